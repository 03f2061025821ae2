//! A fleet of stowage nodes sharing one object store, end to end: a real upstream
//! (distribution), real Garage (a 3-node S3-compatible cluster started by the test; one pair of
//! nodes on GCS's JSON API, fake-gcs-server), skopeo as the client; the in-process fake upstream where a test must hold a blob mid-fill; the shared
//! directory backend (`storage.shared_path`) where the test needs conditional create, which
//! Garage lacks.
//!
//! Each test starts its own upstream, store and nodes (own ports, own temp dirs).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::clients::stowage_blob_gets;
use support::fake_upstream::{FakeUpstream, Fault};
use support::garage::Garage;
use support::gcs::GcsEmulator;
use support::images::{Format, Image, Pushed};
use support::nginx::Nginx;
use support::registry::Registry;
use support::scrape::Scrape;
use support::stowage::{Stowage, UpstreamSpec};
use support::{http, sha256_hex, skopeo_ok, wait_until};

/// One small and one multi-MiB layer (the latter goes through multipart upload paths).
const LAYERS: &[usize] = &[1024, 3 * 1024 * 1024];

/// How long background uploads may take on a busy 2-core machine.
const SHARE_TIMEOUT: Duration = Duration::from_secs(90);

/// The key prefix the nodes use in the test bucket.
const PREFIX: &str = "fleet/";

/// A node in front of `upstream_url` (as `docker.io`) with these `[storage]` lines.
fn node(upstream_url: &str, storage: &str) -> Stowage {
    Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", upstream_url))
        .storage_toml(storage)
        .start()
}

/// `skopeo copy` of `fleet/app:<tag>` through `node` into `out`, then a byte-level check of
/// every file against what was pushed.
fn pull(node: &Stowage, pushed: &Pushed, out: &Path) {
    let src = format!(
        "docker://{}/{}:{}",
        node.host_port(),
        pushed.name,
        pushed.tag
    );
    let dst = format!("dir:{}", out.display());
    skopeo_ok(
        &["copy", "--preserve-digests", &src, &dst],
        &format!(
            "pulling {}:{} through {}",
            pushed.name,
            pushed.tag,
            node.url()
        ),
    );
    let manifest = std::fs::read(out.join("manifest.json")).expect("manifest.json");
    assert!(
        manifest == pushed.manifest().bytes,
        "manifest.json differs from the pushed manifest"
    );
    for blob in pushed.blobs() {
        let got = std::fs::read(out.join(blob.hex()))
            .unwrap_or_else(|e| panic!("blob {} missing from the copy: {e}", blob.hex()));
        assert_eq!(
            sha256_hex(&got),
            blob.hex(),
            "blob {} corrupted",
            blob.hex()
        );
    }
}

/// Waits until every blob of `pushed` is in the shared store, read through stowage's own
/// store client (the same code the nodes use).
fn wait_shared(store: &Arc<dyn stowage::store::BlobStore>, pushed: &Pushed) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let keys: Vec<String> = pushed
        .blobs()
        .iter()
        .map(|b| format!("blobs/sha256/{}", b.hex()))
        .collect();
    let all_there = wait_until(SHARE_TIMEOUT, || {
        keys.iter()
            .all(|k| matches!(rt.block_on(store.head(k)), Ok(Some(_))))
    });
    assert!(all_there, "node A never shared every blob of the image");
}

fn garage_store(garage: &Garage) -> Arc<dyn stowage::store::BlobStore> {
    stowage::store::open(&garage.shared_store_config(PREFIX, Duration::from_secs(10)))
        .expect("opening the Garage bucket")
}

fn metric(node: &Stowage, name: &str, labels: &[(&str, &str)]) -> f64 {
    Scrape::get(&node.url()).find(name, labels).unwrap_or(0.0)
}

/// `stowage_fill_sources_total{source}` of `node`.
fn fill_sources(node: &Stowage, source: &str) -> f64 {
    metric(node, "stowage_fill_sources_total", &[("source", source)])
}

