//! The counters hold exact values: a cold pull then a warm pull of one image from a real upstream
//! registry (distribution 2.8), concurrent requests joining one held-back fill, a failed fill,
//! the cache gauges after a restart, and bounded route labels.
//!
//! Each test starts its own upstream and its own stowage (own ports, temp dirs, counters).

mod support;

use std::time::Duration;

use support::fake_upstream::{FakeUpstream, WrongBytes};
use support::images::{Format, Image};
use support::registry::Registry;
use support::scrape::Scrape;
use support::stowage::{command_ok, Stowage};
use support::{http, manifest_accept, wait_until};

/// Pulls `name:tag` the way a client does: `GET /v2/`, the manifest by tag, then every blob
/// in full, one after another. Returns the blob bytes received.
fn pull(stowage: &Stowage, name: &str, tag: &str, image: &Image) -> u64 {
    let client = http();
    let base = stowage.url();
    let r = client.get(format!("{base}/v2/")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .get(format!("{base}/v2/{name}/manifests/{tag}"))
        .header("Accept", manifest_accept())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "manifest {name}:{tag}");
    assert_eq!(r.bytes().unwrap().as_ref(), image.manifest.bytes.as_slice());
    let mut received = 0;
    for blob in image.blobs() {
        let r = client
            .get(format!("{base}/v2/{name}/blobs/{}", blob.digest))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "blob {}", blob.digest);
        let body = r.bytes().unwrap();
        assert!(
            body.as_ref() == blob.bytes.as_slice(),
            "blob {} bytes",
            blob.digest
        );
        received += body.len() as u64;
    }
    received
}

#[test]
fn cold_then_warm_pull_counts_misses_then_hits_and_fetches_each_blob_once() {
    let upstream = Registry::start();
    let image = Image::build(Format::Docker, &[1024, 2 * 1024 * 1024]);
    let pushed = upstream.push("library/counted", "1.0", image.clone());
    let blobs = pushed.blobs().len() as f64;
    assert_eq!(blobs, 3.0, "config + two layers");
    let blob_bytes: u64 = image.blobs().iter().map(|b| b.size() as u64).sum();
    let mut stowage = Stowage::for_docker_io(&upstream.url());
    let base = stowage.url();
    let gb = blob_bytes as f64;

    let before = Scrape::get(&base);
    assert_eq!(before.value("stowage_cache_blobs", &[]), 0.0);
    assert_eq!(
        before.value("stowage_cache_budget_bytes", &[]),
        (20u64 << 30) as f64
    );

    const UP_HEAD: &[(&str, &str)] = &[
        ("upstream", "docker.io"),
        ("method", "HEAD"),
        ("status", "200"),
    ];
    const UP_GET: &[(&str, &str)] = &[
        ("upstream", "docker.io"),
        ("method", "GET"),
        ("status", "200"),
    ];
    const MANIFEST: &[(&str, &str)] = &[("kind", "manifest")];
    const BLOB: &[(&str, &str)] = &[("kind", "blob")];
    const FILL: &[(&str, &str)] = &[("source", "fill")];
    const CACHE: &[(&str, &str)] = &[("source", "cache")];
    const DOCKER_IO: &[(&str, &str)] = &[("upstream", "docker.io")];
    const BLOB_GETS: &[(&str, &str)] = &[("route", "blobs"), ("method", "GET"), ("status", "200")];
    const BASE: &[(&str, &str)] = &[("route", "base")];
    // (The harness's readiness probe asked for `/v2/` before the pulls.)
    let probes = before.value("stowage_http_requests_total", BASE);

    // Cold: everything is a miss, every blob is fetched once and streamed while it fills. The tag
    // is revalidated with a HEAD, then the manifest fetched by digest, then the blobs.
    assert_eq!(pull(&stowage, "library/counted", "1.0", &image), blob_bytes);
    // Each client's last byte comes once its blob verifies; the commits follow.
    stowage.wait_commits();
    Scrape::get(&base).assert_values(
        "after the cold pull",
        &[
            ("stowage_cache_misses_total", MANIFEST, 1.0),
            ("stowage_cache_hits_total", MANIFEST, 0.0),
            ("stowage_cache_misses_total", BLOB, blobs),
            ("stowage_cache_hits_total", BLOB, 0.0),
            ("stowage_served_bytes_total", FILL, gb),
            ("stowage_served_bytes_total", CACHE, 0.0),
            ("stowage_upstream_bytes_total", DOCKER_IO, gb),
            ("stowage_upstream_requests_total", UP_HEAD, 1.0),
            ("stowage_upstream_requests_total", UP_GET, 1.0 + blobs),
            ("stowage_fill_joins_total", &[], 0.0),
            ("stowage_fills_in_flight", &[], 0.0),
            ("stowage_cache_blobs", &[], blobs),
            ("stowage_cache_size_bytes", &[], gb),
            ("stowage_http_requests_total", BLOB_GETS, blobs),
            (
                "stowage_http_request_duration_seconds_count",
                &[("route", "blobs")],
                blobs,
            ),
            ("stowage_http_requests_total", BASE, probes + 1.0),
        ],
    );

    // Warm, within the tag's manifest_ttl: everything is a hit and nothing reaches the upstream.
    assert_eq!(pull(&stowage, "library/counted", "1.0", &image), blob_bytes);
    Scrape::get(&base).assert_values(
        "after the warm pull",
        &[
            ("stowage_cache_misses_total", MANIFEST, 1.0),
            ("stowage_cache_hits_total", MANIFEST, 1.0),
            ("stowage_cache_misses_total", BLOB, blobs),
            ("stowage_cache_hits_total", BLOB, blobs),
            ("stowage_served_bytes_total", FILL, gb),
            ("stowage_served_bytes_total", CACHE, gb),
            ("stowage_upstream_bytes_total", DOCKER_IO, gb),
            ("stowage_upstream_requests_total", UP_HEAD, 1.0),
            ("stowage_upstream_requests_total", UP_GET, 1.0 + blobs),
            ("stowage_fill_joins_total", &[], 0.0),
            ("stowage_cache_blobs", &[], blobs),
            ("stowage_cache_size_bytes", &[], gb),
            ("stowage_http_requests_total", BLOB_GETS, 2.0 * blobs),
            ("stowage_http_requests_total", BASE, probes + 2.0),
        ],
    );
    // The upstream's own log agrees: each blob was downloaded once.
    assert_eq!(
        upstream.blob_gets(),
        blobs as usize,
        "{:#?}",
        upstream.access_log_lines()
    );

    // After a restart the counters start again, the cache gauges come from the index.
    stowage.restart();
    Scrape::get(&base).assert_values(
        "after a restart",
        &[
            ("stowage_cache_blobs", &[], blobs),
            ("stowage_cache_size_bytes", &[], gb),
            ("stowage_cache_hits_total", BLOB, 0.0),
        ],
    );
}

