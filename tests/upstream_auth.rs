//! Upstream-facing behaviour that a real registry cannot provoke, pinned against the in-process
//! [`FakeUpstream`]: Docker Hub-style bearer-token auth, blob redirects to a CDN on another host
//! (the token must not follow), bytes that do not match their digest (never served as a
//! success), "401 with a fresh token" (Docker Hub's answer for a repository that does not
//! exist), secrets in logs, and manifests whose exact bytes matter (the digest is of the bytes).
//!
//! Every stowage test runs the real binary (`support::stowage::Stowage`) with the fake as its
//! default `docker.io` upstream. The last group of tests checks the fake itself against plain
//! HTTP, so a failure there points at the harness, not at stowage.

mod support;

use std::time::Duration;

use base64::Engine as _;
use support::fake_upstream::{FakeUpstream, Fault, Listener, RecordedRequest, WrongBytes, SERVICE};
use support::images::{Blob, Format, Image, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST};
use support::stowage::{Stowage, UpstreamSpec};
use support::{error_codes, http, manifest_accept, sha256_digest, sha256_hex, wait_until};

/// Upper bound for "eventually" checks (cleanup, commit). Never a timing assertion.
const EVENTUALLY: Duration = Duration::from_secs(60);

/// Registers `image` (manifest under `tag`, config and layers) in `repo` on the fake.
fn publish(fake: &FakeUpstream, repo: &str, tag: &str, image: &Image) {
    for blob in image.blobs() {
        fake.add_blob(repo, blob.bytes.clone());
    }
    let digest = fake.add_manifest(
        repo,
        tag,
        &image.manifest.media_type,
        image.manifest.bytes.clone(),
    );
    assert_eq!(digest, image.manifest.digest);
}

fn stowage_for(fake: &FakeUpstream) -> Stowage {
    Stowage::for_docker_io(&fake.url())
}

/// `GET url` (with `Accept: accept`, if given): the status, `Docker-Content-Digest` and body.
fn fetch(url: &str, accept: Option<String>) -> (reqwest::StatusCode, Option<String>, Vec<u8>) {
    let mut req = http().get(url);
    if let Some(accept) = accept {
        req = req.header("Accept", accept);
    }
    let resp = req.send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let digest = header(&resp, "docker-content-digest");
    let body = resp
        .bytes()
        .unwrap_or_else(|e| panic!("reading body of GET {url}: {e}"));
    (status, digest, body.to_vec())
}

/// `GET` a manifest through stowage like containerd does and check it is byte-exact.
fn pull_manifest(
    stowage: &Stowage,
    repo: &str,
    reference: &str,
    expected: &support::images::Manifest,
) {
    let url = format!("{}/v2/{repo}/manifests/{reference}", stowage.url());
    let (status, digest, body) = fetch(&url, Some(manifest_accept()));
    assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
    assert!(
        body == expected.bytes,
        "GET {url}: manifest bytes differ from upstream's"
    );
    assert_eq!(
        digest.as_deref(),
        Some(expected.digest.as_str()),
        "GET {url}: Docker-Content-Digest"
    );
}

/// `GET` a blob through stowage and check bytes and `Docker-Content-Digest`.
fn pull_blob(stowage: &Stowage, repo: &str, blob: &Blob) {
    let url = format!("{}/v2/{repo}/blobs/{}", stowage.url(), blob.digest);
    let (status, digest, body) = fetch(&url, None);
    assert_eq!(
        status,
        200,
        "GET {url}: {}",
        String::from_utf8_lossy(&body[..body.len().min(500)])
    );
    assert_eq!(body.len(), blob.size(), "GET {url}: body length");
    assert!(
        sha256_digest(&body) == blob.digest,
        "GET {url}: body does not hash to its digest"
    );
    assert_eq!(
        digest.as_deref(),
        Some(blob.digest.as_str()),
        "GET {url}: Docker-Content-Digest"
    );
}

fn pull_image(stowage: &Stowage, repo: &str, tag: &str, image: &Image) {
    pull_manifest(stowage, repo, tag, &image.manifest);
    for blob in image.blobs() {
        pull_blob(stowage, repo, blob);
    }
}

