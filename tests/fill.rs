//! The blob fill engine, end to end through the stowage binary: one upstream transfer
//! per blob however many clients ask, every client streaming as bytes arrive, resumes with
//! `Range` when the upstream breaks, stalls or fails midway, a clean restart when it ignores
//! `Range`, verification before commit, client `Range` requests (also while filling), and what
//! a `kill -9` mid-fill leaves behind.
//!
//! Sequencing never depends on timing: the in-process [`FakeUpstream`] holds a blob's tail back
//! ([`Fault::HoldAt`]) until the test has seen what it wants (followers with bytes, a client gone,
//! a process killed) and then releases it. Waits are bounded by generous timeouts only.

mod support;

use std::time::Duration;

use rand::RngCore;
use support::fake_upstream::{FakeUpstream, Fault, Listener, WrongBytes};
use support::images::{push_blob, Blob, OCI_LAYER};
use support::reader::{assert_whole, client, wait_for_bytes, Reader};
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{error_codes, wait_until};

/// Upper bound for every "eventually" (never a timing assertion): the machine is small and busy.
const EVENTUALLY: Duration = Duration::from_secs(180);
const MIB: usize = 1 << 20;
const REPO: &str = "library/fill";

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// stowage in front of `upstream_url` as `docker.io`, with extra `[[upstreams]]` / `[storage]` TOML.
fn stowage(upstream_url: &str, upstream_toml: &str, storage_toml: &str) -> Stowage {
    Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", upstream_url).with_extra(upstream_toml))
        .storage_toml(storage_toml)
        .start()
}

fn blob_url(stowage: &Stowage, digest: &str) -> String {
    format!("{}/v2/{REPO}/blobs/{digest}", stowage.url())
}

/// Ranges of the upstream `GET`s of `digest`, in order (`None`: a whole-blob request).
fn upstream_ranges(fake: &FakeUpstream, digest: &str) -> Vec<Option<String>> {
    fake.blob_gets(digest)
        .into_iter()
        .map(|r| r.range)
        .collect()
}

fn assert_nothing_committed(stowage: &Stowage, digest: &str) {
    assert!(
        !stowage.blob_path(digest).exists(),
        "{digest} was committed although its fill failed"
    );
    assert!(
        wait_until(EVENTUALLY, || stowage.tmp_files().is_empty()),
        "temp files left behind: {:?}",
        stowage.tmp_files()
    );
}

// ---------------------------------------------------------------------------------------------
// Single flight

#[test]
fn concurrent_cold_gets_share_one_upstream_transfer_and_stream_before_completion() {
    let fake = FakeUpstream::start();
    let blob = random_bytes(64 * MIB);
    let digest = fake.add_blob(REPO, blob.clone());
    // The upstream sends three quarters, then waits for the test: the fill cannot complete
    // before every client has proven it streams.
    fake.push_faults(&digest, [Fault::HoldAt(48 * MIB as u64)]);
    let stowage = stowage(&fake.url(), "", "");
    let url = blob_url(&stowage, &digest);

    let first = Reader::start(&url, &[], false, None);
    wait_for_bytes(&first, 1, "the first client");
    let followers: Vec<Reader> = (0..31)
        .map(|_| Reader::start(&url, &[], false, None))
        .collect();
    for (i, f) in followers.iter().enumerate() {
        wait_for_bytes(f, MIB as u64, &format!("follower {i}"));
    }
    assert!(
        !stowage.blob_path(&digest).exists(),
        "the fill finished while the upstream was still holding its tail back"
    );
    fake.release_holds();

    assert_whole(&first.finish(), &blob, "first client");
    for (i, f) in followers.into_iter().enumerate() {
        assert_whole(&f.finish(), &blob, &format!("follower {i}"));
    }
    assert_eq!(
        upstream_ranges(&fake, &digest),
        vec![None],
        "32 clients must cause exactly one upstream GET"
    );
    stowage.wait_committed(&digest, &blob, EVENTUALLY);
}

