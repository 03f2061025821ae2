//! What the cache does after it opens, in a thread of its own while it already serves: load
//! sizes and recency into the budget, then reconcile the index with the files.
//!
//! Loading streams the index once: blob records and blob access records are both kept in hex
//! order, so they are merged as they are read (no map of a million ticks), and blobs enter the
//! budget in chunks (each under the budget's lock for a moment). Eviction waits until loading
//! is over ([`Budget::begin_loading`]).
//!
//! Reconciliation then walks the 256 fan-out directories one at a time, comparing each
//! directory's files with the index records of its prefix: an entry whose file is gone is
//! dropped, a file without an entry is hashed and adopted (or removed if its bytes do not match
//! its name), and anything not named like a blob is removed. Memory stays bounded by one
//! directory. Fills commit meanwhile (file renamed in, then indexed): an entry whose file is
//! missing from the listing is checked again on disk before it is dropped, and adoption is
//! decided under the budget's lock, which eviction holds while it deletes.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use super::budget::{key_of, Key};
use super::{blob_path_in, hash_file, index, BlobMeta, Budget, CacheError, CacheEvictor, Startup};
use crate::oci::Digest;

/// Blobs loaded into the budget per lock.
const CHUNK: usize = 4096;

pub(super) struct Work {
    pub evictor: CacheEvictor,
    pub budget: Arc<Budget>,
    pub startup: Arc<Startup>,
}

impl Work {
    pub fn run(self) {
        let t = std::time::Instant::now();
        if let Err(e) = self.load() {
            tracing::error!(error = %e, "could not load the cache index; the budget counts only new blobs");
        }
        self.budget.finish_loading();
        let loaded = t.elapsed();
        let freed = self.budget.maybe_evict(&self.evictor);
        if freed > 0 {
            tracing::info!(bytes = freed, "evicted at startup to fit the budget");
        }
        if let Err(e) = self.reconcile() {
            tracing::error!(error = %e, "cache reconciliation failed");
        }
        if let Err(e) = self.evictor.index.flush() {
            tracing::warn!(error = %e, "index flush after reconciliation failed");
        }
        self.startup.finish();
        let r = self.startup.wait();
        tracing::info!(
            blobs = r.blobs,
            dropped_entries = r.dropped_entries,
            adopted_files = r.adopted_files,
            removed_files = r.removed_files,
            temp_files = r.temp_files,
            loaded_ms = loaded.as_millis() as u64,
            total_ms = t.elapsed().as_millis() as u64,
            "cache reconciled"
        );
    }

    /// Loads every indexed blob (size, persisted tick) and the manifests' bytes into the budget.
    fn load(&self) -> Result<(), CacheError> {
        let index = &self.evictor.index;
        for tick in index.other_ticks() {
            self.budget.observe_tick(tick?);
        }
        let mut ticks = index.blob_ticks().peekable();
        let mut chunk: Vec<(Key, u64, u64)> = Vec::with_capacity(CHUNK);
        for rec in index.blob_sizes() {
            let (hex, size) = rec?;
            let mut tick = 0;
            while let Some(Ok((k, t))) = ticks.peek() {
                match k.as_ref().cmp(hex.as_ref()) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => tick = *t,
                    std::cmp::Ordering::Greater => break,
                }
                ticks.next();
            }
            // Unreadable records are left to reconciliation, which drops them.
            let key = std::str::from_utf8(&hex).ok().and_then(key_of);
            if let (Some(key), Some(size)) = (key, size) {
                chunk.push((key, size, tick));
            }
            if chunk.len() == CHUNK {
                self.budget.load_blobs(&chunk);
                chunk.clear();
            }
        }
        self.budget.load_blobs(&chunk);
        let mut manifest_bytes = 0;
        for rec in index.manifest_sizes() {
            manifest_bytes += rec?.1;
        }
        self.budget.add_manifest_bytes(manifest_bytes);
        Ok(())
    }

    /// Makes the index and `blobs/` agree, one fan-out directory at a time.
    fn reconcile(&self) -> Result<(), CacheError> {
        let blobs_dir = self.evictor.root.join("blobs").join("sha256");
        for entry in std::fs::read_dir(&blobs_dir).map_err(super::io_at(&blobs_dir))? {
            let entry = entry.map_err(super::io_at(&blobs_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let fan_out = name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if !(fan_out && name == name.to_ascii_lowercase() && entry.path().is_dir()) {
                self.remove_stray(&entry.path());
            }
        }
        for prefix in 0..=255u8 {
            self.reconcile_dir(&format!("{prefix:02x}"))?;
        }
        Ok(())
    }

    fn remove_stray(&self, path: &Path) {
        tracing::warn!(path = %path.display(), "removing a stray file from blobs/");
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        if removed.is_ok() {
            self.startup.update(|r| r.removed_files += 1);
        }
    }

    /// Reconciles the blobs whose hex starts with `prefix`.
    fn reconcile_dir(&self, prefix: &str) -> Result<(), CacheError> {
        let root = &self.evictor.root;
        let index = &self.evictor.index;
        let dir = root.join("blobs").join("sha256").join(prefix);
        let mut on_disk = HashSet::new();
        match std::fs::read_dir(&dir) {
            Ok(listing) => {
                for f in listing {
                    let f = f.map_err(super::io_at(&dir))?;
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.starts_with(prefix)
                        && format!("sha256:{name}").parse::<Digest>().is_ok()
                    {
                        on_disk.insert(name);
                    } else {
                        self.remove_stray(&f.path());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(super::io_at(&dir)(e)),
        }
        let mut present = 0;
        for rec in index.blobs_with_prefix(prefix) {
            let (hex, meta) = rec?;
            if meta.is_some() && (on_disk.remove(&hex) || blob_path_in(root, &hex).is_file()) {
                present += 1;
                continue;
            }
            tracing::warn!(digest = %format!("sha256:{hex}"), "index entry without a blob file; dropped");
            index.remove_blob_hex(&hex)?;
            self.budget.forget_blob(&hex);
            self.startup.update(|r| r.dropped_entries += 1);
        }
        self.startup.update(|r| r.blobs += present);
        for hex in on_disk {
            self.adopt(&hex)?;
        }
        Ok(())
    }

    /// A file the index does not know (a crash between rename and index write): adopted if its
    /// bytes match its name, removed otherwise.
    fn adopt(&self, hex: &str) -> Result<(), CacheError> {
        let root = &self.evictor.root;
        let index = &self.evictor.index;
        let path = blob_path_in(root, hex);
        let hashed = match hash_file(&path, |_| {}) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Ok((actual, size)) if actual.hex() == hex => Some((actual, size)),
            _ => None,
        };
        let Some((actual, size)) = hashed else {
            tracing::warn!(path = %path.display(), "removing an unindexed blob file that does not match its name");
            if std::fs::remove_file(&path).is_ok() {
                self.startup.update(|r| r.removed_files += 1);
            }
            return Ok(());
        };
        let mut failed = None;
        let adopted = self.budget.adopt_blob(hex, size, || {
            // Not evicted meanwhile (eviction deletes under this lock), not indexed meanwhile.
            if !path.is_file() || !matches!(index.blob(&actual), Ok(None)) {
                return false;
            }
            let meta = BlobMeta {
                size,
                added: index::unix_now(),
            };
            match index.put_blob(&actual, &meta) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        });
        if let Some(e) = failed {
            return Err(e.into());
        }
        if adopted {
            self.startup.update(|r| {
                r.adopted_files += 1;
                r.blobs += 1;
            });
            tracing::info!(digest = %actual, "adopted an unindexed blob file");
        }
        Ok(())
    }
}
