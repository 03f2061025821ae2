//! Storage lifecycle: the byte budget with least-recently-used eviction, pins, leases
//! for blobs being streamed, recency across restarts, crash safety, `verify` and `gc`.
//!
//! Images are synthetic (random, incompressible layers) on a real upstream registry; pulls go
//! through stowage with plain HTTP (manifest by tag, then every blob), and the upstream's access
//! log proves what was (not) fetched again. No timing assertions: everything waits on state.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::images::push_test;
use support::images::{self, Pushed};
use support::registry::Registry;
use support::stowage::{command, command_ok, pull_image, text, Stowage, UpstreamSpec};
use support::{files_under, http, sha256_digest, wait_until};

const MIB: usize = 1 << 20;

fn stowage_with(upstream: &Registry, max_size: &str, storage_toml: &str) -> Stowage {
    Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .max_size(max_size)
        .storage_toml(storage_toml)
        .start()
}

fn get_blob(stowage: &Stowage, name: &str, digest: &str) -> Vec<u8> {
    let url = format!("{}/v2/{name}/blobs/{digest}", stowage.url());
    let r = http().get(&url).send().expect("GET blob");
    assert_eq!(r.status().as_u16(), 200, "GET {url}");
    r.bytes().expect("blob body").to_vec()
}

/// How many blob GETs for this image's blobs reached the upstream.
fn upstream_blob_gets(upstream: &Registry, p: &Pushed) -> usize {
    p.blobs()
        .iter()
        .map(|b| upstream.count_requests("GET", &format!("/blobs/{}", b.digest)))
        .sum()
}

fn has_all_blobs(stowage: &Stowage, p: &Pushed) -> bool {
    p.blobs()
        .iter()
        .all(|b| stowage.blob_path(&b.digest).exists())
}

fn has_no_layers(stowage: &Stowage, p: &Pushed) -> bool {
    p.blobs()
        .iter()
        .filter(|b| b.size() > MIB)
        .all(|b| !stowage.blob_path(&b.digest).exists())
}

/// Bytes of blob files plus temp files (blobs listed first: a rename from tmp/ between the
/// two listings is then missed rather than counted twice).
fn on_disk(data: &Path) -> u64 {
    let size = |files: Vec<PathBuf>| -> u64 {
        files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    };
    size(files_under(&data.join("blobs"))) + size(files_under(&data.join("tmp")))
}

fn stop_cleanly(stowage: &mut Stowage) {
    let status = stowage.terminate(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "stowage did not stop cleanly: {status:?}"
    );
}

#[test]
fn budget_evicts_least_recently_used_and_is_never_exceeded() {
    let upstream = Registry::start();
    let stowage = stowage_with(&upstream, "40MiB", "");
    // Ten images of ~10 MiB (two ~5 MiB layers): ~100 MiB through a 40 MiB budget.
    let imgs: Vec<Pushed> = (0..10)
        .map(|i| push_test(&upstream, &format!("img{i}"), &[5 * MIB, 5 * MIB]))
        .collect();

    // Sample the on-disk size throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, data) = (stop.clone(), peak.clone(), stowage.data_dir());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(on_disk(&data), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Pull each image, and after each pull hit the previous one again.
    for i in 0..imgs.len() {
        pull_image(&stowage, &imgs[i]);
        peak.fetch_max(on_disk(&stowage.data_dir()), Ordering::SeqCst);
        if i > 0 {
            pull_image(&stowage, &imgs[i - 1]);
        }
    }
    stop.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler thread");
    let budget = 40 * MIB as u64;
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= budget,
        "on-disk size reached {peak} bytes, over the {budget}-byte budget"
    );
    assert!(
        peak > budget / 2,
        "the sampler saw at most {peak} bytes: it did not observe the cache filling up"
    );

    // The most recently used image (img8, hit last) is a full hit: no upstream blob GET.
    let before = upstream_blob_gets(&upstream, &imgs[8]);
    assert_eq!(before, imgs[8].blobs().len(), "img8 was fetched once");
    assert!(has_all_blobs(&stowage, &imgs[8]));
    pull_image(&stowage, &imgs[8]);
    assert_eq!(
        upstream_blob_gets(&upstream, &imgs[8]),
        before,
        "a hit on the most recently used image went upstream"
    );
    assert!(
        has_all_blobs(&stowage, &imgs[9]),
        "the newest image was evicted"
    );
    // The least recently used ones were evicted.
    for old in &imgs[..5] {
        assert!(
            has_no_layers(&stowage, old),
            "{} should have been evicted (least recently used)",
            old.name
        );
    }
    assert!(on_disk(&stowage.data_dir()) <= budget);
}

