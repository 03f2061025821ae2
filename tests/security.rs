//! Security end to end: TLS (skopeo verifying a test CA, HTTP/2 by ALPN, plain HTTP on the TLS
//! port, certificate reload on SIGHUP without dropping connections), htpasswd client auth
//! (challenge, wrong credentials, per-IP failed-login limit, open health paths, htpasswd reload)
//! and per-upstream repository policy (403 `DENIED`, nothing asked of the upstream).
//!
//! Certificates are generated per test with rcgen (a CA and a `localhost`/`127.0.0.1` server
//! certificate signed by it); htpasswd entries with the bcrypt crate at cost 4.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use support::images::{self, Format, Image};
use support::registry::Registry;
use support::stowage::{Stowage, StowageBuilder, UpstreamSpec};
use support::write_htpasswd;
use support::{error_codes, http, manifest_accept, raw_request, skopeo, wait_until, RawResponse};

/// A test CA and a server certificate for `localhost` and `127.0.0.1` signed by it.
struct Pki {
    ca_key: rcgen::KeyPair,
    ca: rcgen::Certificate,
}

struct ServerCert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stowage test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&ca_key).expect("self-sign CA");
        Pki { ca_key, ca }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn server_cert(&self, common_name: &str) -> ServerCert {
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign server cert");
        ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Writes cert and key into `dir` and returns their paths.
fn write_cert(dir: &Path, cert: &ServerCert) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
    // Write-then-rename, as an operator's tooling would, so a reload never sees half a file.
    std::fs::write(dir.join("server.crt.new"), &cert.cert_pem).expect("write cert");
    std::fs::write(dir.join("server.key.new"), &cert.key_pem).expect("write key");
    std::fs::rename(dir.join("server.crt.new"), &c).expect("rename cert");
    std::fs::rename(dir.join("server.key.new"), &k).expect("rename key");
    (c, k)
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A stowage speaking TLS with `cert`, in front of `upstream`.
fn tls_builder(
    pki: &Pki,
    files: &tempfile::TempDir,
    cert: &ServerCert,
    upstream: &str,
) -> StowageBuilder {
    let (c, k) = write_cert(files.path(), cert);
    Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", upstream))
        .server_toml(&format!(
            "tls_cert = {}\ntls_key = {}",
            toml_path(&c),
            toml_path(&k)
        ))
        .https(pki.ca_pem().as_bytes())
}

fn basic(user: &str, password: &str) -> String {
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {creds}")
}

/// A client trusting only the test CA.
fn https_client(pki: &Pki) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("https client")
}

/// A raw TLS connection (rustls) that can send several HTTP/1.1 requests and shows the
/// certificate the server presented.
struct TlsConn {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsConn {
    fn open(pki: &Pki, port: u16) -> TlsConn {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(pki.ca.der().clone())
            .expect("add test CA to roots");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
        let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client conn");
        let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        // Drive the handshake to completion so the peer certificate is known.
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .expect("TLS handshake");
        }
        TlsConn { stream }
    }

    fn peer_cert(&self) -> Vec<u8> {
        self.stream
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .expect("server presented a certificate")
    }

    /// `GET path` on this connection (keep-alive); returns the status.
    fn get(&mut self, path: &str) -> u16 {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: stowage-tests\r\n\r\n");
        self.stream.write_all(req.as_bytes()).expect("send request");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = self.stream.read(&mut byte).expect("read response head");
            assert_eq!(
                n,
                1,
                "connection closed mid-response: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        let len: usize = text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .expect("content-length");
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).expect("read body");
        status
    }
}