/// Node `b` pulls `pushed` (already in the shared store): no blob is asked of the upstream and
/// every one comes from the object store. Returns the upstream's access log lines of the pull.
fn pull_from_the_store(upstream: &Registry, b: &Stowage, pushed: &Pushed) -> Vec<String> {
    let requests_before_b = upstream.access_log().len();
    let out_b = tempfile::tempdir().expect("tempdir");
    pull(b, pushed, out_b.path());
    let during_b: Vec<String> = upstream.access_log_lines()[requests_before_b..].to_vec();
    assert!(
        !during_b.iter().any(|l| l.contains("/blobs/")),
        "node B must not ask the upstream for any blob: {during_b:#?}"
    );
    assert_eq!(
        fill_sources(b, "object_store"),
        pushed.blobs().len() as f64,
        "every blob of node B came from the object store"
    );
    during_b
}

#[test]
fn node_b_serves_what_node_a_fetched_without_asking_the_upstream() {
    let upstream = Registry::start();
    let pushed = upstream.push("fleet/app", "v1", Image::build(Format::Docker, LAYERS));
    let garage = Garage::start(3);
    let storage = garage.storage_toml(PREFIX);
    let a = node(&upstream.url(), &storage);
    let b = node(&upstream.url(), &storage);

    let out_a = tempfile::tempdir().expect("tempdir");
    pull(&a, &pushed, out_a.path());
    let blob_gets_after_a = upstream.blob_gets();
    assert_eq!(
        blob_gets_after_a,
        pushed.blobs().len(),
        "node A fetches each blob once from the upstream\n{:#?}",
        upstream.access_log_lines()
    );
    wait_shared(&garage_store(&garage), &pushed);
    let during_b = pull_from_the_store(&upstream, &b, &pushed);
    assert!(
        !during_b.iter().any(|l| l.contains("/manifests/")),
        "the tag node A confirmed within manifest_ttl is a hit on node B: {during_b:#?}"
    );
    assert_eq!(fill_sources(&b, "upstream"), 0.0);
    assert!(metric(&b, "stowage_object_store_hits_total", &[("kind", "tag")]) >= 1.0);

    // B's local tier now holds the blobs: a third pull asks nobody.
    let out_b2 = tempfile::tempdir().expect("tempdir");
    pull(&b, &pushed, out_b2.path());
    assert_eq!(
        fill_sources(&b, "object_store"),
        pushed.blobs().len() as f64,
        "the second pull on node B is served from its local tier"
    );
}

/// The same sharing with the store on Google Cloud Storage's JSON API (`backend = "gcs"`).
#[test]
fn nodes_on_gcs_share_what_one_of_them_fetched() {
    let upstream = Registry::start();
    let pushed = upstream.push("fleet/app", "v1", Image::build(Format::Docker, LAYERS));
    let gcs = GcsEmulator::start();
    let storage = gcs.storage_toml(PREFIX);
    let a = node(&upstream.url(), &storage);
    let b = node(&upstream.url(), &storage);

    let out_a = tempfile::tempdir().expect("tempdir");
    pull(&a, &pushed, out_a.path());
    let store = stowage::store::open(&gcs.shared_store_config(PREFIX, Duration::from_secs(10)))
        .expect("opening the GCS bucket");
    wait_shared(&store, &pushed);
    pull_from_the_store(&upstream, &b, &pushed);
    let uploads = gcs
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("POST /upload/") && r.contains("name=fleet%2Fblobs%2Fsha256%2F"))
        .count();
    assert_eq!(uploads, pushed.blobs().len(), "{:#?}", gcs.requests());
}

