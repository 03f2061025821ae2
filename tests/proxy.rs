//! stowage behind an egress proxy, with a real forward proxy (Debian's tinyproxy) and a real
//! upstream (distribution): `HTTP_PROXY` / `HTTPS_PROXY` honoured, `NO_PROXY` bypassing it, the
//! per-upstream `proxy` key overriding the environment, CONNECT to a TLS upstream, and a proxy
//! that refuses (407 without the right credentials, connection refused) answered with a quick
//! `503 UNAVAILABLE` naming the proxy, its password in no log, `/readyz` or `stowage config`.
//! The object store follows the same variables (tests/store.rs's Garage behind the proxy).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::garage::Garage;
use support::images::{Format, Image};
use support::proxy::Tinyproxy;
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{error_codes, http, manifest_accept, skopeo_ok, wait_until};

const PASSWORD: &str = "pr0xy-s3cret-pw";

fn upstream_with(name: &str) -> Registry {
    let upstream = Registry::start();
    upstream.push(name, "1", Image::build(Format::Docker, &[1024, 8192]));
    upstream
}

/// skopeo pulls `reference` through stowage (plain http to stowage itself, never proxied).
fn pull(stowage: &Stowage, reference: &str) {
    let out = tempfile::tempdir().unwrap();
    let src = format!("docker://{}/{reference}", stowage.host_port());
    let dst = format!("dir:{}", out.path().display());
    skopeo_ok(
        &["copy", "--src-tls-verify=false", &src, &dst],
        &format!("pulling {reference} through stowage\n{}", stowage.log()),
    );
}

/// The proxy's request lines that went to `upstream` (forwarded GETs or CONNECTs).
fn proxied(proxy: &Tinyproxy, upstream: &Registry) -> Vec<String> {
    proxy
        .requests()
        .into_iter()
        .filter(|r| r.contains(&upstream.host_port()))
        .collect()
}

/// Whether `upstream` logged a manifest request for `name` (a HEAD by tag, a GET by digest).
fn reached(upstream: &Registry, name: &str) -> bool {
    upstream
        .access_log()
        .iter()
        .any(|l| l.uri.starts_with(&format!("/v2/{name}/manifests/")))
}

#[test]
fn http_proxy_from_the_environment_carries_upstream_traffic() {
    let upstream = upstream_with("team/env");
    let proxy = Tinyproxy::start();
    let stowage = Stowage::start_with(
        &[UpstreamSpec::new("docker.io", &upstream.url())],
        "",
        &[("HTTP_PROXY", &proxy.url())],
    );
    pull(&stowage, "team/env:1");
    let seen = proxied(&proxy, &upstream);
    assert!(
        seen.iter()
            .any(|r| r.starts_with("HEAD http://") && r.contains("/manifests/1")),
        "the manifest went through the proxy: {seen:?}"
    );
    assert!(
        seen.iter().any(|r| r.contains("/blobs/sha256:")),
        "blobs too: {seen:?}"
    );
    let ready = support::get_json(&format!("{}/readyz", stowage.url()));
    assert_eq!(ready["upstreams"][0]["proxy"], proxy.url(), "{ready}");
}

