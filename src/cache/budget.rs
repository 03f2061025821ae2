//! The byte budget: what the cache holds, in which order it was last used, and eviction.
//!
//! [`Budget`] keeps every committed blob's size and a logical "last used" tick in memory, in an
//! LRU order (a `BTreeSet` of `(tick, hex)`), plus the bytes of stored manifests and the bytes
//! *reserved* by fills in flight. A fill reserves its blob's size before it writes a byte (see
//! [`Budget::reserve`]); if that would cross the high watermark, least recently used blobs are
//! evicted down to the low watermark first. Blobs that are pinned, being read by a client (a
//! [`BlobLease`] is alive) or still held by a fill's readers are skipped — they are evicted by a
//! later pass once free. A fill that cannot fit even after eviction is refused with `507`.
//!
//! We keep our own ordered map rather than moka here: eviction must be synchronous, exact
//! (a hard budget) and able to *skip* entries in use, which moka's asynchronous, admission-
//! filtered eviction cannot promise. Hits cost one short mutex section and no I/O; recency is
//! written to sled in batches by [`Budget::take_dirty`] (see `Cache::flush_access`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Watermarks and the hard limit, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max: u64,
    pub high: u64,
    pub low: u64,
}

impl Limits {
    /// Limits from a budget and watermark fractions (`0 < low <= high <= 1`).
    pub fn new(max: u64, high: f64, low: f64) -> Limits {
        Limits {
            max,
            high: ((max as f64) * high) as u64,
            low: ((max as f64) * low) as u64,
        }
    }
}

/// Numbers for operators and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// `storage.max_size`.
    pub budget_bytes: u64,
    /// Blob + manifest bytes held (committed).
    pub size_bytes: u64,
    pub blob_bytes: u64,
    pub manifest_bytes: u64,
    /// Bytes reserved by fills in flight.
    pub reserved_bytes: u64,
    pub blob_count: u64,
    pub pinned_blob_bytes: u64,
    /// Blobs evicted since start, and their bytes.
    pub evictions: u64,
    pub evicted_bytes: u64,
    /// Fills refused because the budget could not make room.
    pub fills_refused: u64,
}

/// A pending recency write: `Some((tick, unix))` to store, `None` to delete.
pub type AccessUpdate = Option<(u64, u64)>;

/// Access-record keys: `b<hex>` (blob), `m<hex>` (manifest), `t<tag key>` (tag).
pub fn blob_key(hex: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(65);
    k.push(b'b');
    k.extend_from_slice(hex.as_bytes());
    k
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    size: u64,
    tick: u64,
}

#[derive(Default)]
struct State {
    blobs: HashMap<String, Entry>,
    order: BTreeSet<(u64, String)>,
    clock: u64,
    blob_bytes: u64,
    manifest_bytes: u64,
    reserved: u64,
    readers: HashMap<String, usize>,
    pinned: HashSet<String>,
    dirty: HashMap<Vec<u8>, AccessUpdate>,
}

impl State {
    fn used(&self) -> u64 {
        self.blob_bytes + self.manifest_bytes
    }
    /// Sets the cache gauges from these totals: called wherever the committed blobs change, so
    /// `stowage_cache_blobs` / `stowage_cache_size_bytes` are the budget's own numbers.
    fn publish_gauges(&self) {
        crate::metrics::metrics().cache_totals(self.blobs.len() as u64, self.blob_bytes);
    }
    fn bump(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

/// A victim chosen by eviction: delete its index entry and file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Victim {
    pub hex: String,
    pub size: u64,
}

/// What the budget needs from the rest of the cache to evict: whether a digest is still held by
/// a fill's readers, and how to delete a blob (index entry, then file).
pub trait Evictor {
    fn held_by_fill(&self, hex: &str) -> bool;
    fn delete(&self, victim: &Victim) -> std::io::Result<()>;
    /// Free bytes on the cache's filesystem, if known.
    fn available_space(&self) -> Option<u64>;
}

/// Why a reservation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    pub needed: u64,
    pub message: String,
}

/// The in-memory budget and LRU order. Shared (`Arc`) by the cache, fills and leases.
pub struct Budget {
    limits: Limits,
    state: Mutex<State>,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    fills_refused: AtomicU64,
}

