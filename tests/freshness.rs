//! Tag freshness against a real upstream, proven with its access log: within `manifest_ttl` a tag
//! costs no upstream request at all; after it, one `HEAD` (and a `GET` by digest only when the
//! tag moved); `immutable_tags` are never revalidated; upstream failures (stopped, 503, 429)
//! serve the cached tag with a `Warning`, bounded by `max_stale`, while uncached tags get the
//! upstream's error (503, or 429 with its `Retry-After`, which is then honoured); a hanging
//! upstream is given up after `revalidate_timeout`; 404s are remembered for `negative_ttl`;
//! per-Accept variants of a multi-arch tag are cached, never mixed up, and dropped when the tag
//! moves; tag records survive a restart.
//!
//! TTLs are short and the tests sleep past them; nothing here asserts how long anything took.

mod support;

use std::time::{Duration, Instant};

use support::fake_upstream::{FakeUpstream, Fault, Gate};
use support::images::{self, Format, Image, ImageIndex, DOCKER_LIST, DOCKER_MANIFEST};
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{error_codes, manifest_accept, request, Resp};

fn get(url: &str) -> Resp {
    request(reqwest::Method::GET, url, &[&manifest_accept()])
}

fn head(url: &str) -> Resp {
    request(reqwest::Method::HEAD, url, &[&manifest_accept()])
}

/// Sleeps until `ttl` (plus a margin) has passed since `since`.
fn sleep_past(since: Instant, ttl: Duration) {
    let until = since + ttl + Duration::from_millis(700);
    let now = Instant::now();
    if until > now {
        std::thread::sleep(until - now);
    }
}

/// The upstream requests after the first `from` lines, as `"METHOD URI"`.
fn since(upstream: &Registry, from: usize) -> Vec<String> {
    upstream.access_log_lines().split_off(from)
}

fn log_len(upstream: &Registry) -> usize {
    upstream.access_log().len()
}

fn hub(upstream_url: &str, extra: &str) -> Stowage {
    Stowage::start(&[UpstreamSpec::new("docker.io", upstream_url).with_extra(extra)])
}

#[test]
fn moved_tag_is_served_from_cache_within_ttl_then_one_head_and_one_get_by_digest() {
    let upstream = Registry::start();
    let ttl = Duration::from_secs(10);
    let stowage = hub(&upstream.url(), "manifest_ttl = \"10s\"");
    let first = upstream.push(
        "library/fresh",
        "latest",
        Image::build(Format::Docker, &[256]),
    );
    // The next version's blobs are upstream already, so moving the tag is one manifest PUT.
    let next = Image::build(Format::Docker, &[256]);
    for b in next.blobs() {
        images::push_blob(&upstream.url(), "library/fresh", b);
    }

    let url = format!("{}/v2/library/fresh/manifests/latest", stowage.url());
    let r = get(&url);
    let checked = Instant::now();
    assert_eq!(r.status, 200);
    assert_eq!(r.digest(), first.digest());

    images::push_manifest(&upstream.url(), "library/fresh", "latest", &next.manifest);
    let before = log_len(&upstream);
    // Within the TTL: GET and HEAD by tag, and GET by digest, all from the cache.
    let r = get(&url);
    assert_eq!(r.status, 200);
    assert_eq!(r.digest(), first.digest(), "within the TTL the old digest");
    assert_eq!(r.body, first.manifest().bytes);
    let h = head(&url);
    assert_eq!((h.status, h.digest()), (200, first.digest().to_string()));
    let by_digest = get(&format!(
        "{}/v2/library/fresh/manifests/{}",
        stowage.url(),
        first.digest()
    ));
    assert_eq!(by_digest.status, 200);
    let premise = checked.elapsed();
    let seen = since(&upstream, before);
    assert!(
        premise < ttl,
        "test premise broken: the checks took {premise:?}, longer than the TTL"
    );
    assert_eq!(
        seen,
        Vec::<String>::new(),
        "within the TTL nothing reaches the upstream"
    );

    sleep_past(checked, ttl);
    let before = log_len(&upstream);
    let r = get(&url);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.digest(),
        next.manifest.digest,
        "after the TTL the new digest"
    );
    assert_eq!(r.body, next.manifest.bytes);
    assert_eq!(
        since(&upstream, before),
        vec![
            "HEAD /v2/library/fresh/manifests/latest".to_string(),
            format!("GET /v2/library/fresh/manifests/{}", next.manifest.digest),
        ],
        "exactly one HEAD, then the new manifest by digest"
    );
}

