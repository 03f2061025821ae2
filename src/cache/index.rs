//! The durable index, in sled: what blobs exist (size, when added), manifests by digest (exact
//! bytes and media type), tag → digest per (upstream, repository) with the per-`Accept` variants
//! seen, and the repositories seen.
//!
//! Lifecycle trees: `access` (last use of blobs `b<hex>`, manifests `m<hex>` and tags `t<tag key>`:
//! a logical tick and unix seconds, written in batches, never per request) and `pins` (one record
//! per pinned manifest and reference the operator named: `<hex>\0<reference>`).
//!
//! Blob *bytes* never live here — only in files under `blobs/`. Keys are built from validated
//! names, separated by `\0`, which no name, tag or host can contain.
//!
//! Tag check times: a revalidation that finds the digest unchanged only moves the tag's `checked`
//! time. That is held in memory ([`Index::tag_checked`]) and written to sled in one sweep at most
//! every [`CHECK_PERSIST_INTERVAL`] (piggybacked on a later check) and on [`Index::flush`] — never
//! a sled write per request. A crash loses at most that interval of check times, which costs one
//! extra `HEAD` per tag afterwards; the tag → digest association itself is written (and made
//! durable) whenever it changes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::oci::{Digest, RepoName, Tag};

/// Index errors (sled or a corrupt record).
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index: {0}")]
    Sled(#[from] sled::Error),
    #[error("index record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

/// What the index knows of a blob.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobMeta {
    pub size: u64,
    /// Unix seconds when it was committed.
    pub added: u64,
}

/// A manifest, byte-exact, with the media type it was served with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// What a tag pointed to when last checked.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagEntry {
    /// What the tag resolves to for a client accepting every manifest type (the answer to the
    /// mirror's own full-`Accept` request upstream).
    pub digest: String,
    pub media_type: String,
    /// Unix *milliseconds* of the last successful check upstream.
    pub checked: u64,
    /// What the tag resolved to for clients that do not accept `media_type` (e.g. a single
    /// manifest instead of a list), keyed by [`Accept::variant_key`](crate::oci::Accept::variant_key).
    /// Valid as long as `digest` is: cleared when the tag moves.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, TagVariant>,
}

/// One per-`Accept` answer for a tag.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagVariant {
    pub digest: String,
    pub media_type: String,
}

/// A mirrored referrers answer: the descriptors of the manifests whose `subject` is one digest
/// (as the upstream listed them, through its referrers API or its `sha256-<hex>` tag), and when
/// the upstream last said so.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReferrersEntry {
    /// Unix milliseconds of the last answer from upstream; 0 = never asked (rebuilt from
    /// imported manifests).
    pub checked: u64,
    /// Image-index descriptors, sorted by digest, each digest once.
    pub manifests: Vec<serde_json::Value>,
}

/// How long check times may wait in memory before they are written to sled.
pub const CHECK_PERSIST_INTERVAL: Duration = Duration::from_secs(15);
/// Pending check times that force a write regardless of the interval.
const CHECK_PERSIST_MAX: usize = 4096;

/// Tag check times not yet written to sled.
#[derive(Default)]
struct PendingChecks {
    times: HashMap<Vec<u8>, u64>,
    since: Option<Instant>,
}

/// A raw record: key and value bytes.
pub type Record = (Vec<u8>, Vec<u8>);

/// A repository present in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoEntry {
    pub upstream: String,
    pub repo: String,
}

/// The sled database and its trees.
#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    blobs: sled::Tree,
    manifests: sled::Tree,
    tags: sled::Tree,
    repos: sled::Tree,
    checks: Arc<Mutex<PendingChecks>>,
    access: sled::Tree,
    pins: sled::Tree,
    stats: sled::Tree,
    referrers: sled::Tree,
}

/// A tag record with its key parts, for listing.
#[derive(Clone, Debug)]
pub struct TagRecord {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub entry: TagEntry,
}