/// While alive, the blob is being read by a client and is not evicted.
pub struct BlobLease {
    budget: Arc<Budget>,
    hex: String,
}

impl Drop for BlobLease {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        if let Some(n) = s.readers.get_mut(&self.hex) {
            *n -= 1;
            if *n == 0 {
                s.readers.remove(&self.hex);
            }
        }
    }
}

/// Bytes needed on disk beyond a blob itself before a fill starts (filesystem slack).
const DISK_SLACK: u64 = 1 << 20;

impl Budget {
    pub fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            state: Mutex::default(),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            fills_refused: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads a blob at startup with its persisted tick (0 if never recorded).
    pub fn load_blob(&self, hex: &str, size: u64, tick: u64) {
        let mut s = self.lock();
        if let Some(old) = s.blobs.insert(hex.to_owned(), Entry { size, tick }) {
            s.order.remove(&(old.tick, hex.to_owned()));
            s.blob_bytes -= old.size;
        }
        s.order.insert((tick, hex.to_owned()));
        s.blob_bytes += size;
        s.clock = s.clock.max(tick);
        s.publish_gauges();
    }

    /// Loads many blobs at startup: (hex, size, persisted tick), under one lock.
    pub fn load_blobs(&self, blobs: Vec<(String, u64, u64)>) {
        let mut s = self.lock();
        s.blobs.reserve(blobs.len());
        for (hex, size, tick) in blobs {
            if let Some(old) = s.blobs.insert(hex.clone(), Entry { size, tick }) {
                s.order.remove(&(old.tick, hex.clone()));
                s.blob_bytes -= old.size;
            }
            s.order.insert((tick, hex));
            s.blob_bytes += size;
            s.clock = s.clock.max(tick);
        }
        s.publish_gauges();
    }

    /// Advances the clock past a persisted tick (startup), so new uses sort after old ones.
    pub fn observe_tick(&self, tick: u64) {
        let mut s = self.lock();
        s.clock = s.clock.max(tick);
    }

    /// Adds manifest bytes (a new manifest stored) or removes them (negative via `remove`).
    pub fn add_manifest_bytes(&self, n: u64) {
        self.lock().manifest_bytes += n;
    }

    pub fn remove_manifest_bytes(&self, n: u64) {
        let mut s = self.lock();
        s.manifest_bytes = s.manifest_bytes.saturating_sub(n);
    }

    /// Replaces the set of pinned blobs.
    pub fn set_pinned(&self, pinned: HashSet<String>) {
        self.lock().pinned = pinned;
    }

    pub fn is_pinned(&self, hex: &str) -> bool {
        self.lock().pinned.contains(hex)
    }

    /// Whether the budget accounts this blob as committed.
    pub fn contains(&self, hex: &str) -> bool {
        self.lock().blobs.contains_key(hex)
    }

    /// Marks a blob used now and takes a read lease on it. The lease is taken even if the blob
    /// is not (yet) accounted, so that a blob committed a moment ago is protected too.
    pub fn lease(self: &Arc<Budget>, hex: &str) -> BlobLease {
        let mut s = self.lock();
        *s.readers.entry(hex.to_owned()).or_insert(0) += 1;
        touch_blob(&mut s, hex);
        BlobLease {
            budget: self.clone(),
            hex: hex.to_owned(),
        }
    }

    /// Records a use of a manifest or tag (access key `m<hex>` / `t<tag key>`) for `gc` and `ls`.
    pub fn touch_key(&self, key: Vec<u8>) {
        let mut s = self.lock();
        let tick = s.bump();
        s.dirty
            .insert(key, Some((tick, crate::cache::index::unix_now())));
    }

    /// Forgets the access record `key` at the next flush.
    pub fn forget_key(&self, key: Vec<u8>) {
        self.lock().dirty.insert(key, None);
    }

    /// Takes the recency updates not yet written to sled.
    pub fn take_dirty(&self) -> HashMap<Vec<u8>, AccessUpdate> {
        std::mem::take(&mut self.lock().dirty)
    }

