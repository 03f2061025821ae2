//! Bad input against a running stowage with a real upstream behind it: malformed names,
//! digests and tags, unknown content, path traversal, write methods, and a dead upstream.
//!
//! Every error must be an OCI error body (`{"errors":[{"code":…}]}`) with the expected code and
//! status, HEAD errors carry no body, and none of it may leave anything in the cache.
//! Requests go over a raw socket so the exact request target reaches the server (`reqwest`
//! would normalise `..` and `%2e%2e`).

mod support;

use support::images::{Format, Image, Pushed};
use support::registry::Registry;
use support::stowage::Stowage;
use support::{error_codes, raw_request, RawResponse};

/// A real upstream with one image (`library/present:1.0`) and a stowage in front of it.
struct World {
    stowage: Stowage,
    upstream: Registry,
    present: Pushed,
}

fn world() -> World {
    let upstream = Registry::start();
    let present = upstream.push(
        "library/present",
        "1.0",
        Image::build(Format::Docker, &[1024]),
    );
    let stowage = Stowage::for_docker_io(&upstream.url());
    World {
        stowage,
        upstream,
        present,
    }
}

const ACCEPT: (&str, &str) = (
    "Accept",
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
);

/// A well-formed digest nobody pushed.
fn absent_digest() -> String {
    format!(
        "sha256:{}",
        support::sha256_hex(b"stowage: nobody pushed this")
    )
}

/// Sends `method target` and checks status and error code(s). GET bodies must be OCI errors
/// whose first code is one of `codes`; HEAD responses must have no body.
fn expect_error(w: &World, method: &str, target: &str, status: u16, codes: &[&str]) -> RawResponse {
    let resp = raw_request(w.stowage.port(), method, target, &[ACCEPT]);
    let context = format!("{method} {target}");
    assert_eq!(
        resp.status,
        status,
        "{context}: expected {status} {codes:?}, got {} with body {:?}",
        resp.status,
        resp.body_text()
    );
    if method == "HEAD" {
        assert!(
            resp.body.is_empty(),
            "{context}: a HEAD response must not carry a body, got {:?}",
            resp.body_text()
        );
    } else {
        let got = error_codes(&resp.body, &context);
        assert!(
            codes.contains(&got[0].as_str()),
            "{context}: expected error code {codes:?}, got {got:?} (body {:?})",
            resp.body_text()
        );
        let content_type = resp.header("Content-Type").unwrap_or("");
        assert!(
            content_type.starts_with("application/json"),
            "{context}: an error body should be served as application/json, got {content_type:?}"
        );
    }
    resp
}

/// GET and HEAD of `target` both fail with `status` / `codes`.
fn expect_error_get_and_head(w: &World, target: &str, status: u16, codes: &[&str]) {
    expect_error(w, "GET", target, status, codes);
    expect_error(w, "HEAD", target, status, codes);
}

/// GET and HEAD of `template` with `{}` replaced by each of `items` fail with `status` / `codes`.
fn expect_each(w: &World, template: &str, items: &[impl AsRef<str>], status: u16, codes: &[&str]) {
    let targets = items.iter().map(|i| template.replace("{}", i.as_ref()));
    expect_errors(w, targets, status, codes);
}

/// GET and HEAD of every target in `targets` fail with `status` / `codes`.
fn expect_errors(
    w: &World,
    targets: impl IntoIterator<Item = impl AsRef<str>>,
    status: u16,
    codes: &[&str],
) {
    for target in targets {
        expect_error_get_and_head(w, target.as_ref(), status, codes);
    }
}

/// Nothing was committed and nothing is half-written.
fn assert_cache_untouched(stowage: &Stowage) {
    assert!(
        stowage.blob_files().is_empty(),
        "bad input must not write blobs; found {:#?}",
        stowage.blob_files()
    );
    assert!(
        stowage.tmp_files().is_empty(),
        "bad input must not leave temp files; found {:#?}",
        stowage.tmp_files()
    );
}

