//! Many upstreams behind one endpoint, all three addressing styles at once: two real
//! `docker-registry` upstreams configured as `docker.io` (the default) and `ghcr.io` hold the
//! same repository name with different content. Bare paths go to the default, `/v2/<host>/...`
//! and `?ns=<host>` to the named upstream; tags are kept per upstream, blobs once per digest
//! (a layer both images share is stored and fetched once); `tags/list` links stay in the form
//! the client used; unknown hosts are `NAME_UNKNOWN` naming the configured ones; skopeo pulls
//! through the bare and prefix styles (containerd's `ns` has no skopeo spelling: reqwest); each
//! upstream authenticates with its own credentials (`password_env`).
//!
//! Against the in-process fake upstream: an upstream that pages `tags/list` by default (Quay,
//! GAR) is followed through `Link`s in the client's form even when the client sent no `n`;
//! containerd's `ns` comes back in `OCI-Namespace` on tag lists and on errors; and a `Range`
//! on a blob still filling from an upstream that sent no `Content-Length` gets dockerd's 206.

mod support;

use serde_json::json;
use support::fake_upstream::{FakeUpstream, Fault};
use support::images::{self, Blob, Format, Image, Layer, Manifest};
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{error_codes, manifest_accept, request, sha256_digest, skopeo_ok, Resp};

const REPO: &str = "team/app";

struct World {
    hub: Registry,
    ghcr: Registry,
    stowage: Stowage,
    hub_image: Image,
    ghcr_image: Image,
    shared: Layer,
}

