//! Real container clients driven against stowage: `dockerd` (Debian's docker.io 20.10),
//! `containerd` 1.6 with `ctr`, `podman` 4.3 and `skopeo` 1.9.
//!
//! Every daemon gets its own temp dir holding its config, data root, state, socket, pid file and
//! log, and is owned by a guard that stops it on drop (SIGTERM, then SIGKILL), also while a test
//! panics — then the tail of its log is printed. Client commands run with a generous timeout and
//! are killed when it passes, so a hung pull fails the test instead of hanging CI.
//!
//! Each client is configured hermetically: nothing under `/etc/docker`, `/etc/containerd` or
//! `/etc/containers` is read for the mirror settings; the config snippets written here are the
//! ones the README shows.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::images::{Image, Layer};
use super::stowage::Stowage;
use super::{files_under, spawn_logged, tail, wait_until};

/// Upper bound for one client command (a pull of the ≥128 MiB image on a busy 2-core machine
/// included). Never a timing assertion: only a guard against hangs.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);

/// Upper bound for a daemon to answer its first request.
pub const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Removes the proxy variables from `cmd`'s environment: every client here talks to 127.0.0.1.
fn without_proxy(cmd: &mut Command) -> &mut Command {
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd` with stdout/stderr captured in temp files; kills it if it runs past `timeout`
/// (the returned status then is the kill's). Proxy variables are removed from its environment.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("temp dir for command output");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let out = File::create(&out_path).expect("create stdout file");
    let err = File::create(&err_path).expect("create stderr file");
    let mut child = without_proxy(cmd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut status: Option<ExitStatus> = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let mut stderr = std::fs::read(&err_path).unwrap_or_default();
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            stderr.extend_from_slice(
                format!("\n[test harness: killed after {timeout:?} without exiting]\n").as_bytes(),
            );
            child.wait().expect("wait for killed command")
        }
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr,
    }
}

/// Panics with the command, its output and `context` unless `output` is a success.
pub fn expect_success(output: Output, what: &str, context: &str) -> Output {
    assert!(
        output.status.success(),
        "{what} failed ({}) {context}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        tail(&String::from_utf8_lossy(&output.stdout), 40),
        tail(&String::from_utf8_lossy(&output.stderr), 40),
    );
    output
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child.
fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let exited = wait_until(grace, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Kills the process whose pid is in `pid_file` if it is still running (a daemon's own child
/// that outlived it, e.g. dockerd's managed containerd after a SIGKILL).
fn kill_pid_file(pid_file: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return;
    };
    if Path::new(&format!("/proc/{pid}")).exists() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
}

/// Adds `<flag> <dir>/<file>` to `cmd` for each `(flag, file)` of `flags`.
fn with_paths<'c>(cmd: &'c mut Command, dir: &Path, flags: &[(&str, &str)]) -> &'c mut Command {
    for (flag, file) in flags {
        cmd.arg(flag).arg(dir.join(file));
    }
    cmd
}

fn daemon_dir(prefix: &str) -> tempfile::TempDir {
    // Short paths: unix socket paths are limited to 108 bytes.
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("temp dir for daemon")
}

/// The one guard every client daemon runs under: its temp dir (config, data, socket, log
/// `<name>.log`), the process, stopped on drop (SIGTERM, `grace`, SIGKILL; then the process in
/// `orphan_pid_file`, if any, is killed), and the tail of its log printed if the test panics.
pub struct Daemon {
    name: &'static str,
    child: Option<Child>,
    dir: tempfile::TempDir,
    grace: Duration,
    orphan_pid_file: Option<PathBuf>,
}

impl Daemon {
    /// Spawns `cmd` (written against `dir`) with its output appended to `<dir>/<name>.log`,
    /// then waits until `ready` (a client command against it) succeeds; panics with the log if
    /// the daemon exits or is not ready within [`DAEMON_READY_TIMEOUT`].
    fn start(
        name: &'static str,
        dir: tempfile::TempDir,
        mut cmd: Command,
        grace: Duration,
        ready: impl Fn(&Daemon) -> bool,
    ) -> Daemon {
        let log = dir.path().join(format!("{name}.log"));
        let child = spawn_logged(without_proxy(&mut cmd), &log, name);
        let mut daemon = Daemon {
            name,
            child: Some(child),
            dir,
            grace,
            orphan_pid_file: None,
        };
        let mut exited = None;
        let up = wait_until(DAEMON_READY_TIMEOUT, || {
            if let Some(Ok(Some(status))) = daemon.child.as_mut().map(|c| c.try_wait()) {
                exited = Some(status);
                return true;
            }
            ready(&daemon)
        });
        assert!(
            up && exited.is_none(),
            "{name} did not come up (exit: {exited:?})\n--- log\n{}",
            tail(&daemon.log(), 60)
        );
        daemon
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.name))
    }

    /// The stdout of `out` of client command `what`, panicking with its output and this
    /// daemon's log unless it succeeded.
    fn stdout_ok(&self, what: &str, args: &[&str], out: Output) -> String {
        if !out.status.success() {
            panic!(
                "{what} {args:?} failed ({})\n--- stdout\n{}\n--- stderr\n{}\n--- {} log\n{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stdout), 30),
                tail(&String::from_utf8_lossy(&out.stderr), 30),
                self.name,
                tail(&self.log(), 40)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, self.grace);
        }
        if let Some(pid_file) = &self.orphan_pid_file {
            kill_pid_file(pid_file);
        }
        super::print_log_if_panicking(self.name, &self.log_path(), &self.log(), 40);
    }
}

// ---------------------------------------------------------------------------------------------
// dockerd
// ---------------------------------------------------------------------------------------------

/// The `daemon.json` that points dockerd at stowage: the mirror as an `http://` root URL (dockerd
/// 20.10 rejects any path) and the same host:port as an insecure registry.
pub fn docker_daemon_json(mirror: &Stowage) -> String {
    format!(
        "{{\n  \"registry-mirrors\": [\"{url}\"],\n  \"insecure-registries\": [\"{hp}\"]\n}}\n",
        url = mirror.url(),
        hp = mirror.host_port()
    )
}

/// `docker` (Debian's CLI) against the dockerd whose files are in `dir`.
fn docker_at(dir: &Path, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new("/usr/bin/docker");
    cmd.env(
        "DOCKER_HOST",
        format!("unix://{}", dir.join("docker.sock").display()),
    )
    .env("DOCKER_CONFIG", dir.join("cli"))
    .args(args);
    run(&mut cmd, timeout)
}

/// A private `dockerd` (vfs storage, no networking setup) with a `daemon.json` of the test's
/// choosing. Stopped on drop.
pub struct Dockerd {
    daemon: Daemon,
}

impl Dockerd {
    /// Starts dockerd with `daemon_json` as its config file and waits until `docker version`
    /// answers.
    pub fn start(daemon_json: &str) -> Dockerd {
        let dir = daemon_dir("stw-dockerd-");
        let d = dir.path();
        std::fs::write(d.join("daemon.json"), daemon_json).expect("write daemon.json");
        std::fs::create_dir_all(d.join("cli")).expect("create docker cli config dir");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--host")
            .arg(format!("unix://{}", d.join("docker.sock").display()));
        with_paths(
            &mut cmd,
            d,
            &[
                ("--config-file", "daemon.json"),
                ("--data-root", "data"),
                ("--exec-root", "exec"),
                ("--pidfile", "dockerd.pid"),
            ],
        )
        .args([
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--storage-driver=vfs",
        ]);
        let mut daemon = Daemon::start("dockerd", dir, cmd, Duration::from_secs(60), |d| {
            docker_at(d.dir(), &["version"], Duration::from_secs(20))
                .status
                .success()
        });
        // dockerd starts its own containerd; it stops it on SIGTERM, but not after a SIGKILL.
        daemon.orphan_pid_file = Some(daemon.dir().join("exec/containerd/containerd.pid"));
        Dockerd { daemon }
    }

    /// `--data-root`: where vfs unpacks layers (`vfs/dir/<id>/...`).
    pub fn data_root(&self) -> PathBuf {
        self.daemon.dir().join("data")
    }

    /// Runs Debian's docker CLI (`/usr/bin/docker`, not any other `docker` on `PATH`) against
    /// this daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        docker_at(self.daemon.dir(), args, CLIENT_TIMEOUT)
    }

    /// Like [`docker`](Self::docker), panicking with the output and dockerd's log on failure.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        self.daemon.stdout_ok("docker", args, self.docker(args))
    }
}

