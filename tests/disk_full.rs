//! A disk that really fills up in the middle of a blob fill (`ENOSPC` from a write, after the
//! free-space pre-check passed), on a small tmpfs used as `storage.path`.
//!
//! Sequencing never depends on timing: the in-process [`FakeUpstream`] holds the blob's tail
//! back ([`Fault::HoldAt`]) while the test fills the disk with a ballast file, then releases it.
//! The byte budget is far larger than the tmpfs, so only the real disk limits. Waits are bounded
//! by generous timeouts only. Needs root (tmpfs mounts), as on the test VMs and CI.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use rand::RngCore;
use support::fake_upstream::{FakeUpstream, Fault};
use support::reader::{assert_whole, client, Got, Reader};
use support::scrape::Scrape;
use support::stowage::{Stowage, UpstreamSpec};
use support::tmpfs::Tmpfs;
use support::wait_until;

/// Upper bound for every "eventually" (never a timing assertion): the machine is small and busy.
const EVENTUALLY: Duration = Duration::from_secs(180);
const MIB: usize = 1 << 20;
const REPO: &str = "library/diskfull";
/// The blob whose fill runs out of disk, and where the upstream pauses in it.
const BIG: usize = 8 * MIB;
const HOLD_AT: u64 = MIB as u64;

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// stowage in front of `fake`, its cache on `disk`, with a budget far larger than the disk.
fn stowage_on(disk: &Tmpfs, fake: &FakeUpstream) -> Stowage {
    Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &fake.url()))
        .storage_path(disk.path())
        .max_size("20GiB")
        .start()
}

fn blob_url(stowage: &Stowage, digest: &str) -> String {
    format!("{}/v2/{REPO}/blobs/{digest}", stowage.url())
}

/// Asserts a transfer that visibly failed: never a complete-looking body.
fn assert_failed_transfer(got: &Got, blob: &[u8], what: &str) {
    assert!(
        got.error.is_some(),
        "{what}: got a clean body of {} bytes (status {}) from a fill that ran out of disk",
        got.len,
        got.status
    );
    assert!(
        got.len < blob.len() as u64,
        "{what}: received all {} bytes although the fill failed",
        got.len
    );
}

/// Fetches a small blob whole and waits for its commit (it is then a plain cached blob).
fn cache_blob(stowage: &Stowage, digest: &str, blob: &[u8]) {
    assert_whole(
        &Reader::get(&blob_url(stowage, digest)).finish(),
        blob,
        "warming the cache",
    );
    stowage.wait_committed(digest, blob, EVENTUALLY);
    stowage.wait_commits();
}

/// The size of the fill's partial file(s) under `tmp/`.
fn partial_bytes(stowage: &Stowage) -> u64 {
    stowage
        .tmp_files()
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Writes a file of zeros into `disk` (outside the cache's directories) so that `leave` bytes
/// stay free. Returns its path.
fn write_ballast(disk: &Tmpfs, leave: u64) -> PathBuf {
    let path = disk.path().join("ballast");
    let avail = disk.available();
    assert!(
        avail > leave + MIB as u64,
        "the tmpfs has only {avail} bytes free; cannot leave {leave}"
    );
    let mut left = avail - leave;
    let mut f = std::fs::File::create(&path).expect("create the ballast file");
    let zeros = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n]).expect("write the ballast file");
        left -= n as u64;
    }
    f.sync_all().expect("sync the ballast file");
    path
}

fn metric(stowage: &Stowage, name: &str, labels: &[(&str, &str)]) -> f64 {
    Scrape::get(&stowage.url()).value(name, labels)
}

/// Starts the fill of `digest` with two clients (the second joins the first's fill), and waits
/// until the upstream has paused at [`HOLD_AT`] with those bytes in the partial file and both
/// clients streaming.
fn start_paused_fill(stowage: &Stowage, fake: &FakeUpstream, digest: &str) -> (Reader, Reader) {
    fake.push_faults(digest, [Fault::HoldAt(HOLD_AT)]);
    let url = blob_url(stowage, digest);
    let first = Reader::get(&url);
    assert!(
        wait_until(EVENTUALLY, || first.bytes() > 0),
        "the first client got no bytes of the fill"
    );
    let second = Reader::get(&url);
    assert!(
        wait_until(EVENTUALLY, || second.bytes() > 0
            && partial_bytes(stowage) >= HOLD_AT),
        "the joining client got no bytes, or the partial file never reached {HOLD_AT} bytes \
         (has {})",
        partial_bytes(stowage)
    );
    assert_eq!(
        fake.blob_gets(digest).len(),
        1,
        "the second client must join the fill, not start another"
    );
    (first, second)
}