#[test]
fn losing_the_object_store_keeps_the_local_tier_serving_and_readiness_reports_it() {
    let upstream = Registry::start();
    let first = upstream.push("fleet/app", "v1", Image::build(Format::Docker, LAYERS));
    let mut garage = Garage::start(3);
    let a = node(&upstream.url(), &garage.storage_toml(PREFIX));
    let out = tempfile::tempdir().expect("tempdir");
    pull(&a, &first, out.path());
    wait_shared(&garage_store(&garage), &first);

    let ready: serde_json::Value = http()
        .get(format!("{}/readyz", a.url()))
        .send()
        .expect("readyz")
        .json()
        .expect("readyz json");
    assert_eq!(ready["object_store"]["reachable"], true, "{ready}");
    assert_eq!(ready["degraded"], false, "{ready}");

    garage.stop_all();

    // Hits from the local tier continue, without the store and without the upstream.
    let blob_gets = upstream.blob_gets();
    let again = tempfile::tempdir().expect("tempdir");
    pull(&a, &first, again.path());
    assert_eq!(
        upstream.blob_gets(),
        blob_gets,
        "local hits need no upstream"
    );

    // Readiness reports the fault (the node still serves: 200, degraded).
    let resp = http()
        .get(format!("{}/readyz", a.url()))
        .send()
        .expect("readyz");
    assert_eq!(resp.status().as_u16(), 200);
    let ready: serde_json::Value = resp.json().expect("readyz json");
    assert_eq!(ready["object_store"]["reachable"], false, "{ready}");
    assert_eq!(ready["degraded"], true, "{ready}");
    assert!(
        ready["object_store"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{ready}"
    );
    let store = ready["object_store"]["store"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        metric(&a, "stowage_object_store_up", &[("store", &store)]),
        0.0
    );

    // New content falls back to the upstream, kept locally.
    let second = upstream.push("fleet/app", "v2", Image::build(Format::Oci, LAYERS));
    let out2 = tempfile::tempdir().expect("tempdir");
    pull(&a, &second, out2.path());
    assert!(metric(&a, "stowage_object_store_fallbacks_total", &[]) >= 1.0);
    assert!(
        metric(
            &a,
            "stowage_object_store_requests_total",
            &[("op", "head"), ("result", "error")]
        ) >= 1.0
    );
}

/// Two nodes on one shared directory, a cold blob whose tail the upstream holds back: node A claims the
/// fill; node B, asked for the same blob meanwhile, finds A's lease, waits for A's shared copy
/// and reads it from the store. One upstream transfer for the fleet.
#[test]
fn fill_lease_makes_the_second_node_wait_for_the_first_nodes_copy() {
    let upstream = FakeUpstream::start();
    let bytes: Vec<u8> = (0..(2 * 1024 * 1024u32)).map(|i| (i % 251) as u8).collect();
    let digest = upstream.add_blob("fleet/app", bytes.clone());
    // The upstream sends 64 KiB, then holds the rest until the test says.
    upstream.push_faults(&digest, [Fault::HoldAt(64 * 1024)]);
    let shared = tempfile::tempdir().expect("tempdir");
    let storage = format!(
        "shared_path = \"{}\"\nfill_lease_ttl = \"2m\"\n",
        shared.path().display()
    );
    let a = node(&upstream.url(), &storage);
    let b = node(&upstream.url(), &storage);
    let url_a = format!("{}/v2/fleet/app/blobs/{digest}", a.url());
    let url_b = format!("{}/v2/fleet/app/blobs/{digest}", b.url());

    let get_a = std::thread::spawn(move || http().get(url_a).send().and_then(|r| r.bytes()));
    assert!(
        wait_until(Duration::from_secs(30), || !upstream
            .blob_gets(&digest)
            .is_empty()),
        "node A never asked the upstream"
    );
    let get_b = std::thread::spawn(move || http().get(url_b).send().and_then(|r| r.bytes()));
    assert!(
        wait_until(Duration::from_secs(30), || b
            .log()
            .contains("another node is filling this blob")),
        "node B did not see node A's fill lease\n{}",
        b.log()
    );
    upstream.release_holds();

    let body_a = get_a.join().expect("thread").expect("node A's answer");
    let body_b = get_b.join().expect("thread").expect("node B's answer");
    assert_eq!(sha256_hex(&body_a), sha256_hex(&bytes));
    assert_eq!(sha256_hex(&body_b), sha256_hex(&bytes));
    assert_eq!(
        upstream.blob_gets(&digest).len(),
        1,
        "one upstream transfer for the whole fleet"
    );
    assert_eq!(fill_sources(&b, "object_store"), 1.0);
    // The lease is released once the blob is shared.
    let lease = shared.path().join(format!(
        "leases/sha256/{}",
        digest.trim_start_matches("sha256:")
    ));
    assert!(
        wait_until(SHARE_TIMEOUT, || !lease.exists()),
        "node A's fill lease was never released"
    );
}

/// A shared object that does not hash to its digest is never served as good bytes: the fill
/// from it fails verification, the object is removed, and the next request fills from the
/// upstream and shares a verified copy.
#[test]
fn a_damaged_shared_blob_is_rejected_removed_and_replaced_from_the_upstream() {
    let upstream = FakeUpstream::start();
    let bytes: Vec<u8> = (0..(512 * 1024u32)).map(|i| (i % 241) as u8).collect();
    let digest = upstream.add_blob("fleet/app", bytes.clone());
    let hex = digest.trim_start_matches("sha256:").to_string();
    let shared = tempfile::tempdir().expect("tempdir");
    let object = shared.path().join(format!("blobs/sha256/{hex}"));
    std::fs::create_dir_all(object.parent().expect("parent")).expect("mkdir");
    let mut damaged = bytes.clone();
    damaged[1000] ^= 0xff;
    std::fs::write(&object, &damaged).expect("write damaged object");
    let storage = format!("shared_path = \"{}\"\n", shared.path().display());
    let a = node(&upstream.url(), &storage);
    let url = format!("{}/v2/fleet/app/blobs/{digest}", a.url());

    let first = http().get(&url).send().and_then(|r| r.bytes());
    assert!(
        first.map(|b| sha256_hex(&b) != hex).unwrap_or(true),
        "damaged bytes must never arrive as a clean, complete body"
    );
    assert!(
        upstream.blob_gets(&digest).is_empty(),
        "the shared copy was tried first"
    );
    assert!(
        wait_until(Duration::from_secs(30), || !object.exists()),
        "the damaged shared object was not removed"
    );
    assert!(
        a.blob_files().is_empty(),
        "nothing unverified is committed locally"
    );

    let second = http()
        .get(&url)
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.bytes())
        .expect("second GET");
    assert_eq!(sha256_hex(&second), hex);
    assert_eq!(upstream.blob_gets(&digest).len(), 1);
    assert!(
        wait_until(SHARE_TIMEOUT, || std::fs::read(&object)
            .map(|b| sha256_hex(&b) == hex)
            .unwrap_or(false)),
        "the verified copy was not shared"
    );
}

