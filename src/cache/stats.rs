//! What each repository costs and earns: per (upstream, repository) and per tag counters (pulls,
//! blob bytes served, bytes fetched upstream, last pulled), the request totals since start and a
//! 24-hour history at 5-minute resolution, and [`Footprint`]: the size on disk of each
//! repository and tag.
//!
//! Counters are atomics behind an `Arc` each, found once per request (a read lock on a map) and
//! then bumped without a lock, so a blob stream counts its chunks for free. They are written to
//! sled's `stats` tree in one batch by `Cache::flush_access` (with recency, by the housekeeping
//! task and at shutdown), never per request, and read back at open: they survive restarts. A
//! crash loses at most one flush interval of counts.
//!
//! Sizes are derived, not counted: [`Footprint`] walks the tags' manifest closures (references
//! of each manifest parsed once and kept, manifests being immutable) and weighs the blobs the
//! budget holds. A blob shared by several repositories is attributed to each of them (and
//! reported as shared), and counted once in the cache's totals. The footprint is rebuilt only
//! when the cache changed (tags, manifests, blobs, pins) or after [`FOOTPRINT_MAX_AGE`]; a
//! listing sorts the rows it already has.
//!
//! The history and the totals since start live in memory only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::index::unix_now;
use super::{Cache, CacheError};
use crate::oci::{references, Digest};

/// Width of one history bucket.
pub const BUCKET_SECS: u64 = 300;
/// Buckets kept: 24 hours.
pub const BUCKETS: usize = 288;
/// A footprint older than this is rebuilt even if no change was noticed (changes made to the
/// index behind the cache's back, such as a tag upstream deleted).
pub const FOOTPRINT_MAX_AGE: Duration = Duration::from_secs(30);

/// The pseudo-upstream under which hosted repositories are counted.
pub const HOSTED: &str = "hosted";

/// (upstream, repository).
pub type RepoKey = (String, String);
/// (upstream, repository, tag).
pub type TagKey = (String, String, String);

/// The counters of one repository or tag.
#[derive(Default, Debug)]
pub struct Counters {
    pulls: AtomicU64,
    served: AtomicU64,
    fetched: AtomicU64,
    last_pulled: AtomicU64,
    dirty: AtomicBool,
}

/// The counters' values, as stored and reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterValues {
    /// Manifest GETs answered.
    pub pulls: u64,
    /// Blob body bytes sent to clients.
    pub bytes_served: u64,
    /// Bytes fetched from the upstream (blobs and manifests).
    pub bytes_fetched: u64,
    /// Unix seconds of the last pull (0: never).
    pub last_pulled: u64,
}

impl Counters {
    fn from_values(v: CounterValues) -> Counters {
        Counters {
            pulls: AtomicU64::new(v.pulls),
            served: AtomicU64::new(v.bytes_served),
            fetched: AtomicU64::new(v.bytes_fetched),
            last_pulled: AtomicU64::new(v.last_pulled),
            dirty: AtomicBool::new(false),
        }
    }

    pub fn values(&self) -> CounterValues {
        CounterValues {
            pulls: self.pulls.load(Ordering::Relaxed),
            bytes_served: self.served.load(Ordering::Relaxed),
            bytes_fetched: self.fetched.load(Ordering::Relaxed),
            last_pulled: self.last_pulled.load(Ordering::Relaxed),
        }
    }

    fn pull(&self, now: u64) {
        self.pulls.fetch_add(1, Ordering::Relaxed);
        self.last_pulled.fetch_max(now, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
    }
}

/// Request and byte totals (cumulative since start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Manifest and blob requests answered.
    pub requests: u64,
    /// Of those, answered from the cache.
    pub hits: u64,
    /// Blob bytes sent to clients.
    pub bytes_served: u64,
    /// Of those, sent from committed files (not tailing a fill).
    pub bytes_from_cache: u64,
    /// Bytes fetched from upstreams.
    pub bytes_fetched: u64,
}

