//! The mirror under test: the built `stowage` binary started as `stowage serve --config PATH`
//! with a config written into its own temp dir, on an ephemeral port.
//!
//! [`Stowage::start`] covers the common case (a list of upstreams, the first is the default);
//! [`StowageBuilder`] adds raw TOML to any section and environment variables. The cache lives in
//! `<tempdir>/data` ([`Stowage::data_dir`]); [`Stowage::blob_files`] and [`Stowage::tmp_files`]
//! let tests assert what was (or was not) written. stdout and stderr go to files in the temp
//! dir; on a failing test the tail of the log is printed when the guard drops.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::{files_under, free_port, tail, wait_until, READY_TIMEOUT};

/// One `[[upstreams]]` entry.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    /// The registry host this upstream stands for, e.g. `docker.io`.
    pub host: String,
    /// Where to reach it, e.g. `http://127.0.0.1:5000`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Raw TOML lines appended inside this `[[upstreams]]` table.
    pub extra: String,
}

impl UpstreamSpec {
    pub fn new(host: &str, url: &str) -> UpstreamSpec {
        UpstreamSpec {
            host: host.to_string(),
            url: url.to_string(),
            username: None,
            password: None,
            extra: String::new(),
        }
    }

    pub fn with_credentials(mut self, username: &str, password: &str) -> UpstreamSpec {
        self.username = Some(username.to_string());
        self.password = Some(password.to_string());
        self
    }

    pub fn with_extra(mut self, toml: &str) -> UpstreamSpec {
        self.extra = toml.to_string();
        self
    }
}

/// Options for starting stowage beyond the upstream list.
#[derive(Debug, Clone, Default)]
pub struct StowageBuilder {
    upstreams: Vec<UpstreamSpec>,
    server_extra: String,
    storage_extra: String,
    max_size: Option<String>,
    /// `storage.path` instead of `<tempdir>/data` (e.g. a [`super::tmpfs::Tmpfs`]).
    storage_path: Option<PathBuf>,
    extra_toml: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    /// PEM of the CA that signed the server certificate: the mirror speaks HTTPS, its URL is
    /// `https://localhost:<port>` and the readiness probe trusts only this CA.
    tls_ca: Option<Vec<u8>>,
    /// Client auth is on: the readiness probe takes `401` on `/v2/` as ready.
    auth: bool,
    /// `storage.advertise_url` is the node's own URL (known once its port is).
    advertise: bool,
}

impl StowageBuilder {
    pub fn upstream(mut self, spec: UpstreamSpec) -> Self {
        self.upstreams.push(spec);
        self
    }
    pub fn upstreams(mut self, specs: &[UpstreamSpec]) -> Self {
        self.upstreams.extend_from_slice(specs);
        self
    }
    /// Raw TOML lines placed inside `[server]` (after `listen`).
    pub fn server_toml(mut self, toml: &str) -> Self {
        self.server_extra.push_str(toml);
        self.server_extra.push('\n');
        self
    }
    /// Raw TOML lines placed inside `[storage]` (after `path`/`max_size`).
    pub fn storage_toml(mut self, toml: &str) -> Self {
        self.storage_extra.push_str(toml);
        self.storage_extra.push('\n');
        self
    }
    /// `storage.max_size` (default `"20GiB"`).
    pub fn max_size(mut self, size: &str) -> Self {
        self.max_size = Some(size.to_string());
        self
    }
    /// `storage.path` (default `<tempdir>/data`): a directory the test owns, e.g. a small
    /// [`Tmpfs`](super::tmpfs::Tmpfs) that really fills up. [`Stowage::data_dir`] follows it.
    pub fn storage_path(mut self, path: &Path) -> Self {
        self.storage_path = Some(path.to_owned());
        self
    }
    /// Raw TOML appended at the end of the file (new tables).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
    /// Extra command-line arguments after `serve --config PATH`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }
    /// The config sets `server.tls_cert`/`tls_key` for a certificate signed by `ca_pem`.
    pub fn https(mut self, ca_pem: &[u8]) -> Self {
        self.tls_ca = Some(ca_pem.to_vec());
        self
    }
    /// The config turns on `[auth]`: readiness is `401` on `/v2/`.
    pub fn auth_required(mut self) -> Self {
        self.auth = true;
        self
    }
    /// The config sets `storage.advertise_url` to the node's own URL: other nodes on the same
    /// shared store stream the blobs it fills from it.
    pub fn advertise(mut self) -> Self {
        self.advertise = true;
        self
    }
    pub fn start(self) -> Stowage {
        Stowage::start_from(self)
    }
}