#[test]
fn unchanged_tag_after_ttl_costs_one_head_and_no_get() {
    let upstream = Registry::start();
    let stowage = hub(&upstream.url(), "manifest_ttl = \"2s\"");
    let pushed = upstream.push("library/steady", "1.0", Image::build(Format::Oci, &[256]));
    let url = format!("{}/v2/library/steady/manifests/1.0", stowage.url());
    let r = get(&url);
    let checked = Instant::now();
    assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));

    sleep_past(checked, Duration::from_secs(2));
    let before = log_len(&upstream);
    let r = get(&url);
    assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
    assert_eq!(r.body, pushed.manifest().bytes);
    assert_eq!(
        since(&upstream, before),
        vec!["HEAD /v2/library/steady/manifests/1.0".to_string()],
        "an unchanged digest is confirmed with a HEAD only"
    );
}

#[test]
fn immutable_tags_are_never_revalidated_and_ttl_zero_always_is() {
    let upstream = Registry::start();
    let stowage = hub(
        &upstream.url(),
        "manifest_ttl = \"0\"\nimmutable_tags = ['^v?\\d+\\.\\d+\\.\\d+$']",
    );
    let image = Image::build(Format::Docker, &[128]);
    let pushed = upstream.push("library/pinned", "v1.2.3", image.clone());
    images::push_manifest(&upstream.url(), "library/pinned", "latest", &image.manifest);
    let pinned = format!("{}/v2/library/pinned/manifests/v1.2.3", stowage.url());
    let latest = format!("{}/v2/library/pinned/manifests/latest", stowage.url());
    for url in [&pinned, &latest] {
        let r = get(url);
        assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
    }
    let before = log_len(&upstream);
    for url in [&pinned, &latest, &pinned, &latest] {
        let r = get(url);
        assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
    }
    assert_eq!(
        since(&upstream, before),
        vec![
            "HEAD /v2/library/pinned/manifests/latest".to_string(),
            "HEAD /v2/library/pinned/manifests/latest".to_string(),
        ],
        "v1.2.3 is immutable (never asked again); latest with manifest_ttl = 0 is asked every time"
    );
}

#[test]
fn stopped_upstream_serves_cached_tag_with_warning_and_uncached_tag_is_503() {
    let mut upstream = Registry::start();
    let stowage = hub(&upstream.url(), "manifest_ttl = \"0\"");
    let pushed = upstream.push(
        "library/offline",
        "1.0",
        Image::build(Format::Docker, &[256]),
    );
    upstream.push(
        "library/offline",
        "never-pulled",
        Image::build(Format::Docker, &[64]),
    );
    let url = format!("{}/v2/library/offline/manifests/1.0", stowage.url());
    let r = get(&url);
    assert_eq!((r.status, r.header("warning")), (200, String::new()));

    upstream.stop();
    let r = get(&url);
    assert_eq!(
        r.status, 200,
        "the cached tag is served while upstream is down"
    );
    assert_eq!(r.digest(), pushed.digest());
    assert_eq!(r.body, pushed.manifest().bytes);
    let warning = r.header("warning");
    assert!(
        warning.starts_with("299 - \"stale: "),
        "stale answers carry a Warning: {warning:?}"
    );
    let h = head(&url);
    assert_eq!(h.status, 200);
    assert!(h.header("warning").starts_with("299 - \"stale: "));

    // By digest is content-addressed: no warning, upstream not needed.
    let by_digest = get(&format!(
        "{}/v2/library/offline/manifests/{}",
        stowage.url(),
        pushed.digest()
    ));
    assert_eq!(
        (by_digest.status, by_digest.header("warning")),
        (200, String::new())
    );

    let r = get(&format!(
        "{}/v2/library/offline/manifests/never-pulled",
        stowage.url()
    ));
    assert_eq!(r.status, 503, "nothing cached and upstream down");
    assert_eq!(error_codes(&r.body, "uncached tag"), ["UNAVAILABLE"]);
}

