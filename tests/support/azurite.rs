//! A real Azure Blob Storage API for tests: Azurite (npm `azurite`, Microsoft's emulator), its
//! blob service only (`azurite-blob`), as a child process on loopback with its own port, its own
//! workspace (`--location`, on disk) and its own log file, all in one temp dir.
//!
//! [`Azurite::start`] gives the emulator one storage account of its own through
//! `AZURITE_ACCOUNTS` (a random key, so the well-known development key is never used), starts
//! it with telemetry off and in strict mode, waits until it answers, creates a container with
//! one Shared Key-signed REST call (`object_store` has no create-container), and proves the blob
//! API accepts the key (a signed `LIST` through stowage's own object-store client). Killed on
//! drop; a failing test prints the tail of its log (the access log: one line per request, never
//! a key).
//!
//! The binary is `$AZURITE_BLOB_BIN`, else `azurite-blob` on `PATH`, else where `scripts/test`
//! installs it (`${XDG_CACHE_HOME:-~/.cache}/stowage-test/azurite/node_modules/.bin/`); missing
//! is a panic, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use stowage::config::{AzureStoreConfig, Secret, SharedStoreConfig, SharedStoreKind};

use super::{find_binary, free_port, probe_list, retry, spawn_logged, tail, wait_until};

/// Generous: node starting on a busy 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The version `scripts/test` installs (kept in step with it).
pub const VERSION: &str = "3.35.0";

/// A running `azurite-blob` with one account and one container. Killed on drop.
pub struct Azurite {
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    account: String,
    container: String,
    key: String,
}

/// Where the azurite-blob binary is: `$AZURITE_BLOB_BIN`, `azurite-blob` on `PATH`, the
/// `scripts/test` install under `${XDG_CACHE_HOME:-$HOME/.cache}/stowage-test/azurite`.
pub fn azurite_bin() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    let installed = cache.map(|c| c.join("stowage-test/azurite/node_modules/.bin/azurite-blob"));
    find_binary("AZURITE_BLOB_BIN", "azurite-blob", installed)
}