#[test]
fn a_fill_that_cannot_fit_fails_cleanly_and_hits_keep_working() {
    let upstream = Registry::start();
    let stowage = stowage_with(&upstream, "8MiB", "");
    let small = push_test(&upstream, "small", &[MIB]);
    let big = push_test(&upstream, "big", &[10 * MIB]);
    pull_image(&stowage, &small);
    let layer = &big.image_layers()[0];
    let url = format!("{}/v2/{}/blobs/{}", stowage.url(), big.name, layer);
    let r = http().get(&url).send().expect("GET big blob");
    assert_eq!(r.status().as_u16(), 507, "a blob over the budget");
    let body = r.text().unwrap_or_default();
    assert!(body.contains("cache is full"), "error body: {body}");
    assert!(
        wait_until(Duration::from_secs(30), || stowage.tmp_files().is_empty()),
        "temp files left: {:?}",
        stowage.tmp_files()
    );
    assert!(!stowage.blob_path(layer).exists());
    // The cache is consistent: the small image is still a hit.
    let before = upstream.blob_gets();
    pull_image(&stowage, &small);
    assert_eq!(upstream.blob_gets(), before, "hits went upstream");
}

/// Digests of an image's layers (helper on `Pushed`).
trait Layers {
    fn image_layers(&self) -> Vec<String>;
}

impl Layers for Pushed {
    fn image_layers(&self) -> Vec<String> {
        self.blobs()
            .iter()
            .filter(|b| b.size() > MIB / 2)
            .map(|b| b.digest.clone())
            .collect()
    }
}

#[test]
fn a_blob_streamed_to_a_slow_client_is_not_deleted_mid_stream() {
    let upstream = Registry::start();
    let stowage = stowage_with(&upstream, "40MiB", "");
    // Bigger than what loopback socket buffers hold, so the server is still streaming.
    let slow = push_test(&upstream, "slow", &[20 * MIB]);
    pull_image(&stowage, &slow);
    let layer = slow.image_layers()[0].clone();
    let path = stowage.blob_path(&layer);
    assert!(path.exists());

    // A client reads the first 64 KiB of the cached layer, then stalls.
    let url = format!("{}/v2/{}/blobs/{}", stowage.url(), slow.name, layer);
    let mut resp = http().get(&url).send().expect("GET slow blob");
    assert_eq!(resp.status().as_u16(), 200);
    let mut received = vec![0u8; 64 * 1024];
    resp.read_exact(&mut received).expect("first 64 KiB");

    // Pressure that would evict the slow image first (it is the least recently used).
    let others: Vec<Pushed> = (0..4)
        .map(|i| push_test(&upstream, &format!("other{i}"), &[5 * MIB, 5 * MIB]))
        .collect();
    for o in &others {
        pull_image(&stowage, o);
        assert!(path.exists(), "blob deleted while a client was reading it");
    }
    assert!(
        has_no_layers(&stowage, &others[0]),
        "pressure did not evict anything: the test proves nothing"
    );
    // The client finishes and gets every byte right.
    resp.read_to_end(&mut received).expect("rest of the blob");
    assert_eq!(sha256_digest(&received), layer);
    drop(resp);
    // Once the client is gone, the blob can go at the next pressure (the server drops the
    // response body just after the last byte, so allow a few rounds).
    for i in 0..3 {
        if !path.exists() {
            break;
        }
        let more = push_test(&upstream, &format!("more{i}"), &[5 * MIB, 5 * MIB]);
        pull_image(&stowage, &more);
    }
    assert!(
        !path.exists(),
        "the least recently used blob was kept after its reader left"
    );
}