#[test]
fn concurrent_cold_gets_reach_a_real_registry_once() {
    let registry = Registry::start();
    let blob = Blob::new(OCI_LAYER, random_bytes(8 * MIB));
    push_blob(&registry.url(), REPO, &blob);
    let before = registry.blob_gets();
    let stowage = stowage(&registry.url(), "", "");
    let url = blob_url(&stowage, &blob.digest);
    let clients: Vec<Reader> = (0..32)
        .map(|_| Reader::start(&url, &[], false, None))
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_whole(&c.finish(), &blob.bytes, &format!("client {i}"));
    }
    assert_eq!(
        registry.blob_gets() - before,
        1,
        "upstream saw: {:?}",
        registry.access_log_lines()
    );
    // Later requests are hits: still one upstream GET.
    let again = Reader::start(&url, &[], false, None).finish();
    assert_whole(&again, &blob.bytes, "a later request");
    assert_eq!(registry.blob_gets() - before, 1);
}

// ---------------------------------------------------------------------------------------------
// Resume

#[test]
fn breaks_stalls_and_5xx_midway_are_resumed_with_range() {
    // Docker Hub's shape: token auth and a CDN redirect, so every resume must re-follow the
    // redirect from the registry (fresh signed URL) with a valid token.
    let fake = FakeUpstream::builder()
        .token_auth()
        .redirect_blobs_to_cdn()
        .start();
    let size = 8 * MIB as u64;
    let blob = random_bytes(size as usize);
    let digest = fake.add_blob(REPO, blob.clone());
    let (p30, p60, p90) = (size * 3 / 10, size * 6 / 10, size * 9 / 10);
    fake.push_faults(
        &digest,
        [
            Fault::CutAt(p30),
            Fault::Status(503),
            Fault::StallAt(p60, Duration::from_secs(600)),
            Fault::CutAt(p90),
        ],
    );
    // A short idle timeout so the stall is noticed quickly; generous enough for a busy machine.
    let stowage = stowage(&fake.url(), "read_timeout = \"5s\"", "");
    let url = blob_url(&stowage, &digest);

    let first = Reader::start(&url, &[], true, None);
    wait_for_bytes(&first, 1, "the first client");
    let second = Reader::start(&url, &[], true, None);
    assert_whole(&first.finish(), &blob, "first client");
    let second = second.finish();
    assert_whole(&second, &blob, "second client");

    let range = |n: u64| Some(format!("bytes={n}-"));
    assert_eq!(
        upstream_ranges(&fake, &digest),
        vec![None, range(p30), range(p30), range(p60), range(p90)],
        "upstream GETs of the blob (at the CDN)"
    );
    // Each attempt went through the registry again (fresh redirect), with a token.
    let blob_path = format!("/v2/{REPO}/blobs/{digest}");
    let authorised = fake
        .requests()
        .into_iter()
        .filter(|r| r.listener == Listener::Registry && r.method == "GET" && r.path == blob_path)
        .filter(|r| r.has_authorization())
        .count();
    assert_eq!(
        authorised, 5,
        "each resume re-follows the registry's redirect"
    );
    stowage.wait_committed(&digest, &blob, EVENTUALLY);
    assert!(stowage.log().contains("fill resumed"));
    // Four breaks, four resumes — and the metric says so.
    let scrape = support::scrape::Scrape::get(&stowage.url());
    assert_eq!(
        scrape.value("stowage_fill_resumes_total", &[]),
        4.0,
        "stowage_fill_resumes_total after four breaks"
    );
}

#[test]
fn upstream_ignoring_range_restarts_without_duplicate_bytes() {
    let fake = FakeUpstream::start();
    let size = 6 * MIB as u64;
    let blob = random_bytes(size as usize);
    let digest = fake.add_blob(REPO, blob.clone());
    fake.push_faults(&digest, [Fault::CutAt(size * 4 / 10), Fault::IgnoreRange]);
    let stowage = stowage(&fake.url(), "", "");
    let url = blob_url(&stowage, &digest);
    let first = Reader::start(&url, &[], true, None);
    wait_for_bytes(&first, 1, "the first client");
    let second = Reader::start(&url, &[], true, None);
    let first = first.finish();
    assert_whole(&first, &blob, "first client");
    assert!(first.body == blob, "first client: bytes differ");
    let second = second.finish();
    assert_whole(&second, &blob, "second client");
    assert!(second.body == blob, "second client: bytes differ");
    assert_eq!(
        upstream_ranges(&fake, &digest),
        vec![None, Some(format!("bytes={}-", size * 4 / 10))]
    );
    stowage.wait_committed(&digest, &blob, EVENTUALLY);
}

