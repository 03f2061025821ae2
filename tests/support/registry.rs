//! A real upstream registry for tests: Debian's `docker-registry` (distribution 2.8) as a child
//! process with its own temp dir, ephemeral port and access log.
//!
//! distribution writes one combined-log-format line per request, e.g.
//! `127.0.0.1 - - [23/Nov/2026:10:58:11 +0000] "GET /v2/library/x/blobs/sha256:… HTTP/1.1" 200 2 "" "ua"`,
//! interleaved with logrus lines. [`Registry::access_log`] parses the former, so a test can
//! count exactly which requests reached the upstream. The line is written after the response,
//! so call [`Registry::sync_log`] (done by the counting helpers) before trusting a count.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::images::{Pushed, TestImage};
use super::{free_port, http, spawn_logged, tail, wait_until, READY_TIMEOUT};

/// Marker query used by [`Registry::sync_log`]; lines carrying it are excluded from counts.
const MARKER: &str = "stowage-test-log-marker";

/// One parsed access-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLine {
    pub method: String,
    /// The request target as sent, including any query string.
    pub uri: String,
    pub status: u16,
}

/// A running `docker-registry serve`. Killed on [`Registry::stop`] and on drop.
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    log_path: PathBuf,
    markers: AtomicU64,
    /// Serving HTTPS (certificate and key files), see [`Registry::start_tls_beside`].
    tls: Option<(PathBuf, PathBuf)>,
}

impl Registry {
    /// Starts a fresh, empty registry and waits until `GET /v2/` answers 200.
    /// Retries with another port if the chosen one was taken in the meantime.
    pub fn start() -> Registry {
        Registry::launch(None, None)
    }

    /// A second registry serving `beside`'s storage over HTTPS with the PEM files `cert` and
    /// `key`: images pushed to `beside` are pulled from this one.
    pub fn start_tls_beside(beside: &Registry, cert: &Path, key: &Path) -> Registry {
        Registry::launch(
            Some(beside.dir.path().join("data")),
            Some((cert.to_owned(), key.to_owned())),
        )
    }