/// A pinned manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pin {
    /// The reference the operator pinned (`docker.io/library/alpine:3.19`).
    pub reference: String,
    /// Unix seconds.
    pub pinned: u64,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix time in milliseconds (tag check times).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A record's JSON; a value that cannot be written is reported as corrupt under `key`.
fn encode<T: serde::Serialize + ?Sized>(
    value: &T,
    key: &dyn std::fmt::Display,
) -> Result<Vec<u8>, IndexError> {
    serde_json::to_vec(value).map_err(|e| IndexError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// The key of a tag record (and, prefixed with `t`, of its access record).
pub fn tag_key(upstream: &str, repo: &RepoName, tag: &Tag) -> Vec<u8> {
    format!("{upstream}\0{repo}\0{tag}").into_bytes()
}

/// Decodes an access record: (tick, unix seconds).
pub fn decode_access(v: &[u8]) -> Option<(u64, u64)> {
    let tick = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let unix = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    Some((tick, unix))
}

/// The key of a pin record: `<hex>\0<reference>`. (Records keyed by the hex alone, from when a
/// digest held one pin, still load.)
fn pin_key(digest: &Digest, reference: &str) -> Vec<u8> {
    format!("{}\0{reference}", digest.hex()).into_bytes()
}

fn repo_key(upstream: &str, repo: &RepoName) -> Vec<u8> {
    format!("{upstream}\0{repo}").into_bytes()
}

/// The bound of sled's page cache (see [`Index::open`]).
const INDEX_CACHE_BYTES: u64 = 4 << 20;

impl Index {
    /// Opens (or creates) the index at `dir`.
    pub fn open(dir: &Path) -> Result<Index, IndexError> {
        // sled's cache counts pages by their serialized size; in memory they take a few times
        // that. 4 MiB holds the hot pages (tags, recent blob records): manifests are served from
        // moka, and a scan of a million blob records (startup) pages through without growing it.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(INDEX_CACHE_BYTES)
            .flush_every_ms(Some(500))
            .open()?;
        Ok(Index {
            blobs: db.open_tree("blobs")?,
            manifests: db.open_tree("manifests")?,
            tags: db.open_tree("tags")?,
            repos: db.open_tree("repos")?,
            checks: Arc::default(),
            access: db.open_tree("access")?,
            pins: db.open_tree("pins")?,
            stats: db.open_tree("stats")?,
            referrers: db.open_tree("referrers")?,
            db,
        })
    }

    /// Flushes everything to disk, pending tag check times included.
    pub fn flush(&self) -> Result<(), IndexError> {
        self.persist_checks()?;
        self.db.flush()?;
        Ok(())
    }

    /// Makes every write so far durable (an fsync of sled's log). Called after writes that a
    /// crash must not lose: committed blobs, new manifests, moved tags. Failures are logged —
    /// sled's own periodic flush still runs.
    ///
    /// The wait runs on a blocking thread of ours, never on sled's own small thread pool (as
    /// `flush_async` would): sled writes its log on that pool, so a handful of concurrent waits
    /// parked there would take every thread from the write they wait for, and never end.
    pub async fn durable(&self) {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "index flush failed"),
            Err(e) => tracing::warn!(error = %e, "index flush task failed"),
        }
    }

    pub fn blob(&self, digest: &Digest) -> Result<Option<BlobMeta>, IndexError> {
        match self.blobs.get(digest.hex())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| IndexError::Corrupt {
                    key: digest.to_string(),
                    message: e.to_string(),
                }),
        }
    }

    /// Records a committed blob. Flushed before returning: the file is already durable.
    pub fn put_blob(&self, digest: &Digest, meta: &BlobMeta) -> Result<(), IndexError> {
        let v = encode(meta, &digest)?;
        self.blobs.insert(digest.hex(), v)?;
        Ok(())
    }

    pub fn remove_blob(&self, digest: &Digest) -> Result<(), IndexError> {
        self.blobs.remove(digest.hex())?;
        Ok(())
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// Number and total size of committed blobs (a full scan: for startup and reports).
    pub fn blob_totals(&self) -> Result<(u64, u64), IndexError> {
        let (mut count, mut bytes) = (0u64, 0u64);
        for item in self.blobs.iter() {
            let (key, v) = item?;
            let meta: BlobMeta = serde_json::from_slice(&v).map_err(|e| IndexError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                message: e.to_string(),
            })?;
            count += 1;
            bytes += meta.size;
        }
        Ok((count, bytes))
    }

    /// Every blob record as (hex, meta); corrupt records are reported as `None` meta.
    pub fn blobs(&self) -> impl Iterator<Item = Result<(String, Option<BlobMeta>), IndexError>> {
        self.blobs.iter().map(|item| {
            let (k, v) = item?;
            Ok((
                String::from_utf8_lossy(&k).into_owned(),
                serde_json::from_slice(&v).ok(),
            ))
        })
    }

    /// Blob records as (hex, size) in hex order; `None` size if the record is unreadable.
    pub fn blob_sizes(
        &self,
    ) -> impl Iterator<Item = Result<(sled::IVec, Option<u64>), IndexError>> {
        self.blobs.iter().map(|item| {
            let (k, v) = item?;
            let meta: Option<BlobMeta> = serde_json::from_slice(&v).ok();
            Ok((k, meta.map(|m| m.size)))
        })
    }

    /// Blob records whose hex starts with `prefix` (one fan-out directory's worth).
    pub fn blobs_with_prefix(
        &self,
        prefix: &str,
    ) -> impl Iterator<Item = Result<(String, Option<BlobMeta>), IndexError>> {
        self.blobs.scan_prefix(prefix.as_bytes()).map(|item| {
            let (k, v) = item?;
            Ok((
                String::from_utf8_lossy(&k).into_owned(),
                serde_json::from_slice(&v).ok(),
            ))
        })
    }

    /// Blob access records as (hex, tick), in hex order.
    pub fn blob_ticks(&self) -> impl Iterator<Item = Result<(sled::IVec, u64), IndexError>> {
        self.access.scan_prefix(b"b").filter_map(|item| match item {
            Err(e) => Some(Err(e.into())),
            Ok((k, v)) => {
                let (tick, _) = decode_access(&v)?;
                Some(Ok((k.subslice(1, k.len() - 1), tick)))
            }
        })
    }

    /// Ticks of the access records of manifests and tags (not blobs).
    pub fn other_ticks(&self) -> impl Iterator<Item = Result<u64, IndexError>> {
        let below = self.access.range::<&[u8], _>(..&b"b"[..]);
        let above = self.access.range::<&[u8], _>(&b"c"[..]..);
        below.chain(above).filter_map(|item| match item {
            Err(e) => Some(Err(e.into())),
            Ok((_, v)) => decode_access(&v).map(|(t, _)| Ok(t)),
        })
    }

    /// Removes a blob record by hex (startup reconcile, repair).
    pub fn remove_blob_hex(&self, hex: &str) -> Result<(), IndexError> {
        self.blobs.remove(hex.as_bytes())?;
        Ok(())
    }

    /// Every access record as (key, tick, unix).
    pub fn access_records(&self) -> impl Iterator<Item = Result<(Vec<u8>, u64, u64), IndexError>> {
        self.access.iter().filter_map(|item| match item {
            Err(e) => Some(Err(e.into())),
            Ok((k, v)) => decode_access(&v).map(|(t, u)| Ok((k.to_vec(), t, u))),
        })
    }

    /// One access record.
    pub fn access(&self, key: &[u8]) -> Result<Option<(u64, u64)>, IndexError> {
        Ok(self.access.get(key)?.and_then(|v| decode_access(&v)))
    }

    /// Writes a batch of access updates (`None` deletes) in one sled batch.
    pub fn write_access<'a>(
        &self,
        updates: impl IntoIterator<Item = (&'a Vec<u8>, &'a Option<(u64, u64)>)>,
    ) -> Result<(), IndexError> {
        let mut batch = sled::Batch::default();
        for (k, v) in updates {
            match v {
                Some((tick, unix)) => {
                    let mut val = [0u8; 16];
                    val[..8].copy_from_slice(&tick.to_be_bytes());
                    val[8..].copy_from_slice(&unix.to_be_bytes());
                    batch.insert(k.as_slice(), &val[..]);
                }
                None => batch.remove(k.as_slice()),
            }
        }
        self.access.apply_batch(batch)?;
        Ok(())
    }

    /// Every manifest as (hex, stored length in bytes, media type + bytes record).
    pub fn manifest_sizes(&self) -> impl Iterator<Item = Result<(String, u64), IndexError>> {
        self.manifests.iter().map(|item| {
            let (k, v) = item?;
            let nl = v
                .iter()
                .position(|&b| b == b'\n')
                .map(|p| p + 1)
                .unwrap_or(0);
            Ok((
                String::from_utf8_lossy(&k).into_owned(),
                (v.len() - nl) as u64,
            ))
        })
    }

    /// Removes a manifest; returns the bytes it held.
    pub fn remove_manifest(&self, digest: &Digest) -> Result<u64, IndexError> {
        Ok(self
            .manifests
            .remove(digest.hex())?
            .map(|v| {
                let nl = v
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|p| p + 1)
                    .unwrap_or(0);
                (v.len() - nl) as u64
            })
            .unwrap_or(0))
    }

    /// Every tag record.
    pub fn tags(&self) -> Result<Vec<TagRecord>, IndexError> {
        let mut out = Vec::new();
        for item in self.tags.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let mut parts = key.splitn(3, '\0');
            let (Some(upstream), Some(repo), Some(tag)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(entry) = serde_json::from_slice::<TagEntry>(&v) else {
                continue;
            };
            out.push(TagRecord {
                upstream: upstream.to_owned(),
                repo: repo.to_owned(),
                tag: tag.to_owned(),
                entry,
            });
        }
        Ok(out)
    }

    /// The tag records of one repository.
    pub fn tags_of(&self, upstream: &str, repo: &str) -> Result<Vec<TagRecord>, IndexError> {
        let mut out = Vec::new();
        for item in self
            .tags
            .scan_prefix(format!("{upstream}\0{repo}\0").as_bytes())
        {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let Some(tag) = key.splitn(3, '\0').nth(2) else {
                continue;
            };
            let Ok(mut entry) = serde_json::from_slice::<TagEntry>(&v) else {
                continue;
            };
            if let Some(t) = self.pending().times.get(k.as_ref()) {
                entry.checked = entry.checked.max(*t);
            }
            out.push(TagRecord {
                upstream: upstream.to_owned(),
                repo: repo.to_owned(),
                tag: tag.to_owned(),
                entry,
            });
        }
        Ok(out)
    }

    /// Removes a tag record by its raw key parts.
    pub fn remove_tag_raw(&self, upstream: &str, repo: &str, tag: &str) -> Result<(), IndexError> {
        self.tags
            .remove(format!("{upstream}\0{repo}\0{tag}").as_bytes())?;
        Ok(())
    }

    /// Removes a repository record.
    pub fn remove_repo_raw(&self, upstream: &str, repo: &str) -> Result<(), IndexError> {
        self.repos
            .remove(format!("{upstream}\0{repo}").as_bytes())?;
        Ok(())
    }

    /// Pins, one per (digest, reference). A manifest is pinned while any reference pins it.
    pub fn pins(&self) -> Result<Vec<(Digest, Pin)>, IndexError> {
        let mut out = Vec::new();
        for item in self.pins.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k);
            let hex = key.split('\0').next().unwrap_or_default();
            let Ok(d) = format!("sha256:{hex}").parse::<Digest>() else {
                continue;
            };
            if let Ok(p) = serde_json::from_slice::<Pin>(&v) {
                out.push((d, p));
            }
        }
        Ok(out)
    }

    /// Records a pin of `digest` by `pin.reference`, beside the pins of other references.
    pub fn put_pin(&self, digest: &Digest, pin: &Pin) -> Result<(), IndexError> {
        let v = encode(pin, &digest)?;
        let mut batch = sled::Batch::default();
        // A record keyed by the digest alone (one pin per digest, the earlier layout) for the
        // same reference is replaced by the per-reference one.
        if let Some(old) = self.pins.get(digest.hex())? {
            if serde_json::from_slice::<Pin>(&old).is_ok_and(|p| p.reference == pin.reference) {
                batch.remove(digest.hex().as_bytes());
            }
        }
        batch.insert(pin_key(digest, &pin.reference), v);
        self.pins.apply_batch(batch)?;
        Ok(())
    }

    /// Removes every pin of `digest`, whatever its reference; returns the removed pins.
    pub fn remove_pins_of_digest(&self, digest: &Digest) -> Result<Vec<Pin>, IndexError> {
        let mut removed = Vec::new();
        for item in self.pins.scan_prefix(digest.hex()) {
            let (k, v) = item?;
            if k.len() == digest.hex().len() || k.get(digest.hex().len()) == Some(&0) {
                self.pins.remove(&k)?;
                removed.push(serde_json::from_slice::<Pin>(&v).unwrap_or_else(|_| Pin {
                    reference: digest.to_string(),
                    pinned: 0,
                }));
            }
        }
        Ok(removed)
    }

    /// Removes the pin of `digest` by `reference`; returns whether there was one.
    pub fn remove_pin(&self, digest: &Digest, reference: &str) -> Result<bool, IndexError> {
        let mut found = self.pins.remove(pin_key(digest, reference))?.is_some();
        // The earlier layout: keyed by the digest alone.
        if let Some(old) = self.pins.get(digest.hex())? {
            if serde_json::from_slice::<Pin>(&old).is_ok_and(|p| p.reference == reference) {
                found |= self.pins.remove(digest.hex())?.is_some();
            }
        }
        Ok(found)
    }

    /// Manifest record layout: media type, `\n`, then the exact bytes.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, IndexError> {
        let Some(v) = self.manifests.get(digest.hex())? else {
            return Ok(None);
        };
        let corrupt = |m: &str| IndexError::Corrupt {
            key: digest.to_string(),
            message: m.to_owned(),
        };
        let nl = v
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| corrupt("no media type separator"))?;
        let media_type =
            std::str::from_utf8(&v[..nl]).map_err(|_| corrupt("media type is not UTF-8"))?;
        let bytes = Bytes::copy_from_slice(&v[nl + 1..]);
        if Digest::of(&bytes) != *digest {
            return Err(corrupt("bytes do not match the digest"));
        }
        Ok(Some(StoredManifest {
            digest: digest.clone(),
            media_type: media_type.to_owned(),
            bytes,
        }))
    }

    pub fn has_manifest(&self, digest: &Digest) -> Result<bool, IndexError> {
        Ok(self.manifests.contains_key(digest.hex())?)
    }

    pub fn put_manifest(&self, m: &StoredManifest) -> Result<(), IndexError> {
        let mut v = Vec::with_capacity(m.media_type.len() + 1 + m.bytes.len());
        v.extend_from_slice(m.media_type.as_bytes());
        v.push(b'\n');
        v.extend_from_slice(&m.bytes);
        self.manifests.insert(m.digest.hex(), v)?;
        Ok(())
    }

    /// A tag's record, with the latest check time (including one not yet written to sled).
    pub fn tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagEntry>, IndexError> {
        let key = tag_key(upstream, repo, tag);
        let Some(v) = self.tags.get(&key)? else {
            return Ok(None);
        };
        let mut entry: TagEntry = serde_json::from_slice(&v).map_err(|e| IndexError::Corrupt {
            key: format!("{upstream}/{repo}:{tag}"),
            message: e.to_string(),
        })?;
        if let Some(t) = self.pending().times.get(&key) {
            entry.checked = entry.checked.max(*t);
        }
        Ok(Some(entry))
    }

    /// Forgets a tag (it no longer exists upstream).
    pub fn remove_tag(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> Result<(), IndexError> {
        let key = tag_key(upstream, repo, tag);
        self.pending().times.remove(&key);
        self.tags.remove(key)?;
        Ok(())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, PendingChecks> {
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that upstream confirmed a tag at `at_ms` (unix ms) without it changing. Held in
    /// memory; written to sled together with the others once [`CHECK_PERSIST_INTERVAL`] has
    /// passed since the oldest pending one (or on [`Index::flush`]).
    pub fn tag_checked(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        at_ms: u64,
    ) -> Result<(), IndexError> {
        let due = {
            let mut p = self.pending();
            let t = p.times.entry(tag_key(upstream, repo, tag)).or_insert(0);
            *t = (*t).max(at_ms);
            let since = *p.since.get_or_insert_with(Instant::now);
            (since.elapsed() >= CHECK_PERSIST_INTERVAL || p.times.len() >= CHECK_PERSIST_MAX)
                .then(|| Self::take_pending(&mut p))
        };
        if let Some(times) = due {
            // Off the async workers when there is a runtime: the sweep touches many records.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let index = self.clone();
                    rt.spawn_blocking(move || {
                        if let Err(e) = index.write_checks(times) {
                            tracing::warn!(error = %e, "writing tag check times failed");
                        }
                    });
                }
                Err(_) => self.write_checks(times)?,
            }
        }
        Ok(())
    }

    fn take_pending(p: &mut PendingChecks) -> HashMap<Vec<u8>, u64> {
        p.since = None;
        std::mem::take(&mut p.times)
    }

    /// Writes every pending check time now.
    fn persist_checks(&self) -> Result<(), IndexError> {
        let times = Self::take_pending(&mut self.pending());
        self.write_checks(times)
    }

    /// Writes pending check times into their tag records. Each record is updated atomically
    /// (compare-and-swap), so a concurrent write of a moved tag is never overwritten, and a
    /// check time only ever moves forward.
    fn write_checks(&self, times: HashMap<Vec<u8>, u64>) -> Result<(), IndexError> {
        for (key, at) in times {
            self.tags.fetch_and_update(&key, |old| {
                let old = old?;
                match serde_json::from_slice::<TagEntry>(old) {
                    Ok(mut e) if e.checked < at => {
                        e.checked = at;
                        serde_json::to_vec(&e).ok().or_else(|| Some(old.to_vec()))
                    }
                    _ => Some(old.to_vec()),
                }
            })?;
        }
        Ok(())
    }

    pub fn put_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        entry: &TagEntry,
    ) -> Result<(), IndexError> {
        let v = encode(entry, &format!("{upstream}/{repo}:{tag}"))?;
        let key = tag_key(upstream, repo, tag);
        {
            // The record carries the newest check time; a pending older one is moot.
            let mut p = self.pending();
            if p.times.get(&key).is_some_and(|t| *t <= entry.checked) {
                p.times.remove(&key);
            }
        }
        self.tags.insert(key, v)?;
        Ok(())
    }

    /// The cached referrers answer for `subject` in a mirrored repository.
    pub fn referrers(
        &self,
        upstream: &str,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Option<ReferrersEntry>, IndexError> {
        let key = format!("{upstream}\0{repo}\0{}", subject.hex());
        let Some(v) = self.referrers.get(key.as_bytes())? else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| IndexError::Corrupt {
                key: format!("{upstream}/{repo} referrers of {subject}"),
                message: e.to_string(),
            })
    }

    pub fn put_referrers(
        &self,
        upstream: &str,
        repo: &RepoName,
        subject: &Digest,
        entry: &ReferrersEntry,
    ) -> Result<(), IndexError> {
        let v = encode(entry, &format!("{upstream}/{repo} referrers of {subject}"))?;
        let key = format!("{upstream}\0{repo}\0{}", subject.hex());
        self.referrers.insert(key.as_bytes(), v)?;
        Ok(())
    }

    /// Notes that a repository has content in the cache (no write if already known).
    pub fn touch_repo(&self, upstream: &str, repo: &RepoName) -> Result<(), IndexError> {
        let key = repo_key(upstream, repo);
        if !self.repos.contains_key(&key)? {
            self.repos.insert(key, unix_now().to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Every cached repository with the unix second it was first cached, ordered by (upstream,
    /// repository).
    pub fn repos_first_cached(&self) -> Result<Vec<(RepoEntry, u64)>, IndexError> {
        let mut out = Vec::new();
        for item in self.repos.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k);
            if let Some((upstream, repo)) = key.split_once('\0') {
                let first = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                out.push((
                    RepoEntry {
                        upstream: upstream.to_owned(),
                        repo: repo.to_owned(),
                    },
                    first,
                ));
            }
        }
        Ok(out)
    }

    /// The per-repository and per-tag counters (see `cache::stats`), as (key, JSON value).
    pub fn stats_records(&self) -> Result<Vec<Record>, IndexError> {
        let mut out = Vec::new();
        for item in self.stats.iter() {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Writes counters (`Some`) and removes them (`None`) in one batch.
    pub fn write_stats(&self, records: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), IndexError> {
        let mut batch = sled::Batch::default();
        for (k, v) in records {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.stats.apply_batch(batch)?;
        Ok(())
    }

    /// Every cached repository, ordered by (upstream, repository).
    pub fn repos(&self) -> Result<Vec<RepoEntry>, IndexError> {
        let mut out = Vec::new();
        for item in self.repos.iter() {
            let (k, _) = item?;
            let key = String::from_utf8_lossy(&k);
            if let Some((upstream, repo)) = key.split_once('\0') {
                out.push(RepoEntry {
                    upstream: upstream.to_owned(),
                    repo: repo.to_owned(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_record_kind() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index")).unwrap();
        let d = Digest::of(b"hello");
        idx.put_blob(&d, &BlobMeta { size: 5, added: 1 }).unwrap();
        assert_eq!(idx.blob(&d).unwrap(), Some(BlobMeta { size: 5, added: 1 }));
        assert_eq!(idx.blob_count(), 1);

        let bytes = Bytes::from_static(b"{ \"schemaVersion\" : 2 }\n");
        let m = StoredManifest {
            digest: Digest::of(&bytes),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes,
        };
        idx.put_manifest(&m).unwrap();
        assert_eq!(idx.manifest(&m.digest).unwrap(), Some(m.clone()));

        let repo: RepoName = "library/alpine".parse().unwrap();
        let tag: Tag = "3.19".parse().unwrap();
        let e = TagEntry {
            digest: m.digest.to_string(),
            media_type: m.media_type.clone(),
            checked: 7,
            variants: BTreeMap::new(),
        };
        idx.put_tag("docker.io", &repo, &tag, &e).unwrap();
        assert_eq!(idx.tag("docker.io", &repo, &tag).unwrap(), Some(e));
        assert_eq!(idx.tag("ghcr.io", &repo, &tag).unwrap(), None);

        idx.touch_repo("docker.io", &repo).unwrap();
        idx.touch_repo("docker.io", &repo).unwrap();

        idx.remove_tag("docker.io", &repo, &tag).unwrap();
        assert_eq!(idx.tag("docker.io", &repo, &tag).unwrap(), None);
        assert_eq!(
            idx.repos().unwrap(),
            vec![RepoEntry {
                upstream: "docker.io".into(),
                repo: "library/alpine".into()
            }]
        );
    }

    #[test]
    fn pins_are_kept_per_reference_and_an_old_single_record_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index")).unwrap();
        let (d1, d2) = (Digest::of(b"one"), Digest::of(b"two"));
        let pin = |r: &str| Pin {
            reference: r.into(),
            pinned: 1,
        };
        // A record in the earlier layout: keyed by the digest alone.
        idx.pins
            .insert(d1.hex(), serde_json::to_vec(&pin("a:1")).unwrap())
            .unwrap();
        assert_eq!(idx.pins().unwrap(), vec![(d1.clone(), pin("a:1"))]);
        // Re-pinning the same reference replaces it; another reference on the same digest and
        // the same reference on another digest (the tag moved) are pins of their own.
        idx.put_pin(&d1, &pin("a:1")).unwrap();
        idx.put_pin(&d1, &pin("a:latest")).unwrap();
        idx.put_pin(&d2, &pin("a:1")).unwrap();
        let mut all = idx.pins().unwrap();
        all.sort_by(|x, y| (&x.1.reference, &x.0).cmp(&(&y.1.reference, &y.0)));
        let mut want = vec![
            (d1.clone(), pin("a:1")),
            (d2.clone(), pin("a:1")),
            (d1.clone(), pin("a:latest")),
        ];
        want.sort_by(|x, y| (&x.1.reference, &x.0).cmp(&(&y.1.reference, &y.0)));
        assert_eq!(all, want);

        // Unpinning a reference leaves the other reference's pin of the same digest.
        assert!(idx.remove_pin(&d1, "a:1").unwrap());
        assert!(idx.remove_pin(&d2, "a:1").unwrap());
        assert_eq!(idx.pins().unwrap(), vec![(d1.clone(), pin("a:latest"))]);
        assert!(!idx.remove_pin(&d1, "a:1").unwrap());
        // A record in the earlier layout is removed by its reference too.
        idx.pins
            .insert(d2.hex(), serde_json::to_vec(&pin("c:1")).unwrap())
            .unwrap();
        assert!(!idx.remove_pin(&d2, "c:2").unwrap());
        assert!(idx.remove_pin(&d2, "c:1").unwrap());
        assert_eq!(idx.pins().unwrap(), vec![(d1.clone(), pin("a:latest"))]);

        // By digest: every pin of that digest, the earlier layout included.
        idx.pins
            .insert(d2.hex(), serde_json::to_vec(&pin("b:1")).unwrap())
            .unwrap();
        idx.put_pin(&d2, &pin("b:2")).unwrap();
        let mut refs: Vec<String> = idx
            .remove_pins_of_digest(&d2)
            .unwrap()
            .into_iter()
            .map(|p| p.reference)
            .collect();
        refs.sort();
        assert_eq!(refs, vec!["b:1".to_string(), "b:2".to_string()]);
        assert_eq!(idx.pins().unwrap(), vec![(d1, pin("a:latest"))]);
    }

    #[test]
    fn check_times_live_in_memory_until_flushed_and_never_clobber_a_moved_tag() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index")).unwrap();
        let repo: RepoName = "org/app".parse().unwrap();
        let tag: Tag = "latest".parse().unwrap();
        let mut variants = BTreeMap::new();
        variants.insert(
            "k".to_string(),
            TagVariant {
                digest: "sha256:bb".into(),
                media_type: "m".into(),
            },
        );
        let e = TagEntry {
            digest: "sha256:aa".into(),
            media_type: "t".into(),
            checked: 1_000,
            variants,
        };
        idx.put_tag("ghcr.io", &repo, &tag, &e).unwrap();
        idx.tag_checked("ghcr.io", &repo, &tag, 5_000).unwrap();
        // Visible at once, though not written yet.
        assert_eq!(
            idx.tag("ghcr.io", &repo, &tag).unwrap().unwrap().checked,
            5_000
        );
        // The record as written to sled (not the pending checks held in memory).
        let on_disk = || -> TagEntry {
            let raw = idx
                .tags
                .get(tag_key("ghcr.io", &repo, &tag))
                .unwrap()
                .unwrap();
            serde_json::from_slice(&raw).unwrap()
        };
        let stored = on_disk();
        assert_eq!(stored.checked, 1_000, "no sled write per check");
        idx.flush().unwrap();
        let stored = on_disk();
        assert_eq!(stored.checked, 5_000);
        assert_eq!(stored.variants, e.variants, "variants survive");

        // A pending check older than a newer record does not roll it back.
        idx.tag_checked("ghcr.io", &repo, &tag, 6_000).unwrap();
        let moved = TagEntry {
            digest: "sha256:cc".into(),
            media_type: "t".into(),
            checked: 7_000,
            variants: BTreeMap::new(),
        };
        idx.put_tag("ghcr.io", &repo, &tag, &moved).unwrap();
        idx.flush().unwrap();
        assert_eq!(idx.tag("ghcr.io", &repo, &tag).unwrap(), Some(moved));
    }
}