#[test]
fn a_manifest_get_cut_mid_body_serves_the_cached_tag_stale() {
    // The revalidation's HEAD says the tag moved; the GET of the new digest breaks mid-body. The
    // upstream is unavailable (not wrong): the cached tag is served stale.
    let fake = FakeUpstream::start();
    let stowage = hub(&fake.url(), "manifest_ttl = \"0\"");
    let repo = "library/cut";
    let first = Image::build(Format::Docker, &[128]).manifest;
    fake.add_manifest(repo, "1.0", &first.media_type, first.bytes.clone());
    let url = format!("{}/v2/{repo}/manifests/1.0", stowage.url());
    let r = get(&url);
    assert_eq!((r.status, r.digest()), (200, first.digest.clone()));

    let next = Image::build(Format::Docker, &[128]).manifest;
    fake.add_manifest(repo, "1.0", &next.media_type, next.bytes.clone());
    let cut = next.bytes.len() as u64 / 2;
    fake.push_manifest_faults(&next.digest, [Fault::CutAt(cut)]);
    let r = get(&url);
    assert_eq!(
        fake.count("GET", &next.digest),
        1,
        "premise: the new digest was fetched (and cut)"
    );
    assert_eq!(
        (r.status, r.digest()),
        (200, first.digest.clone()),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.body, first.bytes);
    let warning = r.header("warning");
    assert!(
        warning.starts_with("299 - \"stale: "),
        "stale answers carry a Warning: {warning:?}"
    );

    // The upstream recovered: the tag moves on the next revalidation.
    let r = get(&url);
    assert_eq!((r.status, r.digest()), (200, next.digest.clone()));
    assert_eq!(r.header("warning"), "");
}

#[test]
fn max_stale_bounds_how_long_a_cached_tag_outlives_its_upstream() {
    let mut upstream = Registry::start();
    let max_stale = Duration::from_secs(6);
    let stowage = hub(&upstream.url(), "manifest_ttl = \"0\"\nmax_stale = \"6s\"");
    let pushed = upstream.push(
        "library/bounded",
        "1.0",
        Image::build(Format::Docker, &[128]),
    );
    let url = format!("{}/v2/library/bounded/manifests/1.0", stowage.url());
    assert_eq!(get(&url).status, 200);
    let checked = Instant::now();
    upstream.stop();
    let r = get(&url);
    assert!(
        checked.elapsed() < max_stale,
        "test premise broken: stopping the upstream took longer than max_stale"
    );
    assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
    assert!(r.header("warning").contains("stale"));

    sleep_past(checked, max_stale);
    let r = get(&url);
    assert_eq!(
        r.status, 503,
        "past max_stale the cached tag is no longer served"
    );
    assert_eq!(error_codes(&r.body, "past max_stale"), ["UNAVAILABLE"]);
}

#[test]
fn upstream_429_serves_stale_when_cached_and_passes_429_with_retry_after_when_not() {
    let upstream = Registry::start();
    let gate = Gate::start(&upstream.url());
    let stowage = hub(&gate.url(), "manifest_ttl = \"0\"");
    let pushed = upstream.push(
        "library/limited",
        "1.0",
        Image::build(Format::Docker, &[128]),
    );
    upstream.push(
        "library/limited",
        "2.0",
        Image::build(Format::Docker, &[64]),
    );
    let url = format!("{}/v2/library/limited/manifests/1.0", stowage.url());
    assert_eq!(get(&url).status, 200);

    gate.fail_with(429, Some("42"));
    let heads_before = gate.count("HEAD", "/v2/library/limited/manifests/1.0");
    let r = get(&url);
    assert_eq!(
        r.status, 200,
        "a rate-limited revalidation serves the cache"
    );
    assert_eq!(r.digest(), pushed.digest());
    let warning = r.header("warning");
    assert!(
        warning.starts_with("299 - \"stale: ") && warning.contains("429"),
        "{warning:?}"
    );
    assert_eq!(
        gate.count("HEAD", "/v2/library/limited/manifests/1.0"),
        heads_before + 1,
        "the revalidation was tried (and answered 429)"
    );

    // Retry-After is honoured: until it passes, cached tags are served without asking.
    let r = get(&url);
    assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
    assert!(r.header("warning").contains("stale"));
    assert_eq!(
        gate.count("HEAD", "/v2/library/limited/manifests/1.0"),
        heads_before + 1,
        "no revalidation while the upstream's Retry-After runs"
    );

    let uncached = format!("{}/v2/library/limited/manifests/2.0", stowage.url());
    let r = get(&uncached);
    assert_eq!(
        r.status, 429,
        "nothing cached: the upstream's 429 is passed on"
    );
    assert_eq!(r.header("retry-after"), "42");
    assert_eq!(error_codes(&r.body, "uncached tag"), ["TOOMANYREQUESTS"]);
    let h = head(&uncached);
    assert_eq!((h.status, h.header("retry-after")), (429, "42".to_string()));

    // Upstream back: fresh answers, no warning (and the backoff ends).
    gate.pass();
    let r = get(&uncached);
    assert_eq!((r.status, r.header("warning")), (200, String::new()));
    let r = get(&url);
    assert_eq!((r.status, r.header("warning")), (200, String::new()));

    // 5xx is "unavailable" too: stale when cached, 503 when not.
    gate.fail_with(503, None);
    let r = get(&url);
    assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
    assert!(r.header("warning").contains("stale"));
    let r = get(&format!(
        "{}/v2/library/limited/manifests/3.0",
        stowage.url()
    ));
    assert_eq!(r.status, 503);
    assert_eq!(error_codes(&r.body, "5xx, uncached"), ["UNAVAILABLE"]);
}

