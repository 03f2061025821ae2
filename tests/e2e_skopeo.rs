//! End to end with a real client: skopeo pulls synthetic images through stowage from a real
//! upstream registry (distribution 2.8), and every byte that arrives is checked against what was
//! pushed. Also pins the read-side HTTP surface a client sees: GET/HEAD header agreement,
//! `_catalog`, `/v1/search`, proxied `tags/list` and docker.io's `library/` normalisation.
//!
//! Each test starts its own upstream and its own stowage (own ports, own temp dirs).

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use support::images::{self, Format, Image, ImageIndex, Pushed};
use support::registry::Registry;
use support::stowage::{MirroredRegistry, Stowage};
use support::{get_json, http, manifest_accept, sha256_hex, skopeo_ok, wait_until};

/// A real upstream registry and a stowage in front of it as the `docker.io` upstream.
fn world() -> MirroredRegistry {
    MirroredRegistry::start()
}

/// 1 KiB + 3 MiB layers: one small, one multi-MiB so streaming paths are exercised.
const LAYERS: &[usize] = &[1024, 3 * 1024 * 1024];

/// `skopeo copy docker://<host>/<reference> dir:<out>` (with `--all` if asked), then checks
/// that the directory holds exactly the pushed content.
fn pull_and_verify(host: &str, reference: &str, pushed: &Pushed, all: bool, out: &Path) {
    let src = format!("docker://{host}/{reference}");
    let dst = format!("dir:{}", out.display());
    let mut args = vec!["copy", "--preserve-digests"];
    if all {
        args.push("--all");
    }
    args.extend([src.as_str(), dst.as_str()]);
    skopeo_ok(&args, &format!("pulling {reference} from {host}"));
    verify_dir(out, pushed, all);
}

/// [`pull_and_verify`] of `reference` from stowage into a fresh temp dir, which it returns.
fn pull_from_stowage(
    w: &MirroredRegistry,
    reference: &str,
    pushed: &Pushed,
    all: bool,
) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("temp dir for a pull");
    pull_and_verify(&w.stowage.host_port(), reference, pushed, all, out.path());
    out
}

/// Checks a skopeo `dir:` copy: `manifest.json` is byte-identical to the pushed top manifest,
/// every `<hex>.manifest.json` (children with `--all`) to the pushed child, and every other
/// file is named by the sha256 of its own content, is a pushed blob and equals it byte for byte.
/// Every blob of every copied platform must be present.
fn verify_dir(out: &Path, pushed: &Pushed, all: bool) {
    let what = format!("{}:{}", pushed.name, pushed.tag);
    let top = std::fs::read(out.join("manifest.json"))
        .unwrap_or_else(|e| panic!("{what}: no manifest.json in {}: {e}", out.display()));
    assert!(
        top == pushed.manifest().bytes,
        "{what}: manifest.json differs from the pushed manifest ({}, {}): got digest sha256:{} ({} bytes), expected {} ({} bytes)",
        pushed.media_type(),
        pushed.tag,
        sha256_hex(&top),
        top.len(),
        pushed.digest(),
        pushed.manifest().size()
    );

    assert!(
        all || pushed.image.images().len() == 1,
        "{what}: verify_dir checks whole copies; copy a list/index with --all"
    );
    let expected_blobs: BTreeSet<String> =
        pushed.blobs().iter().map(|b| b.hex().to_string()).collect();
    let mut seen_blobs = BTreeSet::new();
    let mut seen_children = BTreeSet::new();
    for entry in std::fs::read_dir(out).expect("read skopeo output dir") {
        let entry = entry.expect("dir entry");
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name == "manifest.json" || file_name == "version" {
            continue;
        }
        let bytes = std::fs::read(entry.path()).expect("read copied file");
        if let Some(hex) = file_name.strip_suffix(".manifest.json") {
            let child = pushed.image.manifest_by(hex).unwrap_or_else(|| {
                panic!("{what}: skopeo wrote a child manifest {file_name} that was never pushed")
            });
            assert!(
                bytes == child.bytes,
                "{what}: child manifest {file_name} differs from the pushed bytes (got sha256:{})",
                sha256_hex(&bytes)
            );
            seen_children.insert(hex.to_string());
            continue;
        }
        let actual = sha256_hex(&bytes);
        assert_eq!(
            actual,
            file_name,
            "{what}: file {file_name} does not hash to its name ({} bytes)",
            bytes.len()
        );
        let blob = pushed.image.blob(&file_name).unwrap_or_else(|| {
            panic!("{what}: skopeo wrote blob {file_name} that was never pushed")
        });
        assert!(
            bytes == blob.bytes,
            "{what}: blob {file_name} differs from the pushed bytes"
        );
        seen_blobs.insert(file_name);
    }
    assert_eq!(
        seen_blobs, expected_blobs,
        "{what}: the set of copied blobs differs from the pushed blobs"
    );
    if all {
        let expected_children: BTreeSet<String> = match &pushed.image {
            images::TestImage::Single(_) => BTreeSet::new(),
            images::TestImage::Index(i) => i
                .children
                .iter()
                .map(|c| c.manifest.hex().to_string())
                .collect(),
        };
        assert_eq!(
            seen_children, expected_children,
            "{what}: the set of copied child manifests differs from the pushed children"
        );
    }
}

