//! Hosted repositories: the names that live in stowage (`hosted.repositories`), pushed to and
//! pulled from without any upstream. Beside [`crate::mirror`], chosen by the edge from the name.
//!
//! Pushed content is data, not cache. Its blob files live under `hosted/blobs/` and its records
//! in a sled database of its own ([`index`]), so the cache's LRU and budget cannot see them; its
//! bytes count in `hosted.max_size` ([`uploads::Quota`]). A repository sees only what was pushed
//! or mounted into it (per-repository links): a blob existence answer never leaks another
//! repository's content.
//!
//! The order that makes a `201` true. Blob: upload file fsynced and verified → renamed into
//! `hosted/blobs/sha256/<2>/<64>` → directory fsynced → blob record and link → index flushed →
//! `201`. Manifest: parsed, every reference checked in this repository → bytes, link and tag
//! stored → index flushed → `201`. A crash between two steps leaves either nothing visible or
//! the complete thing (a blob file without a link is unreachable and collected by `gc`).
//! `stowage import` commits through the same steps ([`Hosted::import_blob`],
//! [`Hosted::import_manifest`]): every blob of an image, then its child manifests, its top
//! manifest and tag last.
//!
//! With a fleet's shared store ([`shared`]) the shared objects are written first, before any
//! local record: a push the store refused leaves nothing visible on any node, and the local
//! directory is a cache that fills itself from the store on a miss.
//!
//! Files: `blobs` reads blobs (fetching shared ones) and places files durably, `commit`
//! makes a blob hosted (upload closed, mount, adoption, import), `manifests` reads, pushes and
//! deletes manifests, `tags` resolves tags and lists repositories, [`uploads`] holds upload
//! sessions, [`referrers`] answers the referrers API, [`gc`] collects, [`shared`] speaks to the
//! fleet's store and [`shared_gc`] collects in it, [`index`] is the sled database.

mod blobs;
mod commit;
pub mod gc;
pub mod index;
mod manifests;
pub mod referrers;
pub mod shared;
pub mod shared_gc;
mod tags;
pub mod uploads;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::oci::{Digest, ErrorCode, RegistryError, RepoName};

pub use index::{HostedIndex, StoredManifest};
pub use uploads::{Quota, Session, Uploads};

/// The largest manifest accepted (as for upstream manifests).
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

pub use crate::config::HostedConfig as Settings;

/// The hosted repositories of one node.
pub struct Hosted {
    settings: Settings,
    root: PathBuf,
    index: HostedIndex,
    uploads: Uploads,
    quota: Arc<Quota>,
    /// Shared by pushes from their reference check to their index flush, exclusive for `gc`.
    gc_lock: tokio::sync::RwLock<()>,
    /// Blob files with a record (`stowage_hosted_blobs`).
    blob_count: std::sync::atomic::AtomicU64,
    /// The fleet's shared store, when there is one: then the source of truth ([`shared`]).
    shared: Option<shared::SharedHosted>,
}

fn internal(what: &str, e: impl std::fmt::Display) -> RegistryError {
    tracing::error!(error = %e, "hosted: {what}");
    RegistryError::new(ErrorCode::Unknown, format!("{what}: {e}"))
}

fn blob_unknown(repo: &RepoName, digest: &Digest) -> RegistryError {
    RegistryError::new(
        ErrorCode::BlobUnknown,
        format!("blob {digest} is not in {repo}"),
    )
}

fn manifest_unknown(repo: &RepoName, reference: &impl std::fmt::Display) -> RegistryError {
    RegistryError::new(
        ErrorCode::ManifestUnknown,
        format!("manifest {reference} is not in {repo}"),
    )
}

/// A hosted blob opened for reading.
#[derive(Debug)]
pub struct HostedBlob {
    pub file: std::fs::File,
    pub size: u64,
}

impl Hosted {
    /// Opens the hosted store under `<storage.path>/hosted`.
    pub fn open(settings: Settings, storage_root: &Path) -> Result<Hosted, crate::Error> {
        let root = storage_root.join("hosted");
        let startup = |what: &str, e: &dyn std::fmt::Display| {
            crate::Error::Startup(format!("hosted storage {}: {what}: {e}", root.display()))
        };
        std::fs::create_dir_all(root.join("blobs/sha256")).map_err(|e| startup("create", &e))?;
        let index = HostedIndex::open(&root.join("index")).map_err(|e| startup("index", &e))?;
        let quota = Arc::new(Quota::new(settings.max_size));
        let committed = index
            .blobs()
            .map_err(|e| startup("index", &e))?
            .iter()
            .map(|(_, size)| size)
            .sum::<u64>()
            + index
                .manifest_sizes()
                .map_err(|e| startup("index", &e))?
                .iter()
                .map(|(_, size)| size)
                .sum::<u64>();
        quota.add(committed);
        let blob_count = index.blobs().map_err(|e| startup("index", &e))?.len() as u64;
        let uploads = Uploads::open(&root.join("uploads"), quota.clone())
            .map_err(|e| startup("uploads", &e))?;
        Ok(Hosted {
            settings,
            root,
            index,
            uploads,
            quota,
            gc_lock: tokio::sync::RwLock::new(()),
            blob_count: std::sync::atomic::AtomicU64::new(blob_count),
            shared: None,
        })
    }

    /// Makes the fleet's shared store the source of truth for hosted content: pushes write it
    /// before their `201`, local misses read it (each call bounded by `timeout`).
    pub fn with_shared_store(
        mut self,
        store: Arc<dyn crate::store::BlobStore>,
        timeout: std::time::Duration,
    ) -> Hosted {
        let grace = self.settings.upload_timeout;
        self.shared = Some(shared::SharedHosted::new(store, timeout, grace));
        self
    }

    /// Whether hosted content lives in a shared store.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether `name` is a hosted repository.
    pub fn holds_name(&self, name: &RepoName) -> bool {
        self.settings
            .repositories
            .iter()
            .any(|p| p.matches(name.as_str()))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn index(&self) -> &HostedIndex {
        &self.index
    }

    pub fn uploads(&self) -> &Uploads {
        &self.uploads
    }

    /// Bytes held (committed content and open uploads) and blob files.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.quota.used(),
            self.blob_count.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Sets the hosted gauges from the current totals (after every change to them).
    pub fn publish(&self) {
        let m = crate::metrics::metrics();
        let (bytes, blobs) = self.usage();
        m.hosted_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        m.hosted_blobs.set(i64::try_from(blobs).unwrap_or(i64::MAX));
        m.uploads_in_progress
            .set(i64::try_from(self.uploads.in_progress()).unwrap_or(i64::MAX));
    }

    /// Records a blob file whose bytes were taken from the budget. When a concurrent push of
    /// the same blob recorded it first, this push's bytes are given back: a blob counts once.
    fn record_blob(&self, digest: &Digest, size: u64) -> Result<(), RegistryError> {
        let new = self
            .index
            .put_blob(digest, size)
            .map_err(|e| internal("index", e))?;
        if new {
            self.blob_count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.quota.give(size);
        }
        Ok(())
    }

    /// Runs one of these async operations to completion from synchronous code (the operator
    /// commands): on the current runtime when the thread has one (not from inside a task), else
    /// on a runtime of its own.
    pub fn wait<F: std::future::Future>(&self, f: F) -> Result<F::Output, RegistryError> {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            return Ok(handle.block_on(f));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| internal("runtime", e))?;
        Ok(runtime.block_on(f))
    }

    /// The path of a hosted blob file.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs/sha256")
            .join(hex.get(..2).unwrap_or("xx"))
            .join(hex)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