impl Azurite {
    /// Starts the blob service and waits until the container exists and the key is accepted.
    pub fn start() -> Azurite {
        let bin = azurite_bin().unwrap_or_else(|| {
            panic!(
                "azurite-blob not found ($AZURITE_BLOB_BIN, PATH, \
                 ~/.cache/stowage-test/azurite): run ./scripts/test, or `npm install --prefix \
                 ~/.cache/stowage-test/azurite azurite@{VERSION}`"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("stowage-azurite-")
            .tempdir()
            .expect("temp dir for azurite");
        let mut azurite = Azurite {
            log: dir.path().join("azurite.log"),
            dir,
            bin,
            child: None,
            port: free_port(),
            account: "stowagetest".into(),
            container: "stowage".into(),
            key: base64::engine::general_purpose::STANDARD.encode(random_key()),
        };
        azurite.spawn();
        azurite.create_container();
        azurite.wait_blob_api_ready();
        azurite
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>/<account>`: the account URL (path style, as for any emulator).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{}", self.port, self.account)
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn container(&self) -> &str {
        &self.container
    }

    /// The account key (base64), for asserting it never shows.
    pub fn access_key(&self) -> &str {
        &self.key
    }

    /// The typed config for `stowage::store::open`: `backend = "azure"`, keys below `prefix`.
    pub fn shared_store_config(&self, prefix: &str, timeout: Duration) -> SharedStoreConfig {
        SharedStoreConfig {
            kind: SharedStoreKind::Azure(AzureStoreConfig {
                account: self.account.clone(),
                container: self.container.clone(),
                prefix: prefix.into(),
                access_key: Some(Secret::new(self.key.clone())),
                endpoint: Some(self.endpoint()),
            }),
            timeout,
            fill_lease_ttl: Duration::from_secs(120),
        }
    }

    /// Kills the emulator (SIGKILL) and waits for it. Its workspace stays until drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again (after [`stop`](Self::stop)) on the same port and workspace, and waits
    /// until the blob API accepts the key.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_blob_api_ready();
    }

    /// Whether the emulator is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Everything it logged so far (its access log and startup messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The requests it received so far, as `"METHOD /account/container/key?query"`, from its
    /// access log (`… "PUT /path?query HTTP/1.1" 201 …`).
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| {
                let start = l.find('"')? + 1;
                let line = &l[start..];
                let line = &line[..line.find('"')?];
                let line = line.rsplit_once(" HTTP/").map_or(line, |(r, _)| r);
                Some(line.to_string())
            })
            .collect()
    }

    /// The emulator's temp dir (workspace and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let workspace = self.dir.path().join("data");
        std::fs::create_dir_all(&workspace).expect("create azurite workspace");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--blobHost")
            .arg("127.0.0.1")
            .arg("--blobPort")
            .arg(self.port.to_string())
            .arg("--location")
            .arg(&workspace)
            // Strict mode (no `--loose`): a header or parameter Azurite does not implement is an
            // error, not silently ignored. The API version check is skipped so that a newer
            // `object_store` (a newer `x-ms-version`) does not fail against the pinned emulator.
            .args(["--disableTelemetry", "--skipApiVersionCheck"])
            // Its own account: the account name and a random key (never the well-known one).
            .env("AZURITE_ACCOUNTS", format!("{}:{}", self.account, self.key))
            .env("NO_COLOR", "1");
        let what = self.bin.display().to_string();
        self.child = Some(spawn_logged(&mut cmd, &self.log, &what));
    }

    /// `PUT /<account>/<container>?restype=container`, Shared Key-signed, retried until the
    /// emulator answers 201 (or 409: it exists).
    fn create_container(&mut self) {
        let client = super::http_with_timeout(Duration::from_secs(10));
        let path = format!("/{}/{}", self.account, self.container);
        let url = format!("http://127.0.0.1:{}{path}?restype=container", self.port);
        let mut last = String::from("no answer yet");
        let created = wait_until(START_TIMEOUT, || {
            if !self.is_running() {
                return true;
            }
            let date = httpdate::fmt_http_date(SystemTime::now());
            let version = "2021-08-06";
            // Method, eleven empty standard headers, the x-ms-* headers, the resource.
            let to_sign = format!(
                "PUT{}\nx-ms-date:{date}\nx-ms-version:{version}\n/{}{path}\nrestype:container",
                "\n".repeat(11),
                self.account
            );
            let key = base64::engine::general_purpose::STANDARD
                .decode(&self.key)
                .expect("the account key is base64");
            let signature = base64::engine::general_purpose::STANDARD
                .encode(hmac_sha256(&key, to_sign.as_bytes()));
            let sent = client
                .put(&url)
                .header("x-ms-date", &date)
                .header("x-ms-version", version)
                .header("content-length", "0")
                .header(
                    "authorization",
                    format!("SharedKey {}:{signature}", self.account),
                )
                .send();
            match sent {
                Ok(r) if r.status().as_u16() == 201 || r.status().as_u16() == 409 => true,
                Ok(r) => {
                    last = format!("{}: {}", r.status(), r.text().unwrap_or_default());
                    false
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        if !self.is_running() {
            self.fail("azurite-blob exited during startup");
        }
        if !created {
            self.fail(&format!("could not create the container: {last}"));
        }
    }

    /// Polls a signed `LIST` through `stowage::store` until the emulator accepts it.
    fn wait_blob_api_ready(&mut self) {
        let cfg = self.shared_store_config("", Duration::from_secs(10));
        let ready = retry(START_TIMEOUT, || {
            if !self.is_running() {
                return Ok(());
            }
            probe_list(&cfg)
        });
        if !self.is_running() {
            self.fail("azurite-blob exited");
        }
        if let Err(last) = ready {
            self.fail(&format!(
                "the blob API never accepted the key; last error: {last}"
            ));
        }
    }

    fn fail(&mut self, message: &str) -> ! {
        let log = tail(&self.log(), 30);
        self.stop();
        panic!("{message}\n--- azurite log\n{log}");
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
        super::print_log_if_panicking("azurite", &self.log, &self.log(), 20);
    }
}

/// 64 random bytes, the size of an Azure account key.
fn random_key() -> Vec<u8> {
    let mut key = rand::random::<[u8; 32]>().to_vec();
    key.extend_from_slice(&rand::random::<[u8; 32]>());
    key
}

/// HMAC-SHA256, for the one signed request above.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, message).as_ref().to_vec()
}