/// Waits (bounded) until every blob of `pushed` is committed in stowage's cache layout, so the
/// next pull cannot race a fill that is still being finalised. Returns the missing blobs.
fn wait_for_cached_blobs(stowage: &Stowage, pushed: &Pushed) -> Vec<String> {
    let missing = || -> Vec<String> {
        pushed
            .blobs()
            .iter()
            .filter(|b| !stowage.blob_path(&b.digest).is_file())
            .map(|b| b.digest.clone())
            .collect()
    };
    wait_until(Duration::from_secs(30), || missing().is_empty());
    missing()
}

/// Pull through stowage, verify; pull again, verify, and prove that no blob request reached
/// the upstream the second time.
fn pull_twice_through_stowage(w: &MirroredRegistry, pushed: &Pushed, all: bool) {
    let reference = format!("{}:{}", pushed.name, pushed.tag);
    let _first = pull_from_stowage(w, &reference, pushed, all);
    assert!(
        w.upstream.blob_gets() > 0,
        "the first (cold) pull of {reference} should have fetched blobs from the upstream; upstream saw: {:#?}",
        w.upstream.access_log_lines()
    );

    let missing = wait_for_cached_blobs(&w.stowage, pushed);
    let upstream_blob_gets_before = w.upstream.blob_gets();
    let log_before = w.upstream.access_log_lines().len();

    let _second = pull_from_stowage(w, &reference, pushed, all);
    let after = w.upstream.access_log_lines();
    assert_eq!(
        w.upstream.blob_gets(),
        upstream_blob_gets_before,
        "the second pull of {reference} must not GET any blob from the upstream; upstream requests during it: {:#?}",
        &after[log_before.min(after.len())..]
    );
    assert!(
        missing.is_empty(),
        "after the first pull every blob should be committed at blobs/sha256/<2hex>/<hex>; missing: {missing:?}; files: {:#?}",
        w.stowage.blob_files()
    );
}

#[test]
fn harness_pushes_images_that_skopeo_pulls_straight_from_the_upstream() {
    // Proves the harness itself (push API, image building, dir verification) before stowage is
    // involved: if this fails, the other failures in this file say nothing about stowage.
    let upstream = Registry::start();
    let cases: Vec<(Pushed, bool)> = vec![
        (
            upstream.push(
                "library/h-docker",
                "1.0",
                Image::build(Format::Docker, &[512, 4096]),
            ),
            false,
        ),
        (
            upstream.push("library/h-oci", "1.0", Image::build(Format::Oci, &[512])),
            false,
        ),
        (
            upstream.push(
                "library/h-list",
                "1.0",
                ImageIndex::build(Format::Docker, &["amd64", "arm64"], &[512]),
            ),
            true,
        ),
        (
            upstream.push(
                "org/h-index",
                "1.0",
                ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[512]),
            ),
            true,
        ),
    ];
    for (pushed, all) in &cases {
        let out = tempfile::tempdir().expect("temp dir");
        let reference = format!("{}:{}", pushed.name, pushed.tag);
        pull_and_verify(&upstream.host_port(), &reference, pushed, *all, out.path());
    }
    assert!(
        upstream.blob_gets() >= cases.iter().map(|(p, _)| p.blobs().len()).sum::<usize>(),
        "the access log should show every blob GET; saw {:#?}",
        upstream.access_log_lines()
    );
}