impl Totals {
    fn minus(self, o: Totals) -> Totals {
        Totals {
            requests: self.requests.saturating_sub(o.requests),
            hits: self.hits.saturating_sub(o.hits),
            bytes_served: self.bytes_served.saturating_sub(o.bytes_served),
            bytes_from_cache: self.bytes_from_cache.saturating_sub(o.bytes_from_cache),
            bytes_fetched: self.bytes_fetched.saturating_sub(o.bytes_fetched),
        }
    }

    fn plus(self, o: Totals) -> Totals {
        Totals {
            requests: self.requests + o.requests,
            hits: self.hits + o.hits,
            bytes_served: self.bytes_served + o.bytes_served,
            bytes_from_cache: self.bytes_from_cache + o.bytes_from_cache,
            bytes_fetched: self.bytes_fetched + o.bytes_fetched,
        }
    }
}

#[derive(Default)]
struct AtomicTotals {
    requests: AtomicU64,
    hits: AtomicU64,
    served: AtomicU64,
    from_cache: AtomicU64,
    fetched: AtomicU64,
}

impl AtomicTotals {
    fn load(&self) -> Totals {
        Totals {
            requests: self.requests.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            bytes_served: self.served.load(Ordering::Relaxed),
            bytes_from_cache: self.from_cache.load(Ordering::Relaxed),
            bytes_fetched: self.fetched.load(Ordering::Relaxed),
        }
    }
}

/// One 5-minute bucket of the history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Unix seconds at which the bucket starts (a multiple of [`BUCKET_SECS`]).
    pub start: u64,
    #[serde(flatten)]
    pub totals: Totals,
}

/// The last 24 hours: what was counted between samples lands in the bucket of the sample.
#[derive(Default)]
struct History {
    buckets: VecDeque<Bucket>,
    sampled: Totals,
}

impl History {
    fn sample(&mut self, now: u64, totals: Totals) {
        let delta = totals.minus(self.sampled);
        self.sampled = totals;
        let start = now - now % BUCKET_SECS;
        match self.buckets.back_mut() {
            Some(b) if b.start == start => b.totals = b.totals.plus(delta),
            _ => self.buckets.push_back(Bucket {
                start,
                totals: delta,
            }),
        }
        let oldest = start.saturating_sub(BUCKET_SECS * (BUCKETS as u64 - 1));
        while self.buckets.front().is_some_and(|b| b.start < oldest) {
            self.buckets.pop_front();
        }
    }
}

/// Counts bytes for one repository (and the totals) as a stream or a fill moves them.
#[derive(Clone)]
pub struct Tally {
    cell: Arc<Counters>,
    activity: Arc<Activity>,
}

impl Tally {
    /// Blob bytes sent to a client; `from_cache`: from a committed file.
    pub fn served(&self, n: u64, from_cache: bool) {
        self.cell.served.fetch_add(n, Ordering::Relaxed);
        self.cell.dirty.store(true, Ordering::Relaxed);
        let t = &self.activity.totals;
        t.served.fetch_add(n, Ordering::Relaxed);
        if from_cache {
            t.from_cache.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Bytes fetched from the upstream for this repository.
    pub fn fetched(&self, n: u64) {
        self.cell.fetched.fetch_add(n, Ordering::Relaxed);
        self.cell.dirty.store(true, Ordering::Relaxed);
        self.activity.totals.fetched.fetch_add(n, Ordering::Relaxed);
    }
}

/// The activity of the cache: per-repository and per-tag counters, totals, history, and the
/// footprint built from the index.
#[derive(Default)]
pub struct Activity {
    repos: RwLock<HashMap<RepoKey, Arc<Counters>>>,
    tags: RwLock<HashMap<TagKey, Arc<Counters>>>,
    totals: AtomicTotals,
    history: Mutex<History>,
    /// Moves whenever tags, manifests, blobs or pins change (see [`Activity::changed`]).
    changes: AtomicU64,
    footprint: Mutex<Option<Built>>,
    refs: Mutex<HashMap<String, Arc<ManifestRefs>>>,
    /// Fills started on behalf of a repository, by blob hex (pruned as fills end).
    filling: Mutex<HashMap<String, RepoKey>>,
    /// Unix seconds of the process start.
    started: u64,
}

struct Built {
    fingerprint: (u64, u64, u64, u64, u64),
    at: Instant,
    footprint: Arc<Footprint>,
}

/// What one manifest references, kept parsed (manifests never change).
struct ManifestRefs {
    len: u64,
    blobs: Vec<String>,
    children: Vec<Digest>,
}

fn get_or_insert<K: std::hash::Hash + Eq + Clone>(
    map: &RwLock<HashMap<K, Arc<Counters>>>,
    key: &K,
) -> Arc<Counters> {
    if let Some(c) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        return c.clone();
    }
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.clone())
        .or_default()
        .clone()
}