    /// Puts updates back after a failed write (newer updates win).
    pub fn restore_dirty(&self, updates: HashMap<Vec<u8>, AccessUpdate>) {
        let mut s = self.lock();
        for (k, v) in updates {
            s.dirty.entry(k).or_insert(v);
        }
    }

    /// A committed fill: turns its reservation into an accounted blob, used now.
    pub fn commit(&self, hex: &str, reserved: u64, size: u64) {
        let mut s = self.lock();
        s.reserved = s.reserved.saturating_sub(reserved);
        let tick = s.bump();
        if let Some(old) = s.blobs.insert(hex.to_owned(), Entry { size, tick }) {
            s.order.remove(&(old.tick, hex.to_owned()));
            s.blob_bytes -= old.size;
        }
        s.order.insert((tick, hex.to_owned()));
        s.blob_bytes += size;
        s.dirty
            .insert(blob_key(hex), Some((tick, crate::cache::index::unix_now())));
        s.publish_gauges();
    }

    /// A failed fill: gives its reservation back.
    pub fn release(&self, reserved: u64) {
        let mut s = self.lock();
        s.reserved = s.reserved.saturating_sub(reserved);
    }

    /// Drops a blob from the accounting (removed by `verify --repair`, `gc`, or found missing).
    pub fn forget_blob(&self, hex: &str) {
        let mut s = self.lock();
        if let Some(e) = s.blobs.remove(hex) {
            s.order.remove(&(e.tick, hex.to_owned()));
            s.blob_bytes -= e.size;
        }
        s.dirty.insert(blob_key(hex), None);
        s.publish_gauges();
    }