/// The load-balancer setup of `docs/fleet.md`: nginx hashing on the digest in front of two
/// nodes (no shared store at all). Two clients pull the same image at once through it: every
/// blob is served by exactly one node, so the upstream sees each blob once.
#[test]
fn the_documented_nginx_setup_sends_each_digest_to_one_node() {
    let upstream = Registry::start();
    let pushed = upstream.push(
        "fleet/app",
        "v1",
        Image::build(
            Format::Oci,
            &[1024, 2048, 512 * 1024, 1024 * 1024, 3 * 1024 * 1024],
        ),
    );
    let a = node(&upstream.url(), "");
    let b = node(&upstream.url(), "");
    let lb = Nginx::start_fleet(&[a.host_port(), b.host_port()]);
    let lb_host = lb.host_port();

    let pulls: Vec<_> = (0..2)
        .map(|_| {
            let src = format!("docker://{lb_host}/{}:{}", pushed.name, pushed.tag);
            std::thread::spawn(move || {
                let out = tempfile::tempdir().expect("tempdir");
                let dst = format!("dir:{}", out.path().display());
                skopeo_ok(
                    &["copy", "--preserve-digests", &src, &dst],
                    "pulling through nginx",
                );
                out
            })
        })
        .collect();
    for p in pulls {
        let out = p.join().expect("pull thread");
        for blob in pushed.blobs() {
            let got = std::fs::read(out.path().join(blob.hex())).expect("blob in the copy");
            assert_eq!(sha256_hex(&got), blob.hex());
        }
    }
    for blob in pushed.blobs() {
        let (on_a, on_b) = (
            stowage_blob_gets(&a, &blob.digest),
            stowage_blob_gets(&b, &blob.digest),
        );
        assert!(
            on_a + on_b >= 2 && (on_a == 0 || on_b == 0),
            "blob {} went to both nodes (A {on_a}, B {on_b})",
            blob.digest
        );
    }
    assert_eq!(
        upstream.blob_gets(),
        pushed.blobs().len(),
        "each blob crossed from the upstream once for the fleet\n{:#?}",
        upstream.access_log_lines()
    );
}