#[test]
fn a_pinned_image_survives_pressure_and_commands_run_while_serving() {
    let upstream = Registry::start();
    let mut stowage = stowage_with(&upstream, "40MiB", "");
    let pinned = push_test(&upstream, "pinned", &[5 * MIB, 5 * MIB]);
    pull_image(&stowage, &pinned);

    // While serving, operator commands run inside the server, through its admin socket.
    let out = command_ok(&stowage, &["pin", "test/pinned:1"]);
    assert!(out.contains("pinned docker.io/test/pinned:1"), "{out}");

    stop_cleanly(&mut stowage);
    let out = command_ok(&stowage, &["pin", "docker.io/test/pinned:1"]);
    assert!(out.contains("pinned docker.io/test/pinned:1"), "{out}");
    let ls = command_ok(&stowage, &["ls"]);
    let line = ls
        .lines()
        .find(|l| l.contains("docker.io/test/pinned:1"))
        .unwrap_or_else(|| panic!("ls does not list the image:\n{ls}"));
    assert!(
        line.trim_end().ends_with("yes"),
        "not shown as pinned: {line}"
    );
    stowage.restart();

    let before = upstream_blob_gets(&upstream, &pinned);
    let others: Vec<Pushed> = (0..6)
        .map(|i| push_test(&upstream, &format!("other{i}"), &[5 * MIB, 5 * MIB]))
        .collect();
    for o in &others {
        pull_image(&stowage, o);
        assert!(has_all_blobs(&stowage, &pinned), "pinned blob evicted");
    }
    assert!(
        has_no_layers(&stowage, &others[0]),
        "pressure did not evict anything: the test proves nothing"
    );
    pull_image(&stowage, &pinned);
    assert_eq!(upstream_blob_gets(&upstream, &pinned), before);

    // Unpinned, it becomes evictable again.
    stop_cleanly(&mut stowage);
    command_ok(&stowage, &["unpin", "test/pinned:1"]);
    stowage.restart();
    for o in &others[..4] {
        pull_image(&stowage, o);
    }
    assert!(
        has_no_layers(&stowage, &pinned),
        "unpinned image was never evicted"
    );
}

/// The `ls` line of `image` (`docker.io/test/a:1`), or a panic with the whole listing.
fn ls_line(ls: &str, image: &str) -> String {
    ls.lines()
        .find(|l| l.split_whitespace().next() == Some(image))
        .unwrap_or_else(|| panic!("ls does not list {image}:\n{ls}"))
        .to_owned()
}

#[test]
fn unpin_follows_the_pinned_reference_after_its_tag_moved() {
    let upstream = Registry::start();
    let stowage = Stowage::builder()
        .upstream(
            UpstreamSpec::new("docker.io", &upstream.url()).with_extra("manifest_ttl = \"0s\""),
        )
        .max_size("1GiB")
        .start();
    // test/a:1 and test/a:latest on one digest, both pinned (inside the running serve).
    let old = push_test(&upstream, "a", &[MIB]);
    let old_latest = upstream.push("test/a", "latest", old.image.clone());
    pull_image(&stowage, &old);
    pull_image(&stowage, &old_latest);
    command_ok(&stowage, &["pin", "test/a:1", "test/a:latest"]);

    // Unpinning one reference leaves the other's pin of the same digest.
    let out = command_ok(&stowage, &["unpin", "test/a:latest"]);
    assert!(out.contains("unpinned docker.io/test/a:latest"), "{out}");
    let ls = command_ok(&stowage, &["ls"]);
    assert!(
        ls_line(&ls, "docker.io/test/a:latest")
            .trim_end()
            .ends_with("yes"),
        "test/a:1's pin went with test/a:latest's:\n{ls}"
    );
    let out = command_ok(&stowage, &["unpin", "test/a:latest"]);
    assert!(
        out.contains("was not pinned; its digest")
            && out.contains("is pinned as docker.io/test/a:1 "),
        "{out}"
    );

    // Both tags move upstream; the mirror revalidates them (manifest_ttl = 0).
    let new = upstream.push(
        "test/a",
        "1",
        images::Image::build(images::Format::Oci, &[MIB]),
    );
    let new_latest = upstream.push("test/a", "latest", new.image.clone());
    pull_image(&stowage, &new);
    pull_image(&stowage, &new_latest);
    let ls = command_ok(&stowage, &["ls"]);
    assert!(
        ls_line(&ls, "docker.io/test/a:1")
            .trim_end()
            .ends_with("no"),
        "the moved tag is not pinned:\n{ls}"
    );
    // The old digest is still pinned, by test/a:1, and ls shows it.
    assert!(ls.contains("pinned, not tagged"), "{ls}");
    let line = ls
        .lines()
        .find(|l| l.contains(old.digest()))
        .unwrap_or_else(|| panic!("ls does not show the pinned old digest:\n{ls}"));
    assert!(line.starts_with("docker.io/test/a:1 "), "{line}");

    // `unpin test/a:1` releases the digest test/a:1 pinned, though the tag points elsewhere now.
    let out = command_ok(&stowage, &["unpin", "test/a:1"]);
    assert!(
        out.contains(&format!("unpinned docker.io/test/a:1 ({})", old.digest())),
        "{out}"
    );
    let ls = command_ok(&stowage, &["ls"]);
    assert!(!ls.contains("pinned, not tagged"), "{ls}");
    assert!(ls.contains(", 0 B pinned)"), "the budget still pins:\n{ls}");
}