/// A running `stowage serve`. Killed on [`Stowage::stop`] and on drop.
pub struct Stowage {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    options: StowageBuilder,
}

/// A real upstream registry and a stowage in front of it as the `docker.io` upstream.
pub struct MirroredRegistry {
    pub stowage: Stowage,
    pub upstream: super::registry::Registry,
}

impl MirroredRegistry {
    pub fn start() -> MirroredRegistry {
        let upstream = super::registry::Registry::start();
        let stowage = Stowage::for_docker_io(&upstream.url());
        MirroredRegistry { stowage, upstream }
    }
}

impl Stowage {
    /// Starts stowage in front of `upstreams` (the first one is the default) and waits until
    /// `GET /v2/` answers 200.
    pub fn start(upstreams: &[UpstreamSpec]) -> Stowage {
        Stowage::builder().upstreams(upstreams).start()
    }

    /// Starts stowage in front of one upstream at `url`, as `docker.io`.
    pub fn for_docker_io(url: &str) -> Stowage {
        Stowage::start(&[UpstreamSpec::new("docker.io", url)])
    }

    /// Like [`start`](Self::start) with raw TOML appended to the config and extra env vars.
    pub fn start_with(
        upstreams: &[UpstreamSpec],
        extra_toml: &str,
        env: &[(&str, &str)],
    ) -> Stowage {
        let mut b = Stowage::builder()
            .upstreams(upstreams)
            .extra_toml(extra_toml);
        for (k, v) in env {
            b = b.env(k, v);
        }
        b.start()
    }

    pub fn builder() -> StowageBuilder {
        StowageBuilder::default()
    }

    fn start_from(options: StowageBuilder) -> Stowage {
        let dir = tempfile::Builder::new()
            .prefix("stowage-test-")
            .tempdir()
            .expect("temp dir for stowage");
        let mut stowage = Stowage {
            child: None,
            dir,
            port: 0,
            options,
        };
        let mut last_log = String::new();
        for _attempt in 0..3 {
            stowage.port = free_port();
            stowage.spawn();
            match stowage.wait_ready() {
                Ok(()) => return stowage,
                Err(why) => {
                    last_log = format!("{why}\n{}", stowage.log());
                    stowage.kill();
                    // Only a lost port race is worth retrying; anything else is a real failure.
                    if !last_log.to_ascii_lowercase().contains("already in use")
                        && !last_log.to_ascii_lowercase().contains("addrinuse")
                    {
                        break;
                    }
                }
            }
        }
        let config = std::fs::read_to_string(stowage.config_path()).unwrap_or_default();
        panic!(
            "stowage did not become ready\n--- config\n{config}\n--- log (last 60 lines)\n{}",
            tail(&last_log, 60)
        );
    }