fn repo_record_key(upstream: &str, repo: &str) -> Vec<u8> {
    format!("r{upstream}\0{repo}").into_bytes()
}

fn tag_record_key(upstream: &str, repo: &str, tag: &str) -> Vec<u8> {
    format!("t{upstream}\0{repo}\0{tag}").into_bytes()
}

impl Activity {
    /// Loads the counters stored in `records` (key, JSON value); unreadable records are skipped.
    pub fn load(records: impl Iterator<Item = (Vec<u8>, Vec<u8>)>) -> Activity {
        let a = Activity {
            started: unix_now(),
            ..Activity::default()
        };
        {
            let mut repos = a.repos.write().unwrap_or_else(|p| p.into_inner());
            let mut tags = a.tags.write().unwrap_or_else(|p| p.into_inner());
            for (k, v) in records {
                let Ok(values) = serde_json::from_slice::<CounterValues>(&v) else {
                    continue;
                };
                let key = String::from_utf8_lossy(&k[1.min(k.len())..]).into_owned();
                let parts: Vec<&str> = key.split('\0').collect();
                let cell = Arc::new(Counters::from_values(values));
                match (k.first(), parts.as_slice()) {
                    (Some(b'r'), [u, r]) => {
                        repos.insert((u.to_string(), r.to_string()), cell);
                    }
                    (Some(b't'), [u, r, t]) => {
                        tags.insert((u.to_string(), r.to_string(), t.to_string()), cell);
                    }
                    _ => {}
                }
            }
        }
        a
    }

    /// Unix seconds at which this process started counting.
    pub fn started(&self) -> u64 {
        self.started
    }

    /// A manifest request answered (`hit`: from the cache). A GET (`pull`) of `tag` (if by tag)
    /// counts as a pull of the repository and the tag; `fetched` manifest bytes came from the
    /// upstream to answer it.
    pub fn manifest_answered(
        &self,
        key: &RepoKey,
        tag: Option<&str>,
        pull: bool,
        hit: bool,
        fetched: u64,
    ) {
        self.request(hit);
        if pull {
            self.pulled(key, tag);
        }
        let cell = get_or_insert(&self.repos, key);
        if fetched > 0 {
            cell.fetched.fetch_add(fetched, Ordering::Relaxed);
            cell.dirty.store(true, Ordering::Relaxed);
            self.totals.fetched.fetch_add(fetched, Ordering::Relaxed);
        }
    }