/// Runs skopeo with the given args, returns (success, stderr).
fn skopeo_run(args: &[&str]) -> (bool, String) {
    let out = skopeo(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn skopeo_pulls_over_tls_with_credentials_and_verifies_the_certificate() {
    let upstream = Registry::start();
    let image = Image::build(Format::Oci, &[1024, 64 * 1024]);
    let pushed = upstream.push("library/app", "v1", image);
    let pki = Pki::new();
    let files = tempfile::tempdir().unwrap();
    let htpasswd = write_htpasswd(files.path(), &[("alice", "correct horse")]);
    let stowage = tls_builder(&pki, &files, &pki.server_cert("localhost"), &upstream.url())
        .extra_toml(&format!("[auth]\nhtpasswd = {}", toml_path(&htpasswd)))
        .auth_required()
        .start();
    // skopeo's --src-cert-dir wants CA certificates as *.crt.
    let cert_dir = files.path().join("certs.d");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::write(cert_dir.join("ca.crt"), pki.ca_pem()).unwrap();
    let cert_dir = cert_dir.display().to_string();
    let src = format!("docker://localhost:{}/library/app:v1", stowage.port());
    let out = files.path().join("out");
    let dst = format!("dir:{}", out.display());
    // The harness disables verification for copy; the later flag turns it back on.
    let verify = "--src-tls-verify=true";

    // `skopeo copy` with verification, the CA in `cert_dir` if given and `creds`.
    let copy = |cert_dir: Option<&str>, creds: &str, dst: &str| {
        let mut args = vec!["copy", verify];
        if let Some(dir) = cert_dir {
            args.extend(["--src-cert-dir", dir]);
        }
        args.extend(["--src-creds", creds, &src, dst]);
        skopeo_run(&args)
    };

    let (ok, stderr) = copy(Some(&cert_dir), "alice:correct horse", &dst);
    assert!(ok, "skopeo over TLS with credentials failed:\n{stderr}");
    let manifest = std::fs::read(out.join("manifest.json")).expect("manifest.json copied");
    assert_eq!(manifest, pushed.manifest().bytes, "manifest bytes differ");
    for blob in pushed.blobs() {
        let got = std::fs::read(out.join(blob.hex())).expect("blob copied");
        assert!(got == blob.bytes, "blob {} differs", blob.digest);
    }

    // Without the CA the certificate is not trusted: verification really is on.
    let out2 = format!("dir:{}", files.path().join("out2").display());
    let (ok, stderr) = copy(None, "alice:correct horse", &out2);
    assert!(!ok, "skopeo trusted an unknown CA");
    assert!(
        stderr.contains("certificate") || stderr.contains("x509"),
        "failure should be about the certificate: {stderr}"
    );

    // A wrong password is refused.
    let out3 = format!("dir:{}", files.path().join("out3").display());
    let (ok, stderr) = copy(Some(&cert_dir), "alice:wrong", &out3);
    assert!(!ok, "skopeo pulled with a wrong password");
    assert!(
        stderr.contains("401") || stderr.to_lowercase().contains("unauthorized"),
        "failure should be a 401: {stderr}"
    );
}

#[test]
fn http2_is_negotiated_by_alpn_and_plain_http_to_the_tls_port_fails_cleanly() {
    let pki = Pki::new();
    let files = tempfile::tempdir().unwrap();
    let stowage = tls_builder(
        &pki,
        &files,
        &pki.server_cert("localhost"),
        "http://127.0.0.1:9",
    )
    .server_toml("header_read_timeout = \"1s\"")
    .start();

    let resp = https_client(&pki)
        .get(format!("{}/v2/", stowage.url()))
        .send()
        .expect("https GET /v2/");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "ALPN should pick h2"
    );
    assert_eq!(
        resp.headers()
            .get("docker-distribution-api-version")
            .and_then(|v| v.to_str().ok()),
        Some("registry/2.0")
    );

    let mut conn = TlsConn::open(&pki, stowage.port());
    assert_eq!(conn.get("/v2/"), 200, "HTTP/1.1 over TLS");

    let plain = raw_request(stowage.port(), "GET", "/v2/", &[]);
    assert_eq!(plain.status, 400, "plain HTTP on the TLS port: {plain:?}");
    assert!(
        plain.body_text().contains("https://"),
        "{}",
        plain.body_text()
    );

    // A client that never starts the handshake is closed after the header read timeout.
    let mut idle = TcpStream::connect(("127.0.0.1", stowage.port())).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut out = Vec::new();
    let closed = idle.read_to_end(&mut out);
    assert!(
        closed.is_ok() && out.is_empty(),
        "a silent client held the TLS port: {closed:?}"
    );

    // The listener is unharmed. (The first connection has idled past the 1 s head timeout,
    // which also bounds keep-alive idling, so open a new one.)
    let mut conn = TlsConn::open(&pki, stowage.port());
    assert_eq!(conn.get("/v2/"), 200);
    let resp = https_client(&pki)
        .get(format!("{}/v2/", stowage.url()))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let pki = Pki::new();
    let files = tempfile::tempdir().unwrap();
    let first = pki.server_cert("first");
    let mut stowage = tls_builder(&pki, &files, &first, "http://127.0.0.1:9").start();

    let mut old = TlsConn::open(&pki, stowage.port());
    assert_eq!(old.get("/v2/"), 200);
    assert_eq!(old.peer_cert(), first.der);

    let second = pki.server_cert("second");
    write_cert(files.path(), &second);
    let pid = stowage.pid().expect("stowage running").to_string();
    let status = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(status.success());

    let reloaded = wait_until(Duration::from_secs(30), || {
        TlsConn::open(&pki, stowage.port()).peer_cert() == second.der
    });
    assert!(
        reloaded,
        "new connections never got the new certificate\n{}",
        stowage.log()
    );
    assert!(stowage.is_running(), "SIGHUP must not stop stowage");
    // The connection opened before the reload still works.
    assert_eq!(old.get("/v2/"), 200);
    assert_eq!(old.peer_cert(), first.der);

    // A broken certificate file is refused and the current one kept.
    std::fs::write(files.path().join("server.crt"), "not a certificate").unwrap();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let logged = wait_until(Duration::from_secs(30), || {
        stowage.log().contains("NOT reloaded")
    });
    assert!(
        logged,
        "a failed reload should be logged\n{}",
        stowage.log()
    );
    assert!(stowage.is_running());
    assert_eq!(TlsConn::open(&pki, stowage.port()).peer_cert(), second.der);
}

/// An authenticated stowage over plain HTTP in front of a real upstream with `library/app:v1`.
struct AuthWorld {
    stowage: Stowage,
    upstream: Registry,
    files: tempfile::TempDir,
    pushed: images::Pushed,
}

fn auth_world(auth_extra: &str) -> AuthWorld {
    let upstream = Registry::start();
    let pushed = upstream.push("library/app", "v1", Image::build(Format::Docker, &[1024]));
    let files = tempfile::tempdir().unwrap();
    let htpasswd = write_htpasswd(files.path(), &[("alice", "s3cret"), ("bob", "hunter2")]);
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml(&format!(
            "[auth]\nhtpasswd = {}\n{auth_extra}",
            toml_path(&htpasswd)
        ))
        .auth_required()
        .start();
    AuthWorld {
        stowage,
        upstream,
        files,
        pushed,
    }
}

impl AuthWorld {
    /// `GET target` with `Authorization: authorization` (and, if given, `Accept: accept`).
    fn get_as(&self, target: &str, authorization: &str, accept: Option<&str>) -> RawResponse {
        let mut headers = vec![("Authorization", authorization)];
        headers.extend(accept.map(|a| ("Accept", a)));
        raw_request(self.stowage.port(), "GET", target, &headers)
    }
}

#[test]
fn missing_credentials_get_401_with_the_basic_challenge_and_reach_nothing() {
    let w = auth_world("");
    let manifest = "/v2/library/app/manifests/v1";
    for (method, target) in [
        ("GET", "/v2/"),
        ("HEAD", "/v2/"),
        ("GET", manifest),
        ("GET", "/v2/_catalog"),
        ("GET", "/v1/search?q=app"),
    ] {
        let r = raw_request(w.stowage.port(), method, target, &[]);
        assert_eq!(r.status, 401, "{method} {target}: {r:?}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"stowage\""),
            "{method} {target}"
        );
        assert_eq!(
            r.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
        if method == "GET" {
            assert_eq!(error_codes(&r.body, target), ["UNAUTHORIZED"]);
        } else {
            assert!(r.body.is_empty(), "HEAD has no body");
        }
    }
    // A non-Basic scheme is no credentials at all.
    let r = w.get_as(manifest, "Bearer abc", None);
    assert_eq!(r.status, 401);
    assert_eq!(
        w.upstream.count_requests("GET", "/v2/library/app")
            + w.upstream.count_requests("HEAD", "/v2/library/app"),
        0,
        "nothing may reach the upstream without credentials: {:?}",
        w.upstream.access_log_lines()
    );
    // Liveness stays open by default.
    let r = raw_request(w.stowage.port(), "GET", "/healthz", &[]);
    assert_eq!(r.status, 200);
}

#[test]
fn wrong_credentials_get_the_same_401_whichever_part_is_wrong() {
    let w = auth_world("");
    let target = "/v2/library/app/manifests/v1";
    let accept = manifest_accept();
    let wrong_password = basic("alice", "hunter2");
    let unknown_user = basic("mallory", "s3cret");
    let a = w.get_as(target, &wrong_password, Some(&accept));
    let b = w.get_as(target, &unknown_user, Some(&accept));
    assert_eq!((a.status, b.status), (401, 401));
    assert_eq!(
        a.body, b.body,
        "the body must not tell which part was wrong"
    );
    assert_eq!(a.header("www-authenticate"), b.header("www-authenticate"));
    assert_eq!(error_codes(&a.body, "wrong password"), ["UNAUTHORIZED"]);

    let good = basic("alice", "s3cret");
    let r = w.get_as(target, &good, Some(&accept));
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.body, w.pushed.manifest().bytes);
    let r = w.get_as("/v2/", &basic("bob", "hunter2"), None);
    assert_eq!(r.status, 200);

    // The credentials never reach the log.
    let log = w.stowage.log();
    for secret in ["s3cret", "hunter2", good.as_str(), wrong_password.as_str()] {
        assert!(!log.contains(secret), "log contains a secret {secret:?}");
    }
}

