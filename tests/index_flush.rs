//! The cache index under many concurrent durability waits: every fill that commits a blob, and
//! every new manifest, waits for the index to be on disk (`Index::durable`). With 16 fills
//! committing at once, those waits must never starve the index's own log writes — the index
//! (sled) writes its log on a small shared thread pool, and a wait parked on that pool for a
//! write queued behind it never ends (the server then hung with every fill stuck).
//!
//! Drives the real index on disk, from many tasks at once, round after round, and bounds each
//! round by a generous deadline (never a timing assertion).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stowage::cache::{BlobMeta, Index};
use stowage::oci::Digest;

/// Upper bound of all rounds (a few seconds when healthy): the machine is small and busy; a hung
/// round never ends.
const EVENTUALLY: Duration = Duration::from_secs(240);
/// Concurrent writers per round: at least the index's pool of log-writing threads (7), as many
/// as `storage.max_concurrent_fills` lets commit at once.
const WRITERS: u64 = 16;
const ROUNDS: u64 = 300;

/// Runs `ROUNDS` rounds of `WRITERS` concurrent index writes, each followed by a durability
/// wait; `done` counts the finished rounds.
async fn rounds(index: Arc<Index>, done: Arc<AtomicU64>) {
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let index = index.clone();
                tokio::spawn(async move {
                    let hex = format!("{:064x}", round * WRITERS + w);
                    let digest: Digest = format!("sha256:{hex}").parse().expect("digest");
                    let meta = BlobMeta { size: 1, added: 0 };
                    let idx = index.clone();
                    tokio::task::spawn_blocking(move || idx.put_blob(&digest, &meta))
                        .await
                        .expect("join")
                        .expect("put_blob");
                    index.durable().await;
                })
            })
            .collect();
        for r in futures_util::future::join_all(tasks).await {
            r.expect("writer task");
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn concurrent_durable_waits_never_hang() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = Arc::new(Index::open(&dir.path().join("index")).expect("open index"));
    let done = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    // The rounds run on a thread of their own: a hung one cannot hold this thread's deadline.
    let (i, d) = (index.clone(), done.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(rounds(i, d));
        let _ = tx.send(());
    });
    if rx.recv_timeout(EVENTUALLY).is_err() {
        panic!(
            "{} of {ROUNDS} rounds of {WRITERS} concurrent index writes + durability waits \
             finished in {EVENTUALLY:?}: the index's log writer is starved",
            done.load(Ordering::Relaxed)
        );
    }
}
