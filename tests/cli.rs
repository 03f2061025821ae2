//! The command line contract: `stowage --version` (version and commit), config errors that
//! name the key and exit with code 2, a clean stop on SIGTERM / SIGINT, `stowage health`, and
//! `--log-format json`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stowage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stowage"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn version_prints_the_crate_version() {
    let out = stowage().arg("--version").output().expect("run stowage");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {text:?}"
    );
}

#[test]
fn version_names_the_git_commit() {
    let out = stowage().arg("--version").output().expect("run stowage");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(commit "), "--version printed {text:?}");
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match head {
        Ok(h) if h.status.success() => {
            let head = String::from_utf8_lossy(&h.stdout).trim().to_string();
            assert!(text.contains(&head), "--version {text:?} names HEAD {head}");
        }
        _ => eprintln!("no git here: the commit is not compared"),
    }
}

fn serve_with_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("write config");
    let out = stowage()
        .args(["serve", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .expect("run stowage");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_config_names_the_key_and_exits_2() {
    let cases = [
        ("[server]\nlisten = \"not-an-address\"\n", "server.listen"),
        ("[storage]\nmax_size = \"twelve\"\n", "storage.max_size"),
        ("[server]\nlistne = \"0.0.0.0:1\"\n", "listne"),
        (
            "[[upstreams]]\nhost = \"docker.io\"\nurl = \"ftp://example\"\n",
            "upstreams[0].url",
        ),
        ("this is not toml", "config"),
    ];
    for (text, key) in cases {
        let (code, stderr) = serve_with_config(text);
        assert_eq!(code, 2, "config {text:?} should exit 2; stderr: {stderr}");
        assert!(
            stderr.contains(key),
            "config {text:?}: message should name {key:?}, got {stderr}"
        );
    }
}

#[test]
fn missing_explicit_config_file_exits_2() {
    let out = stowage()
        .args(["serve", "--config", "/nonexistent/stowage.toml"])
        .output()
        .expect("run stowage");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/stowage.toml"));
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "stowage did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stops_cleanly_on(signal: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // No config file: defaults, with the environment overriding listen address and storage.
    let mut child = stowage()
        .arg("serve")
        .current_dir(dir.path())
        .env("STOWAGE_LISTEN", format!("127.0.0.1:{port}"))
        .env("STOWAGE_STORAGE_PATH", dir.path().join("cache"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stowage");
    wait_for_port(port);
    // (Waited for, not just checked: the port may have answered for another process that took
    // it between `free_port` and our bind.)
    let index = dir.path().join("cache/index");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !index.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        index.exists(),
        "sled index created under STOWAGE_STORAGE_PATH"
    );
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("stowage did not stop within 30 s of {signal}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(exit.success(), "exit status {exit:?}; stderr: {stderr}");
    assert!(stderr.contains("stopped cleanly"), "stderr: {stderr}");
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    stops_cleanly_on("-TERM");
}

#[test]
fn sigint_stops_the_server_cleanly() {
    stops_cleanly_on("-INT");
}

/// A `stowage serve` configured by the environment alone, on its own port and directory.
struct Served {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
    stderr: std::path::PathBuf,
}

impl Served {
    fn start(extra: &[&str], envs: &[(&str, &str)]) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let stderr = dir.path().join("stderr");
        let child = stowage()
            .arg("serve")
            .args(extra)
            .current_dir(dir.path())
            .env("STOWAGE_SERVER_LISTEN", format!("127.0.0.1:{port}"))
            .env("STOWAGE_STORAGE_PATH", dir.path().join("cache"))
            .env("STOWAGE_UPSTREAM_URL", "http://127.0.0.1:9")
            .envs(envs.iter().copied())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn stowage");
        wait_for_port(port);
        Served {
            child,
            port,
            _dir: dir,
            stderr,
        }
    }

    /// SIGTERM, then the exit status (within 30 s) and the log.
    fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "no stop within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        };
        (
            status,
            std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        )
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn health(envs: &[(&str, String)]) -> (Option<i32>, String) {
    let mut cmd = stowage();
    cmd.arg("health").env_remove("STOWAGE_CONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run stowage health");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn health_asks_the_configured_listener() {
    let mut served = Served::start(&[], &[]);
    let listen = format!("127.0.0.1:{}", served.port);
    let (code, text) = health(&[("STOWAGE_SERVER_LISTEN", listen.clone())]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ready") && text.contains(&listen), "{text}");
    // The same through a config file named by STOWAGE_CONFIG, the way the image runs it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stowage.toml");
    std::fs::write(
        &file,
        format!("[server]\nlisten = \"0.0.0.0:{}\"\n", served.port),
    )
    .unwrap();
    let (code, text) = health(&[("STOWAGE_CONFIG", file.display().to_string())]);
    assert_eq!(
        code,
        Some(0),
        "0.0.0.0 is asked on the loopback address: {text}"
    );
    let (status, log) = served.stop();
    assert!(status.success(), "{log}");
    let (code, text) = health(&[("STOWAGE_SERVER_LISTEN", listen)]);
    assert_eq!(code, Some(1), "nothing listens any more: {text}");
    assert!(text.contains("not ready"), "{text}");
    let (code, text) = health(&[("STOWAGE_SERVER_LISTEN", "nope".into())]);
    assert_eq!(code, Some(2), "{text}");
}

#[test]
fn json_logs_are_one_object_a_line() {
    let by_flag = Served::start(&["--log-format", "json"], &[]);
    let by_env = Served::start(&[], &[("STOWAGE_LOG_FORMAT", "json")]);
    for mut served in [by_flag, by_env] {
        let (status, log) = served.stop();
        assert!(status.success(), "{log}");
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 2, "{log}");
        for line in &lines {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                v.get("level").is_some() && v.get("timestamp").is_some(),
                "{line}"
            );
        }
        assert!(log.contains("stopped cleanly"), "{log}");
    }
}