#[test]
fn invalid_repository_names_are_name_invalid() {
    let w = world();
    let long = format!("library/{}", "a".repeat(300));
    let digest = absent_digest();
    for name in [
        "Library/present",
        "library/Present",
        "library/a..b",
        "library/present-",
        "library/-present",
        "library//present",
        long.as_str(),
    ] {
        expect_error_get_and_head(
            &w,
            &format!("/v2/{name}/manifests/1.0"),
            400,
            &["NAME_INVALID"],
        );
        expect_error_get_and_head(
            &w,
            &format!("/v2/{name}/blobs/{digest}"),
            400,
            &["NAME_INVALID"],
        );
        expect_error(
            &w,
            "GET",
            &format!("/v2/{name}/tags/list"),
            400,
            &["NAME_INVALID"],
        );
    }
    // One-segment (docker.io `library/`-normalised) forms.
    let names = ["Present", "a..b", "present-", &"a".repeat(300)];
    expect_each(&w, "/v2/{}/manifests/1.0", &names, 400, &["NAME_INVALID"]);
    assert_cache_untouched(&w.stowage);
}

#[test]
fn malformed_blob_digests_are_digest_invalid() {
    let w = world();
    let hex64 = support::sha256_hex(b"x");
    let bad = [
        "sha256:xyz".to_string(),
        format!("sha256:{}", &hex64[..63]),
        format!("sha256:{hex64}0"),
        format!("sha256:{}", hex64.to_uppercase()),
        format!("sha256:{}g", &hex64[..63]),
        "sha256:".to_string(),
        hex64.clone(),
        format!("sha256{hex64}"),
    ];
    expect_each(
        &w,
        "/v2/library/present/blobs/{}",
        &bad,
        400,
        &["DIGEST_INVALID"],
    );
    // By-digest manifest references with a broken digest: malformed either way.
    let codes = ["DIGEST_INVALID", "TAG_INVALID"];
    expect_each(
        &w,
        "/v2/library/present/manifests/{}",
        &bad[..5],
        400,
        &codes,
    );
    assert_cache_untouched(&w.stowage);
}

#[test]
fn unknown_digest_algorithm_is_digest_invalid() {
    let w = world();
    let md5 = format!("md5:{}", "0123456789abcdef".repeat(2));
    let made_up = format!("foo:{}", support::sha256_hex(b"y"));
    expect_each(
        &w,
        "/v2/library/present/blobs/{}",
        &[md5, made_up],
        400,
        &["DIGEST_INVALID"],
    );
    assert_cache_untouched(&w.stowage);
}

#[test]
fn malformed_tags_are_unknown_to_pulls_and_invalid_to_pushes() {
    let w = world();
    let long = "a".repeat(129);
    let tags = ["-bad", ".bad", long.as_str()];
    expect_each(
        &w,
        "/v2/library/present/manifests/{}",
        &tags,
        404,
        &["MANIFEST_UNKNOWN"],
    );
    for tag in tags {
        expect_error(
            &w,
            "PUT",
            &format!("/v2/library/present/manifests/{tag}"),
            400,
            &["TAG_INVALID"],
        );
    }
    // 128 characters is still a valid tag: unknown upstream, so 404, not 400.
    let max = "a".repeat(128);
    expect_error(
        &w,
        "GET",
        &format!("/v2/library/present/manifests/{max}"),
        404,
        &["MANIFEST_UNKNOWN"],
    );
    assert_cache_untouched(&w.stowage);
}

#[test]
fn unknown_tag_is_manifest_unknown() {
    let w = world();
    let targets = [
        "/v2/library/present/manifests/no-such-tag".to_string(),
        "/v2/present/manifests/no-such-tag".to_string(),
        format!("/v2/library/present/manifests/{}", absent_digest()),
    ];
    expect_errors(&w, targets, 404, &["MANIFEST_UNKNOWN"]);
    assert_cache_untouched(&w.stowage);
}

#[test]
fn unknown_blob_is_blob_unknown() {
    let w = world();
    let digest = absent_digest();
    expect_error_get_and_head(
        &w,
        &format!("/v2/library/present/blobs/{digest}"),
        404,
        &["BLOB_UNKNOWN"],
    );
    assert_cache_untouched(&w.stowage);
}

#[test]
fn unknown_repository_is_not_found() {
    let w = world();
    for target in [
        "/v2/library/absent/manifests/1.0",
        "/v2/absent/manifests/latest",
        "/v2/org/absent/manifests/1.0",
    ] {
        expect_error_get_and_head(&w, target, 404, &["NAME_UNKNOWN", "MANIFEST_UNKNOWN"]);
    }
    let digest = absent_digest();
    expect_error_get_and_head(
        &w,
        &format!("/v2/library/absent/blobs/{digest}"),
        404,
        &["BLOB_UNKNOWN", "NAME_UNKNOWN"],
    );
    expect_error(
        &w,
        "GET",
        "/v2/library/absent/tags/list",
        404,
        &["NAME_UNKNOWN"],
    );
    assert_cache_untouched(&w.stowage);
}

