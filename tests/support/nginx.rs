//! nginx (Debian's package) as the fleet's load balancer, run from the configuration block
//! `docs/fleet.md` documents (between `<!-- fleet-nginx:begin -->` and
//! `<!-- fleet-nginx:end -->`), so the documented setup is the tested one. Only the addresses are
//! rewritten: the `server` lines point at the test's nodes and `listen` at an ephemeral loopback
//! port. One process (no master, no daemon), own prefix and temp paths, killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::{free_port, tail, wait_until, READY_TIMEOUT};

pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

/// The nginx block for the fleet in `docs/fleet.md`.
pub fn documented_fleet_config() -> String {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/fleet.md"))
        .expect("docs/fleet.md");
    let start = doc
        .find("<!-- fleet-nginx:begin -->")
        .expect("docs/fleet.md has the fleet nginx block");
    let end = doc
        .find("<!-- fleet-nginx:end -->")
        .expect("docs/fleet.md's fleet nginx block ends");
    let block = &doc[start..end];
    let body_start = block.find("```nginx\n").expect("an nginx code fence") + "```nginx\n".len();
    let body_end = block[body_start..].find("```").expect("closing fence") + body_start;
    block[body_start..body_end].to_string()
}

impl Nginx {
    /// nginx balancing over `nodes` (`host:port`) with the configuration in `docs/fleet.md`.
    pub fn start_fleet(nodes: &[String]) -> Nginx {
        let port = free_port();
        let dir = tempfile::tempdir().expect("nginx temp dir");
        let mut servers_done = false;
        let mut http = String::new();
        for line in documented_fleet_config().lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("server ") && trimmed.contains(":5000") {
                // The documented example's node lines become the test's nodes.
                if !servers_done {
                    for n in nodes {
                        http.push_str(&format!("    server {n} max_fails=2 fail_timeout=10s;\n"));
                    }
                    servers_done = true;
                }
                continue;
            }
            if trimmed.starts_with("listen ") {
                http.push_str(&format!("    listen 127.0.0.1:{port};\n"));
                continue;
            }
            http.push_str(line);
            http.push('\n');
        }
        assert!(
            servers_done,
            "docs/fleet.md's nginx block has no `server ...:5000` lines"
        );
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             error_log {d}/error.log info;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             {http}}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let out = std::fs::File::create(dir.path().join("nginx.out")).expect("nginx.out");
        let err = out.try_clone().expect("clone");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("starting nginx (apt-get install nginx)");
        let mut nginx = Nginx { child, dir, port };
        let up = wait_until(READY_TIMEOUT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !up {
            let log = nginx.log();
            nginx.kill();
            panic!("nginx did not start\n{}", tail(&log, 30));
        }
        nginx
    }

    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.path().join("nginx.out")).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default());
        s
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- nginx log (tail) ---\n{}", tail(&self.log(), 30));
        }
        self.kill();
    }
}