fn header(resp: &reqwest::blocking::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Requests that reached the registry API (not the token endpoint, not the CDN) for `repo`.
fn registry_requests_for(fake: &FakeUpstream, repo: &str) -> Vec<RecordedRequest> {
    let prefix = format!("/v2/{repo}/");
    fake.requests()
        .into_iter()
        .filter(|r| r.listener == Listener::Registry && r.path.starts_with(&prefix))
        .collect()
}

fn describe(requests: &[RecordedRequest]) -> String {
    requests
        .iter()
        .map(|r| {
            format!(
                "{:?} {} {}{}{}",
                r.listener,
                r.method,
                r.path,
                r.query
                    .as_deref()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default(),
                r.authorization
                    .as_deref()
                    .map(|a| format!("  [Authorization: {}]", a.split(' ').next().unwrap_or("")))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Token auth

#[test]
fn token_auth_dance_fetches_a_scoped_token_and_reuses_it() {
    let fake = FakeUpstream::builder().token_auth().start();
    let repo = "library/alpine";
    let first = Image::build(Format::Docker, &[2_000, 3_000]);
    let second = Image::build(Format::Docker, &[1_000]);
    publish(&fake, repo, "3.20", &first);
    publish(&fake, repo, "3.21", &second);
    let stowage = stowage_for(&fake);

    pull_image(&stowage, repo, "3.20", &first);

    let tokens = fake.token_requests();
    let expected_scope = format!("repository:{repo}:pull");
    assert!(
        !tokens.is_empty(),
        "stowage never asked the token endpoint:\n{}",
        describe(&fake.requests())
    );
    for t in &tokens {
        assert_eq!(
            t.query_param("service"),
            vec![SERVICE.to_string()],
            "token request {:?}",
            t.query
        );
        for scope in t.query_param("scope") {
            assert_eq!(
                scope, expected_scope,
                "token request {:?} asks for a scope nobody needed",
                t.query
            );
        }
    }
    let scoped = tokens
        .iter()
        .filter(|t| t.query_param("scope") == vec![expected_scope.clone()])
        .count();
    assert_eq!(
        scoped,
        1,
        "one pull (manifest + 3 blobs, sequential) should need exactly one token for {repo}:\n{}",
        describe(&fake.requests())
    );
    let issued = fake.issued_tokens();
    let authorised: Vec<_> = registry_requests_for(&fake, repo)
        .into_iter()
        .filter(|r| r.bearer().is_some())
        .collect();
    assert!(
        !authorised.is_empty(),
        "no registry request carried the bearer token"
    );
    for r in &authorised {
        assert!(
            issued.iter().any(|t| Some(t.as_str()) == r.bearer()),
            "{} {} carried an unknown bearer token",
            r.method,
            r.path
        );
    }

    // More work on the same repository that must reach upstream: the cached token is reused.
    let before = registry_requests_for(&fake, repo).len();
    pull_image(&stowage, repo, "3.21", &second);
    assert!(
        registry_requests_for(&fake, repo).len() > before,
        "pulling a new tag never reached upstream, so token reuse was not exercised"
    );
    assert_eq!(
        fake.token_requests().len(),
        tokens.len(),
        "the token for {repo} (expires_in 300) should be reused, not fetched again:\n{}",
        describe(&fake.requests())
    );
}

#[test]
fn configured_credentials_are_sent_to_the_token_endpoint_as_basic() {
    let (user, password) = ("stowage-bot", "s3cr3t:with&odd=chars");
    let fake = FakeUpstream::builder()
        .token_credentials(user, password)
        .start();
    let repo = "acme/tool";
    let image = Image::build(Format::Oci, &[1_000]);
    publish(&fake, repo, "v1", &image);
    let stowage = Stowage::start(&[
        UpstreamSpec::new("docker.io", &fake.url()).with_credentials(user, password)
    ]);

    pull_image(&stowage, repo, "v1", &image);

    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    );
    let tokens = fake.token_requests();
    assert!(!tokens.is_empty(), "stowage never asked the token endpoint");
    for t in &tokens {
        assert_eq!(
            t.authorization.as_deref(),
            Some(expected.as_str()),
            "every token request should carry the configured credentials as Basic"
        );
    }
    // The password goes to the token realm only; the registry API gets the bearer token.
    for r in registry_requests_for(&fake, repo) {
        if let Some(auth) = &r.authorization {
            assert!(
                auth.starts_with("Bearer "),
                "{} {} carried a non-bearer Authorization",
                r.method,
                r.path
            );
        }
    }
}

#[test]
fn upstream_401_after_fresh_token_is_not_retried_forever() {
    let fake = FakeUpstream::builder().token_auth().start();
    let repo = "secret/thing";
    let image = Image::build(Format::Docker, &[500]);
    publish(&fake, repo, "v1", &image);
    fake.hide_repo(repo);
    let stowage = stowage_for(&fake);
    let c = http();

    let manifest_url = format!("{}/v2/{repo}/manifests/v1", stowage.url());
    let blob_url = format!("{}/v2/{repo}/blobs/{}", stowage.url(), image.config.digest);
    for url in [&manifest_url, &blob_url] {
        let resp = c
            .get(url)
            .header("Accept", manifest_accept())
            .send()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status().as_u16();
        let challenge = header(&resp, "www-authenticate");
        let body = resp.bytes().unwrap();
        assert!(
            (400..500).contains(&status),
            "GET {url}: a repo upstream will not show us should be a 4xx, got {status}: {}",
            String::from_utf8_lossy(&body)
        );
        let codes = error_codes(&body, &format!("GET {url}"));
        assert!(!codes.is_empty());
        if let Some(challenge) = challenge {
            assert!(
                !challenge.contains(&fake.realm()),
                "GET {url}: upstream's challenge must not be forwarded to clients: {challenge}"
            );
        }
    }

    let registry = registry_requests_for(&fake, repo);
    let tokens = fake.token_requests();
    assert!(
        registry.len() <= 12 && tokens.len() <= 6,
        "two client requests cost {} registry and {} token requests upstream — a retry loop:\n{}",
        registry.len(),
        tokens.len(),
        describe(&fake.requests())
    );
    assert!(!tokens.is_empty(), "stowage never tried to get a token");
}

#[test]
fn a_refused_cached_token_is_replaced_by_one_fresh_token() {
    // Each token works for two repository requests, then the registry refuses it although its
    // `expires_in` (300 s) has not passed: a rotated signing key, a revocation, clock skew.
    let fake = FakeUpstream::builder().token_auth().start();
    fake.revoke_tokens_after(2);
    let repo = "library/rotating";
    let image = Image::build(Format::Docker, &[1_000]);
    publish(&fake, repo, "v1", &image);
    let stowage = stowage_for(&fake);

    // HEAD and GET by digest: the first token's two uses.
    pull_manifest(&stowage, repo, "v1", &image.manifest);
    assert_eq!(
        fake.token_requests().len(),
        1,
        "premise: one token for the manifest:\n{}",
        describe(&fake.requests())
    );
    let first = fake.issued_tokens()[0].clone();

    // The cached token is refused now: it must be dropped and a fresh one fetched, once.
    pull_blob(&stowage, repo, &image.config);
    let issued = fake.issued_tokens();
    assert_eq!(
        issued.len(),
        2,
        "one new token after the refusal, no more:\n{}",
        describe(&fake.requests())
    );
    let config_gets: Vec<_> = registry_requests_for(&fake, repo)
        .into_iter()
        .filter(|r| r.path.ends_with(&image.config.digest))
        .collect();
    let with_first = config_gets
        .iter()
        .filter(|r| r.bearer() == Some(first.as_str()))
        .count();
    assert_eq!(
        with_first,
        1,
        "the refused token must not be sent again:\n{}",
        describe(&config_gets)
    );
    assert_eq!(
        config_gets.last().and_then(|r| r.bearer()),
        Some(issued[1].as_str()),
        "the retry carries the fresh token:\n{}",
        describe(&config_gets)
    );
}

#[test]
fn hub_401_with_a_fresh_token_is_remembered_for_negative_ttl() {
    // Docker Hub answers a repository that does not exist with 401, even with a fresh token
    // (the token endpoint grants an empty scope); asking again costs a HEAD, a token and a HEAD of rate limit.
    let fake = FakeUpstream::builder().token_auth().start();
    let repo = "nobody/nothing";
    fake.hide_repo(repo);
    let stowage = stowage_for(&fake); // negative_ttl: 30 s by default
    let url = format!("{}/v2/{repo}/manifests/latest", stowage.url());
    let get = || {
        let (status, _, body) = fetch(&url, Some(manifest_accept()));
        (status.as_u16(), error_codes(&body, &format!("GET {url}")))
    };

    assert_eq!(get(), (404, vec!["NAME_UNKNOWN".to_string()]));
    let seen = fake.requests().len();
    assert!(
        !fake.token_requests().is_empty(),
        "premise: the 401 came with a fresh token:\n{}",
        describe(&fake.requests())
    );
    assert_eq!(get(), (404, vec!["NAME_UNKNOWN".to_string()]));
    assert_eq!(
        fake.requests().len(),
        seen,
        "within negative_ttl the answer is remembered, nothing reaches upstream:\n{}",
        describe(&fake.requests()[seen..])
    );
}

// ---------------------------------------------------------------------------------------------
// Non-standard error codes (Harbor)

#[test]
fn harbor_404_not_found_stays_a_404_with_the_oci_code() {
    let fake = FakeUpstream::builder().not_found_code("NOT_FOUND").start();
    let repo = "harbor/app";
    let image = Image::build(Format::Oci, &[4_000]);
    publish(&fake, repo, "v1", &image);
    let stowage = stowage_for(&fake);
    let c = http();
    let missing = sha256_digest(b"not on the upstream");

    // Premise: the fake answers like Harbor.
    let direct = c
        .get(format!("{}/v2/{repo}/blobs/{missing}", fake.url()))
        .send()
        .unwrap();
    assert_eq!(direct.status(), 404);
    assert_eq!(error_codes(&direct.bytes().unwrap(), "fake"), ["NOT_FOUND"]);

    let cases = [
        (format!("manifests/{missing}"), "MANIFEST_UNKNOWN"),
        (format!("blobs/{missing}"), "BLOB_UNKNOWN"),
        ("manifests/no-such-tag".to_string(), "MANIFEST_UNKNOWN"),
    ];
    for (rest, code) in &cases {
        let url = format!("{}/v2/{repo}/{rest}", stowage.url());
        let (status, _, body) = fetch(&url, Some(manifest_accept()));
        assert_eq!(
            (status.as_u16(), error_codes(&body, &format!("GET {url}"))),
            (404, vec![code.to_string()]),
            "GET {url}: {}",
            String::from_utf8_lossy(&body)
        );
        let head = c.head(&url).header("Accept", manifest_accept()).send();
        assert_eq!(head.unwrap().status(), 404, "HEAD {url}");
    }

    // The negative cache still works: the missing tag is not asked again within negative_ttl.
    let seen = fake.requests().len();
    let url = format!("{}/v2/{repo}/manifests/no-such-tag", stowage.url());
    let resp = c
        .get(&url)
        .header("Accept", manifest_accept())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        fake.requests().len(),
        seen,
        "the missing tag is remembered:\n{}",
        describe(&fake.requests()[seen..])
    );

    // A blob that disappears mid-fill (the resume gets the 404) is gone, not a 5xx to retry.
    let layer = &image.layers[0].blob;
    fake.push_faults(&layer.digest, [Fault::CutAt(1_000), Fault::Status(404)]);
    let url = format!("{}/v2/{repo}/blobs/{}", stowage.url(), layer.digest);
    let body = c.get(&url).send().and_then(|r| r.bytes());
    assert!(
        body.as_ref()
            .map_or(true, |b| b.as_ref() != layer.bytes.as_slice()),
        "the blob vanished upstream mid-fill; the client must not get it whole"
    );
    assert!(
        wait_until(EVENTUALLY, || fake.blob_gets(&layer.digest).len() >= 2),
        "premise: the fill resumed"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        fake.blob_gets(&layer.digest).len(),
        2,
        "a resume answered 404 is not retried:\n{}",
        describe(&fake.blob_gets(&layer.digest))
    );
}

// ---------------------------------------------------------------------------------------------
// Redirects

#[test]
fn blob_redirect_is_followed_without_authorization_header() {
    let fake = FakeUpstream::builder()
        .token_auth()
        .redirect_blobs_to_cdn()
        .start();
    let repo = "library/redis";
    let image = Image::build(Format::Docker, &[50_000]);
    publish(&fake, repo, "7", &image);
    let stowage = stowage_for(&fake);

    pull_manifest(&stowage, repo, "7", &image.manifest);
    for blob in image.blobs() {
        let url = format!("{}/v2/{repo}/blobs/{}", stowage.url(), blob.digest);
        let (status, digest, body) = fetch(&url, None);

        let cdn = fake.cdn_requests();
        let leaked: Vec<_> = cdn.iter().filter(|r| r.has_authorization()).collect();
        assert!(
            leaked.is_empty(),
            "the bearer token was sent across hosts to the CDN:\n{}",
            describe(&fake.requests())
        );
        let hex = blob.hex();
        assert!(
            cdn.iter().any(|r| r.method == "GET"
                && r.path.contains(hex)
                && !r.query_param("verify").is_empty()),
            "stowage did not follow the 307 to the CDN with the signed query intact:\n{}",
            describe(&fake.requests())
        );
        assert_eq!(
            status,
            200,
            "GET {url}: {}",
            String::from_utf8_lossy(&body[..body.len().min(500)])
        );
        assert!(body == blob.bytes, "GET {url}: wrong bytes");
        assert_eq!(
            digest.as_deref(),
            Some(blob.digest.as_str()),
            "GET {url}: Docker-Content-Digest"
        );
    }
    // The registry side of the redirect needed (and got) the token.
    let blob_gets: Vec<_> = registry_requests_for(&fake, repo)
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .collect();
    assert!(
        blob_gets.iter().any(|r| r.bearer().is_some()),
        "no authorised blob GET reached the registry"
    );
}

// ---------------------------------------------------------------------------------------------
// Verification

/// What a client must never get for a blob upstream serves wrongly: a clean, complete success.
/// An error status, a refused connection or a body that breaks off are all acceptable.
fn assert_not_served(stowage: &Stowage, repo: &str, digest: &str) {
    let url = format!("{}/v2/{repo}/blobs/{digest}", stowage.url());
    let resp = match http().get(&url).send() {
        Err(_) => return, // connection refused/aborted before headers: fine
        Ok(resp) => resp,
    };
    let status = resp.status();
    match resp.bytes() {
        Err(_) => {} // the body broke off: the client knows the transfer failed
        Ok(body) if status.is_success() => panic!(
            "GET {url}: stowage answered a clean {status} with {} bytes (sha256:{}) for {digest}; \
             unverified bytes must not be delivered as a complete response",
            body.len(),
            sha256_hex(&body)
        ),
        Ok(body) => {
            assert!(
                status.is_client_error() || status.is_server_error(),
                "GET {url}: unexpected {status}"
            );
            error_codes(&body, &format!("GET {url} ({status})"));
        }
    }
}

/// No committed blob is named after `digest`, and every committed blob hashes to its name.
fn assert_store_is_clean(stowage: &Stowage, digest: &str) {
    assert!(
        !stowage.blob_path(digest).exists(),
        "{digest} was committed with the wrong bytes"
    );
    for path in stowage.blob_files() {
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            sha256_hex(&bytes),
            name,
            "{} does not hash to its name",
            path.display()
        );
    }
    let tmp_clean = wait_until(EVENTUALLY, || stowage.tmp_files().is_empty());
    assert!(
        tmp_clean,
        "leftovers under tmp/ after a failed fill: {:?}",
        stowage.tmp_files()
    );
}

fn wrong_bytes_are_rejected_then_recovered(how: WrongBytes) {
    let fake = FakeUpstream::start();
    let repo = "library/busybox";
    let image = Image::build(Format::Docker, &[200_000]);
    publish(&fake, repo, "latest", &image);
    let bad = image.layers[0].blob.clone();
    fake.serve_wrong_bytes(&bad.digest, how);
    let stowage = stowage_for(&fake);
    pull_manifest(&stowage, repo, "latest", &image.manifest);

    let blob_path = format!("/v2/{repo}/blobs/{}", bad.digest);
    assert_not_served(&stowage, repo, &bad.digest);
    let asked = fake.count("GET", &blob_path);
    assert!(asked >= 1, "stowage never asked upstream for the blob");
    assert_store_is_clean(&stowage, &bad.digest);

    // Not cached, not poisoned: the next request goes upstream again.
    assert_not_served(&stowage, repo, &bad.digest);
    assert!(
        fake.count("GET", &blob_path) > asked,
        "the second request for {} did not ask upstream again",
        bad.digest
    );
    assert_store_is_clean(&stowage, &bad.digest);

    // Once upstream serves the right bytes, the blob is delivered and committed.
    fake.serve_correct_bytes(&bad.digest);
    pull_blob(&stowage, repo, &bad);
    let committed = wait_until(EVENTUALLY, || {
        std::fs::read(stowage.blob_path(&bad.digest)).is_ok_and(|b| b == bad.bytes)
    });
    assert!(
        committed,
        "the correct blob was served but never committed at {}",
        stowage.blob_path(&bad.digest).display()
    );
}

#[test]
fn wrong_bytes_for_a_digest_are_never_committed() {
    wrong_bytes_are_rejected_then_recovered(WrongBytes::FlippedByte);
}

#[test]
fn short_bytes_for_a_digest_are_never_committed() {
    wrong_bytes_are_rejected_then_recovered(WrongBytes::Truncated(1_000));
}

// ---------------------------------------------------------------------------------------------
// Secrets and exact bytes

#[test]
fn credentials_never_appear_in_logs() {
    let (user, password) = ("stowage-bot", "Zebra-Quokka-7781-do-not-log");
    let fake = FakeUpstream::builder()
        .token_credentials(user, password)
        .redirect_blobs_to_cdn()
        .start();
    let repo = "library/nginx";
    let image = Image::build(Format::Docker, &[5_000]);
    publish(&fake, repo, "1.27", &image);
    let hidden = "private/stuff";
    publish(&fake, hidden, "v1", &Image::build(Format::Docker, &[100]));
    fake.hide_repo(hidden);

    let mut stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &fake.url()).with_credentials(user, password))
        .env("RUST_LOG", "debug,stowage=trace")
        .start();
    pull_image(&stowage, repo, "1.27", &image);
    // Error paths log too: a repo the token server will not open for us, and an unknown tag.
    for path in [
        format!("/v2/{hidden}/manifests/v1"),
        format!("/v2/{repo}/manifests/nope"),
    ] {
        let _ = http()
            .get(format!("{}{path}", stowage.url()))
            .header("Accept", manifest_accept())
            .send();
    }
    stowage.stop();

    let tokens = fake.issued_tokens();
    assert!(
        !tokens.is_empty(),
        "no token was issued, so the test proves nothing"
    );
    let log = stowage.log();
    assert!(
        !log.trim().is_empty(),
        "stowage wrote no output at RUST_LOG=debug, so the test proves nothing"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    assert!(
        !log.contains(password),
        "the upstream password appears in stowage's output"
    );
    assert!(
        !log.contains(&basic),
        "the Basic credentials appear in stowage's output"
    );
    for token in &tokens {
        assert!(
            !log.contains(token.as_str()),
            "a bearer token appears in stowage's output"
        );
    }
}

/// Registers, under `tag`, an OCI manifest with odd whitespace, CRLF, tabs, keys out of the usual
/// order, escaped and raw non-ASCII and trailing blank lines: any re-serialisation changes its
/// digest. Returns its bytes and digest.
fn publish_odd_manifest(fake: &FakeUpstream, repo: &str, tag: &str) -> (Vec<u8>, String) {
    let config = Blob::new(
        OCI_CONFIG,
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec(),
    );
    let layer = Blob::new(
        OCI_LAYER,
        (0..4096u32).map(|i| (i * 7 % 251) as u8).collect(),
    );
    fake.add_blob(repo, config.bytes.clone());
    fake.add_blob(repo, layer.bytes.clone());
    let text = format!(
        "{{\n\t\"layers\" : [ {{\"size\":{},\"mediaType\":\"{OCI_LAYER}\",  \"digest\":\"{}\"}} ],\r\n   \
         \"config\":{{ \"size\":{}, \"digest\":\"{}\",\"mediaType\":\"{OCI_CONFIG}\"}},\n\
         \"mediaType\":   \"{OCI_MANIFEST}\",   \"schemaVersion\":2  ,\n\
         \"annotations\":{{\"z\":\"1\",\"a\":\"\\u00e9 é \\/\"}}\n}}\n\n  ",
        layer.size(),
        layer.digest,
        config.size(),
        config.digest
    );
    let bytes = text.into_bytes();
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .expect("the odd manifest is still valid JSON");
    let digest = fake.add_manifest(repo, tag, OCI_MANIFEST, bytes.clone());
    (bytes, digest)
}

/// `method` on a manifest through stowage: status 200, upstream's media type, the digest of
/// `bytes`, their length, and (for GET) exactly those bytes.
fn check_exact_manifest(
    stowage: &Stowage,
    method: reqwest::Method,
    repo: &str,
    reference: &str,
    bytes: &[u8],
    digest: &str,
) {
    let url = format!("{}/v2/{repo}/manifests/{reference}", stowage.url());
    let what = format!("{method} {url}");
    let resp = http()
        .request(method.clone(), &url)
        .header("Accept", manifest_accept())
        .send()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(resp.status(), 200, "{what}");
    assert_eq!(
        header(&resp, "content-type").as_deref(),
        Some(OCI_MANIFEST),
        "{what}: Content-Type"
    );
    assert_eq!(
        header(&resp, "docker-content-digest").as_deref(),
        Some(digest),
        "{what}: Docker-Content-Digest"
    );
    assert_eq!(
        header(&resp, "content-length").as_deref(),
        Some(bytes.len().to_string().as_str()),
        "{what}: Content-Length"
    );
    let body = resp.bytes().unwrap();
    if method == reqwest::Method::HEAD {
        assert!(body.is_empty(), "{what}: HEAD has a body");
    } else {
        assert!(
            body.as_ref() == bytes,
            "{what}: bytes differ:\n{}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn manifest_bytes_are_served_byte_exact() {
    let fake = FakeUpstream::start();
    let repo = "library/odd";
    let (bytes, digest) = publish_odd_manifest(&fake, repo, "weird");
    let stowage = stowage_for(&fake);

    for _round in ["cold", "warm"] {
        for reference in ["weird", digest.as_str()] {
            for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
                check_exact_manifest(&stowage, method, repo, reference, &bytes, &digest);
            }
        }
    }
}

#[test]
fn cached_manifest_is_served_byte_exact_after_restart_without_upstream() {
    let fake = FakeUpstream::start();
    let repo = "library/odd";
    let (bytes, digest) = publish_odd_manifest(&fake, repo, "weird");
    let mut stowage = stowage_for(&fake);
    check_exact_manifest(
        &stowage,
        reqwest::Method::GET,
        repo,
        "weird",
        &bytes,
        &digest,
    );

    // By digest the manifest is content-addressed: the durable cache alone must answer it.
    // A clean shutdown (SIGTERM) first: losing not-yet-flushed entries on SIGKILL is allowed.
    drop(fake);
    let status = stowage.terminate(Duration::from_secs(60));
    assert!(status.is_some(), "stowage did not exit on SIGTERM");
    stowage.restart();
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        check_exact_manifest(&stowage, method, repo, &digest, &bytes, &digest);
    }
}

// ---------------------------------------------------------------------------------------------
// The fake itself: if these fail, the stowage tests above prove nothing.

#[test]
fn fake_upstream_demands_scoped_tokens() {
    let fake = FakeUpstream::builder().token_auth().start();
    let digest = fake.add_manifest("team/a", "v1", "application/json", &b"{}"[..]);
    fake.add_manifest("team/b", "v1", "application/json", &b"{}"[..]);
    let c = http();

    let root = c.get(format!("{}/v2/", fake.url())).send().unwrap();
    assert_eq!(root.status(), 401);
    let challenge = root.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        challenge,
        format!(r#"Bearer realm="{}",service="{SERVICE}""#, fake.realm())
    );

    let url_a = format!("{}/v2/team/a/manifests/v1", fake.url());
    let resp = c.get(&url_a).send().unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .ends_with(r#"scope="repository:team/a:pull""#));

    let token: serde_json::Value = c
        .get(fake.realm())
        .query(&[("service", SERVICE), ("scope", "repository:team/a:pull")])
        .send()
        .unwrap()
        .json()
        .unwrap();
    let t = token["token"].as_str().unwrap();
    assert_eq!(token["access_token"], token["token"]);
    assert_eq!(token["expires_in"], 300);
    assert!(token["issued_at"].as_str().unwrap().ends_with('Z'));

    let ok = c.get(&url_a).bearer_auth(t).send().unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["docker-content-digest"], digest.as_str());
    let other = c
        .get(format!("{}/v2/team/b/manifests/v1", fake.url()))
        .bearer_auth(t)
        .send()
        .unwrap();
    assert_eq!(
        other.status(),
        401,
        "a token for team/a must not open team/b"
    );
    assert_eq!(
        c.get(format!("{}/v2/", fake.url()))
            .bearer_auth(t)
            .send()
            .unwrap()
            .status(),
        200
    );

    // Without the right service the token endpoint refuses.
    assert_eq!(
        c.get(fake.realm())
            .query(&[("scope", "repository:team/a:pull")])
            .send()
            .unwrap()
            .status(),
        400
    );
    assert_eq!(fake.token_requests().len(), 2);
    assert_eq!(fake.issued_tokens(), vec![t.to_owned()]);
}

#[test]
fn fake_upstream_token_endpoint_checks_basic_credentials() {
    let fake = FakeUpstream::builder()
        .token_credentials("alice", "hunter2")
        .start();
    let q = [("service", SERVICE), ("scope", "repository:x/y:pull")];
    let token_status = |password: Option<&str>| {
        let mut req = http().get(fake.realm()).query(&q);
        if let Some(password) = password {
            req = req.basic_auth("alice", Some(password));
        }
        req.send().unwrap().status()
    };
    assert_eq!(token_status(None), 401);
    assert_eq!(token_status(Some("nope")), 401);
    assert_eq!(token_status(Some("hunter2")), 200);
    assert!(fake.token_requests()[2]
        .authorization
        .as_deref()
        .unwrap()
        .starts_with("Basic "));
}

#[test]
fn fake_upstream_hidden_repo_gets_token_but_still_401() {
    let fake = FakeUpstream::builder().token_auth().start();
    fake.add_manifest("secret/thing", "v1", "application/json", &b"{}"[..]);
    fake.hide_repo("secret/thing");
    let c = http();
    let token: serde_json::Value = c
        .get(fake.realm())
        .query(&[
            ("service", SERVICE),
            ("scope", "repository:secret/thing:pull"),
        ])
        .send()
        .unwrap()
        .json()
        .unwrap();
    let resp = c
        .get(format!("{}/v2/secret/thing/manifests/v1", fake.url()))
        .bearer_auth(token["token"].as_str().unwrap())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains(r#"error="insufficient_scope""#));
}

#[test]
fn fake_upstream_redirects_blobs_to_a_cdn_on_another_host() {
    let fake = FakeUpstream::builder().redirect_blobs_to_cdn().start();
    let blob = b"some layer bytes".to_vec();
    let digest = fake.add_blob("team/a", blob.clone());
    let c = http();
    let url = format!("{}/v2/team/a/blobs/{digest}", fake.url());

    let head = c.head(&url).send().unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        blob.len().to_string().as_str()
    );
    assert_eq!(head.headers()["docker-content-digest"], digest.as_str());

    let redirect = c.get(&url).send().unwrap();
    assert_eq!(redirect.status(), 307);
    let location = redirect.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&fake.cdn_url().unwrap()), "{location}");
    assert!(location.contains("?verify="), "{location}");
    assert!(!location.starts_with(&fake.url()));

    let got = c.get(&location).send().unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().unwrap().as_ref(), blob.as_slice());
    assert_eq!(
        c.get(&location).bearer_auth("x").send().unwrap().status(),
        400
    );
    let unsigned = location.split('?').next().unwrap();
    assert_eq!(c.get(unsigned).send().unwrap().status(), 403);
    let ranged = c.get(&location).header("range", "bytes=5-").send().unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(
        ranged.headers()["content-range"],
        format!("bytes 5-{}/{}", blob.len() - 1, blob.len()).as_str()
    );
    assert_eq!(ranged.bytes().unwrap().as_ref(), &blob[5..]);

    let cdn = fake.cdn_requests();
    assert_eq!(cdn.len(), 4);
    assert!(cdn.iter().all(|r| r.listener == Listener::Cdn));
    assert_eq!(cdn.iter().filter(|r| r.has_authorization()).count(), 1);

    // reqwest's default policy follows the redirect and drops Authorization across hosts.
    let following = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let body = following.get(&url).bearer_auth("tok").send().unwrap();
    assert_eq!(body.status(), 200);
    assert_eq!(body.bytes().unwrap().as_ref(), blob.as_slice());
}