#[test]
fn concurrent_requests_for_one_cold_blob_join_a_single_fill() {
    let fake = FakeUpstream::start();
    let bytes: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    let digest = fake.add_blob("library/joined", bytes.clone());
    fake.hold_blob(&digest);
    let stowage = Stowage::for_docker_io(&fake.url());
    let url = format!("{}/v2/library/joined/blobs/{digest}", stowage.url());
    const CLIENTS: usize = 4;

    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let r = http().get(&url).send().unwrap();
                (r.status().as_u16(), r.bytes().unwrap().to_vec())
            })
        })
        .collect();
    // While the upstream holds its answer back, every later request must join the one fill.
    let mut last = None;
    let joined = wait_until(Duration::from_secs(60), || {
        let s = Scrape::get(&stowage.url());
        let joins = s.value("stowage_fill_joins_total", &[]);
        let in_flight = s.value("stowage_fills_in_flight", &[]);
        last = Some((joins, in_flight));
        joins == (CLIENTS - 1) as f64 && in_flight == 1.0
    });
    assert!(
        joined,
        "joins / fills in flight never reached 3 / 1: {last:?}"
    );
    fake.release_blob(&digest);
    for h in handles {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 200);
        assert!(body == bytes, "a joined reader got different bytes");
    }

    stowage.wait_commits();
    let s = Scrape::get(&stowage.url());
    let size = bytes.len() as f64;
    assert_eq!(
        fake.count("GET", "/blobs/"),
        1,
        "one upstream fetch for all readers"
    );
    assert_eq!(
        s.value("stowage_fill_joins_total", &[]),
        (CLIENTS - 1) as f64
    );
    assert_eq!(s.value("stowage_fills_in_flight", &[]), 0.0);
    assert_eq!(
        s.value("stowage_cache_misses_total", &[("kind", "blob")]),
        CLIENTS as f64
    );
    assert_eq!(
        s.value("stowage_served_bytes_total", &[("source", "fill")]),
        CLIENTS as f64 * size
    );
    assert_eq!(
        s.value("stowage_upstream_bytes_total", &[("upstream", "docker.io")]),
        size
    );
    assert_eq!(
        s.value(
            "stowage_upstream_requests_total",
            &[
                ("upstream", "docker.io"),
                ("method", "GET"),
                ("status", "200")
            ]
        ),
        1.0
    );

    // One more request is a plain hit from the committed file.
    let r = http().get(&url).send().unwrap();
    assert_eq!(r.bytes().unwrap().len(), bytes.len());
    let s = Scrape::get(&stowage.url());
    assert_eq!(
        s.value("stowage_cache_hits_total", &[("kind", "blob")]),
        1.0
    );
    assert_eq!(
        s.value("stowage_served_bytes_total", &[("source", "cache")]),
        size
    );
    assert_eq!(s.value("stowage_cache_blobs", &[]), 1.0);
    assert_eq!(s.value("stowage_cache_size_bytes", &[]), size);
}

