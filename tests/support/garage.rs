//! A real S3-compatible object store for tests: a Garage cluster (crates.io `garage`, 2.x) of
//! one or more nodes on loopback, each a child process with its own ports (RPC, S3, admin), its
//! own metadata and data dirs, and its own log file, all in one temp dir.
//!
//! [`Garage::start`] writes one config per node (shared random `rpc_secret`, replication factor
//! = number of nodes, at most 3), starts the servers, connects them (`garage node connect`),
//! assigns and applies a layout, waits until every node reports the cluster healthy, creates a
//! bucket and a key with read/write/owner rights on it, and finally proves the S3 API accepts the
//! key (a signed `LIST` through stowage's own object-store client). Everything is killed on
//! drop; a failing test prints the tail of every node's log.
//!
//! The binary is `$GARAGE_BIN`, else `garage` on `PATH`, else `~/.cargo/bin/garage`; missing is
//! a panic (`scripts/test` installs it), never a skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use stowage::config::{S3StoreConfig, Secret, SharedStoreConfig, SharedStoreKind};

use super::{find_binary, free_port, probe_list, retry, spawn_logged, tail, wait_until};

/// Generous: three servers and a layout on a busy 2-core machine.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(120);

/// The S3 region the cluster answers to (`[s3_api] s3_region`).
pub const REGION: &str = "garage";

/// One `garage server`.
struct Node {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    admin_port: u16,
    /// `<64 hex>@127.0.0.1:<rpc_port>`, once known.
    id: String,
}

/// A running Garage cluster with one bucket and one key. Killed on drop.
pub struct Garage {
    dir: tempfile::TempDir,
    bin: PathBuf,
    nodes: Vec<Node>,
    bucket: String,
    key_id: String,
    secret: String,
}

/// Where the garage binary is: `$GARAGE_BIN`, `garage` on `PATH`, `~/.cargo/bin/garage`.
pub fn garage_bin() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    find_binary(
        "GARAGE_BIN",
        "garage",
        cargo_home.map(|c| c.join("bin/garage")),
    )
}