/// `image inspect --format <fields joined by |> <reference>` run by `client` (`docker_ok`,
/// `podman_ok`): the fields' values, in order.
pub fn image_inspect(
    client: impl Fn(&[&str]) -> String,
    fields: &[&str],
    reference: &str,
    what: &str,
) -> Vec<String> {
    let format = fields.join("|");
    let out = client(&["image", "inspect", "--format", &format, reference]);
    let parts: Vec<String> = out
        .trim()
        .splitn(fields.len(), '|')
        .map(str::to_string)
        .collect();
    assert_eq!(
        parts.len(),
        fields.len(),
        "{what}: unexpected inspect output: {out}"
    );
    parts
}

/// `docker image inspect` fields: `(Id, Architecture, RootFS.Layers, RepoDigests)`.
pub fn docker_inspect(
    docker: &Dockerd,
    reference: &str,
) -> (String, String, Vec<String>, Vec<String>) {
    let fields = [
        "{{.Id}}",
        "{{.Architecture}}",
        "{{json .RootFS.Layers}}",
        "{{json .RepoDigests}}",
    ];
    let parts = image_inspect(|args| docker.docker_ok(args), &fields, reference, "docker");
    (
        parts[0].to_string(),
        parts[1].to_string(),
        serde_json::from_str(&parts[2]).expect("RootFS.Layers is a JSON list"),
        serde_json::from_str::<Option<Vec<String>>>(&parts[3])
            .expect("RepoDigests is a JSON list")
            .unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------------------------
// containerd + ctr
// ---------------------------------------------------------------------------------------------

/// `hosts.toml` for one registry host: `server` is the real registry (tried last) and stowage
/// the mirror, allowed to resolve tags and pull.
pub fn containerd_hosts_toml(server: &str, mirror: &Stowage) -> String {
    format!(
        "server = \"{server}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        mirror.url()
    )
}

/// `hosts.toml` whose mirror URL carries its own API root, `<stowage>/v2/<prefix>`, used
/// verbatim thanks to `override_path = true` (stowage then routes by the path prefix).
pub fn containerd_override_path_hosts_toml(server: &str, mirror: &Stowage, prefix: &str) -> String {
    format!(
        "server = \"{server}\"\n\n[host.\"{}/v2/{prefix}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n",
        mirror.url()
    )
}

/// `ctr --address <sock> <args>` against the containerd whose files are in `dir`.
fn ctr_at(dir: &Path, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address")
        .arg(dir.join("containerd.sock"))
        .args(args);
    run(&mut cmd, timeout)
}

/// A private `containerd` (own root, state, sockets; CRI plugin disabled). Stopped on drop.
pub struct Containerd {
    daemon: Daemon,
}

impl Containerd {
    pub fn start() -> Containerd {
        let dir = daemon_dir("stw-ctrd-");
        let d = dir.path();
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = \"{sock}\"\n\n\
             [ttrpc]\n  address = \"{ttrpc}\"\n\n\
             [debug]\n  address = \"\"\n  level = \"info\"\n\n\
             [plugins]\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = \"{opt}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            ttrpc = d.join("containerd.sock.ttrpc").display(),
            opt = d.join("opt").display(),
        );
        std::fs::write(d.join("config.toml"), config).expect("write containerd config");
        std::fs::create_dir_all(d.join("hosts")).expect("create hosts dir");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(d.join("config.toml"));
        let daemon = Daemon::start("containerd", dir, cmd, Duration::from_secs(30), |d| {
            ctr_at(d.dir(), &["version"], Duration::from_secs(20))
                .status
                .success()
        });
        Containerd { daemon }
    }

    /// containerd's `root` (content store, native snapshots).
    pub fn root(&self) -> PathBuf {
        self.daemon.dir().join("root")
    }

    /// The `--hosts-dir` passed to `ctr images pull`.
    pub fn hosts_dir(&self) -> PathBuf {
        self.daemon.dir().join("hosts")
    }

    /// Writes `<hosts-dir>/<registry>/hosts.toml`.
    pub fn write_hosts_toml(&self, registry: &str, toml: &str) {
        let dir = self.hosts_dir().join(registry);
        std::fs::create_dir_all(&dir).expect("create hosts.toml dir");
        std::fs::write(dir.join("hosts.toml"), toml).expect("write hosts.toml");
    }

    /// `ctr --address <sock> <args>`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        ctr_at(self.daemon.dir(), args, CLIENT_TIMEOUT)
    }

    /// Like [`ctr`](Self::ctr), panicking with the output and containerd's log on failure.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        self.daemon.stdout_ok("ctr", args, self.ctr(args))
    }

    /// `ctr images pull --hosts-dir <hosts> --snapshotter native <reference>` (pulls the host's
    /// platform and unpacks it). Returns ctr's stdout.
    pub fn pull(&self, reference: &str) -> String {
        let hosts = self.hosts_dir().display().to_string();
        self.ctr_ok(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
            reference,
        ])
    }
}