/// A Docker schema 2 image with `layers` (in order) and a fresh config.
fn image_with_layers(layers: Vec<Layer>) -> Image {
    let format = Format::Docker;
    let nonce = support::sha256_hex(&rand_bytes());
    let config_json = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Labels": {"nonce": nonce}},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let config = Blob::new(
        format.config_type(),
        serde_json::to_vec(&config_json).unwrap(),
    );
    let desc = |b: &Blob| json!({"mediaType": b.media_type, "size": b.size(), "digest": b.digest});
    let manifest_json = json!({
        "schemaVersion": 2,
        "mediaType": format.manifest_type(),
        "config": desc(&config),
        "layers": layers.iter().map(|l| desc(&l.blob)).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec_pretty(&manifest_json).unwrap();
    Image {
        format,
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: None,
        manifest: Manifest {
            media_type: format.manifest_type().into(),
            digest: sha256_digest(&bytes),
            bytes,
        },
        config,
        layers,
    }
}

fn rand_bytes() -> Vec<u8> {
    // The random layer's bytes are random enough to seed a nonce.
    images::random_layer(Format::Docker, 16).blob.bytes
}

fn world() -> World {
    let hub = Registry::start();
    let ghcr = Registry::start();
    let shared = images::random_layer(Format::Docker, 2048);
    let hub_image = image_with_layers(vec![
        shared.clone(),
        images::random_layer(Format::Docker, 512),
    ]);
    let ghcr_image = image_with_layers(vec![
        shared.clone(),
        images::random_layer(Format::Docker, 768),
    ]);
    hub.push(REPO, "1.0", hub_image.clone());
    ghcr.push(REPO, "1.0", ghcr_image.clone());
    let stowage = Stowage::start(&[
        UpstreamSpec::new("docker.io", &hub.url()),
        UpstreamSpec::new("ghcr.io", &ghcr.url()),
    ]);
    World {
        hub,
        ghcr,
        stowage,
        hub_image,
        ghcr_image,
        shared,
    }
}

fn get(url: &str) -> Resp {
    request(reqwest::Method::GET, url, &[&manifest_accept()])
}

/// Pulls manifest and every blob of `image` through `base` (a `/v2/<name>` URL prefix) with
/// `query` appended, checking bytes and digests.
fn pull_over_http(base: &str, query: &str, image: &Image, what: &str) {
    let m = get(&format!("{base}/manifests/1.0{query}"));
    assert_eq!(m.status, 200, "{what}: manifest");
    assert_eq!(
        m.header("docker-content-digest"),
        image.manifest.digest,
        "{what}: tag resolved on the wrong upstream"
    );
    assert_eq!(m.body, image.manifest.bytes, "{what}");
    for b in image.blobs() {
        let r = get(&format!("{base}/blobs/{}{query}", b.digest));
        assert_eq!(r.status, 200, "{what}: blob {}", b.digest);
        assert_eq!(r.body, b.bytes, "{what}: blob {}", b.digest);
    }
}

#[test]
fn same_name_resolves_per_upstream_by_ns_prefix_and_bare_and_a_shared_layer_is_stored_once() {
    let w = world();
    assert_ne!(w.hub_image.manifest.digest, w.ghcr_image.manifest.digest);
    let base = w.stowage.url();

    // Bare → the default (docker.io); prefix and ns → the named upstream.
    pull_over_http(&format!("{base}/v2/{REPO}"), "", &w.hub_image, "bare");
    pull_over_http(
        &format!("{base}/v2/ghcr.io/{REPO}"),
        "",
        &w.ghcr_image,
        "prefix ghcr.io",
    );
    pull_over_http(
        &format!("{base}/v2/{REPO}"),
        "?ns=ghcr.io",
        &w.ghcr_image,
        "ns=ghcr.io",
    );
    pull_over_http(
        &format!("{base}/v2/docker.io/{REPO}"),
        "",
        &w.hub_image,
        "prefix docker.io",
    );
    pull_over_http(
        &format!("{base}/v2/{REPO}"),
        "?ns=docker.io",
        &w.hub_image,
        "ns=docker.io",
    );

    // containerd's ns is echoed.
    let r = get(&format!("{base}/v2/{REPO}/manifests/1.0?ns=ghcr.io"));
    assert_eq!(r.header("oci-namespace"), "ghcr.io");

    // Blobs are global by digest: 2 configs + 2 own layers + 1 shared layer.
    let mut expected: Vec<String> = w
        .hub_image
        .blobs()
        .into_iter()
        .chain(w.ghcr_image.blobs())
        .map(|b| b.digest.clone())
        .collect();
    expected.sort();
    expected.dedup();
    assert_eq!(expected.len(), 5);
    let files = w.stowage.blob_files();
    assert_eq!(
        files.len(),
        5,
        "each distinct blob stored exactly once: {files:?}"
    );
    for d in &expected {
        assert!(w.stowage.blob_path(d).is_file(), "{d} stored");
    }
    // The shared layer was fetched from one upstream only, once.
    let shared = format!("/blobs/{}", w.shared.blob.digest);
    let fetched = w.hub.count_requests("GET", &shared) + w.ghcr.count_requests("GET", &shared);
    assert_eq!(fetched, 1, "the shared layer is fetched once in all");
    // And each upstream only saw its own repository name (prefix stripped, no library/).
    for line in w
        .hub
        .access_log_lines()
        .into_iter()
        .chain(w.ghcr.access_log_lines())
    {
        if line.contains("/manifests/") || line.contains("/blobs/") {
            assert!(
                line.contains(&format!("/v2/{REPO}/")),
                "upstream saw a wrong name: {line}"
            );
        }
    }
}

/// Follows a paged `tags/list` from `start` (a path under `base`) along its `Link` headers:
/// every page answers 200 and at most `max_pages` are read; `next_page(path, link, tags so
/// far)` checks each non-empty `Link` and returns the next path. Returns every tag and the
/// number of pages.
fn follow_tag_pages(
    base: &str,
    start: &str,
    max_pages: usize,
    mut next_page: impl FnMut(&str, &str, &[String]) -> String,
) -> (Vec<String>, usize) {
    let mut next = Some(start.to_string());
    let mut tags = Vec::new();
    let mut pages = 0;
    while let Some(path) = next.take() {
        pages += 1;
        assert!(pages <= max_pages, "{start}: too many pages");
        let r = get(&format!("{base}{path}"));
        assert_eq!(r.status, 200, "{path}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        for t in v["tags"].as_array().unwrap() {
            tags.push(t.as_str().unwrap().to_string());
        }
        let link = r.header("link");
        if !link.is_empty() {
            next = Some(next_page(&path, &link, &tags));
        }
    }
    (tags, pages)
}

#[test]
fn tag_list_links_keep_the_prefix_or_ns_the_client_used() {
    let w = world();
    let pushed_ghcr_tags = ["1.0", "2.0", "3.0"];
    for t in &pushed_ghcr_tags[1..] {
        images::push_manifest(&w.ghcr.url(), REPO, t, &w.ghcr_image.manifest);
    }
    let base = w.stowage.url();

    for (start, expected_prefix, extra) in [
        (
            format!("/v2/ghcr.io/{REPO}/tags/list?n=1"),
            format!("/v2/ghcr.io/{REPO}/tags/list?"),
            "",
        ),
        (
            format!("/v2/{REPO}/tags/list?n=1&ns=ghcr.io"),
            format!("/v2/{REPO}/tags/list?"),
            "ns=ghcr.io",
        ),
    ] {
        let (tags, _) = follow_tag_pages(&base, &start, 5, |_, link, _| {
            let url = link
                .trim_start_matches('<')
                .split_once('>')
                .map(|(u, _)| u.to_string())
                .unwrap();
            assert!(
                url.starts_with(&expected_prefix),
                "Link {link:?} is not in the client's form {expected_prefix:?}"
            );
            assert!(url.contains(extra), "Link {link:?} lost {extra:?}");
            url
        });
        assert_eq!(tags, pushed_ghcr_tags, "all ghcr.io tags, page by page");
    }

    // The bare name lists the default upstream's tags.
    let r = get(&format!("{base}/v2/{REPO}/tags/list"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["tags"], json!(["1.0"]));
    assert_eq!(v["name"], json!(REPO));
}

#[test]
fn unknown_host_is_name_unknown_naming_the_configured_hosts() {
    let w = world();
    let base = w.stowage.url();
    for path in [
        format!("/v2/quay.io/{REPO}/manifests/1.0"),
        format!("/v2/{REPO}/manifests/1.0?ns=quay.io"),
        format!("/v2/quay.io/{REPO}/tags/list"),
    ] {
        let r = get(&format!("{base}{path}"));
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(error_codes(&r.body, &path), ["NAME_UNKNOWN"]);
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert!(
            body.contains("quay.io") && body.contains("docker.io") && body.contains("ghcr.io"),
            "{path}: the message names the host and the configured ones: {body}"
        );
    }
    // Nothing of it reached an upstream.
    for reg in [&w.hub, &w.ghcr] {
        assert!(
            reg.access_log_lines().iter().all(|l| !l.contains("quay.io")
                && !l.starts_with("GET /v2/team")
                && !l.starts_with("HEAD /v2/team")),
            "{:?}",
            reg.access_log_lines()
        );
    }
}

#[test]
fn skopeo_pulls_through_bare_and_prefix_styles() {
    let w = world();
    for (reference, image) in [
        (
            format!("{}/{REPO}:1.0", w.stowage.host_port()),
            &w.hub_image,
        ),
        (
            format!("{}/ghcr.io/{REPO}:1.0", w.stowage.host_port()),
            &w.ghcr_image,
        ),
        (
            format!("{}/docker.io/{REPO}:1.0", w.stowage.host_port()),
            &w.hub_image,
        ),
    ] {
        let out = tempfile::tempdir().unwrap();
        skopeo_ok(
            &[
                "copy",
                &format!("docker://{reference}"),
                &format!("dir:{}", out.path().display()),
            ],
            &reference,
        );
        let manifest = std::fs::read(out.path().join("manifest.json")).unwrap();
        assert_eq!(
            manifest, image.manifest.bytes,
            "{reference}: the manifest of the right upstream, byte-exact"
        );
        for b in image.blobs() {
            let got = std::fs::read(out.path().join(b.hex()))
                .unwrap_or_else(|e| panic!("{reference}: blob {} missing: {e}", b.digest));
            assert_eq!(got, b.bytes, "{reference}: blob {}", b.digest);
        }
    }
    // The ns style, as containerd sends it (skopeo has no way to add ?ns=).
    pull_over_http(
        &format!("{}/v2/{REPO}", w.stowage.url()),
        "?ns=ghcr.io",
        &w.ghcr_image,
        "ns=ghcr.io",
    );
}

#[test]
fn each_upstream_uses_its_own_credentials_from_password_env() {
    use support::fake_upstream::FakeUpstream;
    let hub = Registry::start();
    let ghcr = FakeUpstream::builder()
        .token_credentials("robot", "env-s3cret")
        .start();
    let image = Image::build(Format::Oci, &[64]);
    for b in image.blobs() {
        ghcr.add_blob(REPO, b.bytes.clone());
    }
    ghcr.add_manifest(
        REPO,
        "1.0",
        &image.manifest.media_type,
        image.manifest.bytes.clone(),
    );
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &hub.url()))
        .upstream(
            UpstreamSpec::new("ghcr.io", &ghcr.url())
                .with_extra("username = \"robot\"\npassword_env = \"STOWAGE_TEST_GHCR_TOKEN\""),
        )
        .env("STOWAGE_TEST_GHCR_TOKEN", "env-s3cret")
        .start();
    pull_over_http(
        &format!("{}/v2/ghcr.io/{REPO}", stowage.url()),
        "",
        &image,
        "ghcr.io with password_env",
    );
    let tokens = ghcr.token_requests();
    assert!(!tokens.is_empty(), "the token endpoint was used");
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("robot:env-s3cret")
    );
    assert!(
        tokens
            .iter()
            .all(|t| t.authorization.as_deref() == Some(basic.as_str())),
        "the password came from the environment"
    );
    assert!(
        !stowage.log().contains("env-s3cret"),
        "the password is never logged"
    );
}