#[test]
fn a_fill_with_wrong_bytes_counts_a_digest_mismatch_failure() {
    let fake = FakeUpstream::start();
    let digest = fake.add_blob("library/bad", vec![7u8; 64 * 1024]);
    fake.serve_wrong_bytes(&digest, WrongBytes::FlippedByte);
    let stowage = Stowage::for_docker_io(&fake.url());
    let url = format!("{}/v2/library/bad/blobs/{digest}", stowage.url());
    // The connection is aborted (or the body cut short): never a clean, complete 200.
    if let Ok(r) = http().get(&url).send() {
        let body = r.bytes();
        assert!(body.map(|b| b.len() < 64 * 1024).unwrap_or(true));
    }
    let mut last = String::new();
    let counted = wait_until(Duration::from_secs(30), || {
        let s = Scrape::get(&stowage.url());
        last = s.metric_lines("stowage_fill");
        s.value(
            "stowage_fill_failures_total",
            &[("reason", "digest_mismatch")],
        ) == 1.0
            && s.value("stowage_fills_in_flight", &[]) == 0.0
    });
    assert!(counted, "no digest_mismatch failure counted:\n{last}");
    let s = Scrape::get(&stowage.url());
    assert_eq!(
        s.value("stowage_fill_failures_total", &[]),
        1.0,
        "one failure in all"
    );
    assert_eq!(s.value("stowage_cache_blobs", &[]), 0.0);
}

#[test]
fn route_labels_are_templates_never_raw_paths() {
    let fake = FakeUpstream::start();
    let stowage = Stowage::for_docker_io(&fake.url());
    let base = stowage.url();
    let client = http();
    let digest = format!("sha256:{}", "ab".repeat(32));
    for path in [
        "/v2/".to_string(),
        "/v2/_catalog".into(),
        "/v2/library/a/tags/list".into(),
        "/v2/library/a/manifests/latest".into(),
        format!("/v2/library/a/blobs/{digest}"),
        "/v1/search?q=a".into(),
        "/healthz".into(),
        "/readyz".into(),
        "/no/such/thing/12345".into(),
        "/v2/library/a/whatever/x".into(),
    ] {
        client.get(format!("{base}{path}")).send().unwrap();
    }
    let s = Scrape::get(&base);
    let routes = s.label_values("stowage_http_requests_total", "route");
    // Every route template the requests above hit; `metrics` may appear too (the scrape).
    let hit = [
        "base",
        "catalog",
        "tags",
        "manifests",
        "blobs",
        "search",
        "health",
        "other",
    ];
    for r in &routes {
        assert!(
            hit.contains(&r.as_str()) || r == "metrics",
            "route label {r:?} is not a template"
        );
    }
    for want in hit {
        assert!(
            routes.iter().any(|r| r == want),
            "no {want:?} in {routes:?}"
        );
    }
    assert_eq!(
        s.value("stowage_http_requests_total", &[("route", "other")]),
        2.0
    );
    assert_eq!(
        s.value("stowage_http_requests_total", &[("route", "health")]),
        2.0
    );
    assert!(
        !s.text.contains("12345"),
        "a raw path leaked into the labels"
    );
}

#[test]
fn cache_gauges_follow_repairs_missing_files_and_refills() {
    let fake = FakeUpstream::start();
    let (a_len, b_len) = (300 * 1024usize, 200 * 1024usize);
    let a = fake.add_blob("library/gauged", vec![1u8; a_len]);
    let b = fake.add_blob("library/gauged", vec![2u8; b_len]);
    let stowage = Stowage::for_docker_io(&fake.url());
    let get = |digest: &str, len: usize| {
        let url = format!("{}/v2/library/gauged/blobs/{digest}", stowage.url());
        let r = http().get(&url).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{digest}");
        assert_eq!(r.bytes().unwrap().len(), len, "{digest}");
        stowage.wait_commits();
    };
    let gauges = |context: &str, blobs: f64, bytes: usize| {
        let mut last = String::new();
        let ok = wait_until(Duration::from_secs(10), || {
            let s = Scrape::get(&stowage.url());
            last = s.metric_lines("stowage_cache_");
            s.value("stowage_cache_blobs", &[]) == blobs
                && s.value("stowage_cache_size_bytes", &[]) == bytes as f64
        });
        assert!(
            ok,
            "{context}: expected {blobs} blobs, {bytes} bytes:\n{last}"
        );
    };
    get(&a, a_len);
    get(&b, b_len);
    gauges("after two fills", 2.0, a_len + b_len);

    // `verify --repair` (run inside the server) drops a corrupt blob.
    let path = stowage.blob_path(&a);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let out = command_ok(&stowage, &["verify", "--repair"]);
    assert!(out.contains(&format!("repaired {a}")), "{out}");
    gauges("after verify --repair", 1.0, b_len);

    // It refills on the next request.
    get(&a, a_len);
    gauges("after the refill", 2.0, a_len + b_len);

    // A blob whose file vanished is dropped when requested, then refilled.
    std::fs::remove_file(stowage.blob_path(&b)).unwrap();
    get(&b, b_len);
    gauges("after a missing file was refilled", 2.0, a_len + b_len);
}
