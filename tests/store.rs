//! The one suite every blob-store backend passes (`stowage::store::BlobStore`), run against the
//! directory backend in a temp dir, against the object backend on `object_store`'s in-memory
//! store, against a real 3-node Garage cluster (S3 API), against Azurite (Azure Blob API) and
//! against fake-gcs-server (GCS's JSON API).
//!
//! [`backend_suite`] runs every case in turn, each in its own key namespace: whole and ranged
//! reads, small and multipart-sized uploads checked by sha256, `head` / `delete` of present and
//! absent keys, `list` by prefix in key order, conditional `create`, eight concurrent writers of
//! one key, and an upload interrupted midway (the `put_file` future dropped while its source — a
//! FIFO — is still being written) that must leave no visible object. Garage, Azurite and
//! fake-gcs-server are required: a missing binary fails the test (`scripts/test` installs them).

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use rand::RngCore;
use stowage::config::SharedStoreKind;
use stowage::store::fs::FsStore;
use stowage::store::object::ObjectBackend;
use stowage::store::{BlobStore, Created, ObjectInfo, StoreError};

use support::azurite::Azurite;
use support::garage::Garage;
use support::gcs::GcsEmulator;
use support::sha256_hex;

type Store = Arc<dyn BlobStore>;

/// Multipart-sized for the object backend (parts of 8 MiB).
const BIG: usize = 20 * 1024 * 1024 + 123;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_backend_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("shared");
    let store: Store = Arc::new(FsStore::new(root.clone()));
    assert!(store.describe().starts_with("file:///"));
    backend_suite(store, &dir.path().join("scratch")).await;
    let leftovers = support::files_under(&root.join(".tmp"));
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

/// The object backend's own logic (prefix, multipart, abort, probe) on `object_store`'s
/// in-memory store: quick feedback before the Garage run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_backend_on_memory_passes_the_suite() {
    let memory = Arc::new(object_store::memory::InMemory::new());
    let store: Store = Arc::new(
        ObjectBackend::from_store(
            memory.clone(),
            "fleet",
            Duration::from_secs(10),
            "memory://fleet/".into(),
        )
        .unwrap(),
    );
    let scratch = tempfile::tempdir().unwrap();
    backend_suite(store, scratch.path()).await;
    // Everything the suite wrote (and the conditional-create probe) stayed below the prefix.
    let all: Vec<_> = object_store::ObjectStore::list(&*memory, None)
        .try_collect()
        .await
        .unwrap();
    assert!(all
        .iter()
        .all(|m| m.location.as_ref().starts_with("fleet/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_backend_passes_the_suite() {
    let mut garage = blocking(|| Garage::start(3)).await;
    let cfg = garage.shared_store_config("suite/", Duration::from_secs(10));
    let store = stowage::store::open(&cfg).unwrap();
    assert!(
        store.describe().starts_with("s3://stowage/suite/"),
        "{}",
        store.describe()
    );
    assert!(!store.describe().contains(garage.secret_access_key()));
    let scratch = tempfile::tempdir().unwrap();
    backend_suite(store.clone(), scratch.path()).await;

    // The interrupted upload was dropped mid-multipart (parts had gone up) and aborted, never
    // completed. The abort runs in a task of its own: wait for its request to arrive.
    let interrupted = "/stowage/suite/interrupted/blob?";
    let requests = |garage: &Garage| -> Vec<String> {
        garage
            .s3_requests(0)
            .into_iter()
            .filter(|r| r.contains(interrupted))
            .collect()
    };
    let aborted = support::wait_until(Duration::from_secs(30), || {
        requests(&garage)
            .iter()
            .any(|r| r.starts_with("DELETE ") && r.contains("uploadId="))
    });
    let seen = requests(&garage);
    assert!(aborted, "no AbortMultipartUpload: {seen:#?}");
    eprintln!("requests for the interrupted upload: {seen:#?}");
    assert!(
        seen.iter()
            .any(|r| r.starts_with("PUT ") && r.contains("partNumber=")),
        "no part was uploaded before the drop: {seen:#?}"
    );
    assert!(
        !seen
            .iter()
            .any(|r| r.starts_with("POST ") && r.contains("uploadId=")),
        "the interrupted upload was completed: {seen:#?}"
    );

    assert_suite_stayed_below_prefix(&garage.shared_store_config("", cfg.timeout)).await;

    // A stopped store fails fast and says it is unavailable.
    let mut garage = blocking(move || {
        garage.stop_all();
        garage
    })
    .await;
    fails_fast_while_down(&store).await;

    // Restarted, the cluster serves what it stored before.
    let garage = blocking(move || {
        for i in 0..3 {
            garage.restart_node(i);
        }
        garage
    })
    .await;
    let back = support::wait_until(Duration::from_secs(60), || {
        let store = store.clone();
        let got = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(store.get_bytes("bytes/manifest"))
        })
        .join()
        .unwrap();
        matches!(got, Ok(Some(b)) if b == "version two")
    });
    assert!(back, "the restarted cluster lost bytes/manifest");
    drop(garage);
}