#[test]
fn docker_schema2_image_pulls_byte_exact_and_second_pull_sends_no_blob_request_upstream() {
    let w = world();
    let pushed = w.upstream.push(
        "library/e2e-docker",
        "1.0",
        Image::build(Format::Docker, LAYERS),
    );
    pull_twice_through_stowage(&w, &pushed, false);
}

#[test]
fn oci_manifest_image_pulls_byte_exact_and_second_pull_sends_no_blob_request_upstream() {
    let w = world();
    let pushed = w
        .upstream
        .push("library/e2e-oci", "1.0", Image::build(Format::Oci, LAYERS));
    pull_twice_through_stowage(&w, &pushed, false);
}

#[test]
fn docker_manifest_list_pulls_every_platform_byte_exact_and_second_pull_sends_no_blob_request_upstream(
) {
    let w = world();
    let list = ImageIndex::build(Format::Docker, &["amd64", "arm64"], LAYERS);
    let pushed = w.upstream.push("library/e2e-list", "1.0", list);
    pull_twice_through_stowage(&w, &pushed, true);
}

#[test]
fn oci_index_pulls_every_platform_byte_exact_and_second_pull_sends_no_blob_request_upstream() {
    let w = world();
    let index = ImageIndex::build(Format::Oci, &["amd64", "arm64"], LAYERS);
    let pushed = w.upstream.push("org/e2e-index", "1.0", index);
    pull_twice_through_stowage(&w, &pushed, true);
}

#[test]
fn pull_by_digest_is_byte_exact() {
    let w = world();
    let pushed = w.upstream.push(
        "library/e2e-bydigest",
        "1.0",
        Image::build(Format::Docker, LAYERS),
    );
    let _out = pull_from_stowage(
        &w,
        &format!("{}@{}", pushed.name, pushed.digest()),
        &pushed,
        false,
    );

    // The manifest list of a multi-arch image by digest, every platform.
    let list = ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[2048]);
    let pushed = w.upstream.push("library/e2e-bydigest-index", "1.0", list);
    let _out = pull_from_stowage(
        &w,
        &format!("{}@{}", pushed.name, pushed.digest()),
        &pushed,
        true,
    );
}

#[test]
fn one_segment_name_is_served_from_library() {
    let w = world();
    let pushed = w.upstream.push(
        "library/e2e-short",
        "3.19",
        Image::build(Format::Docker, &[4096]),
    );

    let resp = http()
        .get(format!("{}/v2/e2e-short/manifests/3.19", w.stowage.url()))
        .header("Accept", manifest_accept())
        .send()
        .expect("GET /v2/e2e-short/manifests/3.19");
    assert_eq!(
        resp.status().as_u16(),
        200,
        "a one-segment docker.io name should resolve to library/e2e-short"
    );
    assert_eq!(
        header(&resp, "Docker-Content-Digest").as_deref(),
        Some(pushed.digest()),
        "Docker-Content-Digest for e2e-short:3.19"
    );
    let body = resp.bytes().expect("manifest body");
    assert!(
        body.as_ref() == pushed.manifest().bytes,
        "e2e-short:3.19 manifest bytes differ from library/e2e-short:3.19"
    );

    // And a real client pulling the short name gets the whole image.
    let _out = pull_from_stowage(&w, "e2e-short:3.19", &pushed, false);
}

fn header(resp: &reqwest::blocking::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header").to_string())
}