    fn launch(data: Option<PathBuf>, tls: Option<(PathBuf, PathBuf)>) -> Registry {
        let mut dir = tempfile::Builder::new()
            .prefix("stowage-upstream-")
            .tempdir()
            .expect("temp dir for docker-registry");
        let data = data.unwrap_or_else(|| dir.path().join("data"));
        let log_path = dir.path().join("registry.log");
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config_yaml(&data, port, tls.as_ref()))
                .expect("write docker-registry config");
            let mut cmd = Command::new("docker-registry");
            cmd.arg("serve").arg(&config_path);
            let what = "docker-registry (is the docker-registry package installed?)";
            let child = spawn_logged(&mut cmd, &log_path, what);
            let mut registry = Registry {
                child: Some(child),
                dir,
                port,
                log_path: log_path.clone(),
                markers: AtomicU64::new(0),
                tls: tls.clone(),
            };
            if registry.wait_ready() {
                return registry;
            }
            last_log = registry.log();
            registry.kill();
            // Take the dir back for the next attempt (Drop only kills the child).
            dir = std::mem::replace(
                &mut registry.dir,
                tempfile::tempdir().expect("placeholder temp dir"),
            );
        }
        panic!(
            "docker-registry did not become ready within {READY_TIMEOUT:?} (3 attempts)\n--- log\n{}",
            tail(&last_log, 40)
        );
    }

    /// Polls `/v2/` until 200; false if the child exits or the timeout passes.
    /// The harness's own client for this registry (a TLS one's test certificate accepted).
    fn client(&self, timeout: Duration) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(self.tls.is_some())
            .timeout(timeout)
            .build()
            .expect("registry probe client")
    }

    fn wait_ready(&mut self) -> bool {
        let client = self.client(Duration::from_secs(2));
        let url = format!("{}/v2/", self.url());
        let mut exited = false;
        let ready = wait_until(READY_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    return true;
                }
            }
            matches!(client.get(&url).send(), Ok(r) if r.status().as_u16() == 200)
        });
        ready && !exited
    }

    /// Pushes `image` as `name:tag` (blobs, child manifests, then the tagged manifest).
    pub fn push(&self, name: &str, tag: &str, image: impl Into<TestImage>) -> Pushed {
        super::images::push(&self.url(), name, tag, image)
    }

    /// `http://127.0.0.1:<port>` (`https://` for [`Registry::start_tls_beside`])
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.host_port())
    }

    /// `127.0.0.1:<port>`, as used in `docker://` references.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Everything the registry printed so far (logrus lines and access lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Makes sure every request answered before this call has its access line in the log:
    /// sends a uniquely-marked `GET /v2/?<marker>` and waits until its line appears.
    /// Does nothing if the registry is stopped.
    pub fn sync_log(&self) {
        if self.child.is_none() {
            return;
        }
        let n = self.markers.fetch_add(1, Ordering::SeqCst);
        let marker = format!("{MARKER}={n}");
        let url = format!("{}/v2/?{marker}", self.url());
        let resp = if self.tls.is_some() {
            self.client(Duration::from_secs(30)).get(&url).send()
        } else {
            http().get(&url).send()
        };
        assert!(
            matches!(&resp, Ok(r) if r.status().is_success()),
            "upstream registry did not answer the log marker request: {resp:?}"
        );
        let needle = format!("/v2/?{marker} ");
        let seen = wait_until(READY_TIMEOUT, || self.log().contains(&needle));
        assert!(
            seen,
            "marker {marker} never appeared in the registry access log\n{}",
            tail(&self.log(), 20)
        );
    }

    /// All access-log lines so far (after [`sync_log`](Self::sync_log)), marker requests excluded.
    pub fn access_log(&self) -> Vec<AccessLine> {
        self.sync_log();
        self.log()
            .lines()
            .filter_map(parse_access_line)
            .filter(|l| !l.uri.contains(MARKER))
            .collect()
    }

    /// The raw access-log lines as `"METHOD URI"` strings (marker requests excluded).
    pub fn access_log_lines(&self) -> Vec<String> {
        self.access_log()
            .into_iter()
            .map(|l| format!("{} {}", l.method, l.uri))
            .collect()
    }

    /// How many requests with this method had a URI containing `path_substring`.
    pub fn count_requests(&self, method: &str, path_substring: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|l| l.method == method && l.uri.contains(path_substring))
            .count()
    }

    /// How many `GET …/blobs/…` requests reached the registry (any repository).
    pub fn blob_gets(&self) -> usize {
        self.count_requests("GET", "/blobs/sha256:")
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the registry (SIGKILL) and waits for it. The temp dir and log stay until drop.
    pub fn stop(&mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        super::kill_and_reap(&mut self.child);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // logrus repeats every access line as `msg="response completed"`; skip those.
            let full = self.log();
            let log: Vec<&str> = full
                .lines()
                .filter(|l| !l.contains("msg=\"response completed\""))
                .collect();
            eprintln!(
                "--- upstream docker-registry log ({}), last 30 lines:\n{}",
                self.log_path.display(),
                tail(&log.join("\n"), 30)
            );
        }
    }
}

fn config_yaml(data: &Path, port: u16, tls: Option<&(PathBuf, PathBuf)>) -> String {
    let tls = tls
        .map(|(cert, key)| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            )
        })
        .unwrap_or_default();
    format!(
        "version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: false\n\
         storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: stowage-tests-secret\n{tls}",
        data = data.display()
    )
}

/// Parses `IP - - [date] "METHOD URI PROTO" STATUS SIZE "ref" "ua"`; `None` for other lines.
pub fn parse_access_line(line: &str) -> Option<AccessLine> {
    let bracket = line.find("] \"")?;
    if !line.starts_with(|c: char| c.is_ascii_digit() || c == '[' || c == ':') {
        return None;
    }
    let rest = &line[bracket + 3..];
    let close = rest.find('"')?;
    let mut request = rest[..close].split(' ');
    let method = request.next()?.to_string();
    let uri = request.next()?.to_string();
    let status = rest[close + 1..].split_whitespace().next()?.parse().ok()?;
    Some(AccessLine {
        method,
        uri,
        status,
    })
}