/// Azure Blob Storage through Azurite: blocks (`Put Block`) for the parts, `Put Block List` to
/// complete, `If-None-Match: *` for conditional create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_backend_passes_the_suite() {
    let mut azurite = blocking(Azurite::start).await;
    let cfg = azurite.shared_store_config("suite/", Duration::from_secs(10));
    let store = stowage::store::open(&cfg).unwrap();
    let describe = store.describe();
    assert_eq!(
        describe,
        format!(
            "az://{}/{}/suite/ at http://127.0.0.1:{}",
            azurite.account(),
            azurite.container(),
            azurite.port()
        )
    );
    assert!(!describe.contains(azurite.access_key()));
    assert!(!format!("{cfg:?}").contains(azurite.access_key()));
    let scratch = tempfile::tempdir().unwrap();
    backend_suite(store.clone(), scratch.path()).await;

    // Azurite honours `If-None-Match: *`: the second create of the lease is a 409.
    let lease = format!(
        "\"PUT /{}/{}/suite/create/lease HTTP/1.1\"",
        azurite.account(),
        azurite.container()
    );
    let statuses: Vec<String> = azurite
        .log()
        .lines()
        .filter_map(|l| {
            Some(
                l.split_once(&lease)?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(statuses, ["201", "409"], "PUTs of create/lease");

    // The interrupted upload had put blocks when it was dropped and never committed them
    // (Azure has no abort: uncommitted blocks are never visible and expire on their own).
    let interrupted = format!(
        "/{}/{}/suite/interrupted/blob?",
        azurite.account(),
        azurite.container()
    );
    let seen: Vec<String> = azurite
        .requests()
        .into_iter()
        .filter(|r| r.contains(&interrupted))
        .collect();
    eprintln!("requests for the interrupted upload: {seen:#?}");
    assert!(
        seen.iter()
            .any(|r| r.starts_with("PUT ") && r.contains("comp=block&")),
        "no block was uploaded before the drop: {seen:#?}"
    );
    assert!(
        !seen.iter().any(|r| r.contains("comp=blocklist")),
        "the interrupted upload was committed: {seen:#?}"
    );

    assert_suite_stayed_below_prefix(&azurite.shared_store_config("", cfg.timeout)).await;

    // The account URL may be written with a trailing slash.
    let mut slashed = azurite.shared_store_config("suite/", cfg.timeout);
    if let SharedStoreKind::Azure(az) = &mut slashed.kind {
        az.endpoint = Some(format!("{}/", azurite.endpoint()));
    }
    let slashed = stowage::store::open(&slashed).unwrap();
    assert_eq!(slashed.describe(), describe);
    assert_eq!(
        slashed.get_bytes("bytes/manifest").await.unwrap().unwrap(),
        "version two"
    );

    // A stopped store fails fast and says it is unavailable.
    let mut azurite = blocking(move || {
        azurite.stop();
        azurite
    })
    .await;
    fails_fast_while_down(&store).await;

    // Restarted on its workspace, it serves what it stored before.
    let azurite = blocking(move || {
        azurite.restart();
        azurite
    })
    .await;
    assert_eq!(
        store.get_bytes("bytes/manifest").await.unwrap().unwrap(),
        "version two"
    );
    drop(azurite);
}

/// Google Cloud Storage's JSON API on fake-gcs-server: media uploads, a multipart upload with
/// `ifGenerationMatch=0` for conditional create, resumable uploads for files above 8 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_emulator_backend_passes_the_suite() {
    let mut gcs = blocking(GcsEmulator::start).await;
    let cfg = gcs.shared_store_config("suite/", Duration::from_secs(10));
    let store = stowage::store::open(&cfg).unwrap();
    assert_eq!(
        store.describe(),
        format!("gs://{}/suite/ at {}", gcs.bucket(), gcs.endpoint())
    );
    let scratch = tempfile::tempdir().unwrap();
    let created = backend_suite(store.clone(), scratch.path()).await;
    assert_eq!(created, Created::Created, "GCS creates conditionally");

    // The interrupted upload had sent chunks of its resumable session when it was dropped; the
    // session was cancelled (in a task of its own: wait for it), never finished.
    let interrupted = "name=suite%2Finterrupted%2Fblob";
    let requests = |gcs: &GcsEmulator| -> Vec<String> {
        gcs.requests()
            .into_iter()
            .filter(|r| r.contains(interrupted) && r.contains("uploadType=resumable"))
            .collect()
    };
    let cancelled = support::wait_until(Duration::from_secs(30), || {
        requests(&gcs)
            .iter()
            .any(|r| r.starts_with("DELETE ") && r.contains("upload_id="))
    });
    let seen = requests(&gcs);
    eprintln!("requests for the interrupted upload: {seen:#?}");
    assert!(
        cancelled,
        "the resumable session was not cancelled: {seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.starts_with("PUT ") && r.ends_with(" 308")),
        "no chunk was uploaded before the drop: {seen:#?}"
    );
    // The last PUT of each session names the total and is answered 200; the interrupted one's
    // never was. (The key's later whole write is a media upload.)
    assert!(
        !seen
            .iter()
            .any(|r| r.starts_with("PUT ") && r.ends_with(" 200")),
        "the interrupted upload was finished: {seen:#?}"
    );

    assert_suite_stayed_below_prefix(&gcs.shared_store_config("", cfg.timeout)).await;

    // Object names are percent-encoded as one path segment: keys with `:`, `+` and `%`
    // round-trip.
    let odd = "tags/registry.local:5000/library/a+b/v1.0%2F";
    let odd_store = stowage::store::open(&cfg).unwrap();
    odd_store
        .put_bytes(odd, Bytes::from_static(b"odd"))
        .await
        .unwrap();
    assert_eq!(odd_store.get_bytes(odd).await.unwrap().unwrap(), "odd");
    assert_eq!(
        odd_store
            .list("tags/registry.local:5000/")
            .await
            .unwrap()
            .len(),
        1
    );
    odd_store.delete(odd).await.unwrap();
    assert_eq!(odd_store.head(odd).await.unwrap(), None);

    // A stopped store fails fast and says it is unavailable.
    let gcs = blocking(move || {
        gcs.stop();
        gcs
    })
    .await;
    fails_fast_while_down(&store).await;
    drop(gcs);
}

/// Everything the suite wrote stays below its prefix `suite/`: a store opened on `unprefixed`
/// (the same bucket or container without a prefix) sees it all there.
async fn assert_suite_stayed_below_prefix(unprefixed: &stowage::config::SharedStoreConfig) {
    let unprefixed = stowage::store::open(unprefixed).unwrap();
    let all = unprefixed.list("").await.unwrap();
    assert!(!all.is_empty());
    assert!(
        all.iter().all(|o| o.key.starts_with("suite/")),
        "{:?}",
        all.iter().map(|o| &o.key).collect::<Vec<_>>()
    );
}

/// Runs `f` on the blocking pool (the harnesses block) and returns what it returns.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A store whose server is down fails a read and a write quickly, as `Unavailable`.
async fn fails_fast_while_down(store: &Store) {
    let started = Instant::now();
    let err = store.head("bytes/manifest").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    let err = store
        .put_bytes("bytes/manifest", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a dead store took {:?} to report",
        started.elapsed()
    );
}

/// Every case, each in its own namespace (`<case>/...`). Returns what the first conditional
/// create answered.
async fn backend_suite(store: Store, scratch: &Path) -> Created {
    std::fs::create_dir_all(scratch).unwrap();
    eprintln!("suite on {}", store.describe());
    bytes_round_trip(&store).await;
    put_file_small_exact_and_multipart(&store, scratch).await;
    ranged_reads(&store).await;
    head_and_delete(&store).await;
    list_is_by_prefix_and_sorted(&store).await;
    let created = create_is_conditional(&store).await;
    eprintln!("conditional create: {created:?}");
    concurrent_writers_of_one_key(&store, scratch).await;
    interrupted_upload_leaves_no_object(&store, scratch).await;
    created
}

async fn bytes_round_trip(store: &Store) {
    let key = "bytes/manifest";
    assert_eq!(store.get_bytes(key).await.unwrap(), None);
    store
        .put_bytes(key, Bytes::from_static(b"v1"))
        .await
        .unwrap();
    assert_eq!(store.get_bytes(key).await.unwrap().unwrap(), "v1");
    assert_eq!(store.head(key).await.unwrap(), Some(2));
    store
        .put_bytes(key, Bytes::from_static(b"version two"))
        .await
        .unwrap();
    assert_eq!(store.get_bytes(key).await.unwrap().unwrap(), "version two");
    assert_eq!(store.head(key).await.unwrap(), Some(11));

    store.put_bytes("bytes/empty", Bytes::new()).await.unwrap();
    assert_eq!(store.head("bytes/empty").await.unwrap(), Some(0));
    assert_eq!(store.get_bytes("bytes/empty").await.unwrap().unwrap(), "");
    let (size, body) = read(store, "bytes/empty", 0, None).await.unwrap();
    assert_eq!((size, body.len()), (0, 0));

    let err = store.put_bytes("bytes/../escape", Bytes::new()).await;
    assert!(matches!(err, Err(StoreError::Refused(_))), "{err:?}");
}

async fn put_file_small_exact_and_multipart(store: &Store, scratch: &Path) {
    let part = stowage::store::object::PART_SIZE;
    for (name, size) in [("small", 1000), ("one-part", part), ("multipart", BIG)] {
        let data = random_bytes(size);
        let src = scratch.join(format!("put-{name}"));
        std::fs::write(&src, &data).unwrap();
        let key = format!("files/{name}");
        store.put_file(&key, &src).await.unwrap();
        assert_eq!(store.head(&key).await.unwrap(), Some(size as u64), "{name}");
        let (total, body) = read(store, &key, 0, None).await.unwrap();
        assert_eq!(total, size as u64);
        assert_eq!(body.len(), size, "{name}");
        assert_eq!(
            sha256_hex(&body),
            sha256_hex(&data),
            "{name}: content differs"
        );
        std::fs::remove_file(&src).unwrap();
    }
    let missing = scratch.join("no-such-file");
    let err = store.put_file("files/missing", &missing).await;
    assert!(matches!(err, Err(StoreError::Io(_))), "{err:?}");
    assert_eq!(store.head("files/missing").await.unwrap(), None);
}

async fn ranged_reads(store: &Store) {
    let key = "range/blob";
    let data = random_bytes(100_000);
    store
        .put_bytes(key, Bytes::from(data.clone()))
        .await
        .unwrap();
    let cases: [(u64, Option<u64>, std::ops::Range<usize>); 7] = [
        (0, None, 0..100_000),
        (10, Some(100), 10..110),
        (99_990, None, 99_990..100_000),
        (99_999, Some(10), 99_999..100_000),
        (100_000, None, 100_000..100_000),
        (5, Some(0), 5..5),
        (0, Some(100_000), 0..100_000),
    ];
    for (offset, len, want) in cases {
        let (total, body) = read(store, key, offset, len)
            .await
            .unwrap_or_else(|| panic!("get({offset}, {len:?}) found nothing"));
        assert_eq!(total, 100_000, "get({offset}, {len:?}) total");
        assert!(
            body == data[want.clone()],
            "get({offset}, {len:?}): {} bytes, wanted {want:?}",
            body.len()
        );
    }
    let err = store.get(key, 100_001, None).await.err();
    assert!(matches!(err, Some(StoreError::Refused(_))), "{err:?}");
    assert!(store.get("range/absent", 0, None).await.unwrap().is_none());
    assert!(store
        .get("range/absent", 10, Some(5))
        .await
        .unwrap()
        .is_none());
}

async fn head_and_delete(store: &Store) {
    let key = "delete/x";
    assert_eq!(store.head(key).await.unwrap(), None);
    store.delete(key).await.unwrap();
    store
        .put_bytes(key, Bytes::from_static(b"abc"))
        .await
        .unwrap();
    assert_eq!(store.head(key).await.unwrap(), Some(3));
    store.delete(key).await.unwrap();
    assert_eq!(store.head(key).await.unwrap(), None);
    assert_eq!(store.get_bytes(key).await.unwrap(), None);
    store.delete(key).await.unwrap();
}

async fn list_is_by_prefix_and_sorted(store: &Store) {
    for (key, size) in [
        ("list/b/2", 2),
        ("list/a/10", 10),
        ("list/ab", 3),
        ("list/a/1", 1),
        ("list/c", 4),
    ] {
        store
            .put_bytes(key, Bytes::from(vec![b'x'; size]))
            .await
            .unwrap();
    }
    let keys = |list: Vec<ObjectInfo>| list.into_iter().map(|o| o.key).collect::<Vec<_>>();
    let all = store.list("list/").await.unwrap();
    assert_eq!(
        all,
        [
            ("list/a/1", 1),
            ("list/a/10", 10),
            ("list/ab", 3),
            ("list/b/2", 2),
            ("list/c", 4)
        ]
        .map(|(k, s)| ObjectInfo {
            key: k.into(),
            size: s
        })
    );
    assert_eq!(
        keys(store.list("list/a").await.unwrap()),
        ["list/a/1", "list/a/10", "list/ab"]
    );
    assert_eq!(
        keys(store.list("list/a/").await.unwrap()),
        ["list/a/1", "list/a/10"]
    );
    assert_eq!(
        keys(store.list("list/a/1").await.unwrap()),
        ["list/a/1", "list/a/10"]
    );
    assert!(store.list("list/zz").await.unwrap().is_empty());
    assert!(store.list("nothing-here/").await.unwrap().is_empty());
    let everything = keys(store.list("").await.unwrap());
    assert!(everything.windows(2).all(|w| w[0] < w[1]), "{everything:?}");
    assert!(everything.iter().any(|k| k == "list/c"));
}

/// Returns what the first create answered (`Created`, or `Unsupported` for a store that would
/// overwrite).
async fn create_is_conditional(store: &Store) -> Created {
    let key = "create/lease";
    let first = store.create(key, Bytes::from_static(b"one")).await.unwrap();
    match first {
        Created::Created => {
            assert_eq!(store.get_bytes(key).await.unwrap().unwrap(), "one");
            let second = store.create(key, Bytes::from_static(b"two")).await.unwrap();
            assert_eq!(second, Created::Exists);
            assert_eq!(
                store.get_bytes(key).await.unwrap().unwrap(),
                "one",
                "a refused create overwrote"
            );
        }
        Created::Unsupported => {
            assert_eq!(
                store.head(key).await.unwrap(),
                None,
                "Unsupported create wrote anyway"
            );
            let again = store.create(key, Bytes::from_static(b"two")).await.unwrap();
            assert_eq!(again, Created::Unsupported);
            assert_eq!(store.head(key).await.unwrap(), None);
        }
        Created::Exists => panic!("create of a fresh key answered Exists"),
    }
    first
}

async fn concurrent_writers_of_one_key(store: &Store, scratch: &Path) {
    let data = random_bytes(9 * 1024 * 1024 + 7);
    let src = scratch.join("concurrent");
    std::fs::write(&src, &data).unwrap();
    let small = Bytes::from(random_bytes(1000));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, src, small) = (store.clone(), src.clone(), small.clone());
        tasks.push(tokio::spawn(async move {
            store.put_file("concurrent/blob", &src).await?;
            store.put_bytes("concurrent/small", small).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let (total, body) = read(store, "concurrent/blob", 0, None).await.unwrap();
    assert_eq!(total, data.len() as u64);
    assert_eq!(sha256_hex(&body), sha256_hex(&data), "blob corrupted");
    assert_eq!(
        store.get_bytes("concurrent/small").await.unwrap().unwrap(),
        small
    );
    std::fs::remove_file(&src).unwrap();
}

/// The source is a FIFO: a thread writes half of a 40 MiB "file" and then waits, so `put_file`
/// is mid-upload (for the object backend: two 8 MiB parts up, the multipart upload open) when
/// its future is dropped. Nothing may be visible afterwards, and the key stays usable.
async fn interrupted_upload_leaves_no_object(store: &Store, scratch: &Path) {
    const HALF: u64 = 20 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let fifo = scratch.join("slow-source");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo failed");

    let written = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let (fifo, written) = (fifo.clone(), written.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            // Blocks until put_file opens the FIFO for reading.
            let mut out = std::fs::OpenOptions::new().write(true).open(&fifo)?;
            let chunk = vec![0x5a_u8; CHUNK];
            while written.load(Ordering::SeqCst) < HALF {
                out.write_all(&chunk)?;
                written.fetch_add(CHUNK as u64, Ordering::SeqCst);
            }
            // Hold the FIFO open (no EOF) until the test has dropped the upload.
            let _ = stop_rx.recv();
            Ok::<(), std::io::Error>(())
        })
    };

    let key = "interrupted/blob";
    let mut upload = store.put_file(key, &fifo);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut settle = 0;
    // Drive the upload until the writer has handed over half, then a little longer so the
    // reader drains the pipe and the upload is waiting for more.
    while settle < 10 {
        tokio::select! {
            result = &mut upload => panic!("upload finished while its source was still open: {result:?}"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if written.load(Ordering::SeqCst) >= HALF {
            settle += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the upload read only {} bytes of its source",
            written.load(Ordering::SeqCst)
        );
    }
    drop(upload);
    stop_tx.send(()).unwrap();
    blocking(move || writer.join())
        .await
        .expect("writer thread panicked")
        .expect("writer thread failed");

    assert_eq!(
        store.head(key).await.unwrap(),
        None,
        "partial object visible"
    );
    assert!(store.get(key, 0, None).await.unwrap().is_none());
    assert!(
        store.list("interrupted/").await.unwrap().is_empty(),
        "partial object listed"
    );
    // The key is usable afterwards.
    store
        .put_bytes(key, Bytes::from_static(b"whole"))
        .await
        .unwrap();
    assert_eq!(store.get_bytes(key).await.unwrap().unwrap(), "whole");
    std::fs::remove_file(&fifo).unwrap();
}

/// `get` collected: the total size and the bytes; `None` when absent.
async fn read(store: &Store, key: &str, offset: u64, len: Option<u64>) -> Option<(u64, Vec<u8>)> {
    let (total, stream) = store.get(key, offset, len).await.unwrap()?;
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    Some((total, chunks.concat()))
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut data = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut data);
    data
}
