//! The byte budget: what the cache holds, in which order it was last used, and eviction.
//!
//! [`Budget`] keeps every committed blob's size in memory, in LRU order (a list linked through
//! compact slots, see `Blobs`), plus the bytes of stored manifests and the bytes
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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

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

/// A blob's digest bytes (sha256), the budget's key: 32 bytes rather than a 64-character string.
pub type Key = [u8; 32];

/// The key of a blob by hex; `None` if `hex` is not 64 hex digits.
pub fn key_of(hex: &str) -> Option<Key> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(hex, &mut k).ok()?;
    Some(k)
}

/// One accounted blob: 48 bytes.
#[derive(Clone, Copy, Debug)]
struct Slot {
    key: Key,
    /// Size in bytes; the top bit ([`WAITING`]) marks a blob loaded from the index and not yet
    /// placed in the LRU list.
    size: u64,
    /// Neighbours in the LRU list (toward least / most recently used; [`NIL`] at the ends) —
    /// or, while the blob waits to be placed, its persisted tick (high and low halves).
    prev: u32,
    next: u32,
}

/// No slot: the end of the LRU list.
const NIL: u32 = u32::MAX;
/// The flag in [`Slot::size`] of a blob waiting to be placed by recency.
const WAITING: u64 = 1 << 63;

impl Slot {
    fn size(&self) -> u64 {
        self.size & !WAITING
    }
    fn waiting(&self) -> bool {
        self.size & WAITING != 0
    }
    /// The persisted tick of a waiting blob.
    fn tick(&self) -> u64 {
        (u64::from(self.prev) << 32) | u64::from(self.next)
    }
}

/// The accounted blobs, compact: ~58 bytes each at a million (a 48-byte slot and a hash-table
/// entry of 4 bytes plus a control byte, at most half empty). A blob is named by its slot's
/// index (`u32`). Recency is an intrusive doubly linked list through the slots: a use moves a
/// blob to the most recently used end, eviction walks from the other, and neither allocates.
/// Blobs loaded from the index wait outside the list with their persisted tick until
/// [`Blobs::place_waiting`] sorts them in, before everything used since.
struct Blobs {
    /// Slots by id; ids in `free` are unused.
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Ids, hashed by their slot's key.
    table: hashbrown::HashTable<u32>,
    hasher: std::collections::hash_map::RandomState,
    /// Least and most recently used ends of the list.
    head: u32,
    tail: u32,
    /// Slots waiting to be placed.
    waiting: usize,
}

impl Default for Blobs {
    fn default() -> Blobs {
        Blobs {
            slots: Vec::new(),
            free: Vec::new(),
            table: hashbrown::HashTable::new(),
            hasher: Default::default(),
            head: NIL,
            tail: NIL,
            waiting: 0,
        }
    }
}

impl Blobs {
    fn hash(&self, key: &Key) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn reserve(&mut self, n: usize) {
        self.slots.reserve(n.saturating_sub(self.free.len()));
        let hasher = self.hasher.clone();
        let slots = &self.slots;
        self.table.reserve(n, |id| {
            use std::hash::BuildHasher;
            hasher.hash_one(slots[*id as usize].key)
        });
    }