#[test]
fn resumes_that_keep_failing_abort_clients_and_commit_nothing() {
    let fake = FakeUpstream::start();
    let size = 2 * MIB as u64;
    let blob = random_bytes(size as usize);
    let digest = fake.add_blob(REPO, blob.clone());
    fake.push_faults(
        &digest,
        [
            Fault::CutAt(size / 2),
            Fault::Status(503),
            Fault::Status(502),
            Fault::Status(500),
        ],
    );
    let stowage = stowage(&fake.url(), "", "fill_retries = 2");
    let url = blob_url(&stowage, &digest);
    let got = Reader::start(&url, &[], false, None).finish();
    assert!(
        got.error.is_some() && got.len < size,
        "the client must see the transfer break, got {} bytes, error {:?}",
        got.len,
        got.error
    );
    let half = Some(format!("bytes={}-", size / 2));
    assert_eq!(
        upstream_ranges(&fake, &digest),
        vec![None, half.clone(), half],
        "two retries after the break, then give up"
    );
    assert_nothing_committed(&stowage, &digest);
    // The remaining fault is used up by the next attempt's first request... which is refused
    // and not retried (nothing arrived yet); the one after that succeeds.
    let refused = Reader::start(&url, &[], false, None).finish();
    assert!(refused.status >= 500, "{refused:?}");
    assert_whole(
        &Reader::start(&url, &[], false, None).finish(),
        &blob,
        "after the upstream recovered",
    );
    stowage.wait_committed(&digest, &blob, EVENTUALLY);
}

#[test]
fn a_chunked_blob_the_budget_refuses_fails_at_once_as_internal_without_retries() {
    // No Content-Length: the fill reserves as bytes arrive (4 MiB steps). The first step fits
    // the 6 MiB budget, the second does not: the fill must give up at once (a full cache is not
    // a broken upstream), not resume against the upstream.
    let fake = FakeUpstream::start();
    let size = 10 * MIB as u64;
    let blob = random_bytes(size as usize);
    let digest = fake.add_blob(REPO, blob.clone());
    fake.serve_chunked(&digest);
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &fake.url()))
        .max_size("6MiB")
        .storage_toml("fill_retries = 5")
        .start();
    let url = blob_url(&stowage, &digest);
    let internal = |n: f64| {
        wait_until(Duration::from_secs(30), || {
            let s = support::scrape::Scrape::get(&stowage.url());
            s.value("stowage_fill_failures_total", &[("reason", "internal")]) == n
                && s.value("stowage_fills_in_flight", &[]) == 0.0
        })
    };
    for attempt in 1..=2 {
        let got = Reader::start(&url, &[], false, None).finish();
        assert!(
            got.status >= 500 || (got.error.is_some() && got.len < size),
            "attempt {attempt}: the client must see the fill fail, got {got:?}"
        );
        assert!(
            internal(attempt as f64),
            "attempt {attempt}: no reason=\"internal\" failure counted:\n{}",
            support::scrape::Scrape::get(&stowage.url()).metric_lines("stowage_fill")
        );
        assert_eq!(
            fake.blob_gets(&digest).len(),
            attempt,
            "attempt {attempt}: a refused fill must not be retried against the upstream"
        );
        assert_nothing_committed(&stowage, &digest);
    }
    let s = support::scrape::Scrape::get(&stowage.url());
    assert_eq!(
        s.value("stowage_fill_failures_total", &[("reason", "upstream")]),
        0.0
    );
    assert_eq!(s.value("stowage_fill_resumes_total", &[]), 0.0);
}