impl Garage {
    /// Starts a cluster of `nodes` (1..=3; the issue's setup is 3) and waits until it serves S3.
    pub fn start(nodes: usize) -> Garage {
        assert!(
            (1..=3).contains(&nodes),
            "a Garage test cluster has 1 to 3 nodes"
        );
        let bin = garage_bin().unwrap_or_else(|| {
            panic!(
                "garage not found ($GARAGE_BIN, PATH, ~/.cargo/bin): run ./scripts/test, or \
                 `cargo install garage --locked --version 2.5.0` (about 11 minutes)"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("stowage-garage-")
            .tempdir()
            .expect("temp dir for garage");
        let rpc_secret = hex::encode(rand::random::<[u8; 32]>());
        let mut garage = Garage {
            dir,
            bin,
            nodes: Vec::new(),
            bucket: "stowage".into(),
            key_id: String::new(),
            secret: String::new(),
        };
        for i in 0..nodes {
            let node = garage.write_node_config(i, nodes, &rpc_secret);
            garage.nodes.push(node);
            garage.spawn_node(i);
        }
        for i in 0..nodes {
            garage.wait_for_node_id(i);
        }
        garage.connect_and_layout();
        garage.wait_healthy();
        garage.create_bucket_and_key();
        garage.wait_s3_ready();
        garage
    }

    /// `http://127.0.0.1:<port>` of node 0's S3 API.
    pub fn s3_endpoint(&self) -> String {
        self.s3_endpoint_of(0)
    }

    /// `http://127.0.0.1:<port>` of node `i`'s S3 API (any node serves the whole bucket).
    pub fn s3_endpoint_of(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    pub fn region(&self) -> &str {
        REGION
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn access_key_id(&self) -> &str {
        &self.key_id
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret
    }

    /// The typed config for `stowage::store::open`: node 0, path-style, keys below `prefix`.
    pub fn shared_store_config(&self, prefix: &str, timeout: Duration) -> SharedStoreConfig {
        SharedStoreConfig {
            kind: SharedStoreKind::S3(S3StoreConfig {
                bucket: self.bucket.clone(),
                endpoint: Some(self.s3_endpoint()),
                region: Some(REGION.into()),
                prefix: prefix.into(),
                access_key_id: Some(self.key_id.clone()),
                secret_access_key: Some(Secret::new(self.secret.clone())),
                path_style: true,
            }),
            timeout,
            fill_lease_ttl: Duration::from_secs(120),
        }
    }

    /// Lines for stowage's `[storage]` table (e.g. `StowageBuilder`'s storage extra):
    /// `backend = "s3"` and the `s3` table inline, so they can go anywhere inside `[storage]`.
    pub fn storage_toml(&self, prefix: &str) -> String {
        format!(
            "backend = \"s3\"\nobject_store_timeout = \"5s\"\n\
             s3 = {{ bucket = \"{}\", endpoint = \"{}\", region = \"{REGION}\", prefix = \"{prefix}\", \
             access_key_id = \"{}\", secret_access_key = \"{}\", path_style = true }}\n",
            self.bucket,
            self.s3_endpoint(),
            self.key_id,
            self.secret
        )
    }

    /// Kills node `i` (SIGKILL) and waits for it. Its directories stay until drop.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every node: the store is gone (connections refused).
    pub fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i);
        }
    }

    /// Starts node `i` again (after [`stop_node`](Self::stop_node) or [`stop_all`](Self::stop_all))
    /// with its config, ports and data, waits until its admin API answers `/health` (with any
    /// status: alone, a restarted node has no quorum), and connects it to every running node
    /// (Garage would reconnect by itself, but only after its retry backoff).
    pub fn restart_node(&mut self, i: usize) {
        self.stop_node(i);
        self.spawn_node(i);
        let client = super::http_with_timeout(Duration::from_secs(5));
        let url = format!("http://127.0.0.1:{}/health", self.nodes[i].admin_port);
        let up = wait_until(CLUSTER_TIMEOUT, || client.get(&url).send().is_ok());
        if !up {
            self.fail(&format!(
                "garage node {i} did not come back ({url} never answered)"
            ));
        }
        for j in 0..self.nodes.len() {
            if j == i || !self.is_running(j) {
                continue;
            }
            let peer = self.nodes[j].id.clone();
            let connected = retry(CLUSTER_TIMEOUT, || self.cli(i, &["node", "connect", &peer]));
            if let Err(last) = connected {
                self.fail(&format!(
                    "restarted node {i} cannot connect to node {j}: {last}"
                ));
            }
        }
    }

    /// Whether node `i` is still running.
    pub fn is_running(&mut self, i: usize) -> bool {
        matches!(
            self.nodes[i].child.as_mut().map(|c| c.try_wait()),
            Some(Ok(None))
        )
    }

    /// Everything node `i` logged so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The S3 requests node `i` received so far, as `"METHOD /bucket/key?query"`, from its log
    /// (Garage logs each one when it arrives).
    pub fn s3_requests(&self, i: usize) -> Vec<String> {
        self.log(i)
            .lines()
            .filter(|l| l.contains("generic_server"))
            .filter_map(|l| {
                let after_key = &l[l.find("(key ")?..];
                Some(after_key[after_key.find(") ")? + 2..].trim().to_string())
            })
            .collect()
    }

    /// The cluster's temp dir (configs, metadata, data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn write_node_config(&self, i: usize, nodes: usize, rpc_secret: &str) -> Node {
        let base = self.dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&base).expect("create garage node dir");
        let (rpc_port, s3_port, admin_port) = (free_port(), free_port(), free_port());
        let config = base.join("garage.toml");
        let text = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "lmdb"
lmdb_map_size = "1G"
replication_factor = {nodes}
compression_level = "none"

rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
            meta = base.join("meta").display(),
            data = base.join("data").display(),
        );
        std::fs::write(&config, text).expect("write garage config");
        Node {
            child: None,
            config,
            log: base.join("garage.log"),
            rpc_port,
            s3_port,
            admin_port,
            id: String::new(),
        }
    }

    fn spawn_node(&mut self, i: usize) {
        let mut cmd = self.command(i);
        cmd.arg("server")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let what = format!("{} server", self.bin.display());
        let child = spawn_logged(&mut cmd, &self.nodes[i].log, &what);
        self.nodes[i].child = Some(child);
    }

    /// `garage -c <node i's config>`, isolated from the caller's `GARAGE_*` environment.
    fn command(&self, i: usize) -> Command {
        let mut cmd = Command::new(&self.bin);
        for var in [
            "GARAGE_RPC_HOST",
            "GARAGE_RPC_SECRET",
            "GARAGE_RPC_SECRET_FILE",
            "GARAGE_ADMIN_TOKEN",
            "GARAGE_ADMIN_TOKEN_FILE",
            "GARAGE_METRICS_TOKEN",
            "GARAGE_METRICS_TOKEN_FILE",
            "GARAGE_ALLOW_WORLD_READABLE_SECRETS",
            "GARAGE_CONFIG_FILE",
            "GARAGE_LOG_TO_SYSLOG",
            "GARAGE_LOG_TO_JOURNALD",
        ] {
            cmd.env_remove(var);
        }
        cmd.arg("-c").arg(&self.nodes[i].config);
        cmd
    }

    /// Runs a CLI command against node `i`; the output if it succeeded.
    fn cli(&self, i: usize, args: &[&str]) -> Result<Output, String> {
        let out = self
            .command(i)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run garage {args:?}: {e}"))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(format!(
                "garage {args:?} failed ({})\n--- stdout\n{}\n--- stderr\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Like [`cli`](Self::cli), retried until it succeeds: right after startup a node may not
    /// yet know its peers or the layout. Panics with the last error at the deadline.
    fn cli_retry(&mut self, i: usize, args: &[&str]) -> Output {
        let output = retry(CLUSTER_TIMEOUT, || {
            self.assert_all_running();
            self.cli(i, args)
        });
        match output {
            Ok(out) => out,
            Err(last) => self.fail(&format!("gave up on garage {args:?}:\n{last}")),
        }
    }

    fn wait_for_node_id(&mut self, i: usize) {
        let out = self.cli_retry(i, &["node", "id", "-q"]);
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !id.contains('@') || id.len() < 65 {
            self.fail(&format!("unexpected `garage node id` output: {id:?}"));
        }
        self.nodes[i].id = id;
    }

    fn connect_and_layout(&mut self) {
        for i in 1..self.nodes.len() {
            let peer = self.nodes[i].id.clone();
            self.cli_retry(0, &["node", "connect", &peer]);
        }
        for i in 0..self.nodes.len() {
            let short = self.nodes[i].id[..64].to_string();
            self.cli_retry(0, &["layout", "assign", "-z", "dc1", "-c", "1G", &short]);
        }
        self.cli_retry(0, &["layout", "apply", "--version", "1"]);
    }

    /// Polls every node's admin `/health` until it says the cluster is fully operational.
    fn wait_healthy(&mut self) {
        let client = super::http_with_timeout(Duration::from_secs(5));
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("http://127.0.0.1:{}/health", n.admin_port))
            .collect();
        let mut last = String::new();
        let healthy = wait_until(CLUSTER_TIMEOUT, || {
            self.assert_all_running();
            urls.iter().all(|url| match client.get(url).send() {
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().unwrap_or_default();
                    last = format!("{url}: {status} {body}");
                    status.is_success() && body.contains("fully operational")
                }
                Err(e) => {
                    last = format!("{url}: {e}");
                    false
                }
            })
        });
        if !healthy {
            self.fail(&format!("cluster never became healthy; last: {last}"));
        }
    }

    fn create_bucket_and_key(&mut self) {
        let bucket = self.bucket.clone();
        self.cli_retry(0, &["bucket", "create", &bucket]);
        let out = self.cli_retry(0, &["key", "create", "stowage-test"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (id, secret) = match parse_key(&text) {
            (Some(id), Some(secret)) => (id, secret),
            (Some(id), None) => {
                let info = self.cli_retry(0, &["key", "info", "--show-secret", &id]);
                let text = String::from_utf8_lossy(&info.stdout).to_string();
                match parse_key(&text) {
                    (_, Some(secret)) => (id, secret),
                    _ => self.fail(&format!("no secret in `garage key info` output:\n{text}")),
                }
            }
            _ => self.fail(&format!("no key id in `garage key create` output:\n{text}")),
        };
        self.cli_retry(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", &id,
            ],
        );
        self.key_id = id;
        self.secret = secret;
    }

    /// Lists the bucket with the new key through stowage's own client until it works: the key's
    /// rights may need a moment to reach every node.
    fn wait_s3_ready(&mut self) {
        let cfg = self.shared_store_config("", Duration::from_secs(5));
        let ready = retry(CLUSTER_TIMEOUT, || {
            self.assert_all_running();
            probe_list(&cfg)
        });
        if let Err(last) = ready {
            self.fail(&format!(
                "S3 API never accepted the key; last error: {last}"
            ));
        }
    }

    fn assert_all_running(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.is_running(i) {
                self.fail(&format!("garage node {i} exited during startup"));
            }
        }
    }

    fn fail(&mut self, message: &str) -> ! {
        let logs: Vec<String> = (0..self.nodes.len())
            .map(|i| format!("--- garage node {i} log\n{}", tail(&self.log(i), 30)))
            .collect();
        self.stop_all();
        panic!("{message}\n{}", logs.join("\n"));
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop_all();
        for i in 0..self.nodes.len() {
            let what = format!("garage node {i}");
            super::print_log_if_panicking(&what, &self.nodes[i].log, &self.log(i), 20);
        }
    }
}

/// `Key ID:` and `Secret key:` from `garage key create` / `key info --show-secret` output.
fn parse_key(text: &str) -> (Option<String>, Option<String>) {
    let field = |name: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim_start_matches(':').trim().to_string())
            .find(|v| !v.is_empty() && !v.starts_with('('))
    };
    (field("Key ID"), field("Secret key"))
}