// ---------------------------------------------------------------------------------------------
// podman and skopeo (containers/image): registries.conf
// ---------------------------------------------------------------------------------------------

/// `registries.conf` for docker.io mirrored by stowage (root location, no `ns`), plus, for each
/// `(prefix, host)` in `prefixed`, a registry whose mirror is stowage with the host as a path
/// prefix (`127.0.0.1:<port>/ghcr.io`). Every mirror is `insecure = true` (stowage speaks http).
pub fn registries_conf(mirror: &Stowage, prefixed: &[&str]) -> String {
    let mut conf = String::from(
        "unqualified-search-registries = []\n\n\
         [[registry]]\n\
         prefix = \"docker.io\"\n\
         location = \"registry-1.docker.io\"\n\n",
    );
    conf.push_str(&format!(
        "[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
        mirror.host_port()
    ));
    for host in prefixed {
        conf.push_str(&format!(
            "\n[[registry]]\nprefix = \"{host}\"\nlocation = \"{host}\"\n\n\
             [[registry.mirror]]\nlocation = \"{}/{host}\"\ninsecure = true\n",
            mirror.host_port()
        ));
    }
    conf
}

/// Files shared by podman and skopeo runs: registries.conf, policy, auth, HOME.
pub struct ContainersEnv {
    dir: tempfile::TempDir,
}