/// `GET /v2/<name>/manifests/<reference>` on `node`: the status.
fn manifest_status(node: &Stowage, name: &str, reference: &str) -> u16 {
    http()
        .get(format!("{}/v2/{name}/manifests/{reference}", node.url()))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[test]
fn an_upstream_404_is_shared_with_its_ttl() {
    let upstream = Registry::start();
    let shared = tempfile::tempdir().expect("tempdir");
    let storage = format!("shared_path = \"{}\"\n", shared.path().display());
    // Long enough that the steps before the expiry fit in it on a busy machine.
    let ttl = Duration::from_secs(20);
    let spec = UpstreamSpec::new("docker.io", &upstream.url())
        .with_extra(&format!("negative_ttl = \"{}s\"", ttl.as_secs()));
    let start = |spec: &UpstreamSpec| {
        Stowage::builder()
            .upstream(spec.clone())
            .storage_toml(&storage)
            .start()
    };
    let (a, b) = (start(&spec), start(&spec));
    // Reads of the tag (the push below writes it).
    let asked = || {
        upstream
            .access_log_lines()
            .iter()
            .filter(|l| l.contains("/v2/fleet/late/manifests/v1") && !l.contains("PUT"))
            .count()
    };

    assert_eq!(manifest_status(&a, "fleet/late", "v1"), 404);
    let told = std::time::Instant::now();
    let after_a = asked();
    assert!(after_a >= 1, "node A never asked the upstream");
    let negative = shared.path().join("negative/docker.io/fleet/late/v1");
    assert!(
        wait_until(SHARE_TIMEOUT, || negative.is_file()),
        "node A never shared its negative answer"
    );

    // Node B misses locally, finds A's answer in the store, and does not ask the upstream.
    assert_eq!(manifest_status(&b, "fleet/late", "v1"), 404);
    assert_eq!(asked(), after_a, "node B asked the upstream within the TTL");
    assert_eq!(
        metric(
            &b,
            "stowage_object_store_hits_total",
            &[("kind", "negative")]
        ),
        1.0
    );

    // The tag appears upstream: both nodes keep the answer until it expires...
    let pushed = upstream.push("fleet/late", "v1", Image::build(Format::Docker, &[1024]));
    assert_eq!(manifest_status(&a, "fleet/late", "v1"), 404);
    assert_eq!(manifest_status(&b, "fleet/late", "v1"), 404);
    assert_eq!(asked(), after_a, "a node asked the upstream within the TTL");
    assert!(
        told.elapsed() < ttl,
        "the machine is too slow for this TTL: the checks above may have run after it"
    );

    // ...and after it, ask again and find it.
    std::thread::sleep(ttl.saturating_sub(told.elapsed()));
    assert!(
        wait_until(Duration::from_secs(60), || manifest_status(
            &b,
            "fleet/late",
            "v1"
        ) == 200),
        "node B still answers 404 after the TTL"
    );
    assert!(asked() > after_a, "node B did not ask the upstream again");
    assert!(
        wait_until(Duration::from_secs(60), || manifest_status(
            &a,
            "fleet/late",
            "v1"
        ) == 200),
        "node A still answers 404 after the TTL"
    );
    let out = tempfile::tempdir().expect("tempdir");
    pull(&a, &pushed, out.path());
}
