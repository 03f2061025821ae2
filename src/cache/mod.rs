//! The local store: content-addressed blob files, the sled index, manifests kept hot in memory
//! (moka), and the single-flight map of in-flight fills.
//!
//! Layout under `storage.path`:
//! ```text
//! blobs/sha256/<2 hex>/<64 hex>   committed, verified blobs (written only by rename from tmp/)
//! tmp/<64 hex>.<rand>.partial     fills in progress; anything here at startup is garbage
//! index/                          the sled database (see [`index`])
//! lock                            held (flock) by the one process using the cache; holds its pid
//! ```
//!
//! Lifecycle (see [`budget`]): every committed blob and stored manifest counts against
//! `storage.max_size`; fills reserve their size first and evict least recently used blobs when
//! needed. [`Cache::open`] reconciles the index with the files after a crash: temp files are
//! discarded, index entries without a file dropped, files without an index entry re-hashed and
//! adopted (or removed if their bytes do not match their name).

pub mod budget;
pub mod fill;
pub mod index;
pub mod serve;
mod startup;
pub mod stats;
pub mod tail;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::future::BoxFuture;
use futures_util::StreamExt;

use crate::config::StorageConfig;
use crate::oci::{references, Digest, ErrorCode, RegistryError, RepoName, Tag};
use crate::stream::{BlobBody, ByteStream};
pub use budget::{BlobLease, Budget, CacheStats, Limits};
pub use fill::{BlobSource, Fill, FillMap, FillPolicy};
pub use index::{BlobMeta, Index, IndexError, Pin, RepoEntry, StoredManifest, TagEntry, TagRecord};
pub use stats::{Activity, Footprint, Tally};

/// Local store failures. Clients see them as `500 UNKNOWN`; the log has the detail.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(
        "the cache at {path} is in use by another stowage process{pid}: `stowage serve` holds it \
         while it runs. Stop the server, then run this command again"
    )]
    Locked { path: PathBuf, pid: String },
}

