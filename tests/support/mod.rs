//! The shared integration-test harness.
//!
//! Every integration test file does `mod support;` and builds its world from these parts:
//! - [`registry`]: a real upstream (Debian's `docker-registry`, distribution 2.8) as a child
//!   process, with its access log parsed so tests can prove what reached the upstream;
//! - [`images`]: synthetic images (random gzip tar layers, valid configs, manifests in all four
//!   formats) built in memory and pushed with the plain v2 push API;
//! - [`stowage`]: the mirror under test, started from the built binary on an ephemeral port;
//! - [`nginx`]: nginx as the fleet's load balancer, from `docs/fleet.md`'s own config block;
//! - [`proxy`]: tinyproxy, a real forward proxy (CONNECT, 407 with Basic auth) for egress tests;
//! - [`scrape`]: stowage's `/metrics` parsed, for exact counter assertions;
//! - [`garage`]: a real S3-compatible object store (a Garage cluster on loopback) for the shared
//!   store of a fleet;
//! - [`azurite`]: the Azure Blob Storage API (Microsoft's Azurite emulator on loopback);
//! - [`tmpfs`]: a small tmpfs (root only) as `storage.path`, for a disk that really fills up;
//! - small helpers below: free ports, polling, hashing, a hermetic `skopeo` wrapper, and a raw
//!   HTTP/1.1 client for paths that `reqwest` would normalise.
//!
//! Every child process is owned by a guard that kills it on drop (also while a test panics) and
//! prints the tail of its log when the test is failing.
#![allow(dead_code)]

pub mod azurite;
pub mod browser;
pub mod clients;
pub mod fake_upstream;
pub mod garage;
pub mod gcs;
pub mod images;
pub mod nginx;
pub mod proxy;
pub mod reader;
pub mod registry;
pub mod scrape;
pub mod stowage;
pub mod tmpfs;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// How long a child process gets to answer its readiness probe. The test machine is small and
/// busy, so this is generous on purpose; it is an upper bound, never a timing assertion.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A helper binary the tests start: `$<env_var>` when set, else `name` on `PATH`, else the
/// `installed` path (where `scripts/test` puts it) if it is a file.
pub fn find_binary(env_var: &str, name: &str, installed: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(found) = std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|c| c.is_file())
        {
            return Some(found);
        }
    }
    installed.filter(|p| p.is_file())
}

/// A port that was free a moment ago: bind `127.0.0.1:0`, read the port, drop the listener.
/// Never the same port twice in one test process: the kernel may hand a just-released port out
/// again, and two servers of one test (a Garage node's S3 and admin API, say) must not be
/// given the same one before either has bound it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
        let port = listener
            .local_addr()
            .expect("local_addr of probe listener")
            .port();
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !handed.contains(&port) {
            handed.push(port);
            return port;
        }
    }
}

/// Polls `condition` every 50–200 ms until it returns true or `timeout` passes. Returns whether it
/// became true. Use it for readiness and for "eventually written" checks, never to measure time.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Retries `attempt` (with [`wait_until`]'s pauses) until it succeeds or `timeout` passes:
/// its value, or the last error.
pub fn retry<T>(
    timeout: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let mut last = Err("never tried".to_string());
    wait_until(timeout, || {
        last = attempt();
        last.is_ok()
    });
    last
}

/// Kills and reaps `child`, if there still is one.
pub fn kill_and_reap(child: &mut Option<std::process::Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// While a test panics (a guard's drop), prints the last `lines` lines of `log`, the log of
/// `what` kept at `path`.
pub fn print_log_if_panicking(what: &str, path: &Path, log: &str, lines: usize) {
    if std::thread::panicking() {
        eprintln!(
            "--- {what} log ({}), last {lines} lines:\n{}",
            path.display(),
            tail(log, lines)
        );
    }
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `sha256:<hex>` of `bytes`, the OCI digest string.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// Every regular file under `dir`, recursively, sorted. A missing directory has no files.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(_) => out.push(path),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `GET url`: panics unless it answers 200 with a JSON body, which it returns.
pub fn get_json(url: &str) -> serde_json::Value {
    let resp = http()
        .get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status().as_u16(), 200, "GET {url}");
    resp.json()
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// One `list` through `stowage::store` on a runtime of its own (in a thread, so that callers
/// inside a tokio runtime can use the harness too): the readiness probe of the object-store
/// harnesses (Garage, Azurite).
pub fn probe_list(cfg: &::stowage::config::SharedStoreConfig) -> Result<(), String> {
    let cfg = cfg.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let store = ::stowage::store::open(&cfg).map_err(|e| e.to_string())?;
            store.list("").await.map(|_| ()).map_err(|e| e.to_string())
        })
    })
    .join()
    .unwrap_or_else(|_| Err("probe thread panicked".into()))
}