#[test]
fn pins_written_before_a_failing_reference_apply_inside_serve() {
    let upstream = Registry::start();
    let stowage = stowage_with(&upstream, "40MiB", "");
    let good = push_test(&upstream, "good", &[5 * MIB, 5 * MIB]);
    pull_image(&stowage, &good);

    // `pin good missing`: good is pinned, missing fails the command.
    let o = command(&stowage, &["pin", "test/good:1", "test/missing:1"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("pinned docker.io/test/good:1"),
        "{}",
        text(&o)
    );
    let others: Vec<Pushed> = (0..6)
        .map(|i| push_test(&upstream, &format!("other{i}"), &[5 * MIB, 5 * MIB]))
        .collect();
    for o in &others {
        pull_image(&stowage, o);
        assert!(has_all_blobs(&stowage, &good), "pinned blob evicted");
    }
    assert!(
        has_no_layers(&stowage, &others[0]),
        "pressure did not evict anything: the test proves nothing"
    );

    // The mirror image: `unpin good unknown-host/x` unpins good, then fails.
    let o = command(&stowage, &["unpin", "test/good:1", "quay.io/x/y:1"]);
    assert!(!o.status.success(), "{}", text(&o));
    for o in &others[..4] {
        pull_image(&stowage, o);
    }
    assert!(
        has_no_layers(&stowage, &good),
        "the unpinned image is still pinned in the running budget"
    );
}

/// Pulls an image by manifest digest (no tag involved), then its blobs.
fn pull_by_digest(stowage: &Stowage, p: &Pushed) {
    let url = format!("{}/v2/{}/manifests/{}", stowage.url(), p.name, p.digest());
    let r = http()
        .get(&url)
        .header("accept", support::manifest_accept())
        .send()
        .expect("GET manifest");
    assert_eq!(r.status().as_u16(), 200, "GET {url}");
    for b in p.blobs() {
        assert_eq!(get_blob(stowage, &p.name, &b.digest).len(), b.size());
    }
    stowage.wait_commits();
}

#[test]
fn gc_inside_serve_counts_recency_still_in_memory() {
    let upstream = Registry::start();
    // Recency stays in memory (no batch flush during the test); gc's age threshold is short
    // enough to find an old image unused, long enough for a fresh one to be recent.
    let stowage = stowage_with(
        &upstream,
        "1GiB",
        "gc_max_age = \"5s\"\naccess_flush_interval = \"1h\"",
    );
    let old = push_test(&upstream, "old", &[MIB]);
    let fresh = push_test(&upstream, "fresh", &[MIB]);
    pull_by_digest(&stowage, &old);
    std::thread::sleep(Duration::from_secs(7));
    pull_by_digest(&stowage, &fresh);
    let out = command_ok(&stowage, &["gc"]);
    assert!(
        out.contains(&format!("removed manifest {}", old.digest())),
        "the old image should go: {out}"
    );
    assert!(
        !out.contains(&format!("removed manifest {}", fresh.digest())),
        "the image just pulled was removed: {out}"
    );
    assert!(has_all_blobs(&stowage, &fresh), "{out}");
    for b in old.blobs() {
        assert!(!stowage.blob_path(&b.digest).exists(), "{} kept", b.digest);
    }
    // Still a hit.
    let gets = upstream.count_requests("GET", &format!("/manifests/{}", fresh.digest()));
    pull_by_digest(&stowage, &fresh);
    assert_eq!(
        upstream.count_requests("GET", &format!("/manifests/{}", fresh.digest())),
        gets
    );
}

#[test]
fn restart_preserves_the_cache_and_the_recency_order() {
    let upstream = Registry::start();
    // Recency is only written at shutdown here, so the clean stop must flush it.
    let mut stowage = stowage_with(&upstream, "40MiB", "access_flush_interval = \"1h\"");
    let a = push_test(&upstream, "a", &[5 * MIB, 5 * MIB]);
    let b = push_test(&upstream, "b", &[5 * MIB, 5 * MIB]);
    let c = push_test(&upstream, "c", &[5 * MIB, 5 * MIB]);
    pull_image(&stowage, &a);
    pull_image(&stowage, &b);
    pull_image(&stowage, &c);
    pull_image(&stowage, &a); // order of last use: b, c, a
    stop_cleanly(&mut stowage);
    stowage.restart();

    // A hit after restart needs no upstream.
    let gets = upstream.blob_gets();
    pull_image(&stowage, &c);
    pull_image(&stowage, &a); // order: b, c, a
    assert_eq!(
        upstream.blob_gets(),
        gets,
        "a hit after restart went upstream"
    );

    // Pressure evicts b (least recently used before the restart) and keeps c and a.
    let d = push_test(&upstream, "d", &[5 * MIB, 5 * MIB]);
    pull_image(&stowage, &d);
    assert!(has_no_layers(&stowage, &b), "b should be evicted first");
    assert!(has_all_blobs(&stowage, &c) && has_all_blobs(&stowage, &a));
}

#[test]
fn recency_survives_kill_9_after_a_batch_flush() {
    let upstream = Registry::start();
    let mut stowage = stowage_with(&upstream, "40MiB", "access_flush_interval = \"200ms\"");
    let a = push_test(&upstream, "a", &[5 * MIB, 5 * MIB]);
    let b = push_test(&upstream, "b", &[5 * MIB, 5 * MIB]);
    let c = push_test(&upstream, "c", &[5 * MIB, 5 * MIB]);
    pull_image(&stowage, &b);
    pull_image(&stowage, &a);
    pull_image(&stowage, &c);
    pull_image(&stowage, &b); // order: a, c, b
                              // Give the batch flush time to run (a few intervals), then crash.
    std::thread::sleep(Duration::from_secs(3));
    stowage.restart(); // SIGKILL + start
    let d = push_test(&upstream, "d", &[5 * MIB, 5 * MIB]);
    pull_image(&stowage, &d);
    assert!(has_no_layers(&stowage, &a), "a should be evicted first");
    assert!(has_all_blobs(&stowage, &b) && has_all_blobs(&stowage, &c));
}

#[test]
fn kill_9_during_fills_and_eviction_leaves_a_consistent_cache() {
    let upstream = Registry::start();
    let mut stowage = stowage_with(&upstream, "24MiB", "");
    let imgs: Vec<Pushed> = (0..6)
        .map(|i| push_test(&upstream, &format!("k{i}"), &[3 * MIB, 3 * MIB, 3 * MIB]))
        .collect();
    for round in 0..3 {
        // Pull everything concurrently (fills and evictions all the time), kill -9 mid-way.
        let url = stowage.url();
        let workers: Vec<_> = imgs
            .iter()
            .map(|p| {
                let (url, name) = (url.clone(), p.name.clone());
                let digests: Vec<String> = p.blobs().iter().map(|b| b.digest.clone()).collect();
                std::thread::spawn(move || {
                    for d in digests {
                        let _ = http()
                            .get(format!("{url}/v2/{name}/blobs/{d}"))
                            .send()
                            .and_then(|r| r.bytes());
                    }
                })
            })
            .collect();
        let seen_some = wait_until(Duration::from_secs(60), || {
            stowage.blob_files().len() > round + 1 || !stowage.tmp_files().is_empty()
        });
        assert!(seen_some, "no fill started in round {round}");
        let partial_at_kill = stowage.tmp_files();
        stowage.restart(); // SIGKILL, then start again
        let survived: Vec<_> = partial_at_kill.iter().filter(|p| p.exists()).collect();
        assert!(
            survived.is_empty(),
            "temp files survived a restart: {survived:?}"
        );
        for w in workers {
            let _ = w.join();
        }
        // The workers went on pulling from the restarted process: its last fills may still be
        // committing (a client's last byte comes once the blob verifies, the rename follows).
        stowage.wait_commits();
        assert!(
            wait_until(Duration::from_secs(60), || stowage.tmp_files().is_empty()),
            "temp files left after the fills of the restarted process: {:?}",
            stowage.tmp_files()
        );
    }
    // Damage the cache by hand, as a crash between steps would: an index entry whose file is
    // gone, a file the index does not know (valid bytes), and a file with the wrong bytes.
    pull_image(&stowage, &imgs[0]);
    pull_image(&stowage, &imgs[1]);
    stop_cleanly(&mut stowage);
    let gone = imgs[0].image_layers()[0].clone();
    std::fs::remove_file(stowage.blob_path(&gone)).expect("remove a blob file");
    let stray = images::Blob::new("application/octet-stream", vec![7u8; 4096]);
    let stray_path = stowage.blob_path(&stray.digest);
    std::fs::create_dir_all(stray_path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&stray_path, &stray.bytes).expect("write stray blob");
    let liar = sha256_digest(b"not these bytes");
    let liar_path = stowage.blob_path(&liar);
    std::fs::create_dir_all(liar_path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&liar_path, b"something else").expect("write liar blob");
    std::fs::write(stowage.data_dir().join("tmp").join("x.partial"), b"junk").expect("tmp junk");

    // Ready first, reconciled in the background: the server answers before it is done, and
    // says what it found when it is.
    let before = stowage.log().matches("cache reconciled").count();
    stowage.restart();
    let reconciled = || {
        stowage
            .log()
            .lines()
            .filter(|l| l.contains("cache reconciled"))
            .nth(before)
            .map(str::to_owned)
    };
    assert!(
        wait_until(Duration::from_secs(120), || reconciled().is_some()),
        "no reconciliation after the restart"
    );
    let line = reconciled().unwrap_or_default();
    for found in ["dropped_entries=1 ", "adopted_files=1 ", "removed_files=1 "] {
        assert!(line.contains(found), "{found} expected: {line}");
    }
    stop_cleanly(&mut stowage);
    assert!(stowage.tmp_files().is_empty());
    assert!(
        stray_path.exists(),
        "a valid unindexed blob should be adopted"
    );
    assert!(
        !liar_path.exists(),
        "a blob file with wrong bytes should be removed"
    );
    let out = command_ok(&stowage, &["verify"]);
    assert!(out.contains("cache is clean"), "{out}");
    assert!(out.contains(" 0 corrupt, 0 missing"), "{out}");

    // Everything still pulls correctly afterwards.
    stowage.restart();
    for p in &imgs {
        pull_image(&stowage, p);
    }
}

#[test]
fn verify_finds_a_flipped_byte_and_repair_refetches_it() {
    let upstream = Registry::start();
    let mut stowage = stowage_with(&upstream, "1GiB", "");
    let p = push_test(&upstream, "flip", &[2 * MIB, MIB]);
    pull_image(&stowage, &p);
    stop_cleanly(&mut stowage);
    assert!(command_ok(&stowage, &["verify"]).contains("cache is clean"));

    let layer = p.image_layers()[0].clone();
    let path = stowage.blob_path(&layer);
    let mut bytes = std::fs::read(&path).expect("read blob");
    bytes[MIB] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write flipped blob");

    let o = command(&stowage, &["verify"]);
    assert!(!o.status.success(), "verify should fail: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains(&format!("corrupt {layer}")), "{out}");
    assert!(out.contains("1 corrupt"), "{out}");

    let out = command_ok(&stowage, &["verify", "--repair"]);
    assert!(out.contains(&format!("repaired {layer}")), "{out}");
    assert!(!path.exists(), "the corrupt file should be gone");
    assert!(command_ok(&stowage, &["verify"]).contains("cache is clean"));

    stowage.restart();
    let gets = upstream.count_requests("GET", &format!("/blobs/{layer}"));
    let bytes = get_blob(&stowage, &p.name, &layer);
    assert_eq!(sha256_digest(&bytes), layer);
    assert_eq!(
        upstream.count_requests("GET", &format!("/blobs/{layer}")),
        gets + 1,
        "the repaired blob should be fetched again"
    );
    // Other blobs stayed hits.
    let before = upstream.blob_gets();
    pull_image(&stowage, &p);
    assert_eq!(upstream.blob_gets(), before);
}

#[test]
fn gc_removes_unused_tags_manifests_and_orphaned_blobs_but_keeps_pins() {
    let upstream = Registry::start();
    let mut stowage = stowage_with(&upstream, "1GiB", "gc_max_age = \"0s\"");
    let keep = push_test(&upstream, "keep", &[MIB]);
    let drop_me = push_test(&upstream, "drop", &[MIB]);
    pull_image(&stowage, &keep);
    pull_image(&stowage, &drop_me);
    stop_cleanly(&mut stowage);
    command_ok(&stowage, &["pin", "test/keep:1"]);
    // gc compares whole seconds: let a second pass so that "unused for 0s" is true.
    std::thread::sleep(Duration::from_millis(1100));
    let out = command_ok(&stowage, &["gc"]);
    assert!(out.contains("removed tag docker.io/test/drop:1"), "{out}");
    assert!(!out.contains("test/keep"), "{out}");
    assert!(has_all_blobs(&stowage, &keep), "pinned image lost blobs");
    for b in drop_me.blobs() {
        assert!(!stowage.blob_path(&b.digest).exists(), "{} kept", b.digest);
    }
    let ls = command_ok(&stowage, &["ls"]);
    assert!(
        ls.contains("docker.io/test/keep:1") && !ls.contains("test/drop"),
        "{ls}"
    );
    assert!(command_ok(&stowage, &["verify"]).contains("cache is clean"));
    stowage.restart();
    // The emptied repository left the catalog.
    let catalog: serde_json::Value = http()
        .get(format!("{}/v2/_catalog", stowage.url()))
        .send()
        .expect("GET /v2/_catalog")
        .json()
        .expect("catalog JSON");
    assert_eq!(catalog["repositories"], serde_json::json!(["test/keep"]));
    // The removed image pulls again from upstream.
    pull_image(&stowage, &drop_me);
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "24m"); `None` where mounting is not allowed (not root).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("stowage-tmpfs-")
            .tempdir()
            .ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        ok.then_some(Tmpfs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_disk_smaller_than_the_budget_evicts_for_space_and_refuses_what_cannot_fit() {
    let Some(fs) = Tmpfs::mount("24m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); disk-full behaviour untested");
        return;
    };
    let data = fs.path().join("data");
    let upstream = Registry::start();
    // The budget (1 GiB) is far above the disk (24 MiB): only the disk check can save us.
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .max_size("1GiB")
        .env("STOWAGE_STORAGE_PATH", &data.display().to_string())
        .start();
    let imgs: Vec<Pushed> = (0..8)
        .map(|i| push_test(&upstream, &format!("d{i}"), &[2 * MIB, 2 * MIB]))
        .collect();
    for p in &imgs {
        pull_image(&stowage, p); // ~32 MiB through a 24 MiB disk
    }
    assert!(
        has_no_layers_in(&data, &imgs[0]),
        "the disk never filled up: the test proves nothing"
    );
    let last = imgs.last().expect("images");
    let gets = upstream.blob_gets();
    pull_image(&stowage, last);
    assert_eq!(
        upstream.blob_gets(),
        gets,
        "the newest image should be a hit"
    );

    // A blob the disk cannot hold even with every cached blob gone: refused up front with a
    // clear error, temp file removed, nothing evicted, hits keep working.
    let big = push_test(&upstream, "big", &[26 * MIB]);
    let layer = big.image_layers()[0].clone();
    let r = http()
        .get(format!("{}/v2/{}/blobs/{layer}", stowage.url(), big.name))
        .send()
        .expect("GET big blob");
    assert_eq!(r.status().as_u16(), 507);
    let body = r.text().unwrap_or_default();
    assert!(body.contains("disk"), "{body}");
    assert!(files_under(&data.join("tmp")).is_empty(), "temp file left");
    let gets = upstream.blob_gets();
    pull_image(&stowage, last);
    assert_eq!(
        upstream.blob_gets(),
        gets,
        "hits broke after a refused fill"
    );
}

fn has_no_layers_in(data: &Path, p: &Pushed) -> bool {
    p.image_layers().iter().all(|d| {
        let hex = d.trim_start_matches("sha256:");
        !data.join("blobs/sha256").join(&hex[..2]).join(hex).exists()
    })
}