    /// A blob request answered (`hit`: from the cache).
    pub fn request(&self, hit: bool) {
        self.totals.requests.fetch_add(1, Ordering::Relaxed);
        if hit {
            self.totals.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A pull of a repository (and of its tag, by tag), now. Hosted pulls count only this: the
    /// request and hit totals measure the cache.
    pub fn pulled(&self, key: &RepoKey, tag: Option<&str>) {
        let now = unix_now();
        get_or_insert(&self.repos, key).pull(now);
        if let Some(t) = tag {
            get_or_insert(&self.tags, &(key.0.clone(), key.1.clone(), t.to_owned())).pull(now);
        }
    }

    /// Blob bytes a hosted repository answered with: counted for the repository only, since
    /// the totals measure the cache against the upstream and pushed content is neither.
    pub fn hosted_served(&self, key: &RepoKey, n: u64) {
        let cell = get_or_insert(&self.repos, key);
        cell.served.fetch_add(n, Ordering::Relaxed);
        cell.dirty.store(true, Ordering::Relaxed);
    }

    /// The byte counter of a repository.
    pub fn tally(self: &Arc<Activity>, key: &RepoKey) -> Tally {
        Tally {
            cell: get_or_insert(&self.repos, key),
            activity: self.clone(),
        }
    }

    /// Notes that a fill of `hex` runs for the repository `key` (for the fills in flight).
    pub fn fill_for(&self, hex: &str, key: &RepoKey) {
        let mut f = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        f.insert(hex.to_owned(), key.clone());
    }

    /// The repository a fill in flight runs for, pruning fills no longer in `live`.
    pub fn fill_owners(&self, live: &HashSet<String>) -> HashMap<String, RepoKey> {
        let mut f = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        f.retain(|h, _| live.contains(h));
        f.clone()
    }

    /// A repository's counters (zero if never counted).
    pub fn repo(&self, key: &RepoKey) -> CounterValues {
        self.repos
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|c| c.values())
            .unwrap_or_default()
    }

    /// Every repository's counters.
    pub fn repos(&self) -> HashMap<RepoKey, CounterValues> {
        let repos = self.repos.read().unwrap_or_else(|p| p.into_inner());
        repos.iter().map(|(k, c)| (k.clone(), c.values())).collect()
    }

    /// A tag's counters (zero if never counted).
    pub fn tag(&self, key: &TagKey) -> CounterValues {
        self.tags
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|c| c.values())
            .unwrap_or_default()
    }

    /// Totals since start.
    pub fn totals(&self) -> Totals {
        self.totals.load()
    }