#[test]
fn a_chunked_blob_when_the_budget_cannot_take_a_first_step_is_refused_with_507() {
    let fake = FakeUpstream::start();
    let blob = random_bytes(MIB);
    let digest = fake.add_blob(REPO, blob);
    fake.serve_chunked(&digest);
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &fake.url()))
        .max_size("3MiB")
        .start();
    let got = Reader::start(&blob_url(&stowage, &digest), &[], false, None).finish();
    assert_eq!(got.status, 507, "{got:?}");
    assert_eq!(fake.blob_gets(&digest).len(), 1, "no retries");
    assert_nothing_committed(&stowage, &digest);
    let s = support::scrape::Scrape::get(&stowage.url());
    assert_eq!(
        s.value("stowage_fill_failures_total", &[("reason", "internal")]),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Verification and ownership

#[test]
fn wrong_bytes_abort_every_client_and_commit_nothing() {
    let fake = FakeUpstream::start();
    let size = 4 * MIB as u64;
    let blob = random_bytes(size as usize);
    let digest = fake.add_blob(REPO, blob.clone());
    fake.serve_wrong_bytes(&digest, WrongBytes::FlippedByte);
    fake.push_faults(&digest, [Fault::HoldAt(size * 3 / 4)]);
    let stowage = stowage(&fake.url(), "", "");
    let url = blob_url(&stowage, &digest);
    let clients: Vec<Reader> = (0..4)
        .map(|_| Reader::start(&url, &[], false, None))
        .collect();
    for c in &clients {
        wait_for_bytes(c, 1, "a client of the bad blob");
    }
    fake.release_holds();
    for (i, c) in clients.into_iter().enumerate() {
        let got = c.finish();
        assert!(
            got.error.is_some() && got.len < size,
            "client {i} got a clean body of {} bytes for a blob that failed verification",
            got.len
        );
    }
    assert_nothing_committed(&stowage, &digest);
    assert!(
        stowage.log().contains(&digest) && stowage.log().contains("wrong bytes"),
        "the mismatch should be logged with the digests"
    );
    fake.serve_correct_bytes(&digest);
    assert_whole(
        &Reader::start(&url, &[], false, None).finish(),
        &blob,
        "after upstream fixed the blob",
    );
    stowage.wait_committed(&digest, &blob, EVENTUALLY);
}

/// A blob that fails verification before any of its bytes could be sent (a one-byte blob: its
/// only byte is its last, held back until verified) is an error status with an OCI body, not a
/// connection closed before its status line.
#[test]
fn wrong_bytes_before_the_first_byte_are_an_error_status() {
    let fake = FakeUpstream::start();
    let digest = fake.add_blob(REPO, b"a".to_vec());
    fake.serve_wrong_bytes(&digest, WrongBytes::Replaced(b"b".to_vec()));
    let stowage = stowage(&fake.url(), "", "");
    let r = support::raw_request(
        stowage.port(),
        "GET",
        &format!("/v2/{REPO}/blobs/{digest}"),
        &[],
    );
    assert!(r.status >= 500, "{} {}", r.status, r.body_text());
    assert_eq!(error_codes(&r.body, "bad one-byte blob"), ["UNAVAILABLE"]);
    assert!(r.body_text().contains("hash to"), "{}", r.body_text());
    assert_nothing_committed(&stowage, &digest);
}

#[test]
fn starting_client_hanging_up_does_not_stop_the_fill() {
    let fake = FakeUpstream::start();
    let size = 8 * MIB as u64;
    let blob = random_bytes(size as usize);
    let digest = fake.add_blob(REPO, blob.clone());
    fake.push_faults(&digest, [Fault::HoldAt(size / 2)]);
    let stowage = stowage(&fake.url(), "", "");
    let url = blob_url(&stowage, &digest);
    let quitter = Reader::start(&url, &[], false, Some(MIB as u64)).finish();
    assert!(quitter.len >= MIB as u64 && quitter.len < size);
    // The client is gone and the fill is still waiting for the upstream's tail.
    assert!(!stowage.blob_path(&digest).exists());
    fake.release_holds();
    stowage.wait_committed(&digest, &blob, EVENTUALLY);
    assert_whole(
        &Reader::start(&url, &[], false, None).finish(),
        &blob,
        "after the fill",
    );
    assert_eq!(upstream_ranges(&fake, &digest), vec![None]);
}

#[test]
fn concurrent_fills_are_capped() {
    let fake = FakeUpstream::start();
    let (a, b) = (random_bytes(2 * MIB), random_bytes(2 * MIB));
    let (da, db) = (
        fake.add_blob(REPO, a.clone()),
        fake.add_blob(REPO, b.clone()),
    );
    fake.push_faults(&da, [Fault::HoldAt(MIB as u64)]);
    let stowage = stowage(&fake.url(), "", "max_concurrent_fills = 1");
    let ra = Reader::start(&blob_url(&stowage, &da), &[], false, None);
    wait_for_bytes(&ra, 1, "the first fill");
    let rb = Reader::start(&blob_url(&stowage, &db), &[], false, None);
    // Let the second request reach stowage (its request line is logged only when answered, so
    // poll the upstream instead): while the first fill holds the only slot, B is not fetched.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        fake.blob_gets(&db).is_empty(),
        "a second fill started although max_concurrent_fills = 1"
    );
    fake.release_holds();
    assert_whole(&ra.finish(), &a, "blob a");
    assert_whole(&rb.finish(), &b, "blob b");
}