#[test]
fn failed_logins_are_limited_per_client_ip() {
    let w = auth_world("failed_login_limit = 3\nfailed_login_window = \"10m\"");
    let bad = basic("alice", "guess");
    for i in 0..3 {
        let r = w.get_as("/v2/", &bad, None);
        assert_eq!(r.status, 401, "attempt {i}");
    }
    // Over the limit: refused without checking, even with the right password.
    let good = basic("alice", "s3cret");
    let r = w.get_as("/v2/", &good, None);
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(error_codes(&r.body, "throttled"), ["TOOMANYREQUESTS"]);
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=600).contains(&retry), "Retry-After {retry}");
}

#[test]
fn open_paths_and_htpasswd_reload() {
    let mut w = auth_world("open_paths = []");
    let r = raw_request(w.stowage.port(), "GET", "/healthz", &[]);
    assert_eq!(
        r.status, 401,
        "/healthz is protected when not in open_paths"
    );
    let r = w.get_as("/healthz", &basic("alice", "s3cret"), None);
    assert_eq!(r.status, 200);

    // Replace the users and send SIGHUP: carol gets in, alice is out.
    write_htpasswd(w.files.path(), &[("carol", "new-pass")]);
    let pid = w.stowage.pid().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let carol = basic("carol", "new-pass");
    let reloaded = wait_until(Duration::from_secs(30), || {
        w.get_as("/v2/", &carol, None).status == 200
    });
    assert!(reloaded, "carol never got in\n{}", w.stowage.log());
    let r = w.get_as("/v2/", &basic("alice", "s3cret"), None);
    assert_eq!(r.status, 401, "alice was removed");
    assert!(w.stowage.is_running());
}