/// Spawns `cmd` with no stdin and its stdout and stderr appended to `log`; panics naming
/// `what` if it cannot.
pub fn spawn_logged(
    cmd: &mut std::process::Command,
    log: &Path,
    what: &str,
) -> std::process::Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open the log of {what}: {e}"));
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"))
}

/// A blocking HTTP client for tests: no proxy from the environment, generous timeout, no
/// automatic redirects (tests want to see exactly what the server answered).
pub fn http() -> reqwest::blocking::Client {
    http_with_timeout(Duration::from_secs(120))
}

/// [`http`] with another timeout (blob transfers want a longer one).
pub fn http_with_timeout(timeout: Duration) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .expect("build reqwest blocking client")
}

/// The `Accept` value a modern client sends for manifests: all four schema-2/OCI types.
pub fn manifest_accept() -> String {
    images::ALL_MANIFEST_TYPES.join(", ")
}

/// Runs `skopeo` hermetically: the machine's `/etc/containers` and `~/.config/containers` cannot
/// influence it. The wrapper
/// - passes an empty registries.conf with the global `--registries-conf` flag (hidden in
///   skopeo 1.9's help, and the only override it honours: it ignores
///   `CONTAINERS_REGISTRIES_CONF`) and an empty `--registries.d`,
/// - passes its own permissive `--policy` and an empty auth file,
/// - sets `HOME` / `XDG_RUNTIME_DIR` / `XDG_CONFIG_HOME` to a private temp dir,
/// - adds `--override-os linux --override-arch amd64`,
/// - disables TLS verification for the subcommand (`--src-tls-verify=false` and
///   `--dest-tls-verify=false` for `copy`/`sync`, `--tls-verify=false` for `inspect`/`list-tags`).
///
/// `args` starts with the subcommand, e.g. `["copy", "--all", "docker://…", "dir:/…"]`.
pub fn skopeo(args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("temp dir for skopeo config");
    let registries_conf = home.path().join("registries.conf");
    let registries_d = home.path().join("registries.d");
    let policy = home.path().join("policy.json");
    let auth = home.path().join("auth.json");
    let tmp = home.path().join("tmp");
    std::fs::write(&registries_conf, "").expect("write empty registries.conf");
    std::fs::create_dir_all(&registries_d).expect("create registries.d");
    std::fs::create_dir_all(&tmp).expect("create skopeo tmpdir");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .expect("write policy.json");
    std::fs::write(&auth, r#"{"auths":{}}"#).expect("write auth.json");

    let (sub, rest) = args.split_first().expect("skopeo needs a subcommand");
    let mut cmd = Command::new("skopeo");
    cmd.env("HOME", home.path())
        .env("XDG_RUNTIME_DIR", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .env("REGISTRY_AUTH_FILE", &auth)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .arg("--registries-conf")
        .arg(&registries_conf)
        .arg("--policy")
        .arg(&policy)
        .arg("--registries.d")
        .arg(&registries_d)
        .arg("--tmpdir")
        .arg(&tmp)
        .args(["--override-os", "linux", "--override-arch", "amd64"])
        .arg(sub);
    match *sub {
        "copy" | "sync" => {
            cmd.args(["--src-tls-verify=false", "--dest-tls-verify=false"]);
        }
        "inspect" | "list-tags" | "delete" => {
            cmd.arg("--tls-verify=false");
        }
        _ => {}
    }
    cmd.args(rest);
    let output = cmd.output().expect("run skopeo (is it installed?)");
    drop(home);
    output
}

/// Like [`skopeo`], but panics with skopeo's stdout/stderr (and `context`) unless it succeeded.
pub fn skopeo_ok(args: &[&str], context: &str) -> Output {
    let output = skopeo(args);
    assert!(
        output.status.success(),
        "skopeo {args:?} failed ({status}) {context}\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        status = output.status,
    );
    output
}

/// A response through [`http`], read in full.
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    /// Reads `resp` in full (a body that breaks off reads as empty).
    pub fn read(resp: reqwest::blocking::Response) -> Resp {
        Resp {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.bytes().map(|b| b.to_vec()).unwrap_or_default(),
        }
    }

    /// The header `name` as text, `""` when absent.
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    /// `Docker-Content-Digest`, `""` when absent.
    pub fn digest(&self) -> String {
        self.header("docker-content-digest")
    }
}

/// `method url` with one `Accept` header per entry of `accept`, read in full.
pub fn request(method: reqwest::Method, url: &str, accept: &[&str]) -> Resp {
    let mut req = http().request(method.clone(), url);
    for a in accept {
        req = req.header("Accept", *a);
    }
    Resp::read(req.send().unwrap_or_else(|e| panic!("{method} {url}: {e}")))
}

/// A response read off a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one HTTP/1.1 request with a verbatim request target (no normalisation of `..`,
/// `%2e%2e` or anything else) and reads the whole response (`Connection: close`).
/// For `HEAD` the body is whatever the server sent before closing, which should be nothing.
pub fn raw_request(
    port: u16,
    method: &str,
    target: &str,
    extra_headers: &[(&str, &str)],
) -> RawResponse {
    let raw = raw_exchange(port, method, target, extra_headers);
    parse_raw_response(&raw, method == "HEAD").unwrap_or_else(|e| {
        panic!(
            "cannot parse raw response to {method} {target}: {e}\n{}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// Writes one raw request and reads what comes back until the server closes.
fn raw_exchange(port: u16, method: &str, target: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect for raw request");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set read timeout");
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nUser-Agent: stowage-tests\r\n"
    );
    for (k, v) in extra_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let has_body_header = extra_headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    if !has_body_header && matches!(method, "PUT" | "POST" | "PATCH") {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).expect("write raw request");
    let mut raw = Vec::new();
    // A server may reset instead of closing cleanly after answering; keep what arrived.
    let _ = stream.read_to_end(&mut raw);
    raw
}

fn parse_raw_response(raw: &[u8], head: bool) -> Result<RawResponse, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head_text = std::str::from_utf8(&raw[..end]).map_err(|e| e.to_string())?;
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .ok_or("no status code")?
        .parse()
        .map_err(|e| format!("bad status code: {e}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let body = if head || !chunked {
        rest.to_vec()
    } else {
        decode_chunked(rest)?
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

/// Parses an OCI error body and returns its error codes, or panics with `context`.
pub fn error_codes(body: &[u8], context: &str) -> Vec<String> {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{context}: error body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    let errors = value
        .get("errors")
        .and_then(|e| e.as_array())
        .unwrap_or_else(|| panic!("{context}: body has no \"errors\" array: {value}"));
    assert!(
        !errors.is_empty(),
        "{context}: \"errors\" array is empty: {value}"
    );
    errors
        .iter()
        .map(|e| {
            e.get("code")
                .and_then(|c| c.as_str())
                .unwrap_or_else(|| {
                    panic!("{context}: error entry without string \"code\": {value}")
                })
                .to_string()
        })
        .collect()
}

/// Writes an htpasswd file of bcrypt entries (cost 4) into `dir` and returns its path; replaced
/// atomically, so a server re-reading it on SIGHUP never sees half a file.
pub fn write_htpasswd(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("htpasswd");
    let mut text = String::from("# made by the test\n");
    for (user, password) in users {
        let hash = bcrypt::hash(password, 4).expect("bcrypt");
        text.push_str(&format!("{user}:{hash}\n"));
    }
    std::fs::write(dir.join("htpasswd.new"), text).expect("write htpasswd");
    std::fs::rename(dir.join("htpasswd.new"), &path).expect("rename htpasswd");
    path
}