#[test]
fn no_proxy_sends_listed_hosts_direct() {
    let upstream = upstream_with("team/direct");
    let proxy = Tinyproxy::start();
    let stowage = Stowage::start_with(
        &[UpstreamSpec::new("docker.io", &upstream.url())],
        "",
        &[
            ("HTTP_PROXY", &proxy.url()),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
    );
    pull(&stowage, "team/direct:1");
    assert!(
        proxied(&proxy, &upstream).is_empty(),
        "{:?}",
        proxy.requests()
    );
    assert!(reached(&upstream, "team/direct"), "served directly");
    let ready = support::get_json(&format!("{}/readyz", stowage.url()));
    assert!(ready["upstreams"][0]["proxy"].is_null(), "{ready}");
}

#[test]
fn the_proxy_key_overrides_the_environment() {
    let upstream = upstream_with("team/key");
    let proxy = Tinyproxy::start_with_auth("alice", PASSWORD);
    let key = format!(
        "proxy = \"http://alice:{PASSWORD}@127.0.0.1:{}\"",
        proxy.port()
    );
    // The environment names a proxy that is not there, and says the upstream is direct.
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let stowage = Stowage::start_with(
        &[UpstreamSpec::new("docker.io", &upstream.url()).with_extra(&key)],
        "",
        &[("HTTP_PROXY", &dead), ("NO_PROXY", "127.0.0.1")],
    );
    pull(&stowage, "team/key:1");
    assert!(
        !proxied(&proxy, &upstream).is_empty(),
        "{:?}",
        proxy.requests()
    );
    assert_password_hidden(&stowage);
}

/// The proxy password appears in none of what an operator sees.
fn assert_password_hidden(stowage: &Stowage) {
    let ready = http()
        .get(format!("{}/readyz", stowage.url()))
        .send()
        .and_then(|r| r.text())
        .expect("readyz");
    assert!(!ready.contains(PASSWORD), "/readyz: {ready}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("config")
        .arg("--config")
        .arg(stowage.config_path())
        .env_remove("STOWAGE_CONFIG")
        .output()
        .expect("stowage config");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("proxy = \"http://alice:********@"),
        "{shown}"
    );
    assert!(!shown.contains(PASSWORD), "stowage config: {shown}");
    assert!(!stowage.log().contains(PASSWORD), "log: {}", stowage.log());
}

/// `GET` of a manifest through stowage: status, error codes, message, and how long it took.
fn manifest_error(stowage: &Stowage, reference: &str) -> (u16, Vec<String>, String, Duration) {
    let started = Instant::now();
    let (name, tag) = reference.split_once(':').unwrap();
    let resp = http()
        .get(format!("{}/v2/{name}/manifests/{tag}", stowage.url()))
        .header("Accept", manifest_accept())
        .send()
        .expect("manifest request");
    let took = started.elapsed();
    let status = resp.status().as_u16();
    let body = resp.bytes().expect("body").to_vec();
    let codes = error_codes(&body, reference);
    (
        status,
        codes,
        String::from_utf8_lossy(&body).into_owned(),
        took,
    )
}

#[test]
fn a_proxy_that_refuses_is_a_503_naming_it() {
    let upstream = upstream_with("team/refused");
    // The proxy wants credentials and gets none: 407. (tinyproxy answers wrong credentials
    // with a 401 carrying its own WWW-Authenticate, which cannot be told from a registry's.)
    let proxy = Tinyproxy::start_with_auth("alice", PASSWORD);
    let stowage = Stowage::start_with(
        &[UpstreamSpec::new("docker.io", &upstream.url())],
        "",
        &[("HTTP_PROXY", &proxy.url())],
    );
    let named = format!("proxy http://127.0.0.1:{}", proxy.port());
    let (status, codes, body, took) = manifest_error(&stowage, "team/refused:1");
    assert_eq!(
        (status, codes),
        (503, vec!["UNAVAILABLE".to_string()]),
        "{body}"
    );
    assert!(body.contains(&named) && body.contains("407"), "{body}");
    assert!(!body.contains(PASSWORD), "{body}");
    assert!(took < Duration::from_secs(30), "answered in {took:?}");
    assert!(
        !proxied(&proxy, &upstream).is_empty(),
        "the proxy was asked"
    );
    let ready = support::get_json(&format!("{}/readyz", stowage.url()));
    let error = ready["upstreams"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("407") && error.contains(&named), "{ready}");

    // Nothing listening where the proxy should be: refused at once, also a 503 naming it.
    let closed = support::free_port();
    let gone = format!("proxy = \"http://alice:{PASSWORD}@127.0.0.1:{closed}\"");
    let stowage = Stowage::start_with(
        &[UpstreamSpec::new("docker.io", &upstream.url()).with_extra(&gone)],
        "",
        &[],
    );
    let (status, codes, body, took) = manifest_error(&stowage, "team/refused:1");
    assert_eq!(
        (status, codes),
        (503, vec!["UNAVAILABLE".to_string()]),
        "{body}"
    );
    assert!(
        body.contains(&format!("proxy http://127.0.0.1:{closed}")),
        "{body}"
    );
    assert!(!body.contains(PASSWORD), "{body}");
    assert!(took < Duration::from_secs(30), "answered in {took:?}");
    assert_password_hidden_for(&stowage, PASSWORD);
}

fn assert_password_hidden_for(stowage: &Stowage, password: &str) {
    let ready = http()
        .get(format!("{}/readyz", stowage.url()))
        .send()
        .and_then(|r| r.text())
        .expect("readyz");
    assert!(!ready.contains(password), "/readyz: {ready}");
    assert!(!stowage.log().contains(password), "log: {}", stowage.log());
}

/// A test CA and a certificate for 127.0.0.1 signed by it, written into `dir`: (ca, cert, key).
fn tls_files(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "stowage proxy test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn https_proxy_tunnels_to_a_tls_upstream() {
    let plain = upstream_with("team/tls");
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(dir.path());
    let upstream = Registry::start_tls_beside(&plain, &cert, &key);
    let proxy = Tinyproxy::start();
    let stowage = Stowage::start_with(
        &[UpstreamSpec::new("docker.io", &upstream.url())],
        "",
        &[
            ("HTTPS_PROXY", &proxy.url()),
            // The upstream's certificate is trusted through the CA bundle variable.
            ("SSL_CERT_FILE", &ca.display().to_string()),
        ],
    );
    pull(&stowage, "team/tls:1");
    let tunnels: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.starts_with(&format!("CONNECT {} ", upstream.host_port())))
        .collect();
    assert!(
        !tunnels.is_empty(),
        "CONNECT through the proxy: {:?}",
        proxy.requests()
    );
    assert!(
        reached(&upstream, "team/tls"),
        "the TLS upstream answered (through the tunnel)"
    );

    // The same tunnel refused: 407 to the CONNECT.
    let guarded = Tinyproxy::start_with_auth("alice", PASSWORD);
    let stowage = Stowage::start_with(
        &[UpstreamSpec::new("docker.io", &upstream.url())],
        "",
        &[
            (
                "HTTPS_PROXY",
                &format!("http://alice:nope@127.0.0.1:{}", guarded.port()),
            ),
            ("SSL_CERT_FILE", &ca.display().to_string()),
        ],
    );
    let (status, codes, body, _) = manifest_error(&stowage, "team/tls:1");
    assert_eq!(
        (status, codes),
        (503, vec!["UNAVAILABLE".to_string()]),
        "{body}"
    );
    assert!(
        body.contains(&format!("proxy http://127.0.0.1:{}", guarded.port())),
        "{body}"
    );
    assert!(!body.contains("nope"), "{body}");
}

#[test]
fn the_object_store_follows_the_proxy_environment() {
    let upstream = upstream_with("team/shared");
    let garage = Garage::start(1);
    let proxy = Tinyproxy::start();
    // The upstream is told to go direct; the shared store (Garage's S3 API) has no such key.
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()).with_extra("proxy = \"none\""))
        .storage_toml(&garage.storage_toml("proxied/"))
        .env("HTTP_PROXY", &proxy.url())
        .start();
    pull(&stowage, "team/shared:1");
    let endpoint = garage.s3_endpoint();
    let s3 = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let stored = wait_until(Duration::from_secs(90), || {
        proxy
            .requests()
            .iter()
            .any(|r| r.starts_with("PUT ") && r.contains(s3))
    });
    assert!(
        stored,
        "blobs reached the store through the proxy: {:?}",
        proxy.requests()
    );
    assert!(
        proxied(&proxy, &upstream).is_empty(),
        "proxy = \"none\" goes direct"
    );
    assert!(reached(&upstream, "team/shared"));
}