#[test]
fn denied_repositories_are_403_and_never_reach_the_upstream() {
    let upstream = Registry::start();
    let allowed = upstream.push("library/app", "v1", Image::build(Format::Docker, &[1024]));
    let evil = upstream.push("evil/miner", "v1", Image::build(Format::Docker, &[2048]));
    let secret = upstream.push("myorg/secret", "v1", Image::build(Format::Docker, &[512]));
    let stowage = Stowage::start(&[UpstreamSpec::new("docker.io", &upstream.url())
        .with_extra("allow = [\"library/*\", \"myorg/**\"]\ndeny = [\"myorg/secret\"]")]);
    let accept = manifest_accept();
    let evil_blob = evil.blobs()[0].digest.clone();
    let cases = [
        "/v2/evil/miner/manifests/v1".to_string(),
        format!("/v2/evil/miner/manifests/{}", evil.digest()),
        format!("/v2/evil/miner/blobs/{evil_blob}"),
        "/v2/evil/miner/tags/list".to_string(),
        "/v2/docker.io/evil/miner/manifests/v1".to_string(),
        "/v2/evil/miner/manifests/v1?ns=docker.io".to_string(),
        "/v2/myorg/secret/manifests/v1".to_string(),
        // `library/*` is one component: a deeper name is not covered.
        "/v2/library/app/sub/manifests/v1".to_string(),
    ];
    for target in &cases {
        for method in ["GET", "HEAD"] {
            let r = raw_request(stowage.port(), method, target, &[("Accept", &accept)]);
            assert_eq!(r.status, 403, "{method} {target}: {r:?}");
            if method == "GET" {
                assert_eq!(error_codes(&r.body, target), ["DENIED"]);
                assert!(
                    r.body_text().contains("policy"),
                    "the reason is given: {}",
                    r.body_text()
                );
            }
        }
    }
    // Reads only: the log also holds the test's own pushes (POST/PUT).
    let log: Vec<String> = upstream
        .access_log_lines()
        .into_iter()
        .filter(|l| l.starts_with("GET ") || l.starts_with("HEAD "))
        .collect();
    assert!(
        !log.iter()
            .any(|l| l.contains("evil") || l.contains("secret") || l.contains("app/sub")),
        "a denied repository reached the upstream: {log:?}"
    );
    assert!(stowage.blob_files().is_empty() && stowage.tmp_files().is_empty());

    // Allowed names still work, also when spelled without `library/`.
    let r = raw_request(
        stowage.port(),
        "GET",
        "/v2/app/manifests/v1",
        &[("Accept", &accept)],
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.body, allowed.manifest().bytes);
    let r = http()
        .get(format!(
            "{}/v2/library/app/blobs/{}",
            stowage.url(),
            allowed.blobs()[0].digest
        ))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.bytes().unwrap().as_ref(),
        allowed.blobs()[0].bytes.as_slice()
    );
    let _ = secret;
}