/// The headers both methods must agree on.
fn agreed_headers(resp: &reqwest::blocking::Response) -> [(&'static str, Option<String>); 4] {
    [
        (
            "Docker-Content-Digest",
            header(resp, "Docker-Content-Digest"),
        ),
        ("Content-Type", header(resp, "Content-Type")),
        ("Content-Length", header(resp, "Content-Length")),
        (
            "Docker-Distribution-API-Version",
            header(resp, "Docker-Distribution-API-Version"),
        ),
    ]
}

/// HEAD then GET then HEAD again (cold, then warm): same headers every time, with the right
/// values, and the GET body equals `expected_body`.
fn assert_head_and_get_agree(
    url: &str,
    accept: Option<&str>,
    expected_body: &[u8],
    expected_type: &str,
) {
    let client = http();
    let request = |method: reqwest::Method| {
        let mut req = client.request(method.clone(), url);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        let resp = req.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        assert_eq!(
            resp.status().as_u16(),
            200,
            "{method} {url} should answer 200"
        );
        resp
    };
    let expected_digest = format!("sha256:{}", sha256_hex(expected_body));
    let expected = [
        ("Docker-Content-Digest", Some(expected_digest)),
        ("Content-Type", Some(expected_type.to_string())),
        ("Content-Length", Some(expected_body.len().to_string())),
        (
            "Docker-Distribution-API-Version",
            Some("registry/2.0".to_string()),
        ),
    ];

    let cold_head = request(reqwest::Method::HEAD);
    assert_eq!(
        agreed_headers(&cold_head),
        expected,
        "cold HEAD {url}: headers"
    );
    let get = request(reqwest::Method::GET);
    let get_headers = agreed_headers(&get);
    let body = get.bytes().expect("GET body");
    assert!(
        body.as_ref() == expected_body,
        "GET {url}: body differs from the pushed bytes"
    );
    assert_eq!(get_headers, expected, "GET {url}: headers");
    let warm_head = request(reqwest::Method::HEAD);
    assert_eq!(
        agreed_headers(&warm_head),
        get_headers,
        "warm HEAD {url} must answer the same headers as GET"
    );
}

#[test]
fn manifest_head_and_get_return_identical_headers() {
    let w = world();
    let single = w.upstream.push(
        "library/e2e-heads",
        "1.0",
        Image::build(Format::Docker, &[1024]),
    );
    let index = w.upstream.push(
        "library/e2e-heads-index",
        "1.0",
        ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[1024]),
    );
    let accept = manifest_accept();
    for pushed in [&single, &index] {
        let base = format!("{}/v2/{}/manifests", w.stowage.url(), pushed.name);
        assert_head_and_get_agree(
            &format!("{base}/{}", pushed.tag),
            Some(&accept),
            &pushed.manifest().bytes,
            pushed.media_type(),
        );
        assert_head_and_get_agree(
            &format!("{base}/{}", pushed.digest()),
            Some(&accept),
            &pushed.manifest().bytes,
            pushed.media_type(),
        );
    }
    if let images::TestImage::Index(i) = &index.image {
        let child = &i.children[1].manifest;
        let url = format!(
            "{}/v2/{}/manifests/{}",
            w.stowage.url(),
            index.name,
            child.digest
        );
        assert_head_and_get_agree(&url, Some(&accept), &child.bytes, &child.media_type);
    }
}

#[test]
fn blob_head_and_get_return_identical_headers() {
    let w = world();
    let pushed = w.upstream.push(
        "library/e2e-blob-heads",
        "1.0",
        Image::build(Format::Oci, LAYERS),
    );
    for blob in pushed.blobs() {
        let url = format!(
            "{}/v2/{}/blobs/{}",
            w.stowage.url(),
            pushed.name,
            blob.digest
        );
        assert_head_and_get_agree(&url, None, &blob.bytes, "application/octet-stream");
    }
}

/// Pulls `pushed` through stowage with skopeo (for the side effect of caching it).
fn pull_through(w: &MirroredRegistry, pushed: &Pushed) {
    let _out = pull_from_stowage(w, &format!("{}:{}", pushed.name, pushed.tag), pushed, false);
}

/// Whether a name reported by stowage denotes `name` (optionally qualified by its upstream host).
fn same_repo(reported: &str, name: &str) -> bool {
    reported == name || reported.ends_with(&format!("/{name}"))
}

#[test]
fn catalog_lists_pulled_repositories() {
    let w = world();
    let a = w.upstream.push(
        "library/e2e-cat-one",
        "1.0",
        Image::build(Format::Docker, &[1024]),
    );
    let b = w.upstream.push(
        "acme/e2e-cat-two",
        "1.0",
        Image::build(Format::Oci, &[1024]),
    );
    pull_through(&w, &a);
    pull_through(&w, &b);

    let body = get_json(&format!("{}/v2/_catalog", w.stowage.url()));
    let repos: Vec<String> = body["repositories"]
        .as_array()
        .unwrap_or_else(|| panic!("_catalog has no \"repositories\" array: {body}"))
        .iter()
        .map(|r| {
            r.as_str()
                .expect("repository names are strings")
                .to_string()
        })
        .collect();
    for name in [&a.name, &b.name] {
        assert!(
            repos.iter().any(|r| same_repo(r, name)),
            "_catalog should list pulled repository {name}; got {repos:?}"
        );
    }
}