/// A default upstream and a second one, `quay.io`, that pages `tags/list` two tags at a time and
/// holds `team/app` with five tags.
fn paging_world() -> (FakeUpstream, FakeUpstream, Stowage) {
    let hub = FakeUpstream::start();
    let quay = FakeUpstream::start();
    quay.page_tags_by_default(2);
    for t in ["1", "2", "3", "4", "5"] {
        quay.add_manifest(
            REPO,
            t,
            "application/vnd.oci.image.manifest.v1+json",
            format!("{{\"schemaVersion\":2,\"tag\":\"{t}\"}}"),
        );
    }
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &hub.url()))
        .upstream(UpstreamSpec::new("quay.io", &quay.url()))
        .start();
    (hub, quay, stowage)
}

/// The target of a `Link: <url>; rel="next"` header.
fn link_target(link: &str) -> Option<String> {
    link.trim()
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .map(|(u, _)| u.to_string())
}

#[test]
fn tag_list_without_n_follows_an_upstream_that_pages_by_default() {
    let (_hub, quay, stowage) = paging_world();
    let base = stowage.url();
    for (start, expected_prefix, ns, n) in [
        (
            format!("/v2/quay.io/{REPO}/tags/list"),
            format!("/v2/quay.io/{REPO}/tags/list?"),
            None,
            None,
        ),
        (
            format!("/v2/{REPO}/tags/list?ns=quay.io"),
            format!("/v2/{REPO}/tags/list?"),
            Some("quay.io"),
            None,
        ),
        (
            format!("/v2/{REPO}/tags/list?n=3&ns=quay.io"),
            format!("/v2/{REPO}/tags/list?"),
            Some("quay.io"),
            Some("3"),
        ),
    ] {
        let (tags, pages) = follow_tag_pages(&base, &start, 6, |path, link, tags| {
            assert!(link.ends_with("rel=\"next\""), "{path}: {link}");
            let url = link_target(link).unwrap_or_else(|| panic!("{path}: Link {link:?}"));
            assert!(
                url.starts_with(&expected_prefix),
                "{path}: Link {link:?} is not in the client's form {expected_prefix:?}"
            );
            let query = url::Url::parse(&format!("http://mirror{url}")).unwrap();
            let param = |k: &str| {
                query
                    .query_pairs()
                    .find(|(name, _)| name == k)
                    .map(|(_, v)| v.into_owned())
            };
            assert_eq!(param("ns").as_deref(), ns, "{path}: Link {link:?}");
            assert_eq!(param("n").as_deref(), n, "{path}: Link {link:?}");
            assert_eq!(
                param("last").as_deref(),
                tags.last().map(String::as_str),
                "{path}: Link {link:?}"
            );
            url
        });
        assert_eq!(
            tags,
            ["1", "2", "3", "4", "5"],
            "{start}: every tag, page by page"
        );
        assert!(pages >= 3, "{start}: the upstream paged ({pages} pages)");
    }
    // The upstream was asked for the following pages with `last`, never given an `n` the
    // client did not send.
    let lists: Vec<_> = quay
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/tags/list"))
        .collect();
    assert!(lists.iter().any(|r| r.query_param("last") == ["4"]));
    assert!(
        lists
            .iter()
            .all(|r| r.query_param("n").is_empty() || r.query_param("n") == ["3"]),
        "{lists:?}"
    );
}

