//! A real forward proxy for egress tests: Debian's `tinyproxy` as a child process with its own
//! config, port and log. It forwards `GET http://...` and tunnels `CONNECT host:port`, and with
//! [`Tinyproxy::start_with_auth`] answers 407 to requests without the right Basic credentials.
//! Every request it receives is logged; [`Tinyproxy::requests`] lists them.

use std::path::PathBuf;
use std::process::{Child, Command};

use super::{free_port, kill_and_reap, spawn_logged, tail, wait_until, READY_TIMEOUT};

pub struct Tinyproxy {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl Tinyproxy {
    /// An open proxy on a free loopback port.
    pub fn start() -> Tinyproxy {
        Tinyproxy::launch("")
    }

    /// A proxy that wants `user` / `password` (HTTP Basic) and answers 407 otherwise.
    pub fn start_with_auth(user: &str, password: &str) -> Tinyproxy {
        Tinyproxy::launch(&format!("BasicAuth {user} {password}\n"))
    }

    fn launch(extra: &str) -> Tinyproxy {
        let dir = tempfile::Builder::new()
            .prefix("stowage-tinyproxy-")
            .tempdir()
            .expect("temp dir for tinyproxy");
        let port = free_port();
        let log = dir.path().join("tinyproxy.log");
        let config = dir.path().join("tinyproxy.conf");
        // No ConnectPort line: CONNECT is allowed to any port (the test upstreams' ephemeral ones).
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Info\n\
                 MaxClients 100\nAllow 127.0.0.1\nDisableViaHeader Yes\n{extra}",
                log.display()
            ),
        )
        .expect("write tinyproxy.conf");
        let mut cmd = Command::new("tinyproxy");
        cmd.arg("-d").arg("-c").arg(&config);
        let what = "tinyproxy (is the tinyproxy package installed?)";
        let child = spawn_logged(&mut cmd, &dir.path().join("stdout.log"), what);
        let mut proxy = Tinyproxy {
            child: Some(child),
            dir,
            port,
        };
        let up = wait_until(READY_TIMEOUT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up && proxy.is_running(),
            "tinyproxy did not listen on {port}\n{}",
            tail(&proxy.log(), 20)
        );
        proxy
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tinyproxy.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The request lines it received: `GET http://127.0.0.1:5000/v2/ HTTP/1.1`,
    /// `CONNECT 127.0.0.1:5443 HTTP/1.1`.
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split("]: Request (file descriptor ").nth(1))
            .filter_map(|rest| rest.split_once("): ").map(|(_, r)| r.to_string()))
            .collect()
    }

    /// Kills the proxy; later connections to its port are refused.
    pub fn stop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        super::print_log_if_panicking("tinyproxy", &self.log_path(), &self.log(), 30);
    }
}