    fn id(&self, key: &Key) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(self.hash(key), |id| slots[*id as usize].key == *key)
            .copied()
    }

    fn get(&self, key: &Key) -> Option<Slot> {
        self.id(key).map(|id| self.slots[id as usize])
    }

    /// Links a slot that is in no list at the most recently used end.
    fn push_back(&mut self, id: u32) {
        let tail = self.tail;
        let slot = &mut self.slots[id as usize];
        (slot.prev, slot.next) = (tail, NIL);
        match tail {
            NIL => self.head = id,
            t => self.slots[t as usize].next = id,
        }
        self.tail = id;
    }

    /// Links a slot that is in no list at the least recently used end.
    fn push_front(&mut self, id: u32) {
        let head = self.head;
        let slot = &mut self.slots[id as usize];
        (slot.prev, slot.next) = (NIL, head);
        match head {
            NIL => self.tail = id,
            h => self.slots[h as usize].prev = id,
        }
        self.head = id;
    }

    /// Takes a slot out of the list, or out of the waiting ones.
    fn unlink(&mut self, id: u32) {
        let slot = self.slots[id as usize];
        if slot.waiting() {
            self.slots[id as usize].size = slot.size();
            self.waiting -= 1;
            return;
        }
        match slot.prev {
            NIL => self.head = slot.next,
            p => self.slots[p as usize].next = slot.next,
        }
        match slot.next {
            NIL => self.tail = slot.prev,
            n => self.slots[n as usize].prev = slot.prev,
        }
    }

    /// A new slot for `key` (not accounted yet), in no list.
    fn new_slot(&mut self, key: Key, size: u64) -> u32 {
        let slot = Slot {
            key,
            size: size & !WAITING,
            prev: NIL,
            next: NIL,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let hash = self.hash(&key);
        let hasher = self.hasher.clone();
        let slots = &self.slots;
        self.table.insert_unique(hash, id, |id| {
            use std::hash::BuildHasher;
            hasher.hash_one(slots[*id as usize].key)
        });
        id
    }

    /// Inserts or replaces a blob, as the most recently used (`front`: the least); returns the
    /// replaced slot's size.
    fn insert(&mut self, key: Key, size: u64, front: bool) -> Option<u64> {
        let (id, old) = match self.id(&key) {
            Some(id) => {
                let old = self.slots[id as usize].size();
                self.unlink(id);
                self.slots[id as usize].size = size & !WAITING;
                (id, Some(old))
            }
            None => (self.new_slot(key, size), None),
        };
        if front {
            self.push_front(id);
        } else {
            self.push_back(id);
        }
        old
    }

    /// Inserts a blob that waits, with its persisted tick, to be placed by
    /// [`Blobs::place_waiting`]. `key` must not be accounted yet.
    fn insert_waiting(&mut self, key: Key, size: u64, tick: u64) {
        let id = self.new_slot(key, size);
        let slot = &mut self.slots[id as usize];
        slot.size |= WAITING;
        (slot.prev, slot.next) = ((tick >> 32) as u32, tick as u32);
        self.waiting += 1;
    }

    /// Places the waiting blobs by their persisted ticks, all before the blobs in the list
    /// (used since they were persisted).
    fn place_waiting(&mut self) {
        if self.waiting == 0 {
            return;
        }
        let mut ids: Vec<u32> = Vec::with_capacity(self.waiting);
        let table = &self.table;
        ids.extend(
            table
                .iter()
                .copied()
                .filter(|id| self.slots[*id as usize].waiting()),
        );
        ids.sort_unstable_by_key(|id| self.slots[*id as usize].tick());
        for &id in ids.iter().rev() {
            let slot = &mut self.slots[id as usize];
            slot.size = slot.size();
            self.push_front(id);
        }
        self.waiting = 0;
    }

    fn remove(&mut self, key: &Key) -> Option<Slot> {
        let slots = &self.slots;
        let entry = self
            .table
            .find_entry(self.hash(key), |id| slots[*id as usize].key == *key)
            .ok()?;
        let (id, _) = entry.remove();
        self.unlink(id);
        self.free.push(id);
        Some(self.slots[id as usize])
    }

    /// Marks a blob used now (the most recently used); false if it is not accounted.
    fn touch(&mut self, key: &Key) -> bool {
        let Some(id) = self.id(key) else {
            return false;
        };
        self.unlink(id);
        self.push_back(id);
        true
    }

    /// Slots in the list, least recently used first (waiting ones are not in it yet).
    fn by_recency(&self) -> impl Iterator<Item = &Slot> + '_ {
        let mut id = self.head;
        std::iter::from_fn(move || {
            let slot = self.slots.get(id as usize)?;
            id = slot.next;
            Some(slot)
        })
    }
}

#[derive(Default)]
struct State {
    blobs: Blobs,
    clock: u64,
    blob_bytes: u64,
    manifest_bytes: u64,
    reserved: u64,
    readers: HashMap<String, usize>,
    pinned: HashSet<String>,
    dirty: HashMap<Vec<u8>, AccessUpdate>,
    /// While the index is being loaded (see [`Budget::begin_loading`]): uses of blobs not loaded
    /// yet (they load as used now) and blobs dropped meanwhile (they do not load).
    loading: Option<Loading>,
}