#[test]
fn ns_is_echoed_on_tag_lists_and_on_errors() {
    let (_hub, _quay, stowage) = paging_world();
    let base = stowage.url();
    let absent = sha256_digest(b"nobody pushed this");
    // Success: the tag list.
    let r = get(&format!("{base}/v2/{REPO}/tags/list?ns=quay.io"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("oci-namespace"), "quay.io", "tags/list");
    // Errors, GET and HEAD: unknown tag, unknown blob, unknown repository, bad name.
    for (path, status, code) in [
        (
            format!("/v2/{REPO}/manifests/absent?ns=quay.io"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("/v2/{REPO}/blobs/{absent}?ns=quay.io"),
            404,
            "BLOB_UNKNOWN",
        ),
        (
            "/v2/team/nothing/tags/list?ns=quay.io".to_string(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/Bad/manifests/1?ns=quay.io".to_string(),
            400,
            "NAME_INVALID",
        ),
    ] {
        let url = format!("{base}{path}");
        let r = get(&url);
        assert_eq!(r.status, status, "{path}");
        assert_eq!(error_codes(&r.body, &path), [code]);
        assert_eq!(r.header("oci-namespace"), "quay.io", "GET {path}");
        let h = support::http().head(&url).send().unwrap();
        assert_eq!(h.status().as_u16(), status, "HEAD {path}");
        assert_eq!(
            h.headers()
                .get("oci-namespace")
                .and_then(|v| v.to_str().ok()),
            Some("quay.io"),
            "HEAD {path}"
        );
    }
    // Without ns, no header.
    let r = get(&format!("{base}/v2/quay.io/{REPO}/manifests/absent"));
    assert_eq!(r.status, 404);
    assert!(r.headers.get("oci-namespace").is_none());
}

#[test]
fn a_range_while_a_blob_of_unknown_size_fills_gets_a_206() {
    let upstream = FakeUpstream::start();
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let size = bytes.len();
    let digest = upstream.add_blob(REPO, bytes.clone());
    // No Content-Length, and the body stops at 64 KiB until released: the blob is mid-fill
    // with its size unknown while the clients below ask for ranges.
    upstream.serve_chunked(&digest);
    upstream.push_faults(&digest, [Fault::HoldAt(64 * 1024)]);
    let stowage = Stowage::for_docker_io(&upstream.url());
    let url = format!("{}/v2/{REPO}/blobs/{digest}", stowage.url());

    let ranged = |range: &'static str| {
        let url = url.clone();
        std::thread::spawn(move || {
            let resp = support::http()
                .get(&url)
                .header("Range", range)
                .send()
                .unwrap_or_else(|e| panic!("GET {url} Range {range}: {e}"));
            Resp::read(resp)
        })
    };
    // dockerd's resume starts the fill; two more join it.
    let resume = ranged("bytes=1000-");
    assert!(
        support::wait_until(std::time::Duration::from_secs(30), || !upstream
            .blob_gets(&digest)
            .is_empty()),
        "the fill reached the upstream"
    );
    let middle = ranged("bytes=5000-5999");
    let past_end = ranged("bytes=900000-");
    std::thread::sleep(std::time::Duration::from_millis(500));
    upstream.release_holds();

    let r = resume.join().unwrap();
    assert_eq!(r.status, 206, "dockerd's resume needs a 206, not a 200");
    assert_eq!(
        r.header("content-range"),
        format!("bytes 1000-{}/{size}", size - 1)
    );
    assert_eq!(r.header("content-length"), (size - 1000).to_string());
    assert!(r.body == bytes[1000..], "the resumed bytes");

    let r = middle.join().unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), format!("bytes 5000-5999/{size}"));
    assert!(r.body == bytes[5000..6000]);

    let r = past_end.join().unwrap();
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), format!("bytes */{size}"));
    assert_eq!(
        upstream.blob_gets(&digest).len(),
        1,
        "one fill for all three"
    );
}