    /// Reserves `n` bytes for a fill, evicting least recently used blobs if the total would cross
    /// the high watermark (down to the low one) or if the disk has less room than `n`. Fails if
    /// the budget cannot make room. Blocking: call from a blocking context.
    pub fn reserve(&self, n: u64, ev: &dyn Evictor) -> Result<(), Full> {
        let mut s = self.lock();
        let l = self.limits;
        if s.used() + s.reserved + n > l.high {
            // Refuse up front what would not fit even with everything evictable gone: evicting
            // for a fill that fails anyway would only empty the cache.
            let evictable = evictable(&s, ev);
            if s.used() - evictable + s.reserved + n > l.max {
                self.fills_refused.fetch_add(1, Ordering::Relaxed);
                return Err(Full {
                    needed: n,
                    message: format!(
                        "the cache budget of {} bytes cannot hold {n} more bytes: {} are held \
                         ({evictable} evictable), {} reserved by fills in flight, and the rest \
                         is pinned or being read",
                        l.max,
                        s.used(),
                        s.reserved
                    ),
                });
            }
            let target = l.low.saturating_sub(s.reserved + n);
            self.evict_locked(&mut s, target, ev);
        }
        // The disk may be smaller than the budget (or shared): make room there too.
        if let Some(avail) = ev.available_space() {
            if avail < n + DISK_SLACK {
                let short = n + DISK_SLACK - avail;
                if evictable(&s, ev) < short {
                    self.fills_refused.fetch_add(1, Ordering::Relaxed);
                    return Err(Full {
                        needed: n,
                        message: format!(
                            "the cache's disk has {avail} bytes free and the blob needs {n}; \
                             evicting every unused blob would not free enough"
                        ),
                    });
                }
                let target = s.used().saturating_sub(short);
                self.evict_locked(&mut s, target, ev);
                if let Some(avail) = ev.available_space() {
                    if avail < n + DISK_SLACK {
                        self.fills_refused.fetch_add(1, Ordering::Relaxed);
                        return Err(Full {
                            needed: n,
                            message: format!(
                                "the cache's disk has {avail} bytes free and the blob needs {n}; \
                                 nothing more can be evicted (pinned or in use)"
                            ),
                        });
                    }
                }
            }
        }
        if s.used() + s.reserved + n > l.max {
            self.fills_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Full {
                needed: n,
                message: format!(
                    "the cache budget of {} bytes cannot hold {n} more bytes: {} are held, {} \
                     reserved by fills in flight, and the rest is pinned or being read",
                    l.max,
                    s.used(),
                    s.reserved
                ),
            });
        }
        s.reserved += n;
        Ok(())
    }

    /// Evicts down to the low watermark if the cache is above the high one (e.g. after blobs
    /// that were in use became free). Blocking.
    pub fn maybe_evict(&self, ev: &dyn Evictor) -> u64 {
        let mut s = self.lock();
        if s.used() + s.reserved > self.limits.high {
            let target = self.limits.low.saturating_sub(s.reserved);
            return self.evict_locked(&mut s, target, ev);
        }
        0
    }

    /// Evicts unpinned, unused blobs, least recently used first, until `used <= target`.
    /// Runs under the state lock, so no lease can be taken on a victim meanwhile.
    fn evict_locked(&self, s: &mut State, target: u64, ev: &dyn Evictor) -> u64 {
        let mut freed = 0;
        if s.used() <= target {
            return 0;
        }
        for v in victims_locked(s, target, ev) {
            match ev.delete(&v) {
                Ok(()) => {
                    if let Some(e) = s.blobs.remove(&v.hex) {
                        s.order.remove(&(e.tick, v.hex.clone()));
                        s.blob_bytes -= e.size;
                    }
                    s.dirty.insert(blob_key(&v.hex), None);
                    freed += v.size;
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    self.evicted_bytes.fetch_add(v.size, Ordering::Relaxed);
                    crate::metrics::metrics().blob_evicted(v.size);
                    tracing::info!(digest = %format!("sha256:{}", v.hex), bytes = v.size, "evicted blob");
                }
                Err(e) => {
                    tracing::warn!(digest = %format!("sha256:{}", v.hex), error = %e, "could not evict blob");
                }
            }
        }
        s.publish_gauges();
        freed
    }

    /// What eviction would remove, in order, to free `bytes` now: the same choice
    /// [`Budget::reserve`] makes (least recently used first; pinned, leased and filling blobs
    /// skipped), without removing anything. Fewer bytes than asked when not enough is evictable.
    pub fn eviction_preview(&self, bytes: u64, ev: &dyn Evictor) -> Vec<Victim> {
        let s = self.lock();
        let target = s.used().saturating_sub(bytes);
        victims_locked(&s, target, ev)
    }

    /// A committed blob's size, if the budget accounts it.
    pub fn blob_size(&self, hex: &str) -> Option<u64> {
        self.lock().blobs.get(hex).map(|e| e.size)
    }

    /// Blobs in least-recently-used-first order with their ticks (for tests and `ls`).
    pub fn lru_order(&self) -> Vec<(String, u64)> {
        self.lock()
            .order
            .iter()
            .map(|(t, h)| (h.clone(), *t))
            .collect()
    }

    pub fn stats(&self) -> CacheStats {
        let s = self.lock();
        let pinned_blob_bytes = s
            .pinned
            .iter()
            .filter_map(|h| s.blobs.get(h))
            .map(|e| e.size)
            .sum();
        CacheStats {
            budget_bytes: self.limits.max,
            size_bytes: s.used(),
            blob_bytes: s.blob_bytes,
            manifest_bytes: s.manifest_bytes,
            reserved_bytes: s.reserved,
            blob_count: s.blobs.len() as u64,
            pinned_blob_bytes,
            evictions: self.evictions.load(Ordering::Relaxed),
            evicted_bytes: self.evicted_bytes.load(Ordering::Relaxed),
            fills_refused: self.fills_refused.load(Ordering::Relaxed),
        }
    }
}

/// The blobs to evict, in order, until `used <= target`: least recently used first, skipping
/// pinned ones, leased ones and those a fill's readers still hold.
fn victims_locked(s: &State, target: u64, ev: &dyn Evictor) -> Vec<Victim> {
    let mut victims = Vec::new();
    let mut projected = s.used();
    for (_, hex) in s.order.iter() {
        if projected <= target {
            break;
        }
        if s.pinned.contains(hex) || s.readers.contains_key(hex) || ev.held_by_fill(hex) {
            continue;
        }
        let size = s.blobs.get(hex).map(|e| e.size).unwrap_or(0);
        projected = projected.saturating_sub(size);
        victims.push(Victim {
            hex: hex.clone(),
            size,
        });
    }
    victims
}