/// `stowage_fill_failures_total{reason="internal"}`: fills that failed for local trouble.
fn internal_failures(stowage: &Stowage) -> f64 {
    metric(
        stowage,
        "stowage_fill_failures_total",
        &[("reason", "internal")],
    )
}

#[test]
fn enospc_mid_fill_aborts_readers_commits_nothing_and_the_cache_recovers() {
    // Declared before stowage: stowage stops first, then the tmpfs is unmounted.
    let disk = Tmpfs::mount(24 * MIB as u64);
    let fake = FakeUpstream::start();
    let small = random_bytes(256 * 1024);
    let small_digest = fake.add_blob(REPO, small.clone());
    let big = random_bytes(BIG);
    let big_digest = fake.add_blob(REPO, big.clone());
    let stowage = stowage_on(&disk, &fake);
    assert_eq!(stowage.data_dir(), disk.path());

    cache_blob(&stowage, &small_digest, &small);
    let failures_before = internal_failures(&stowage);

    let (first, second) = start_paused_fill(&stowage, &fake, &big_digest);
    // The pre-check has passed; now the disk fills up behind the fill's back: less room than
    // the rest of the blob, but enough for the index and a little slack.
    let free = 2 * MIB as u64;
    assert!(free < (BIG as u64 - HOLD_AT));
    let ballast = write_ballast(&disk, free);
    fake.release_holds();

    // Both clients see a broken transfer, never a complete-looking body.
    assert_failed_transfer(&first.finish(), &big, "the client that started the fill");
    assert_failed_transfer(&second.finish(), &big, "the client that joined the fill");

    // Nothing partial is committed or left behind.
    assert!(
        wait_until(EVENTUALLY, || stowage.tmp_files().is_empty()),
        "partial files left in tmp/: {:?}",
        stowage.tmp_files()
    );
    assert!(
        !stowage.blob_path(&big_digest).exists(),
        "a blob was committed from a fill that ran out of disk"
    );
    // The failure is counted as local trouble (the disk), and logged with its cause.
    assert!(
        wait_until(EVENTUALLY, || internal_failures(&stowage)
            == failures_before + 1.0),
        "stowage_fill_failures_total{{reason=\"internal\"}} did not count the fill:\n{}",
        Scrape::get(&stowage.url()).metric_lines("stowage_fill_failures_total")
    );
    let upstream_failures = Scrape::get(&stowage.url());
    for reason in ["upstream", "size_mismatch", "digest_mismatch"] {
        assert_eq!(
            upstream_failures.value("stowage_fill_failures_total", &[("reason", reason)]),
            0.0,
            "a full disk was blamed on the upstream ({reason})"
        );
    }
    let log = stowage.log();
    assert!(
        log.lines().any(|l| l.contains("blob fill failed")
            && l.contains(&big_digest)
            && (l.contains("No space left on device") || l.contains("os error 28"))),
        "the failed fill should be logged with its digest and the ENOSPC cause"
    );

    // The index has no entry: a HEAD is answered by asking the upstream, not from the cache.
    let heads = fake.count("HEAD", &format!("/blobs/{big_digest}"));
    let r = client()
        .head(blob_url(&stowage, &big_digest))
        .send()
        .expect("HEAD big blob");
    assert_eq!(r.status().as_u16(), 200, "HEAD after the failed fill");
    assert_eq!(
        fake.count("HEAD", &format!("/blobs/{big_digest}")),
        heads + 1,
        "HEAD of a blob whose fill failed was answered from the cache"
    );

    // stowage keeps serving: the cached blob is still a hit, with the disk still full.
    let hits = metric(&stowage, "stowage_cache_hits_total", &[("kind", "blob")]);
    let small_gets = fake.blob_gets(&small_digest).len();
    assert_whole(
        &Reader::get(&blob_url(&stowage, &small_digest)).finish(),
        &small,
        "a cached blob while the disk is full",
    );
    assert_eq!(fake.blob_gets(&small_digest).len(), small_gets);
    assert_eq!(
        metric(&stowage, "stowage_cache_hits_total", &[("kind", "blob")]),
        hits + 1.0
    );

    // While the disk is still full, and nothing unused can be evicted to make room, the next
    // attempt is refused up front (507) rather than started into a certain ENOSPC.
    let r = client()
        .get(blob_url(&stowage, &big_digest))
        .send()
        .expect("GET big blob with the disk still full");
    assert_eq!(r.status().as_u16(), 507, "a blob that cannot fit on disk");
    let body = r.text().unwrap_or_default();
    assert!(body.contains("cache is full"), "error body: {body}");
    // The refusal is local trouble too, not the upstream's.
    assert!(
        wait_until(EVENTUALLY, || internal_failures(&stowage)
            == failures_before + 2.0),
        "the refused fill is counted as internal:\n{}",
        Scrape::get(&stowage.url()).metric_lines("stowage_fill_failures_total")
    );
    assert_eq!(
        metric(
            &stowage,
            "stowage_fill_failures_total",
            &[("reason", "upstream")]
        ),
        0.0,
        "a full cache was blamed on the upstream"
    );
    assert!(
        wait_until(EVENTUALLY, || stowage.tmp_files().is_empty()),
        "partial files left in tmp/: {:?}",
        stowage.tmp_files()
    );
    assert!(!stowage.blob_path(&big_digest).exists());
    assert!(stowage.blob_path(&small_digest).exists());

    // Room again: the same blob is fetched again, verified, committed and served whole.
    std::fs::remove_file(&ballast).expect("remove the ballast");
    assert_whole(
        &Reader::get(&blob_url(&stowage, &big_digest)).finish(),
        &big,
        "the blob once the disk has room",
    );
    stowage.wait_committed(&big_digest, &big, EVENTUALLY);
    // The failed fill, the refused attempt, and this one.
    assert_eq!(fake.blob_gets(&big_digest).len(), 3);
    let gets = fake.blob_gets(&big_digest).len();
    assert_whole(
        &Reader::get(&blob_url(&stowage, &big_digest)).finish(),
        &big,
        "the committed blob",
    );
    assert_eq!(
        fake.blob_gets(&big_digest).len(),
        gets,
        "not served from cache"
    );
    assert!(stowage.tmp_files().is_empty());
}