#[test]
fn accept_restricted_client_gets_its_own_cached_variant_and_never_the_list() {
    let upstream = Registry::start();
    let ttl = Duration::from_secs(10);
    let stowage = hub(&upstream.url(), "manifest_ttl = \"10s\"");
    let index = ImageIndex::build(Format::Docker, &["amd64", "arm64"], &[256]);
    let pushed = upstream.push("library/multi", "1.0", index.clone());
    let children: Vec<String> = index
        .children
        .iter()
        .map(|c| c.manifest.digest.clone())
        .collect();
    let url = format!("{}/v2/library/multi/manifests/1.0", stowage.url());
    let narrow = || request(reqwest::Method::GET, &url, &[DOCKER_MANIFEST]);
    let check_narrow = |r: &Resp, what: &str| {
        assert_eq!(r.status, 200, "{what}");
        assert_eq!(
            r.header("content-type"),
            DOCKER_MANIFEST,
            "{what}: never the list"
        );
        assert!(
            children.contains(&r.digest()),
            "{what}: {} is not a child",
            r.digest()
        );
        assert_eq!(support::sha256_digest(&r.body), r.digest(), "{what}");
    };

    let full = get(&url);
    let checked = Instant::now();
    assert_eq!(full.header("content-type"), DOCKER_LIST);
    assert_eq!(full.digest(), pushed.digest());
    let first_narrow = narrow();
    check_narrow(&first_narrow, "first narrow request");

    // Within the TTL both variants come from the cache.
    let before = log_len(&upstream);
    let again = narrow();
    check_narrow(&again, "narrow within TTL");
    assert_eq!(again.digest(), first_narrow.digest());
    let full_again = get(&url);
    assert_eq!(full_again.digest(), pushed.digest());
    assert_eq!(full_again.header("content-type"), DOCKER_LIST);
    let h = request(reqwest::Method::HEAD, &url, &[DOCKER_MANIFEST]);
    assert_eq!(h.header("content-type"), DOCKER_MANIFEST);
    let premise = checked.elapsed();
    let seen = since(&upstream, before);
    assert!(premise < ttl, "test premise broken: took {premise:?}");
    assert_eq!(
        seen,
        Vec::<String>::new(),
        "variants are served from the cache"
    );

    // After the TTL: one HEAD (full Accept) confirms the tag, and the variant still stands.
    sleep_past(checked, ttl);
    let before = log_len(&upstream);
    let r = narrow();
    check_narrow(&r, "narrow after TTL");
    assert_eq!(r.digest(), first_narrow.digest());
    assert_eq!(
        since(&upstream, before),
        vec!["HEAD /v2/library/multi/manifests/1.0".to_string()]
    );
}

#[test]
fn upstream_404_for_a_tag_is_remembered_for_negative_ttl() {
    let upstream = Registry::start();
    let negative_ttl = Duration::from_secs(8);
    let stowage = hub(&upstream.url(), "negative_ttl = \"8s\"");
    upstream.push(
        "library/later",
        "other",
        Image::build(Format::Docker, &[64]),
    );
    let url = format!("{}/v2/library/later/manifests/1.0", stowage.url());
    let r = get(&url);
    let first = Instant::now();
    assert_eq!(r.status, 404);
    assert_eq!(error_codes(&r.body, "missing tag"), ["MANIFEST_UNKNOWN"]);

    let before = log_len(&upstream);
    let r = get(&url);
    assert_eq!(r.status, 404);
    let premise = first.elapsed();
    let seen = since(&upstream, before);
    assert!(
        premise < negative_ttl,
        "test premise broken: took {premise:?}"
    );
    assert_eq!(seen, Vec::<String>::new(), "the 404 is remembered");

    let pushed = upstream.push("library/later", "1.0", Image::build(Format::Docker, &[64]));
    sleep_past(first, negative_ttl);
    let r = get(&url);
    assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
}