impl From<CacheError> for RegistryError {
    fn from(e: CacheError) -> RegistryError {
        tracing::error!(error = %e, "cache failure");
        RegistryError::new(ErrorCode::Unknown, "internal cache error")
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A committed blob, opened for reading. While it lives (and the stream made from it), the blob
/// is leased: eviction leaves it alone.
pub struct CachedBlob {
    pub file: std::fs::File,
    pub size: u64,
    pub lease: BlobLease,
}

impl CachedBlob {
    /// Streams `len` bytes from `offset` (mapped windows, see [`serve`]), keeping the lease
    /// until the last window has been sent.
    pub fn into_stream(self, offset: u64, len: u64) -> ByteStream {
        serve::blob_stream(self.file, offset, len, self.lease)
    }
}

/// Fills that may still have readers, by hex: their blob is not evicted while any `Arc<Fill>`
/// (held by every reader of the fill) is alive.
type HeldFills = Arc<Mutex<HashMap<String, Weak<Fill>>>>;

/// What the budget uses to evict: checks fills' readers, deletes index entry then file.
#[derive(Clone)]
struct CacheEvictor {
    root: PathBuf,
    index: Index,
    held: HeldFills,
}

impl budget::Evictor for CacheEvictor {
    fn held_by_fill(&self, hex: &str) -> bool {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(hex).is_some_and(|w| w.strong_count() > 0)
    }

    fn delete(&self, victim: &budget::Victim) -> std::io::Result<()> {
        self.index
            .remove_blob_hex(&victim.hex)
            .map_err(std::io::Error::other)?;
        match std::fs::remove_file(blob_path_in(&self.root, &victim.hex)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn available_space(&self) -> Option<u64> {
        fs2::available_space(&self.root).ok()
    }
}

fn blob_path_in(root: &Path, hex: &str) -> PathBuf {
    root.join("blobs")
        .join("sha256")
        .join(hex.get(..2).unwrap_or("xx"))
        .join(hex)
}

/// What startup reconciliation found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub blobs: u64,
    pub dropped_entries: u64,
    pub adopted_files: u64,
    pub removed_files: u64,
    pub temp_files: u64,
}

/// The startup work done in the background (see [`startup`]): what it found so far and
/// whether it is over.
#[derive(Default)]
struct Startup {
    state: Mutex<(Reconciled, bool)>,
    done: std::sync::Condvar,
}

impl Startup {
    fn update(&self, f: impl FnOnce(&mut Reconciled)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).0);
    }

    fn finish(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.done.notify_all();
    }

    fn wait(&self) -> Reconciled {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !s.1 {
            s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.0.clone()
    }
}

/// The cache.
pub struct Cache {
    root: PathBuf,
    index: Index,
    fills: FillMap,
    held: HeldFills,
    fill_policy: FillPolicy,
    /// One permit per fill allowed to run at once.
    fill_slots: Arc<tokio::sync::Semaphore>,
    manifests: moka::sync::Cache<Digest, Arc<StoredManifest>>,
    /// Serializes manifest stores and removals, so that a manifest's bytes enter the budget
    /// exactly once (concurrent first stores of one digest) and leave it once.
    manifest_writes: Mutex<()>,
    budget: Arc<Budget>,
    startup: Arc<Startup>,
    /// Per-repository counters and the footprint (see [`stats`]).
    activity: Arc<Activity>,
    _lock: std::fs::File,
}

/// Takes the cache's lock file, or explains who holds it.
fn take_lock(root: &Path) -> Result<std::fs::File, CacheError> {
    use fs2::FileExt;
    use std::io::{Read, Seek, Write};
    let path = root.join("lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_at(&path))?;
    if f.try_lock_exclusive().is_err() {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let pid = pid.trim();
        return Err(CacheError::Locked {
            path: root.to_owned(),
            pid: if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            },
        });
    }
    f.set_len(0).map_err(io_at(&path))?;
    f.seek(std::io::SeekFrom::Start(0)).map_err(io_at(&path))?;
    write!(f, "{}", std::process::id()).map_err(io_at(&path))?;
    Ok(f)
}

impl Cache {
    /// Opens the cache at `storage.path` and waits for its startup reconciliation (see
    /// [`Cache::open_serving`]): for commands that read the whole cache.
    pub fn open(storage: &StorageConfig) -> Result<Cache, CacheError> {
        let cache = Cache::open_serving(storage)?;
        cache.wait_reconciled();
        Ok(cache)
    }

    /// Opens the cache at `storage.path`: takes the lock, creates the directories, discards
    /// leftover temp files and opens the index, then returns, ready to serve. Loading sizes and
    /// recency into the budget and reconciling index and files (a crash may leave a file
    /// without an entry or an entry without a file) go on in a thread of their own; until the
    /// budget is loaded, reservations that may need eviction wait (see [`Budget::begin_loading`]).
    pub fn open_serving(storage: &StorageConfig) -> Result<Cache, CacheError> {
        let root = storage.path.as_path();
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io_at(&blobs))?;
        let lock = take_lock(root)?;
        let tmp = root.join("tmp");
        let startup = Arc::new(Startup::default());
        if tmp.exists() {
            let n = std::fs::read_dir(&tmp)
                .map(|d| d.count() as u64)
                .unwrap_or(0);
            startup.update(|r| r.temp_files = n);
            std::fs::remove_dir_all(&tmp).map_err(io_at(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
        let index = Index::open(&root.join("index"))?;
        let manifests = moka::sync::Cache::builder()
            .weigher(|_k: &Digest, m: &Arc<StoredManifest>| {
                u32::try_from(m.bytes.len()).unwrap_or(u32::MAX)
            })
            .max_capacity(64 << 20)
            .build();
        let budget = Arc::new(Budget::new(Limits::new(
            storage.max_size,
            storage.high_watermark,
            storage.low_watermark,
        )));
        budget.begin_loading();
        let mut cache = Cache {
            root: root.to_owned(),
            index,
            fills: Arc::default(),
            held: Arc::default(),
            fill_policy: FillPolicy::default(),
            fill_slots: Arc::new(tokio::sync::Semaphore::new(
                FillPolicy::default().max_concurrent,
            )),
            manifests,
            manifest_writes: Mutex::new(()),
            budget,
            startup,
            activity: Arc::default(),
            _lock: lock,
        };
        cache.activity = Arc::new(Activity::load(cache.index.stats_records()?.into_iter()));
        cache.refresh_pins()?;
        let work = startup::Work {
            evictor: cache.evictor(),
            budget: cache.budget.clone(),
            startup: cache.startup.clone(),
        };
        std::thread::Builder::new()
            .name("cache-startup".into())
            .spawn(move || work.run())
            .map_err(io_at(root))?;
        Ok(cache)
    }

    /// Blocks until the startup reconciliation is over; what it found.
    pub fn wait_reconciled(&self) -> Reconciled {
        self.startup.wait()
    }

    /// What startup reconciliation found so far.
    pub fn reconciled(&self) -> Reconciled {
        self.startup
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    fn evictor(&self) -> CacheEvictor {
        CacheEvictor {
            root: self.root.clone(),
            index: self.index.clone(),
            held: self.held.clone(),
        }
    }

    /// Sizes, budget and eviction counters.
    pub fn stats(&self) -> CacheStats {
        self.budget.stats()
    }

    /// The budget (LRU order, leases), for operator commands and tests.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Recomputes the set of pinned blobs from the pinned manifests (and their children held).
    pub fn refresh_pins(&self) -> Result<(), CacheError> {
        let (_, blobs) = self.pinned_closure()?;
        self.budget.set_pinned(blobs);
        self.activity.changed();
        Ok(())
    }

    /// Pinned manifests (with their children held) and pinned blobs, by hex.
    pub fn pinned_closure(&self) -> Result<(HashSet<String>, HashSet<String>), CacheError> {
        let mut manifests = HashSet::new();
        let mut blobs = HashSet::new();
        let mut stack: Vec<Digest> = self.index.pins()?.into_iter().map(|(d, _)| d).collect();
        while let Some(d) = stack.pop() {
            if !manifests.insert(d.hex().to_owned()) {
                continue;
            }
            let Some(m) = self.index.manifest(&d)? else {
                continue;
            };
            let refs = references(&m.bytes);
            blobs.extend(refs.blobs.iter().map(|(b, _)| b.hex().to_owned()));
            stack.extend(refs.children);
        }
        Ok((manifests, blobs))
    }

    /// Writes recency and the activity counters recorded in memory to the index, in one batch
    /// each. Blocking.
    pub fn flush_access(&self) -> Result<(), CacheError> {
        let counters = self.activity.take_dirty();
        let keys: Vec<Vec<u8>> = counters.iter().map(|(k, _)| k.clone()).collect();
        let records = counters.into_iter().map(|(k, v)| (k, Some(v))).collect();
        if let Err(e) = self.index.write_stats(records) {
            self.activity.restore_dirty(&keys);
            return Err(e.into());
        }
        let dirty = self.budget.take_dirty();
        if dirty.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.index.write_access(dirty.iter()) {
            self.budget.restore_dirty(dirty);
            return Err(e.into());
        }
        Ok(())
    }

    /// Periodic housekeeping (blocking): sample the history, flush recency and counters, evict
    /// blobs that became free.
    pub fn maintain(&self) {
        self.activity.sample(index::unix_now());
        if let Err(e) = self.flush_access() {
            tracing::warn!(error = %e, "could not write access times");
        }
        self.budget.maybe_evict(&self.evictor());
    }

    /// Sets how fills retry and how many run at once (before any fill starts).
    pub fn with_fill_policy(mut self, policy: FillPolicy) -> Cache {
        self.fill_slots = Arc::new(tokio::sync::Semaphore::new(policy.max_concurrent.max(1)));
        self.fill_policy = policy;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Where a committed blob lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path_in(&self.root, digest.hex())
    }

    /// Whether the blob is committed: indexed and its file present. (Does not mark it used.)
    pub fn holds_blob(&self, digest: &Digest) -> Result<bool, CacheError> {
        Ok(self.index.blob(digest)?.is_some() && self.blob_path(digest).is_file())
    }

    /// Opens a committed blob, if the cache has it, and marks it used. An index entry whose file
    /// vanished is dropped.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<CachedBlob>, CacheError> {
        // Lease first: from here on eviction leaves the blob alone.
        let lease = self.budget.lease(digest.hex());
        if self.index.blob(digest)?.is_none() {
            return Ok(None);
        }
        let path = self.blob_path(digest);
        match std::fs::File::open(&path) {
            Ok(file) => {
                let size = file.metadata().map_err(io_at(&path))?.len();
                Ok(Some(CachedBlob { file, size, lease }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(%digest, "indexed blob file is missing; dropping the entry");
                self.index.remove_blob(digest)?;
                self.budget.forget_blob(digest.hex());
                Ok(None)
            }
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Drops a blob from index, budget and disk (`verify --repair`, `gc`).
    pub fn remove_blob(&self, digest: &Digest) -> Result<(), CacheError> {
        self.activity.changed();
        self.index.remove_blob(digest)?;
        self.budget.forget_blob(digest.hex());
        let path = self.blob_path(digest);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_at(&path)(e)),
            _ => Ok(()),
        }
    }

    /// The fill of `digest` in flight, if any (without joining it).
    pub fn fill_in_flight(&self, digest: &Digest) -> Option<Arc<Fill>> {
        let map = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        map.get(digest).cloned()
    }

    /// Joins the fill of `digest` in flight, or starts one from `make_source()`.
    /// Returns the fill and whether it was joined rather than started.
    pub fn fill(
        &self,
        digest: &Digest,
        make_source: impl FnOnce() -> Box<dyn BlobSource>,
    ) -> Result<(Arc<Fill>, bool), CacheError> {
        let mut map = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(digest) {
            tracing::debug!(%digest, written = f.state().written, "joined fill in flight");
            return Ok((f.clone(), true));
        }
        let tmp_path = self.root.join("tmp").join(format!(
            "{}.{:016x}.partial",
            digest.hex(),
            rand::random::<u64>()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io_at(&tmp_path))?;
        let failed_partial = Arc::new(AtomicU64::new(0));
        let source = Box::new(BudgetedSource {
            inner: make_source(),
            digest: digest.clone(),
            budget: self.budget.clone(),
            evictor: self.evictor(),
            reserved: Arc::new(AtomicU64::new(0)),
            failed_partial: failed_partial.clone(),
        });
        let fill = Fill::start(
            digest.clone(),
            source,
            fill::FillContext {
                tmp_path,
                final_path: self.blob_path(digest),
                file,
                index: self.index.clone(),
                fills: self.fills.clone(),
                policy: self.fill_policy.clone(),
                slots: self.fill_slots.clone(),
                failed_partial,
            },
        );
        map.insert(digest.clone(), fill.clone());
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.retain(|_, w| w.strong_count() > 0);
            held.insert(digest.hex().to_owned(), Arc::downgrade(&fill));
        }
        Ok((fill, false))
    }

    /// A manifest by digest, from memory or the index; marks it used.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<Arc<StoredManifest>>, CacheError> {
        let m = self.manifest_untouched(digest)?;
        if m.is_some() {
            self.budget.touch_key(manifest_access_key(digest));
        }
        Ok(m)
    }

    /// A manifest by digest without marking it used (operator commands).
    pub fn manifest_untouched(
        &self,
        digest: &Digest,
    ) -> Result<Option<Arc<StoredManifest>>, CacheError> {
        if let Some(m) = self.manifests.get(digest) {
            return Ok(Some(m));
        }
        match self.index.manifest(digest)? {
            Some(m) => {
                let m = Arc::new(m);
                self.manifests.insert(digest.clone(), m.clone());
                Ok(Some(m))
            }
            None => Ok(None),
        }
    }

    /// Stores a verified manifest.
    pub fn put_manifest(&self, m: StoredManifest) -> Result<Arc<StoredManifest>, CacheError> {
        {
            // Check and insert as one step; count the bytes only once the record is stored.
            let _writing = self
                .manifest_writes
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let existed = self.index.has_manifest(&m.digest)?;
            self.index.put_manifest(&m)?;
            if !existed {
                self.budget.add_manifest_bytes(m.bytes.len() as u64);
            }
        }
        self.budget.touch_key(manifest_access_key(&m.digest));
        self.activity.changed();
        let m = Arc::new(m);
        self.manifests.insert(m.digest.clone(), m.clone());
        Ok(m)
    }

    pub fn tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagEntry>, CacheError> {
        let t = self.index.tag(upstream, repo, tag)?;
        if t.is_some() {
            self.budget.touch_key(tag_access_key(upstream, repo, tag));
        }
        Ok(t)
    }

    /// Removes a manifest (gc); its bytes leave the budget.
    pub fn remove_manifest(&self, digest: &Digest) -> Result<(), CacheError> {
        {
            let _writing = self
                .manifest_writes
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let n = self.index.remove_manifest(digest)?;
            self.budget.remove_manifest_bytes(n);
        }
        self.budget.forget_key(manifest_access_key(digest));
        self.manifests.invalidate(digest);
        self.activity.forget_manifest(digest.hex());
        Ok(())
    }

    pub fn put_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        e: &TagEntry,
    ) -> Result<(), CacheError> {
        self.budget.touch_key(tag_access_key(upstream, repo, tag));
        self.index.put_tag(upstream, repo, tag, e)?;
        self.activity.changed();
        Ok(())
    }

    pub fn touch_repo(&self, upstream: &str, repo: &RepoName) -> Result<(), CacheError> {
        Ok(self.index.touch_repo(upstream, repo)?)
    }

    pub fn repos(&self) -> Result<Vec<RepoEntry>, CacheError> {
        Ok(self.index.repos()?)
    }

    /// Waits for the commits of fills whose blob is already verified (graceful shutdown):
    /// their clients may have every byte, so the blob must be in the cache when `serve` exits.
    /// Fills still downloading are left to be discarded as before.
    pub async fn finish_commits(&self) {
        let verified: Vec<Arc<Fill>> = {
            let map = self.fills.lock().unwrap_or_else(|p| p.into_inner());
            map.values()
                .filter(|f| f.state().verified)
                .cloned()
                .collect()
        };
        for fill in verified {
            let _ = fill.settled().await;
        }
    }

    /// The fills in flight and how far each has got.
    pub fn fills_snapshot(&self) -> Vec<(Digest, fill::FillState)> {
        let map = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(d, f)| (d.clone(), f.state())).collect()
    }

    /// What eviction would remove next to free `bytes` (see [`Budget::eviction_preview`]).
    pub fn eviction_preview(&self, bytes: u64) -> Vec<budget::Victim> {
        self.budget.eviction_preview(bytes, &self.evictor())
    }

    /// Per-repository counters, totals and history (see [`stats`]).
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Number of fills in flight.
    pub fn fills_in_flight(&self) -> usize {
        self.fills.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Writes recency and flushes the index (on shutdown).
    pub fn flush(&self) -> Result<(), CacheError> {
        self.flush_access()?;
        Ok(self.index.flush()?)
    }
}

/// Access-record key of a manifest.
pub fn manifest_access_key(digest: &Digest) -> Vec<u8> {
    let mut k = vec![b'm'];
    k.extend_from_slice(digest.hex().as_bytes());
    k
}

/// Access-record key of a tag.
pub fn tag_access_key(upstream: &str, repo: &RepoName, tag: &Tag) -> Vec<u8> {
    let mut k = vec![b't'];
    k.extend_from_slice(&index::tag_key(upstream, repo, tag));
    k
}

/// Hashes a file, calling `progress` with each chunk's length. Returns its digest and size.
pub fn hash_file(path: &Path, progress: impl FnMut(u64)) -> std::io::Result<(Digest, u64)> {
    hash_copy(std::fs::File::open(path)?, None, progress)
}

/// Hashes everything `reader` yields, copying it into `dest` if given and calling `progress` with
/// each chunk's length. Returns the digest and size. (Verify, repair, startup adoption and bundle
/// import all hash this way; the fill hashes incrementally as bytes arrive instead.)
pub fn hash_copy(
    mut reader: impl std::io::Read,
    mut dest: Option<&mut std::fs::File>,
    mut progress: impl FnMut(u64),
) -> std::io::Result<(Digest, u64)> {
    use sha2::Digest as _;
    use std::io::Write as _;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(d) = dest.as_deref_mut() {
            d.write_all(&buf[..n])?;
        }
        size += n as u64;
        progress(n as u64);
    }
    Ok((Digest::from_hasher(hasher), size))
}

/// The fill's source, wrapped so that the blob's bytes are reserved in the budget before the
/// fill writes them, and the reservation is settled when the fill ends (the fill task drops its
/// source last): an accounted blob if it was committed, released otherwise.
struct BudgetedSource {
    inner: Box<dyn BlobSource>,
    digest: Digest,
    budget: Arc<Budget>,
    evictor: CacheEvictor,
    reserved: Arc<AtomicU64>,
    /// Bytes of the failed fill's partial file that come back once its last handle closes
    /// (the fill holds it open until this source is dropped; see `FillContext::failed_partial`).
    failed_partial: Arc<AtomicU64>,
}

fn cache_full(message: String) -> RegistryError {
    RegistryError::new(
        ErrorCode::Unavailable,
        format!("stowage cache is full: {message}"),
    )
    .with_status(507)
}

/// Reserves `n` more bytes on a blocking thread.
async fn reserve(
    budget: &Arc<Budget>,
    evictor: &CacheEvictor,
    n: u64,
) -> Result<(), RegistryError> {
    let (b, ev) = (budget.clone(), evictor.clone());
    tokio::task::spawn_blocking(move || b.reserve(n, &ev))
        .await
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?
        .map_err(|f| cache_full(f.message))
}

/// Reservation step for a blob of unknown size.
const RESERVE_STEP: u64 = 4 << 20;

impl BlobSource for BudgetedSource {
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<BlobBody, RegistryError>> {
        Box::pin(async move {
            let mut body = self.inner.open(offset).await?;
            match body.total {
                Some(total) => {
                    let have = self.reserved.load(Ordering::SeqCst);
                    if total > have {
                        reserve(&self.budget, &self.evictor, total - have).await?;
                        self.reserved.fetch_add(total - have, Ordering::SeqCst);
                    }
                }
                None => {
                    // Size unknown (no Content-Length; registries send one for blobs, so this is
                    // rare): reserve step by step as bytes arrive, on a blocking thread (it may
                    // evict). A refusal ends the fill at once (507), it is not a broken upstream.
                    // The first step is reserved before the body is handed over, so that a
                    // cache that cannot take even that answers 507 before any response starts.
                    let have = self.reserved.load(Ordering::SeqCst);
                    let first = body.start + RESERVE_STEP;
                    if first > have {
                        reserve(&self.budget, &self.evictor, first - have).await?;
                        self.reserved.fetch_add(first - have, Ordering::SeqCst);
                    }
                    let budget = self.budget.clone();
                    let evictor = self.evictor.clone();
                    let reserved = self.reserved.clone();
                    let mut seen = body.start;
                    body.stream = Box::pin(body.stream.then(move |item| {
                        if let Ok(chunk) = &item {
                            seen += chunk.len() as u64;
                        }
                        let (budget, evictor, reserved) =
                            (budget.clone(), evictor.clone(), reserved.clone());
                        let seen = seen;
                        async move {
                            let chunk = item?;
                            let have = reserved.load(Ordering::SeqCst);
                            if seen > have {
                                let more = (seen - have).max(RESERVE_STEP);
                                reserve(&budget, &evictor, more).await.map_err(|e| {
                                    std::io::Error::other(fill::FatalSourceError(e))
                                })?;
                                reserved.fetch_add(more, Ordering::SeqCst);
                            }
                            Ok(chunk)
                        }
                    }));
                }
            }
            Ok(body)
        })
    }
}

impl Drop for BudgetedSource {
    fn drop(&mut self) {
        let reserved = self.reserved.load(Ordering::SeqCst);
        let committed = match self.evictor.index.blob(&self.digest) {
            Ok(Some(meta)) => Some(meta.size),
            _ => None,
        };
        match committed {
            Some(size) => self.budget.commit(self.digest.hex(), reserved, size),
            None => {
                self.budget.release(reserved);
                // A fill that failed for lack of disk (ENOSPC) makes room for the next try. Its
                // unlinked partial file is still held open here (and maybe by readers that are
                // ending), so the free space does not show it yet: count it as free, and evict
                // only what the blob still needs beyond it.
                use budget::Evictor as _;
                let freeing = self.failed_partial.load(Ordering::SeqCst);
                let needs = reserved.saturating_sub(freeing);
                if reserved > 0
                    && self
                        .evictor
                        .available_space()
                        .is_some_and(|a| a.saturating_add(freeing) < reserved + (1 << 20))
                    && self.budget.reserve(needs, &self.evictor).is_ok()
                {
                    self.budget.release(needs);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_first_stores_of_a_manifest_count_its_bytes_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = crate::config::Config::from_toml("").unwrap().storage;
        storage.path = dir.path().to_owned();
        let cache = Cache::open(&storage).unwrap();
        let mut total = 0u64;
        for round in 0..40u32 {
            let bytes = bytes::Bytes::from(format!("{{\"schemaVersion\":2,\"round\":{round}}}"));
            total += bytes.len() as u64;
            let digest = Digest::of(&bytes);
            let barrier = std::sync::Barrier::new(8);
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| {
                        barrier.wait();
                        cache
                            .put_manifest(StoredManifest {
                                digest: digest.clone(),
                                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                                bytes: bytes.clone(),
                            })
                            .unwrap();
                    });
                }
            });
            assert_eq!(cache.stats().manifest_bytes, total, "round {round}");
        }
        for round in 0..40u32 {
            let bytes = format!("{{\"schemaVersion\":2,\"round\":{round}}}");
            cache
                .remove_manifest(&Digest::of(bytes.as_bytes()))
                .unwrap();
        }
        assert_eq!(cache.stats().manifest_bytes, 0);
    }
}
