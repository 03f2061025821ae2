//! The command line contract: `stowage --version`, config errors that name the key and exit
//! with code 2, and a clean stop on SIGTERM / SIGINT.

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
