//! Air-gapped sites (issue 8): `serve --offline`, `export` to an OCI image layout, `import`.
//!
//! Images are synthetic, pushed to a real upstream registry and pulled through stowage with plain
//! HTTP; the upstream's access log proves that an offline mirror never contacts it.

mod support;

use std::process::Output;

use support::images::{self, Format, Image, Pushed};
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{http, manifest_accept, sha256_digest};

const KIB: usize = 1 << 10;

fn push(upstream: &Registry, name: &str, layers: &[usize]) -> Pushed {
    images::push(
        &upstream.url(),
        &format!("test/{name}"),
        "1",
        Image::build(Format::Oci, layers),
    )
}

/// Pulls an image through stowage: manifest by tag, then every blob, checking each blob's bytes.
fn pull(stowage: &Stowage, p: &Pushed) {
    let c = http();
    let url = format!("{}/v2/{}/manifests/{}", stowage.url(), p.name, p.tag);
    let r = c
        .get(&url)
        .header("accept", manifest_accept())
        .send()
        .expect("GET manifest");
    assert_eq!(r.status().as_u16(), 200, "GET {url}");
    let body = r.bytes().expect("manifest body");
    assert_eq!(sha256_digest(&body), p.digest(), "manifest bytes of {url}");
    for b in p.blobs() {
        let url = format!("{}/v2/{}/blobs/{}", stowage.url(), p.name, b.digest);
        let r = http().get(&url).send().expect("GET blob");
        assert_eq!(r.status().as_u16(), 200, "GET {url}");
        let bytes = r.bytes().expect("blob body");
        assert_eq!(sha256_digest(&bytes), b.digest, "bytes of {}", b.digest);
    }
}

/// GET `url`: (status, body text).
fn get(url: &str) -> (u16, String) {
    let r = http()
        .get(url)
        .header("accept", manifest_accept())
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().unwrap_or_default())
}

fn upstream_requests(upstream: &Registry) -> usize {
    upstream.sync_log();
    upstream.access_log().len()
}

#[allow(dead_code)]
fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn offline_serves_cached_tags_past_ttl_and_never_contacts_upstream() {
    let upstream = Registry::start();
    let cached = push(&upstream, "cached", &[64 * KIB, 32 * KIB]);
    let absent = push(&upstream, "absent", &[16 * KIB]);
    let mut stowage = Stowage::builder()
        .upstream(
            UpstreamSpec::new("docker.io", &upstream.url()).with_extra("manifest_ttl = \"0s\""),
        )
        .start();
    pull(&stowage, &cached);
    stowage.stop();
    stowage.push_arg("--offline");
    stowage.restart();

    let before = upstream_requests(&upstream);
    // manifest_ttl = 0 would revalidate every time online; offline serves the cached tag.
    pull(&stowage, &cached);
    let (status, body) = get(&format!("{}/v2/test/cached/tags/list", stowage.url()));
    assert_eq!(status, 200, "offline tag list: {body}");
    assert!(body.contains("\"1\""), "offline tag list: {body}");

    // The upstream has these, but an offline mirror does not ask.
    let base = stowage.url();
    for url in [
        format!("{base}/v2/test/absent/manifests/1"),
        format!("{base}/v2/test/absent/manifests/{}", absent.digest()),
        format!("{base}/v2/test/absent/blobs/{}", absent.blobs()[0].digest),
        format!("{base}/v2/test/absent/tags/list"),
    ] {
        let (status, body) = get(&url);
        assert_eq!(status, 404, "GET {url}: {body}");
        assert!(body.contains("offline"), "GET {url} says why: {body}");
    }
    assert_eq!(
        upstream_requests(&upstream),
        before,
        "an offline mirror contacted the upstream:\n{}",
        upstream.access_log_lines().join("\n")
    );
}