    /// Moves the totals counted since the last sample into the history's bucket of `now`.
    pub fn sample(&self, now: u64) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.sample(now, self.totals.load());
    }

    /// Moves the totals into the history (at `now`, unix seconds) and returns the buckets of the
    /// last 24 hours, oldest first.
    pub fn history(&self, now: u64) -> Vec<Bucket> {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.sample(now, self.totals.load());
        h.buckets.iter().copied().collect()
    }

    /// Notes a change of tags, manifests, blobs or pins: the footprint is rebuilt when next
    /// asked for.
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets a removed manifest's parsed references.
    pub fn forget_manifest(&self, hex: &str) {
        self.refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hex);
        self.changed();
    }

    /// Forgets the counters of a repository and its tags (its content was purged).
    pub fn forget(&self, key: &RepoKey, tag: Option<&str>) -> Vec<Vec<u8>> {
        let mut gone = Vec::new();
        if tag.is_none() {
            self.repos
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
            gone.push(repo_record_key(&key.0, &key.1));
        }
        let mut tags = self.tags.write().unwrap_or_else(|p| p.into_inner());
        tags.retain(|(u, r, t), _| {
            let drop = *u == key.0 && *r == key.1 && tag.is_none_or(|x| x == t);
            if drop {
                gone.push(tag_record_key(u, r, t));
            }
            !drop
        });
        self.changed();
        gone
    }

    /// The counters changed since the last flush, as (key, JSON value); marks them clean.
    pub fn take_dirty(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut take = |key: Vec<u8>, c: &Counters| {
            if c.dirty.swap(false, Ordering::Relaxed) {
                if let Ok(v) = serde_json::to_vec(&c.values()) {
                    out.push((key, v));
                }
            }
        };
        for ((u, r), c) in self.repos.read().unwrap_or_else(|p| p.into_inner()).iter() {
            take(repo_record_key(u, r), c);
        }
        for ((u, r, t), c) in self.tags.read().unwrap_or_else(|p| p.into_inner()).iter() {
            take(tag_record_key(u, r, t), c);
        }
        out
    }

    /// Marks the counters of these records dirty again (their write failed).
    pub fn restore_dirty(&self, keys: &[Vec<u8>]) {
        let keys: HashSet<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        for ((u, r), c) in self.repos.read().unwrap_or_else(|p| p.into_inner()).iter() {
            if keys.contains(repo_record_key(u, r).as_slice()) {
                c.dirty.store(true, Ordering::Relaxed);
            }
        }
        for ((u, r, t), c) in self.tags.read().unwrap_or_else(|p| p.into_inner()).iter() {
            if keys.contains(tag_record_key(u, r, t).as_slice()) {
                c.dirty.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// The size on disk of a repository or a tag: the manifests and the blobs the cache holds of
/// what its tags reach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Size {
    /// Blob and manifest bytes held.
    pub bytes: u64,
    /// Of `bytes`, those of blobs another repository references too.
    pub shared_bytes: u64,
    /// Blobs held.
    pub blobs: u64,
    /// Manifests held.
    pub manifests: u64,
    /// Whether a pin holds any manifest it reaches.
    pub pinned: bool,
}

/// A repository of the cache with its size.
#[derive(Clone, Debug, Default)]
pub struct RepoSize {
    pub size: Size,
    /// Tags cached.
    pub tags: u64,
    /// Unix seconds when the repository was first cached (0: unknown).
    pub first_cached: u64,
}

/// Sizes of every cached repository and tag, and which repositories reference each blob.
#[derive(Debug, Default)]
pub struct Footprint {
    pub repos: HashMap<RepoKey, RepoSize>,
    pub tags: HashMap<TagKey, Size>,
    /// Blob hex → the repositories whose tags reach it.
    pub blob_repos: HashMap<String, Vec<RepoKey>>,
    /// Manifests (hex) the pins hold.
    pub pinned_manifests: HashSet<String>,
}

/// Manifests (hex) and blobs (hex) a tag reaches.
#[derive(Default)]
struct Reach {
    manifests: HashSet<String>,
    blobs: HashSet<String>,
}

impl Cache {
    /// The sizes of every repository and tag, rebuilt if the cache changed since the last
    /// build. Blocking (reads the index).
    pub fn footprint(&self) -> Result<Arc<Footprint>, CacheError> {
        let a = &self.activity;
        let s = self.budget.stats();
        let fingerprint = (
            a.changes.load(Ordering::Relaxed),
            s.blob_count,
            s.blob_bytes,
            s.manifest_bytes,
            s.evictions,
        );
        {
            let built = a.footprint.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = built.as_ref() {
                if b.fingerprint == fingerprint && b.at.elapsed() < FOOTPRINT_MAX_AGE {
                    return Ok(b.footprint.clone());
                }
            }
        }
        let footprint = Arc::new(self.build_footprint()?);
        *a.footprint.lock().unwrap_or_else(|p| p.into_inner()) = Some(Built {
            fingerprint,
            at: Instant::now(),
            footprint: footprint.clone(),
        });
        Ok(footprint)
    }

    fn build_footprint(&self) -> Result<Footprint, CacheError> {
        let (pinned_manifests, _) = self.pinned_closure()?;
        let mut reach: HashMap<RepoKey, (Reach, u64)> = HashMap::new();
        let mut tag_reach: Vec<(TagKey, Reach)> = Vec::new();
        for t in self.index.tags()? {
            let Ok(root) = t.entry.digest.parse::<Digest>() else {
                continue;
            };
            let r = self.reach(&root)?;
            let key = (t.upstream.clone(), t.repo.clone());
            let (repo, tags) = reach.entry(key).or_default();
            repo.manifests.extend(r.manifests.iter().cloned());
            repo.blobs.extend(r.blobs.iter().cloned());
            *tags += 1;
            tag_reach.push(((t.upstream, t.repo, t.tag), r));
        }
        let mut f = Footprint {
            pinned_manifests,
            ..Footprint::default()
        };
        for (key, (r, _)) in &reach {
            for hex in &r.blobs {
                f.blob_repos
                    .entry(hex.clone())
                    .or_default()
                    .push(key.clone());
            }
        }
        for (entry, first_cached) in self.index.repos_first_cached()? {
            let key = (entry.upstream, entry.repo);
            let (size, tags) = match reach.get(&key) {
                Some((r, tags)) => (self.weigh(r, &f), *tags),
                None => (Size::default(), 0),
            };
            f.repos.insert(
                key,
                RepoSize {
                    size,
                    tags,
                    first_cached,
                },
            );
        }
        for (key, r) in tag_reach {
            let size = self.weigh(&r, &f);
            f.tags.insert(key, size);
        }
        Ok(f)
    }

    /// What the bytes of `r` weigh now (blobs the budget holds, manifests stored).
    fn weigh(&self, r: &Reach, f: &Footprint) -> Size {
        let mut size = Size::default();
        let refs = self.activity.refs.lock().unwrap_or_else(|p| p.into_inner());
        for hex in &r.manifests {
            if let Some(m) = refs.get(hex) {
                size.bytes += m.len;
                size.manifests += 1;
            }
            size.pinned |= f.pinned_manifests.contains(hex);
        }
        drop(refs);
        for hex in &r.blobs {
            if let Some(n) = self.budget.blob_size(hex) {
                size.bytes += n;
                size.blobs += 1;
                if f.blob_repos.get(hex).is_some_and(|v| v.len() > 1) {
                    size.shared_bytes += n;
                }
            }
        }
        size
    }

    /// The manifests and blobs reachable from `root` that the index holds manifests of.
    fn reach(&self, root: &Digest) -> Result<Reach, CacheError> {
        let mut out = Reach::default();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            if out.manifests.contains(d.hex()) {
                continue;
            }
            let Some(refs) = self.manifest_refs(&d)? else {
                continue;
            };
            out.manifests.insert(d.hex().to_owned());
            out.blobs.extend(refs.blobs.iter().cloned());
            stack.extend(refs.children.iter().cloned());
        }
        Ok(out)
    }

    /// The parsed references of a stored manifest, parsed once.
    fn manifest_refs(&self, d: &Digest) -> Result<Option<Arc<ManifestRefs>>, CacheError> {
        let memo = &self.activity.refs;
        if let Some(r) = memo.lock().unwrap_or_else(|p| p.into_inner()).get(d.hex()) {
            return Ok(Some(r.clone()));
        }
        let Some(m) = self.index.manifest(d)? else {
            return Ok(None);
        };
        let parsed = references(&m.bytes);
        let r = Arc::new(ManifestRefs {
            len: m.bytes.len() as u64,
            blobs: parsed
                .blobs
                .iter()
                .map(|(b, _)| b.hex().to_owned())
                .collect(),
            children: parsed.children,
        });
        memo.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(d.hex().to_owned(), r.clone());
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{StoredManifest, TagEntry};
    use crate::oci::{RepoName, Tag};

    fn open(dir: &std::path::Path) -> Cache {
        let mut storage = crate::config::Config::from_toml("").unwrap().storage;
        storage.path = dir.to_owned();
        Cache::open(&storage).unwrap()
    }

    /// Writes blob files before the cache opens (adopted at open) and returns their hex.
    fn blob_files(dir: &std::path::Path, blobs: &[&[u8]]) -> Vec<String> {
        blobs
            .iter()
            .map(|b| {
                let d = Digest::of(b);
                let p = dir.join("blobs/sha256").join(&d.hex()[..2]).join(d.hex());
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, b).unwrap();
                d.hex().to_owned()
            })
            .collect()
    }

    fn image(cache: &Cache, repo: &str, tag: &str, blobs: &[&str]) -> Digest {
        let layers: Vec<String> = blobs
            .iter()
            .map(|h| format!(r#"{{"digest":"sha256:{h}","size":1}}"#))
            .collect();
        let bytes = format!(r#"{{"schemaVersion":2,"layers":[{}]}}"#, layers.join(","));
        let m = StoredManifest {
            digest: Digest::of(bytes.as_bytes()),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: bytes::Bytes::from(bytes),
        };
        let digest = m.digest.clone();
        cache.put_manifest(m).unwrap();
        let (r, t): (RepoName, Tag) = (repo.parse().unwrap(), tag.parse().unwrap());
        let e = TagEntry {
            digest: digest.to_string(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked: 0,
            variants: Default::default(),
        };
        cache.put_tag("docker.io", &r, &t, &e).unwrap();
        cache.touch_repo("docker.io", &r).unwrap();
        digest
    }

    fn key(repo: &str) -> RepoKey {
        ("docker.io".into(), repo.into())
    }

    #[test]
    fn shared_blobs_count_in_each_repository_and_once_in_the_totals() {
        let dir = tempfile::tempdir().unwrap();
        let hex = blob_files(dir.path(), &[&[1u8; 1000], &[2u8; 300], &[3u8; 50]]);
        let cache = open(dir.path());
        let ma = image(&cache, "a/one", "1", &[&hex[0], &hex[1]]);
        image(&cache, "b/two", "1", &[&hex[0], &hex[2]]);
        let f = cache.footprint().unwrap();
        let a = &f.repos[&key("a/one")];
        let b = &f.repos[&key("b/two")];
        let len_a = cache.index().manifest(&ma).unwrap().unwrap().bytes.len() as u64;
        assert_eq!(a.size.bytes, 1300 + len_a);
        assert_eq!((a.size.blobs, a.size.manifests, a.tags), (2, 1, 1));
        assert_eq!(a.size.shared_bytes, 1000);
        assert_eq!(b.size.shared_bytes, 1000);
        assert!(a.first_cached > 0);
        assert_eq!(f.blob_repos[&hex[0]].len(), 2);
        assert_eq!(cache.stats().blob_bytes, 1350, "once in the totals");
        let t = f.tags[&("docker.io".into(), "a/one".into(), "1".into())];
        assert_eq!(t.bytes, a.size.bytes);
        assert!(!t.pinned);

        // A blob leaving the cache leaves the sizes; a pin shows.
        cache
            .remove_blob(&format!("sha256:{}", hex[1]).parse().unwrap())
            .unwrap();
        cache
            .index()
            .put_pin(
                &ma,
                &crate::cache::Pin {
                    reference: "a/one:1".into(),
                    pinned: 1,
                },
            )
            .unwrap();
        cache.refresh_pins().unwrap();
        let f = cache.footprint().unwrap();
        let a = &f.repos[&key("a/one")];
        assert_eq!(a.size.bytes, 1000 + len_a);
        assert!(a.size.pinned);
        assert!(!f.repos[&key("b/two")].size.pinned);
    }

    #[test]
    fn counters_are_written_in_batches_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = open(dir.path());
            let a = cache.activity().clone();
            a.manifest_answered(&key("a/one"), Some("1"), true, false, 500);
            a.manifest_answered(&key("a/one"), Some("1"), true, true, 0);
            a.manifest_answered(&key("a/one"), None, false, true, 0);
            let t = a.tally(&key("a/one"));
            t.served(4096, true);
            t.served(100, false);
            t.fetched(100);
            assert!(
                cache.index().stats_records().unwrap().is_empty(),
                "no write per request"
            );
            cache.flush().unwrap();
            assert_eq!(cache.index().stats_records().unwrap().len(), 2);
            assert!(a.take_dirty().is_empty(), "clean after the flush");
            let totals = a.totals();
            assert_eq!((totals.requests, totals.hits), (3, 2));
            assert_eq!((totals.bytes_served, totals.bytes_from_cache), (4196, 4096));
            assert_eq!(totals.bytes_fetched, 600);
        }
        let cache = open(dir.path());
        let v = cache.activity().repo(&key("a/one"));
        assert_eq!((v.pulls, v.bytes_served, v.bytes_fetched), (2, 4196, 600));
        assert!(v.last_pulled > 0);
        let t = cache
            .activity()
            .tag(&("docker.io".into(), "a/one".into(), "1".into()));
        assert_eq!(t.pulls, 2);
        assert_eq!(
            cache.activity().totals(),
            Totals::default(),
            "totals are per process"
        );
    }

    #[test]
    fn history_keeps_24_hours_of_5_minute_buckets() {
        let a = Activity::default();
        let t0 = 1_000_000 * BUCKET_SECS;
        a.request(true);
        assert_eq!(a.history(t0).len(), 1);
        a.request(false);
        a.request(false);
        let h = a.history(t0 + 10);
        assert_eq!(h.len(), 1);
        assert_eq!((h[0].totals.requests, h[0].totals.hits), (3, 1));
        a.request(true);
        let h = a.history(t0 + BUCKET_SECS);
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].totals.requests, 1);
        let h = a.history(t0 + BUCKET_SECS * 400);
        assert_eq!(h.len(), 1, "older than 24 h is dropped");
        assert_eq!(h[0].start, t0 + BUCKET_SECS * 400);
    }
}