#[test]
fn bad_tls_and_htpasswd_files_are_config_errors_naming_the_key() {
    let files = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let good = pki.server_cert("good");
    let other = pki.server_cert("other");
    let (cert, _) = write_cert(files.path(), &good);
    let mismatched_key = files.path().join("other.key");
    std::fs::write(&mismatched_key, &other.key_pem).unwrap();
    let md5 = files.path().join("htpasswd.md5");
    std::fs::write(&md5, "alice:$apr1$abcdefgh$0123456789abcdefghijkl\n").unwrap();
    let cases = [
        (
            format!(
                "[server]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = {}",
                toml_path(&cert)
            ),
            "server.tls_cert",
        ),
        (
            format!(
                "[server]\ntls_cert = {}\ntls_key = {}",
                toml_path(&cert),
                toml_path(&mismatched_key)
            ),
            "server.tls_key",
        ),
        (
            format!("[auth]\nhtpasswd = {}", toml_path(&md5)),
            "auth.htpasswd",
        ),
        (
            "[auth]\nhtpasswd = \"/nonexistent/htpasswd\"".to_string(),
            "auth.htpasswd",
        ),
    ];
    for (text, key) in cases {
        let path = files.path().join("config.toml");
        std::fs::write(
            &path,
            format!(
                "{text}\n[storage]\npath = {}\n",
                toml_path(&files.path().join("data"))
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .expect("run stowage");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(
            stderr.contains(key),
            "{text}: stderr should name {key}: {stderr}"
        );
    }
}