#[test]
fn variants_are_dropped_when_the_tag_moves() {
    let upstream = Registry::start();
    let ttl = Duration::from_secs(2);
    let stowage = hub(&upstream.url(), "manifest_ttl = \"2s\"");
    let old = ImageIndex::build(Format::Docker, &["amd64", "arm64"], &[128]);
    upstream.push("library/moving", "1.0", old.clone());
    let url = format!("{}/v2/library/moving/manifests/1.0", stowage.url());
    let narrow = || request(reqwest::Method::GET, &url, &[DOCKER_MANIFEST]);
    assert_eq!(get(&url).header("content-type"), DOCKER_LIST);
    let r = narrow();
    let checked = Instant::now();
    assert_eq!(r.status, 200);
    assert!(old.children.iter().any(|c| c.manifest.digest == r.digest()));

    let new = ImageIndex::build(Format::Docker, &["amd64", "arm64"], &[128]);
    let pushed = upstream.push("library/moving", "1.0", new.clone());
    sleep_past(checked, ttl);
    // The narrow client first: the HEAD finds the tag moved, so its variant is fetched anew.
    let r = narrow();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), DOCKER_MANIFEST);
    assert!(
        new.children.iter().any(|c| c.manifest.digest == r.digest()),
        "after the move a child of the new list, got {}",
        r.digest()
    );
    let full = get(&url);
    assert_eq!(full.digest(), pushed.digest());
}

#[test]
fn a_fresh_tag_stays_fresh_across_a_restart() {
    let upstream = Registry::start();
    let ttl = Duration::from_secs(120);
    let mut stowage = hub(&upstream.url(), "manifest_ttl = \"120s\"");
    let pushed = upstream.push(
        "library/durable",
        "1.0",
        Image::build(Format::Docker, &[128]),
    );
    let url = format!("{}/v2/library/durable/manifests/1.0", stowage.url());
    assert_eq!(get(&url).digest(), pushed.digest());
    let checked = Instant::now();
    stowage.restart();
    let before = log_len(&upstream);
    let r = get(&url);
    assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
    assert!(checked.elapsed() < ttl, "test premise broken");
    assert_eq!(
        since(&upstream, before),
        Vec::<String>::new(),
        "the tag record (with its check time) is durable"
    );
}

#[test]
fn a_hanging_upstream_is_given_up_after_revalidate_timeout_and_the_cache_served() {
    let upstream = Registry::start();
    let gate = Gate::start(&upstream.url());
    // read_timeout is far longer than the test client's patience (120 s): only
    // revalidate_timeout can produce an answer.
    let stowage = hub(
        &gate.url(),
        "manifest_ttl = \"0\"\nrevalidate_timeout = \"1s\"\nread_timeout = \"600s\"",
    );
    let pushed = upstream.push("library/slow", "1.0", Image::build(Format::Docker, &[64]));
    let url = format!("{}/v2/library/slow/manifests/1.0", stowage.url());
    assert_eq!(get(&url).status, 200);
    gate.hang();
    let r = get(&url);
    assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
    let warning = r.header("warning");
    assert!(
        warning.starts_with("299 - \"stale: ") && warning.contains("revalidate_timeout"),
        "{warning:?}"
    );
}

/// A burst of requests for an expired tag while the upstream hangs: one revalidation `HEAD`
/// goes out, the requests that arrive meanwhile wait for it and share its outcome (every one is
/// served stale) instead of each sending its own `HEAD` and waiting out the timeout in turn.
#[test]
fn a_burst_on_an_expired_tag_sends_one_revalidation_and_shares_its_outcome() {
    let upstream = Registry::start();
    let gate = Gate::start(&upstream.url());
    let stowage = hub(
        &gate.url(),
        "manifest_ttl = \"0\"\nrevalidate_timeout = \"8s\"\nread_timeout = \"600s\"",
    );
    let pushed = upstream.push("library/burst", "1.0", Image::build(Format::Docker, &[64]));
    let url = format!("{}/v2/library/burst/manifests/1.0", stowage.url());
    assert_eq!(get(&url).status, 200);
    gate.hang();
    let heads_before = gate.count("HEAD", "/manifests/1.0");
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || get(&url))
        })
        .collect();
    for r in burst {
        let r = r.join().expect("request thread");
        assert_eq!((r.status, r.digest()), (200, pushed.digest().to_string()));
        assert!(r.header("warning").starts_with("299 - \"stale: "));
    }
    assert_eq!(
        gate.count("HEAD", "/manifests/1.0") - heads_before,
        1,
        "one revalidation for the whole burst: {:#?}",
        gate.requests()
    );
}