#[test]
fn fake_upstream_serves_wrong_bytes_on_request() {
    let fake = FakeUpstream::start();
    let blob: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let digest = fake.add_blob("team/a", blob.clone());
    let c = http();
    let url = format!("{}/v2/team/a/blobs/{digest}", fake.url());

    fake.serve_wrong_bytes(&digest, WrongBytes::FlippedByte);
    let got = c.get(&url).send().unwrap().bytes().unwrap();
    assert_eq!(got.len(), blob.len());
    assert_ne!(sha256_digest(&got), digest);

    fake.serve_wrong_bytes(&digest, WrongBytes::Truncated(100));
    assert_eq!(
        c.get(&url).send().unwrap().bytes().unwrap().as_ref(),
        &blob[..100]
    );

    fake.serve_wrong_bytes(&digest, WrongBytes::CutOff(4000));
    let cut = c.get(&url).send().unwrap();
    assert_eq!(
        cut.headers()["content-length"],
        blob.len().to_string().as_str()
    );
    assert!(cut.bytes().is_err(), "a cut-off body must not read cleanly");
    let rest = c.get(&url).header("range", "bytes=4000-").send().unwrap();
    assert_eq!(rest.status(), 206);
    assert_eq!(rest.bytes().unwrap().as_ref(), &blob[4000..]);

    fake.serve_correct_bytes(&digest);
    assert_eq!(
        c.get(&url).send().unwrap().bytes().unwrap().as_ref(),
        blob.as_slice()
    );

    let missing = c
        .get(format!(
            "{}/v2/team/a/blobs/sha256:{}",
            fake.url(),
            "0".repeat(64)
        ))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.text().unwrap().contains("BLOB_UNKNOWN"));
    assert_eq!(fake.count("GET", "/blobs/"), 6);
}