impl ContainersEnv {
    /// A private config dir with `registries_conf` and a permissive signature policy; podman's
    /// storage (vfs, graphroot/runroot inside the dir) and engine settings are written too.
    pub fn new(registries_conf: &str) -> ContainersEnv {
        let dir = daemon_dir("stw-podman-");
        let d = dir.path();
        for sub in ["registries.d", "tmp", "home"] {
            std::fs::create_dir_all(d.join(sub)).unwrap_or_else(|e| panic!("create {sub}: {e}"));
        }
        let storage_conf = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            d.join("graph").display(),
            d.join("run").display()
        );
        let containers_conf = format!(
            "[engine]\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\n\
             cgroup_manager = \"cgroupfs\"\ntmp_dir = \"{}\"\n",
            d.join("events.log").display(),
            d.join("libpod-tmp").display()
        );
        for (name, text) in [
            ("registries.conf", registries_conf),
            (
                "policy.json",
                r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
            ),
            ("auth.json", r#"{"auths":{}}"#),
            ("storage.conf", &storage_conf),
            ("containers.conf", &containers_conf),
        ] {
            std::fs::write(d.join(name), text).unwrap_or_else(|e| panic!("write {name}: {e}"));
        }
        ContainersEnv { dir }
    }

    /// The config dir: `policy.json` and `registries.d/` are what skopeo is given; podman reads
    /// `home/.config/containers/{policy.json,registries.d}` (its `HOME` is `home/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// podman's graphroot (vfs unpacks into `vfs/dir/<id>/...`).
    pub fn graphroot(&self) -> PathBuf {
        self.dir.path().join("graph")
    }

    fn env(&self, cmd: &mut Command) {
        let d = self.dir.path();
        cmd.env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .env("HOME", d.join("home"))
            .env("XDG_CONFIG_HOME", d.join("home"))
            .env("TMPDIR", d.join("tmp"));
    }

    /// `podman <args>` with this environment.
    pub fn podman(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("podman");
        self.env(&mut cmd);
        cmd.args(args);
        run(&mut cmd, CLIENT_TIMEOUT)
    }