#[test]
fn kill_during_a_fill_leaves_no_partial_blob() {
    let fake = FakeUpstream::start();
    let size = 4 * MIB as u64;
    let blob = random_bytes(size as usize);
    let digest = fake.add_blob(REPO, blob.clone());
    fake.push_faults(&digest, [Fault::HoldAt(size / 2)]);
    let mut stowage = stowage(&fake.url(), "", "");
    let url = blob_url(&stowage, &digest);
    let reader = Reader::start(&url, &[], false, None);
    wait_for_bytes(&reader, 1, "the client before the kill");
    assert!(
        !stowage.tmp_files().is_empty(),
        "a fill in flight should have a partial file"
    );
    stowage.restart(); // SIGKILL, then start again on the same data dir
    let cut = reader.finish();
    assert!(cut.error.is_some() && cut.len < size, "{cut:?}");
    assert!(
        stowage.tmp_files().is_empty(),
        "partial files survived a restart: {:?}",
        stowage.tmp_files()
    );
    assert!(!stowage.blob_path(&digest).exists());
    fake.release_holds();
    assert_whole(
        &Reader::start(&url, &[], false, None).finish(),
        &blob,
        "after the restart",
    );
    assert_eq!(
        upstream_ranges(&fake, &digest),
        vec![None, None],
        "the new process fetches the blob afresh"
    );
    stowage.wait_committed(&digest, &blob, EVENTUALLY);
}

// ---------------------------------------------------------------------------------------------
// Range from clients

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[test]
fn range_requests_on_cached_blobs() {
    let fake = FakeUpstream::start();
    let blob = random_bytes(100_000);
    let size = blob.len();
    let digest = fake.add_blob(REPO, blob.clone());
    let stowage = stowage(&fake.url(), "", "");
    let url = blob_url(&stowage, &digest);
    let whole = Reader::start(&url, &[], false, None).finish();
    assert_whole(&whole, &blob, "the first GET");
    assert_eq!(header(&whole.headers, "accept-ranges"), Some("bytes"));
    stowage.wait_committed(&digest, &blob, EVENTUALLY);

    let get = |range: &str| Reader::start(&url, &[("Range", range)], true, None).finish();
    for (range, start, end) in [
        ("bytes=0-9", 0, 9),
        ("bytes=99990-", 99_990, size - 1),
        ("bytes=-50", size - 50, size - 1),
        ("bytes=50000-50000", 50_000, 50_000),
        ("bytes=99000-200000", 99_000, size - 1),
    ] {
        let got = get(range);
        assert_eq!(got.status, 206, "{range}");
        assert_eq!(
            header(&got.headers, "content-range"),
            Some(format!("bytes {start}-{end}/{size}").as_str()),
            "{range}"
        );
        assert_eq!(
            header(&got.headers, "content-length"),
            Some((end - start + 1).to_string().as_str())
        );
        assert!(got.body == blob[start..=end], "{range}: wrong bytes");
    }
    for range in [
        format!("bytes={size}-"),
        "bytes=-0".into(),
        "bytes=9-1".into(),
    ] {
        let got = get(&range);
        assert_eq!(got.status, 416, "{range}");
        assert_eq!(
            header(&got.headers, "content-range"),
            Some(format!("bytes */{size}").as_str()),
            "{range}"
        );
        assert_eq!(error_codes(&got.body, &range), vec!["RANGE_INVALID"]);
    }
    // Multi-range: never a single-part 206.
    let multi = get("bytes=0-1,5-6");
    assert_whole(&multi, &blob, "multi-range");
    // Another unit, or an If-Range for another version: the whole blob.
    assert_whole(&get("items=0-1"), &blob, "unknown unit");
    let stale = Reader::start(
        &url,
        &[("Range", "bytes=0-9"), ("If-Range", "\"sha256:other\"")],
        false,
        None,
    )
    .finish();
    assert_whole(&stale, &blob, "If-Range mismatch");
    let fresh = Reader::start(
        &url,
        &[
            ("Range", "bytes=0-9"),
            ("If-Range", &format!("\"{digest}\"")),
        ],
        true,
        None,
    )
    .finish();
    assert_eq!((fresh.status, fresh.body.as_slice()), (206, &blob[..10]));
    // HEAD ignores Range.
    let head = client()
        .head(&url)
        .header("Range", "bytes=0-9")
        .send()
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(head.headers(), "content-length"), Some("100000"));
    assert_eq!(upstream_ranges(&fake, &digest), vec![None], "all hits");
}