#[test]
fn fake_upstream_manifest_head_and_tags() {
    let fake = FakeUpstream::start();
    let bytes = b"{ \"schemaVersion\": 2 }\n".to_vec();
    let digest = fake.add_manifest(
        "team/a",
        "v2",
        "application/vnd.oci.image.manifest.v1+json",
        bytes.clone(),
    );
    fake.add_manifest(
        "team/a",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        bytes.clone(),
    );
    let c = http();
    for reference in ["v2", digest.as_str()] {
        let head = c
            .head(format!("{}/v2/team/a/manifests/{reference}", fake.url()))
            .send()
            .unwrap();
        assert_eq!(head.status(), 200);
        assert_eq!(
            head.headers()["content-length"],
            bytes.len().to_string().as_str()
        );
        assert_eq!(head.headers()["docker-content-digest"], digest.as_str());
        assert_eq!(
            head.headers()["content-type"],
            "application/vnd.oci.image.manifest.v1+json"
        );
    }
    let tags: serde_json::Value = c
        .get(format!("{}/v2/team/a/tags/list", fake.url()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        tags,
        serde_json::json!({"name": "team/a", "tags": ["v1", "v2"]})
    );
    let missing = c
        .get(format!("{}/v2/team/a/manifests/nope", fake.url()))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.text().unwrap().contains("MANIFEST_UNKNOWN"));
    assert_eq!(fake.count("HEAD", "/manifests/"), 2);
}