#[test]
fn dot_dot_segments_in_paths_are_rejected() {
    let w = world();
    let digest = &w.present.manifest().digest;
    let blob = &w.present.blobs()[0].digest;
    // Name-shaped paths whose name contains a traversal segment: the name is invalid.
    let name_invalid = [
        "/v2/library/../present/manifests/1.0".to_string(),
        "/v2/library/%2e%2e/present/manifests/1.0".to_string(),
        "/v2/library/%2E%2E/present/manifests/1.0".to_string(),
        "/v2/../library/present/manifests/1.0".to_string(),
        "/v2/%2e%2e/%2e%2e/library/present/blobs/".to_string() + blob,
        "/v2/library/./present/manifests/1.0".to_string(),
        "/v2/library/present/../../../etc/tags/list".to_string(),
        format!("/v2/library/..%2fpresent/manifests/{digest}"),
    ];
    for target in &name_invalid {
        for method in ["GET", "HEAD"] {
            let resp = expect_error(&w, method, target, 400, &["NAME_INVALID"]);
            assert!(
                !resp.body_text().contains("root:"),
                "{method} {target} leaked a file"
            );
        }
    }
    // Traversal in the reference or digest position: rejected as malformed (which code is
    // pinned separately by `percent_encoded_references_are_digest_or_tag_invalid`).
    for (target, status, code) in TRAVERSAL_IN_REFERENCE {
        for method in ["GET", "HEAD"] {
            let resp = expect_error(&w, method, target, status, &[code]);
            assert!(
                !resp.body_text().contains("root:"),
                "{method} {target} leaked a file"
            );
        }
    }
    // Paths that escape /v2/ entirely are not routes at all.
    for target in [
        "/v2/../../../../etc/passwd",
        "/v2/%2e%2e/%2e%2e/etc/passwd",
        "/../../etc/passwd",
    ] {
        let resp = raw_request(w.stowage.port(), "GET", target, &[]);
        assert!(
            resp.status == 400 || resp.status == 404,
            "GET {target}: expected 400 or 404, got {} {:?}",
            resp.status,
            resp.body_text()
        );
        assert!(
            !resp.body_text().contains("root:"),
            "GET {target} leaked a file"
        );
        error_codes(&resp.body, &format!("GET {target}"));
    }
    assert_cache_untouched(&w.stowage);
    assert!(
        !w.upstream
            .access_log_lines()
            .iter()
            .any(|l| l.contains("..") || l.to_ascii_lowercase().contains("%2e")),
        "no traversal attempt may be forwarded upstream: {:#?}",
        w.upstream.access_log_lines()
    );
}

/// Percent-encoded traversal in the digest/tag position, with the code that names the part
/// that is actually malformed (the repository name in these paths is fine).
const TRAVERSAL_IN_REFERENCE: [(&str, u16, &str); 5] = [
    (
        "/v2/library/present/blobs/..%2f..%2f..%2fetc%2fpasswd",
        400,
        "DIGEST_INVALID",
    ),
    (
        "/v2/library/present/blobs/sha256:..%2f..%2fetc%2fpasswd",
        400,
        "DIGEST_INVALID",
    ),
    // A reference that is no tag names no manifest: on a pull that is a 404.
    (
        "/v2/library/present/manifests/..%2f..%2fetc%2fpasswd",
        404,
        "MANIFEST_UNKNOWN",
    ),
    (
        "/v2/library/present/manifests/%2e%2e",
        404,
        "MANIFEST_UNKNOWN",
    ),
    (
        "/v2/library/present/manifests/bad%21tag",
        404,
        "MANIFEST_UNKNOWN",
    ),
];

#[test]
fn percent_encoded_references_are_digest_or_tag_invalid() {
    let w = world();
    for (target, status, code) in TRAVERSAL_IN_REFERENCE {
        expect_error_get_and_head(&w, target, status, &[code]);
    }
    assert_cache_untouched(&w.stowage);
}