#[test]
fn a_fill_failing_for_lack_of_disk_evicts_unused_blobs_for_the_next_try() {
    let disk = Tmpfs::mount(24 * MIB as u64);
    let fake = FakeUpstream::start();
    let old = random_bytes(6 * MIB);
    let old_digest = fake.add_blob(REPO, old.clone());
    let big = random_bytes(BIG);
    let big_digest = fake.add_blob(REPO, big.clone());
    let stowage = stowage_on(&disk, &fake);

    // An unused, unpinned cached blob: the only thing that can make room on this disk.
    cache_blob(&stowage, &old_digest, &old);
    let evictions = metric(&stowage, "stowage_evictions_total", &[]);

    let (first, second) = start_paused_fill(&stowage, &fake, &big_digest);
    // Less room than the rest of the blob; once the partial file is gone, the free space plus
    // the old blob is enough for the whole blob and the pre-check's slack.
    let ballast = write_ballast(&disk, 3 * MIB as u64);
    fake.release_holds();
    assert_failed_transfer(&first.finish(), &big, "the client that started the fill");
    assert_failed_transfer(&second.finish(), &big, "the client that joined the fill");
    assert!(
        wait_until(EVENTUALLY, || stowage.tmp_files().is_empty()
            && !stowage.blob_path(&old_digest).exists()),
        "the failed fill did not make room: partials {:?}, old blob present: {}",
        stowage.tmp_files(),
        stowage.blob_path(&old_digest).exists()
    );
    assert!(!stowage.blob_path(&big_digest).exists());
    // Once the aborted readers have let go of the unlinked partial, the disk has room for the
    // whole blob and the pre-check's slack.
    let room = (BIG + MIB) as u64;
    assert!(
        wait_until(EVENTUALLY, || disk.available() >= room),
        "only {} bytes free after the eviction; the blob needs {room}",
        disk.available()
    );
    assert_eq!(
        metric(&stowage, "stowage_evictions_total", &[]),
        evictions + 1.0
    );

    // The next try fits, with the ballast still there.
    assert!(ballast.exists());
    assert_whole(
        &Reader::get(&blob_url(&stowage, &big_digest)).finish(),
        &big,
        "the next try after eviction",
    );
    stowage.wait_committed(&big_digest, &big, EVENTUALLY);
    // The evicted blob is fetched again (the index forgot it too).
    let gets = fake.blob_gets(&old_digest).len();
    let _ = std::fs::remove_file(&ballast);
    assert_whole(
        &Reader::get(&blob_url(&stowage, &old_digest)).finish(),
        &old,
        "the evicted blob",
    );
    assert_eq!(fake.blob_gets(&old_digest).len(), gets + 1);
}