#[test]
fn search_finds_pulled_repository() {
    let w = world();
    let pushed = w.upstream.push(
        "library/e2e-searchable",
        "1.0",
        Image::build(Format::Docker, &[1024]),
    );
    let other = w.upstream.push(
        "acme/e2e-unrelated",
        "1.0",
        Image::build(Format::Docker, &[1024]),
    );
    pull_through(&w, &pushed);
    pull_through(&w, &other);

    let body = get_json(&format!("{}/v1/search?q=searchable", w.stowage.url()));
    assert_eq!(
        body["query"], "searchable",
        "/v1/search echoes the query: {body}"
    );
    let results = body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("/v1/search has no \"results\" array: {body}"));
    assert_eq!(
        body["num_results"].as_u64(),
        Some(results.len() as u64),
        "num_results should count the results: {body}"
    );
    for r in results {
        assert!(
            r["name"].is_string(),
            "every result has a string name: {body}"
        );
        assert!(
            r["description"].is_string(),
            "every result has a string description: {body}"
        );
    }
    assert!(
        results.iter().any(
            |r| same_repo(r["name"].as_str().unwrap_or(""), &pushed.name)
                || r["name"] == "e2e-searchable"
        ),
        "/v1/search?q=searchable should find {}: {body}",
        pushed.name
    );
    assert!(
        !results
            .iter()
            .any(|r| r["name"].as_str().unwrap_or("").contains("unrelated")),
        "/v1/search?q=searchable should not return e2e-unrelated: {body}"
    );
}

#[test]
fn tags_list_proxies_the_upstream_tags() {
    let w = world();
    let pushed = w.upstream.push(
        "library/e2e-tags",
        "1.0",
        Image::build(Format::Docker, &[1024]),
    );
    for tag in ["1.1", "2.0", "latest"] {
        images::push_manifest(&w.upstream.url(), &pushed.name, tag, pushed.manifest());
    }
    let all = vec!["1.0", "1.1", "2.0", "latest"];

    let get = |base: &str, name: &str, query: &str| -> serde_json::Value {
        let url = format!("{base}/v2/{name}/tags/list{query}");
        let resp = http()
            .get(&url)
            .send()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "GET {url}");
        if let Some(link) = resp.headers().get("Link") {
            let link = link.to_str().expect("ASCII Link");
            assert!(
                !link.contains(&w.upstream.host_port()),
                "GET {url}: a Link header must point into the mirror, not the upstream: {link}"
            );
        }
        resp.json()
            .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
    };
    let tags = |v: &serde_json::Value| -> Vec<String> {
        v["tags"]
            .as_array()
            .unwrap_or_else(|| panic!("tags/list has no \"tags\" array: {v}"))
            .iter()
            .map(|t| t.as_str().expect("tags are strings").to_string())
            .collect()
    };

    // distribution 2.8 (the upstream here) answers tags in storage order and ignores `n`; the
    // mirror must still answer per the distribution spec: lexical order, `n` and `last` honoured.
    let upstream_full = get(&w.upstream.url(), &pushed.name, "");
    let mut upstream_tags = tags(&upstream_full);
    upstream_tags.sort();
    assert_eq!(
        upstream_tags, all,
        "sanity: the upstream has exactly the pushed tags"
    );

    let full = get(&w.stowage.url(), &pushed.name, "");
    assert_eq!(
        full["name"],
        pushed.name.as_str(),
        "tags/list names the repository: {full}"
    );
    // Every expectation is checked, then all mismatches are reported together.
    let mut problems = Vec::new();
    let mut expect = |what: &str, got: Vec<String>, want: &[&str]| {
        if got != want {
            problems.push(format!("{what}: expected {want:?}, got {got:?}"));
        }
    };
    expect(
        "GET tags/list (every upstream tag, lexical order)",
        tags(&full),
        &all,
    );
    let page = get(&w.stowage.url(), &pushed.name, "?n=2");
    expect(
        "GET tags/list?n=2 (the first two tags)",
        tags(&page),
        &all[..2],
    );
    let next = get(&w.stowage.url(), &pushed.name, "?n=2&last=1.1");
    expect(
        "GET tags/list?n=2&last=1.1 (the tags after 1.1)",
        tags(&next),
        &all[2..],
    );
    // The one-segment form of the same docker.io repository.
    let short = get(&w.stowage.url(), "e2e-tags", "");
    expect(
        "GET /v2/e2e-tags/tags/list (one-segment name)",
        tags(&short),
        &all,
    );
    assert!(
        problems.is_empty(),
        "tags/list through stowage:\n{}",
        problems.join("\n")
    );
}