    pub fn podman_ok(&self, args: &[&str]) -> String {
        let out = expect_success(self.podman(args), &format!("podman {args:?}"), "");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `skopeo <global flags> <args>` with this environment: own registries.conf, policy and
    /// registries.d, linux/amd64. skopeo 1.9.3 ignores `CONTAINERS_REGISTRIES_CONF` (it loads
    /// `/etc/containers/registries.conf`, checked with `--debug`) but has a hidden global
    /// `--registries-conf` flag, used here. No TLS flag is passed: plain http to the mirror must
    /// come from the mirror's `insecure = true`.
    pub fn skopeo(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let mut cmd = Command::new("skopeo");
        self.env(&mut cmd);
        let paths = [
            ("--registries-conf", "registries.conf"),
            ("--policy", "policy.json"),
            ("--registries.d", "registries.d"),
            ("--tmpdir", "tmp"),
        ];
        with_paths(&mut cmd, d, &paths)
            .args(["--override-os", "linux", "--override-arch", "amd64"])
            .args(args);
        run(&mut cmd, CLIENT_TIMEOUT)
    }

    pub fn skopeo_ok(&self, args: &[&str]) -> String {
        let out = expect_success(self.skopeo(args), &format!("skopeo {args:?}"), "");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `buildah <args>` with this environment (the same storage as podman's).
    pub fn buildah_ok(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("buildah");
        self.env(&mut cmd);
        cmd.args(args);
        let out = expect_success(
            run(&mut cmd, CLIENT_TIMEOUT),
            &format!("buildah {args:?}"),
            "",
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// What a client left on disk, and what stowage logged
// ---------------------------------------------------------------------------------------------

/// The regular files (path inside the tar, size) of a layer, read from its gzip tar.
pub fn layer_files(layer: &Layer) -> Vec<(String, u64)> {
    let gz = flate2::read::GzDecoder::new(layer.blob.bytes.as_slice());
    let mut archive = tar::Archive::new(gz);
    let mut files = Vec::new();
    for entry in archive.entries().expect("read layer tar") {
        let entry = entry.expect("tar entry");
        if entry.header().entry_type().is_file() {
            let path = entry
                .path()
                .expect("tar entry path")
                .to_string_lossy()
                .into_owned();
            files.push((path, entry.header().size().expect("tar entry size")));
        }
    }
    files
}

/// Every unpacked test file (`.../stowage-test/file-N.bin`) under `root`, with its size.
pub fn unpacked_test_files(root: &Path) -> Vec<(PathBuf, u64)> {
    files_under(root)
        .into_iter()
        .filter(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .is_some_and(|n| n == "stowage-test")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("file-"))
        })
        .filter_map(|p| {
            let size = std::fs::metadata(&p).ok()?.len();
            Some((p, size))
        })
        .collect()
}

/// Every regular file of every layer of `image` (path inside the tar, size).
pub fn image_files(image: &Image) -> Vec<(String, u64)> {
    image.layers.iter().flat_map(layer_files).collect()
}

/// Panics unless every file in `files` (from [`image_files`]) was unpacked somewhere under `root`
/// (a file `…/stowage-test/file-N.bin` of the same size; vfs and the native snapshotter keep one
/// full directory per layer, so each layer's own files are present in its directory).
pub fn assert_unpacked(root: &Path, files: &[(String, u64)], what: &str) {
    assert!(!files.is_empty(), "{what}: no expected files given");
    let found = unpacked_test_files(root);
    for (path, size) in files {
        let name = Path::new(path).file_name().expect("file name").to_owned();
        let present = found
            .iter()
            .any(|(p, s)| s == size && p.file_name() == Some(name.as_os_str()));
        assert!(
            present,
            "{what}: file {path} ({size} bytes) of the image is not unpacked under {}; unpacked test files: {found:#?}",
            root.display()
        );
    }
}

/// One request line of stowage's log: `... request req=1 method=GET path=/v2/... query="ns=docker.io" status=200 cache="hit" bytes=... ms=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    pub cache: String,
}

/// Every request line stowage logged so far.
pub fn stowage_requests(stowage: &Stowage) -> Vec<RequestLine> {
    stowage
        .log()
        .lines()
        .filter_map(parse_request_line)
        .collect()
}

fn parse_request_line(line: &str) -> Option<RequestLine> {
    if !line.contains(" method=") || !line.contains(" path=") {
        return None;
    }
    let mut method = None;
    let mut path = None;
    let mut query = String::new();
    let mut status = None;
    let mut cache = String::new();
    for token in line.split_whitespace() {
        let Some((k, v)) = token.split_once('=') else {
            continue;
        };
        let v = v.trim_matches('"').to_string();
        match k {
            "method" => method = Some(v),
            "path" => path = Some(v),
            "query" => query = v,
            "status" => status = v.parse().ok(),
            "cache" => cache = v,
            _ => {}
        }
    }
    Some(RequestLine {
        method: method?,
        path: path?,
        query,
        status: status?,
        cache,
    })
}

/// How many `GET` requests for blob `digest` stowage logged (any repository, any status).
pub fn stowage_blob_gets(stowage: &Stowage, digest: &str) -> usize {
    let suffix = format!("/blobs/{digest}");
    stowage_requests(stowage)
        .iter()
        .filter(|l| l.method == "GET" && l.path.ends_with(&suffix))
        .count()
}