#[derive(Default)]
struct Loading {
    touched: HashSet<Key>,
    forgotten: HashSet<Key>,
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
    /// Accounts a blob as the most recently used (`front`: the least), replacing any previous
    /// accounting of it.
    fn put(&mut self, key: Key, size: u64, front: bool) {
        if let Some(old) = self.blobs.insert(key, size, front) {
            self.blob_bytes -= old;
        }
        self.blob_bytes += size;
    }
    fn forget(&mut self, key: &Key) {
        if let Some(slot) = self.blobs.remove(key) {
            self.blob_bytes -= slot.size();
        }
        if let Some(l) = self.loading.as_mut() {
            l.forgotten.insert(*key);
        }
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
    /// Signalled when loading ends.
    loaded: Condvar,
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
            loaded: Condvar::new(),
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

    /// The state once loading is over (see [`Budget::begin_loading`]): what eviction needs.
    fn lock_loaded(&self) -> MutexGuard<'_, State> {
        let mut s = self.lock();
        while s.loading.is_some() {
            s = self.loaded.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s
    }

    /// Accounts a blob adopted by reconciliation if `adopt()` says so, as the least recently
    /// used (its last use is unknown). Runs `adopt` under the budget's lock, which eviction holds
    /// while it deletes: a blob being evicted is not adopted back.
    pub fn adopt_blob(&self, hex: &str, size: u64, adopt: impl FnOnce() -> bool) -> bool {
        let Some(key) = key_of(hex) else { return false };
        let mut s = self.lock();
        if !adopt() {
            return false;
        }
        s.put(key, size, true);
        s.publish_gauges();
        true
    }

    /// From now until [`Budget::finish_loading`], blobs are loaded from the index while the
    /// cache serves: eviction (and so any reservation) waits for the end, a blob committed or
    /// dropped meanwhile keeps what happened to it, and one used meanwhile loads as used now.
    pub fn begin_loading(&self) {
        self.lock().loading = Some(Loading::default());
    }

    /// Loading is over: eviction may run.
    pub fn finish_loading(&self) {
        let mut s = self.lock();
        s.loading = None;
        s.blobs.place_waiting();
        s.publish_gauges();
        self.loaded.notify_all();
    }

    /// Whether blobs are still being loaded.
    pub fn loading(&self) -> bool {
        self.lock().loading.is_some()
    }

    /// Blocks until loading is over.
    pub fn wait_loaded(&self) {
        drop(self.lock_loaded());
    }

    /// Loads indexed blobs — (digest bytes, size, persisted tick) — under one lock. A blob
    /// already accounted keeps its accounting. While loading, they are placed by recency when it
    /// ends (before every blob used meanwhile); otherwise at once.
    pub fn load_blobs(&self, blobs: &[(Key, u64, u64)]) {
        let mut s = self.lock();
        s.blobs.reserve(blobs.len());
        for &(key, size, tick) in blobs {
            s.clock = s.clock.max(tick);
            if s.blobs.get(&key).is_some() {
                continue;
            }
            let touched = match s.loading.as_mut() {
                Some(l) if l.forgotten.contains(&key) => continue,
                Some(l) => l.touched.remove(&key),
                None => false,
            };
            if touched {
                let tick = s.bump();
                let mut buf = [0u8; 64];
                let access = blob_key(hex_of(&key, &mut buf));
                s.dirty
                    .insert(access, Some((tick, crate::cache::index::unix_now())));
                s.put(key, size, false);
            } else {
                s.blobs.insert_waiting(key, size, tick);
                s.blob_bytes += size;
            }
        }
        if s.loading.is_none() {
            s.blobs.place_waiting();
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
        key_of(hex).is_some_and(|k| self.lock().blobs.get(&k).is_some())
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
        if let Some(key) = key_of(hex) {
            s.put(key, size, false);
        }
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
        if let Some(key) = key_of(hex) {
            s.forget(&key);
        }
        s.dirty.insert(blob_key(hex), None);
        s.publish_gauges();
    }

    /// Reserves `n` bytes for a fill, evicting least recently used blobs if the total would cross
    /// the high watermark (down to the low one) or if the disk has less room than `n`. Fails if
    /// the budget cannot make room. Blocking: call from a blocking context.
    pub fn reserve(&self, n: u64, ev: &dyn Evictor) -> Result<(), Full> {
        let mut s = self.lock_loaded();
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
        let mut s = self.lock_loaded();
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
                    if let Some(key) = key_of(&v.hex) {
                        s.forget(&key);
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
        key_of(hex).and_then(|k| self.lock().blobs.get(&k).map(|e| e.size()))
    }

    /// Blobs in least-recently-used-first order.
    pub fn lru_order(&self) -> Vec<String> {
        self.lock()
            .blobs
            .by_recency()
            .map(|slot| hex::encode(slot.key))
            .collect()
    }

    pub fn stats(&self) -> CacheStats {
        let s = self.lock();
        let pinned_blob_bytes = s
            .pinned
            .iter()
            .filter_map(|h| s.blobs.get(&key_of(h)?))
            .map(|e| e.size())
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
    let mut buf = [0u8; 64];
    for slot in s.blobs.by_recency() {
        if projected <= target {
            break;
        }
        if in_use(s, ev, hex_of(&slot.key, &mut buf)) {
            continue;
        }
        projected = projected.saturating_sub(slot.size());
        victims.push(Victim {
            hex: hex_of(&slot.key, &mut buf).to_owned(),
            size: slot.size(),
        });
    }
    victims
}

/// Whether a blob may not be evicted now: pinned, leased or held by a fill.
fn in_use(s: &State, ev: &dyn Evictor, hex: &str) -> bool {
    s.pinned.contains(hex) || s.readers.contains_key(hex) || ev.held_by_fill(hex)
}

/// A key as hex, written into `buf` (no allocation per blob in eviction's scans).
fn hex_of<'a>(key: &Key, buf: &'a mut [u8; 64]) -> &'a str {
    match hex::encode_to_slice(key, buf) {
        Ok(()) => std::str::from_utf8(buf).unwrap_or(""),
        Err(_) => "",
    }
}

/// Bytes of blobs that eviction may remove now (not pinned, leased or held by a fill).
fn evictable(s: &State, ev: &dyn Evictor) -> u64 {
    let mut buf = [0u8; 64];
    s.blobs
        .by_recency()
        .filter(|slot| !in_use(s, ev, hex_of(&slot.key, &mut buf)))
        .map(|slot| slot.size())
        .sum()
}

fn touch_blob(s: &mut State, hex: &str) {
    let Some(key) = key_of(hex) else { return };
    let tick = s.bump();
    if s.blobs.touch(&key) {
        s.dirty
            .insert(blob_key(hex), Some((tick, crate::cache::index::unix_now())));
    } else if let Some(l) = s.loading.as_mut() {
        l.touched.insert(key);
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

    /// A blob's hex from a short name (`"a"` → 62 zeros and `61`).
    fn h(name: &str) -> String {
        format!("{:0>64}", hex::encode(name))
    }

    fn hs(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| h(n)).collect()
    }

    fn budget(max: u64) -> Arc<Budget> {
        Arc::new(Budget::new(Limits::new(max, 0.9, 0.5)))
    }

    #[test]
    fn evicts_least_recently_used_first_down_to_the_low_watermark() {
        let b = budget(100);
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            b.reserve(20, &Recorder::default()).unwrap();
            b.commit(&h(name), 20, 20);
            assert_eq!(b.stats().size_bytes, 20 * (i as u64 + 1));
        }
        drop(b.lease(&h("a"))); // a is now the most recently used
        let ev = Recorder::default();
        b.reserve(20, &ev).unwrap(); // 80 + 20 > 90: evict to 50 - 20 = 30
        assert_eq!(*ev.deleted.lock().unwrap(), hs(&["b", "c", "d"]));
        assert_eq!(b.stats().size_bytes, 20);
        assert_eq!(b.stats().reserved_bytes, 20);
        assert_eq!(b.stats().evictions, 3);
    }

    #[test]
    fn never_evicts_pinned_or_leased_blobs_and_refuses_what_cannot_fit() {
        let b = budget(100);
        for name in ["a", "b", "c", "d"] {
            b.reserve(20, &Recorder::default()).unwrap();
            b.commit(&h(name), 20, 20);
        }
        b.set_pinned([h("a")].into());
        let lease = b.lease(&h("b"));
        let ev = Recorder {
            held: [h("c")].into(),
            ..Default::default()
        };
        b.reserve(15, &ev).unwrap(); // 80 + 15 > 90: only d may go
        assert_eq!(*ev.deleted.lock().unwrap(), hs(&["d"]));
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
        assert_eq!(*ev.deleted.lock().unwrap(), hs(&["c", "b"]));
    }

    fn key(name: &str) -> Key {
        key_of(&h(name)).unwrap()
    }

    #[test]
    fn loading_keeps_what_happened_meanwhile_and_holds_eviction_back() {
        let b = budget(100);
        b.begin_loading();
        b.commit(&h("new"), 0, 10); // committed while loading: keeps its accounting
        drop(b.lease(&h("used"))); // used before it loaded: loads as used now
        b.forget_blob(&h("gone")); // dropped before it loaded: does not load
        b.load_blobs(&[
            (key("old"), 20, 0),
            (key("used"), 20, 0),
            (key("gone"), 20, 3),
            (key("new"), 99, 4),
        ]);
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.reserve(25, &Recorder::default()))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!waiter.is_finished(), "a reservation ran while loading");
        b.finish_loading();
        waiter.join().unwrap().unwrap();
        let order: Vec<String> = b.lru_order();
        assert_eq!(order, hs(&["old", "new", "used"]));
        assert_eq!(b.stats().blob_bytes, 50);
    }

    #[test]
    fn loaded_blobs_take_their_place_by_persisted_tick_and_slots_are_reused() {
        let b = budget(1000);
        b.begin_loading();
        b.load_blobs(&[(key("c"), 1, 30), (key("a"), 2, 10), (key("d"), 4, 0)]);
        b.load_blobs(&[(key("b"), 8, 20), (key("e"), 16, 40)]);
        assert!(b.lru_order().is_empty(), "placed only when loading ends");
        b.forget_blob(&h("b")); // a waiting blob goes without a trace
        drop(b.lease(&h("a"))); // a waiting blob used: the most recent
        b.commit(&h("f"), 0, 32); // reuses b's slot
        b.finish_loading();
        assert_eq!(b.lru_order(), hs(&["d", "c", "e", "a", "f"]));
        assert_eq!(b.stats().blob_bytes, 1 + 2 + 4 + 16 + 32);
        assert_eq!(b.blob_size(&h("f")), Some(32));
        // Loaded outside a loading phase: placed at once, before what was used.
        b.load_blobs(&[(key("g"), 64, 1)]);
        assert_eq!(b.lru_order(), hs(&["g", "d", "c", "e", "a", "f"]));
        for name in ["d", "a", "g"] {
            b.forget_blob(&h(name));
        }
        drop(b.lease(&h("c")));
        assert_eq!(b.lru_order(), hs(&["e", "f", "c"]));
        assert_eq!(b.stats().blob_count, 3);
        assert_eq!(b.stats().blob_bytes, 1 + 16 + 32);
        let ev = Recorder::default();
        assert_eq!(b.maybe_evict(&ev), 0);
        b.reserve(900, &ev).unwrap(); // 49 + 900 > 900: evict to 500 - 900 = 0
        assert_eq!(*ev.deleted.lock().unwrap(), hs(&["e", "f", "c"]));
        assert!(b.lru_order().is_empty());
    }

    #[test]
    fn recency_updates_are_batched_until_taken() {
        let b = budget(100);
        b.commit(&h("a"), 0, 1);
        drop(b.lease(&h("a")));
        drop(b.lease(&h("a")));
        let d = b.take_dirty();
        assert_eq!(d.len(), 1);
        assert!(b.take_dirty().is_empty());
        b.forget_blob(&h("a"));
        assert_eq!(b.take_dirty().get(&blob_key(&h("a"))), Some(&None));
    }
}