/// Bytes of blobs that eviction may remove now (not pinned, leased or held by a fill).
fn evictable(s: &State, ev: &dyn Evictor) -> u64 {
    s.order
        .iter()
        .filter(|(_, h)| !(s.pinned.contains(h) || s.readers.contains_key(h) || ev.held_by_fill(h)))
        .filter_map(|(_, h)| s.blobs.get(h))
        .map(|e| e.size)
        .sum()
}

fn touch_blob(s: &mut State, hex: &str) {
    let tick = s.bump();
    if let Some(e) = s.blobs.get_mut(hex) {
        let old = e.tick;
        e.tick = tick;
        s.order.remove(&(old, hex.to_owned()));
        s.order.insert((tick, hex.to_owned()));
        s.dirty
            .insert(blob_key(hex), Some((tick, crate::cache::index::unix_now())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Recorder {
        deleted: StdMutex<Vec<String>>,
        held: HashSet<String>,
    }

    impl Evictor for Recorder {
        fn held_by_fill(&self, hex: &str) -> bool {
            self.held.contains(hex)
        }
        fn delete(&self, v: &Victim) -> std::io::Result<()> {
            self.deleted.lock().unwrap().push(v.hex.clone());
            Ok(())
        }
        fn available_space(&self) -> Option<u64> {
            None
        }
    }

    fn budget(max: u64) -> Arc<Budget> {
        Arc::new(Budget::new(Limits::new(max, 0.9, 0.5)))
    }

    #[test]
    fn evicts_least_recently_used_first_down_to_the_low_watermark() {
        let b = budget(100);
        for (i, h) in ["a", "b", "c", "d"].iter().enumerate() {
            b.reserve(20, &Recorder::default()).unwrap();
            b.commit(h, 20, 20);
            assert_eq!(b.stats().size_bytes, 20 * (i as u64 + 1));
        }
        drop(b.lease("a")); // a is now the most recently used
        let ev = Recorder::default();
        b.reserve(20, &ev).unwrap(); // 80 + 20 > 90: evict to 50 - 20 = 30
        assert_eq!(*ev.deleted.lock().unwrap(), vec!["b", "c", "d"]);
        assert_eq!(b.stats().size_bytes, 20);
        assert_eq!(b.stats().reserved_bytes, 20);
        assert_eq!(b.stats().evictions, 3);
    }

    #[test]
    fn never_evicts_pinned_or_leased_blobs_and_refuses_what_cannot_fit() {
        let b = budget(100);
        for h in ["a", "b", "c", "d"] {
            b.reserve(20, &Recorder::default()).unwrap();
            b.commit(h, 20, 20);
        }
        b.set_pinned(["a".to_owned()].into());
        let lease = b.lease("b");
        let ev = Recorder {
            held: ["c".to_owned()].into(),
            ..Default::default()
        };
        b.reserve(15, &ev).unwrap(); // 80 + 15 > 90: only d may go
        assert_eq!(*ev.deleted.lock().unwrap(), vec!["d"]);
        let e = b.reserve(50, &ev).unwrap_err();
        assert!(e.message.contains("budget"), "{}", e.message);
        assert_eq!(b.stats().fills_refused, 1);
        assert_eq!(
            ev.deleted.lock().unwrap().len(),
            1,
            "nothing evicted for a refused fill"
        );
        drop(lease);
        b.release(15);
        let ev = Recorder::default();
        // b was leased after c was committed, so c is the older one.
        b.reserve(50, &ev).unwrap();
        assert_eq!(*ev.deleted.lock().unwrap(), vec!["c", "b"]);
    }

    #[test]
    fn recency_updates_are_batched_until_taken() {
        let b = budget(100);
        b.commit("a", 0, 1);
        drop(b.lease("a"));
        drop(b.lease("a"));
        let d = b.take_dirty();
        assert_eq!(d.len(), 1);
        assert!(b.take_dirty().is_empty());
        b.forget_blob("a");
        assert_eq!(b.take_dirty().get(&blob_key("a")), Some(&None));
    }
}
