//! A Google Cloud Storage API for tests: `gcp-storage-emulator` (PyPI), as a child process on
//! loopback with its own port, its own data directory and its own log file, in one temp dir.
//!
//! stowage reaches it through its `backend = "gcs"` configuration: `storage.gcs.endpoint` names
//! the emulator, and the service-account file is a fake one with `disable_oauth`, which
//! `object_store` honours, so no token is ever asked for. The bucket is the emulator's
//! `--default-bucket`. Killed on drop; a failing test prints the tail of its log.
//!
//! The program is `$GCP_STORAGE_EMULATOR_BIN`, else `gcp-storage-emulator` on `PATH`, else a venv
//! at `${XDG_CACHE_HOME:-~/.cache}/stowage-test/gcs` (`python3 -m venv` there, then `bin/pip
//! install gcp-storage-emulator`); missing is a panic, never a skip. Only the ignored GCS test of
//! tests/store.rs uses it (see there why), so `scripts/test` does not install it.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use stowage::config::{GcsStoreConfig, SharedStoreConfig, SharedStoreKind};

use super::{find_binary, free_port, spawn_logged, tail, wait_until};

/// Generous: Python starting on a busy 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running emulator with one bucket. Killed on drop.
pub struct GcsEmulator {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    bucket: String,
}

/// Where the emulator is: `$GCP_STORAGE_EMULATOR_BIN`, `PATH`, the `scripts/test` venv.
pub fn emulator_bin() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    let installed = cache.map(|c| c.join("stowage-test/gcs/bin/gcp-storage-emulator"));
    find_binary(
        "GCP_STORAGE_EMULATOR_BIN",
        "gcp-storage-emulator",
        installed,
    )
}

impl GcsEmulator {
    /// Starts the emulator with its bucket and waits until it answers.
    pub fn start() -> GcsEmulator {
        let bin = emulator_bin().unwrap_or_else(|| {
            panic!(
                "gcp-storage-emulator not found ($GCP_STORAGE_EMULATOR_BIN, PATH, \
                 ~/.cache/stowage-test/gcs): pip install gcp-storage-emulator"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("stowage-gcs-")
            .tempdir()
            .expect("temp dir for the GCS emulator");
        let port = free_port();
        let log = dir.path().join("gcs.log");
        let bucket = "stowage".to_owned();
        let mut cmd = Command::new(&bin);
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["start", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--default-bucket", &bucket]);
        let child = spawn_logged(&mut cmd, &log, "gcp-storage-emulator");
        let mut emulator = GcsEmulator {
            dir,
            child: Some(child),
            port,
            log,
            bucket,
        };
        let client = super::http_with_timeout(Duration::from_secs(5));
        let url = format!("{}/storage/v1/b/{}", emulator.endpoint(), emulator.bucket);
        let up = wait_until(START_TIMEOUT, || {
            client
                .get(&url)
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
        assert!(
            up,
            "the GCS emulator did not serve its bucket\n{}",
            tail(&emulator.log(), 40)
        );
        emulator.write_service_account();
        emulator
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

    /// A service-account file that points `object_store` at the emulator, without OAuth.
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

    /// Everything it logged so far (one line per request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for GcsEmulator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        super::print_log_if_panicking("gcp-storage-emulator", &self.log, &self.log(), 60);
    }
}