#[test]
fn range_requests_during_a_fill_stream_as_bytes_arrive() {
    let fake = FakeUpstream::start();
    let size = 4 * MIB as u64;
    let blob = random_bytes(size as usize);
    let digest = fake.add_blob(REPO, blob.clone());
    let held = size * 6 / 10;
    fake.push_faults(&digest, [Fault::HoldAt(held)]);
    let stowage = stowage(&fake.url(), "", "");
    let url = blob_url(&stowage, &digest);
    let starter = Reader::start(&url, &[], false, None);
    wait_for_bytes(&starter, 1, "the client that started the fill");

    // A range inside what has arrived: all but its last byte arrive before the fill completes.
    let early = Reader::start(&url, &[("Range", "bytes=1000-200999")], true, None);
    let (status, headers) = early.head();
    assert_eq!(status, 206);
    assert_eq!(
        header(&headers, "content-range"),
        Some(format!("bytes 1000-200999/{size}").as_str())
    );
    wait_for_bytes(&early, 199_999, "a range of bytes already filled");
    // A range beyond the held point: headers (after the answer's short wait for a first byte),
    // bytes once they arrive.
    let late_start = size * 8 / 10;
    let late = Reader::start(
        &url,
        &[("Range", &format!("bytes={late_start}-"))],
        true,
        None,
    );
    let (status, headers) = late.head();
    assert_eq!(status, 206);
    assert_eq!(
        header(&headers, "content-range"),
        Some(format!("bytes {late_start}-{}/{size}", size - 1).as_str())
    );
    // Past the end: 416 even before the size is confirmed by a commit.
    let past = Reader::start(&url, &[("Range", &format!("bytes={size}-"))], true, None).finish();
    assert_eq!(past.status, 416);
    assert_eq!(
        header(&past.headers, "content-range"),
        Some(format!("bytes */{size}").as_str())
    );
    // Multi-range while filling: the whole blob.
    let multi = Reader::start(&url, &[("Range", "bytes=0-1,5-6")], false, None);
    assert!(!stowage.blob_path(&digest).exists());
    fake.release_holds();

    let early = early.finish();
    assert!(early.error.is_none(), "{:?}", early.error);
    assert!(
        early.body == blob[1000..201_000],
        "early range: wrong bytes"
    );
    let late = late.finish();
    assert!(late.error.is_none(), "{:?}", late.error);
    assert!(
        late.body == blob[late_start as usize..],
        "late range: wrong bytes"
    );
    assert_whole(&multi.finish(), &blob, "multi-range while filling");
    assert_whole(&starter.finish(), &blob, "the starting client");
    assert_eq!(
        upstream_ranges(&fake, &digest),
        vec![None],
        "ranges are served from the one fill"
    );
}

/// A `HEAD` for a blob being filled is answered from the fill (its size is known once the
/// upstream answered): no extra upstream request.
#[test]
fn head_during_a_fill_is_answered_without_the_upstream() {
    let fake = FakeUpstream::start();
    let blob = random_bytes(4 * MIB);
    let digest = fake.add_blob(REPO, blob.clone());
    fake.push_faults(&digest, [Fault::HoldAt(MIB as u64)]);
    let stowage = stowage(&fake.url(), "", "");
    let url = blob_url(&stowage, &digest);
    let reader = Reader::start(&url, &[], false, None);
    wait_for_bytes(&reader, 1, "the filling client");

    let head = client().head(&url).send().expect("HEAD");
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(
        head.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(blob.len().to_string().as_str())
    );
    assert_eq!(
        fake.count("HEAD", &digest),
        0,
        "the HEAD went upstream: {:#?}",
        fake.requests()
    );
    fake.release_holds();
    assert_whole(&reader.finish(), &blob, "the filling client");
}