#[test]
fn write_methods_are_unsupported_and_never_reach_the_upstream() {
    let w = world();
    let digest = &w.present.manifest().digest;
    let blob = &w.present.blobs()[0].digest;
    let attempts = [
        ("PUT", "/v2/library/present/manifests/1.0".to_string()),
        ("PUT", format!("/v2/library/present/manifests/{digest}")),
        ("DELETE", format!("/v2/library/present/manifests/{digest}")),
        ("DELETE", "/v2/library/present/manifests/1.0".to_string()),
        ("DELETE", format!("/v2/library/present/blobs/{blob}")),
        ("PUT", format!("/v2/library/present/blobs/{blob}")),
        ("POST", "/v2/library/present/blobs/uploads/".to_string()),
        ("POST", format!("/v2/library/present/blobs/uploads/?mount={blob}&from=library/other")),
        ("PATCH", "/v2/library/present/blobs/uploads/3f2a1c9e-0000-4000-8000-000000000000".to_string()),
        ("PUT", format!("/v2/library/present/blobs/uploads/3f2a1c9e-0000-4000-8000-000000000000?digest={blob}")),
        ("DELETE", "/v2/library/present/blobs/uploads/3f2a1c9e-0000-4000-8000-000000000000".to_string()),
        ("PATCH", "/v2/library/present/manifests/1.0".to_string()),
    ];
    // The push that set up `library/present` is in the log already; only look after it.
    let before = w.upstream.access_log_lines().len();
    for (method, target) in &attempts {
        expect_error(&w, method, target, 405, &["UNSUPPORTED"]);
    }
    let writes: Vec<String> = w
        .upstream
        .access_log_lines()
        .into_iter()
        .skip(before)
        .filter(|l| !(l.starts_with("GET ") || l.starts_with("HEAD ")))
        .collect();
    assert!(
        writes.is_empty(),
        "write requests must not be forwarded upstream: {writes:#?}"
    );
    // The upstream still serves the tag unchanged.
    let resp = support::http()
        .get(format!(
            "{}/v2/library/present/manifests/1.0",
            w.upstream.url()
        ))
        .header(ACCEPT.0, ACCEPT.1)
        .send()
        .expect("GET upstream manifest");
    assert_eq!(
        resp.status().as_u16(),
        200,
        "the upstream tag must survive the write attempts"
    );
    assert_cache_untouched(&w.stowage);
}

/// A repository whose name contains the components `blobs/uploads` is an ordinary pull: uploads
/// are only recognised at the right end of the path.
#[test]
fn a_name_containing_blobs_uploads_is_pulled_not_refused_as_a_push() {
    let w = world();
    let name = "team/blobs/uploads";
    let pushed = w
        .upstream
        .push(name, "1.0", Image::build(Format::Docker, &[512]));
    let port = w.stowage.port();
    let target = format!("/v2/{name}/manifests/1.0");
    let resp = raw_request(port, "GET", &target, &[ACCEPT]);
    assert_eq!(resp.status, 200, "GET {target}: {}", resp.body_text());
    assert_eq!(resp.body, pushed.manifest().bytes, "GET {target}");
    for b in pushed.blobs() {
        let target = format!("/v2/{name}/blobs/{}", b.digest);
        let resp = raw_request(port, "GET", &target, &[]);
        assert_eq!(resp.status, 200, "GET {target}");
        assert_eq!(resp.body, b.bytes, "GET {target}");
    }
    // The push endpoints of that name are still refused.
    expect_error(
        &w,
        "POST",
        &format!("/v2/{name}/blobs/uploads/"),
        405,
        &["UNSUPPORTED"],
    );
}

#[test]
fn upstream_down_with_nothing_cached_is_unavailable() {
    let mut w = world();
    let blob = w.present.blobs()[0].digest.clone();
    w.upstream.stop();
    let targets = [
        "/v2/library/present/manifests/1.0".to_string(),
        "/v2/present/manifests/1.0".to_string(),
        format!("/v2/library/present/manifests/{}", w.present.digest()),
        format!("/v2/library/present/blobs/{blob}"),
    ];
    expect_errors(&w, targets, 503, &["UNAVAILABLE"]);
    // Malformed input is still rejected as such, upstream or not.
    expect_error(
        &w,
        "GET",
        "/v2/Library/present/manifests/1.0",
        400,
        &["NAME_INVALID"],
    );
    // The mirror itself stays up.
    let resp = raw_request(w.stowage.port(), "GET", "/v2/", &[]);
    assert_eq!(
        resp.status, 200,
        "/v2/ must keep answering while the upstream is down"
    );
    assert_cache_untouched(&w.stowage);
}