    /// Writes the config for the current port and spawns the binary.
    fn spawn(&mut self) {
        std::fs::write(self.config_path(), self.config_toml()).expect("write stowage config");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("open stowage stderr log");
        let out = File::options()
            .create(true)
            .append(true)
            .open(self.stdout_path())
            .expect("open stowage stdout log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
        cmd.arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .args(&self.options.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY");
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn the stowage binary"));
    }

    /// A short-timeout client for the harness's own probes (readiness, pending commits) that
    /// trusts the test CA when the mirror speaks HTTPS.
    fn probe_client(&self) -> reqwest::blocking::Client {
        let mut client = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2));
        if let Some(ca) = &self.options.tls_ca {
            let ca = reqwest::Certificate::from_pem(ca).expect("test CA is PEM");
            client = client
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca);
        }
        client.build().expect("probe client")
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let client = self.probe_client();
        let ready_status: &[u16] = if self.options.auth { &[401] } else { &[200] };
        let url = format!("{}/v2/", self.url());
        let mut exit: Option<ExitStatus> = None;
        let ready = wait_until(READY_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    exit = Some(status);
                    return true;
                }
            }
            matches!(client.get(&url).send(), Ok(r) if ready_status.contains(&r.status().as_u16()))
        });
        match (ready, exit) {
            (_, Some(status)) => Err(format!("stowage exited early: {status}")),
            (true, None) => Ok(()),
            (false, None) => Err(format!(
                "GET {url} did not answer {ready_status:?} within {READY_TIMEOUT:?}"
            )),
        }
    }

    /// The config file as written for the current port.
    pub fn config_toml(&self) -> String {
        let o = &self.options;
        let mut t = String::new();
        t.push_str("[server]\n");
        t.push_str(&format!(
            "listen = {}\n",
            toml_str(&format!("127.0.0.1:{}", self.port))
        ));
        t.push_str(&o.server_extra);
        t.push_str("\n[storage]\n");
        t.push_str(&format!(
            "path = {}\n",
            toml_str(&self.data_dir().display().to_string())
        ));
        t.push_str(&format!(
            "max_size = {}\n",
            toml_str(o.max_size.as_deref().unwrap_or("20GiB"))
        ));
        t.push_str(&o.storage_extra);
        if o.advertise {
            t.push_str(&format!("advertise_url = {}\n", toml_str(&self.url())));
        }
        for u in &o.upstreams {
            t.push_str("\n[[upstreams]]\n");
            t.push_str(&format!("host = {}\n", toml_str(&u.host)));
            t.push_str(&format!("url = {}\n", toml_str(&u.url)));
            if let Some(user) = &u.username {
                t.push_str(&format!("username = {}\n", toml_str(user)));
            }
            if let Some(pass) = &u.password {
                t.push_str(&format!("password = {}\n", toml_str(pass)));
            }
            if !u.extra.is_empty() {
                t.push_str(&u.extra);
                t.push('\n');
            }
        }
        if !o.extra_toml.is_empty() {
            t.push('\n');
            t.push_str(&o.extra_toml);
        }
        t
    }

    /// Waits up to `timeout` until `blob` (of `digest`) is committed, byte for byte, at its
    /// place in the cache; panics if it never is.
    pub fn wait_committed(&self, digest: &str, blob: &[u8], timeout: Duration) {
        let path = self.blob_path(digest);
        assert!(
            wait_until(timeout, || {
                std::fs::read(&path)
                    .is_ok_and(|b| b.len() == blob.len() && super::sha256_digest(&b) == digest)
            }),
            "{digest} was never committed at {}",
            path.display()
        );
    }

    /// `http://127.0.0.1:<port>`, or `https://localhost:<port>` with [`StowageBuilder::https`].
    pub fn url(&self) -> String {
        if self.options.tls_ca.is_some() {
            format!("https://localhost:{}", self.port)
        } else {
            format!("http://{}", self.host_port())
        }
    }

    /// `127.0.0.1:<port>`, as used in `docker://` references.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The test's private temp dir (config, logs, data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `storage.path`: the cache directory (`<tempdir>/data` unless
    /// [`StowageBuilder::storage_path`] chose another).
    pub fn data_dir(&self) -> PathBuf {
        match &self.options.storage_path {
            Some(p) => p.clone(),
            None => self.dir.path().join("data"),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("stowage.toml")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("stowage.stderr.log")
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("stowage.stdout.log")
    }

    /// stderr (the request log) followed by stdout, as written so far.
    pub fn log(&self) -> String {
        let err = std::fs::read_to_string(self.stderr_path()).unwrap_or_default();
        let out = std::fs::read_to_string(self.stdout_path()).unwrap_or_default();
        if out.is_empty() {
            err
        } else {
            format!("{err}\n--- stdout\n{out}")
        }
    }

    /// Every file under `<data>/blobs`.
    pub fn blob_files(&self) -> Vec<PathBuf> {
        files_under(&self.data_dir().join("blobs"))
    }

    /// Every file under `<data>/tmp`.
    pub fn tmp_files(&self) -> Vec<PathBuf> {
        files_under(&self.data_dir().join("tmp"))
    }

    /// Where a committed blob lives: `<data>/blobs/sha256/<2 hex>/<64 hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.data_dir()
            .join("blobs")
            .join("sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The child's pid, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills stowage (SIGKILL) and waits for it. Data and logs stay until drop.
    pub fn stop(&mut self) {
        self.wait_commits();
        self.kill();
    }

    /// Waits (bounded) until no fill is between verification and commit: a client gets its last
    /// byte once its blob verifies, and the commit (fsync, rename, index) follows in the
    /// background, so a SIGKILL right after a pull could otherwise lose the last blob. A fill
    /// still downloading does not count: killing mid-fill stays what those tests do.
    pub fn wait_commits(&self) {
        if self.child.is_none() {
            return;
        }
        let client = self.probe_client();
        let url = format!("{}/metrics", self.url());
        wait_until(Duration::from_secs(30), || match client.get(&url).send() {
            Ok(r) if r.status().is_success() => r.text().is_ok_and(|t| {
                !t.lines().any(|l| {
                    l.strip_prefix("stowage_fill_commits_pending ")
                        .is_some_and(|v| v.trim() != "0")
                })
            }),
            // No metrics here (auth, another listener): nothing to wait for.
            _ => true,
        });
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns the exit status, or
    /// `None` if it had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// Adds a `serve` argument for the next (re)start (e.g. `--offline`).
    pub fn push_arg(&mut self, arg: &str) {
        self.options.args.push(arg.to_string());
    }

    /// Stops the process and starts it again on the same port, config and data dir.
    pub fn restart(&mut self) {
        self.wait_commits();
        self.kill();
        self.spawn();
        if let Err(why) = self.wait_ready() {
            panic!(
                "stowage did not come back after restart: {why}\n{}",
                tail(&self.log(), 60)
            );
        }
    }

    fn kill(&mut self) {
        super::kill_and_reap(&mut self.child);
    }
}

impl Drop for Stowage {
    fn drop(&mut self) {
        self.kill();
        super::print_log_if_panicking("stowage", &self.stderr_path(), &self.log(), 60);
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Runs `stowage <args> --config <stowage's config>`: on the cache directly when the server is
/// stopped, through its admin socket while it runs.
pub fn command(stowage: &Stowage, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(args)
        .arg("--config")
        .arg(stowage.config_path())
        .output()
        .expect("run the stowage binary")
}

/// [`command`], panicking with its output unless it succeeded; returns its stdout.
pub fn command_ok(stowage: &Stowage, args: &[&str]) -> String {
    let o = command(stowage, args);
    assert!(o.status.success(), "stowage {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The `stowage ls` line of an image (`docker.io/library/app:1`), if listed.
pub fn ls_line(stowage: &Stowage, image: &str) -> Option<String> {
    command_ok(stowage, &["ls"])
        .lines()
        .find(|l| l.starts_with(&format!("{image} ")))
        .map(str::to_owned)
}

/// A command's status, stdout and stderr, for failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Pulls an image through `stowage` like a client: manifest by tag (its bytes must hash to the
/// pushed digest), then every blob, checking each blob's bytes. Returns once the blobs are
/// committed too (a client's last byte comes when its blob verifies; the rename follows), so
/// callers can look at the cache directory right away.
pub fn pull_image(stowage: &Stowage, p: &super::images::Pushed) {
    let c = super::http();
    let url = format!("{}/v2/{}/manifests/{}", stowage.url(), p.name, p.tag);
    let r = c
        .get(&url)
        .header("accept", super::manifest_accept())
        .send()
        .expect("GET manifest");
    assert_eq!(r.status().as_u16(), 200, "GET {url}");
    let body = r.bytes().expect("manifest body");
    assert_eq!(
        super::sha256_digest(&body),
        p.digest(),
        "manifest bytes of {url}"
    );
    for b in p.blobs() {
        let url = format!("{}/v2/{}/blobs/{}", stowage.url(), p.name, b.digest);
        let r = c.get(&url).send().expect("GET blob");
        assert_eq!(r.status().as_u16(), 200, "GET {url}");
        let bytes = r.bytes().expect("blob body");
        assert_eq!(
            super::sha256_digest(&bytes),
            b.digest,
            "bytes of {}",
            b.digest
        );
    }
    stowage.wait_commits();
}
