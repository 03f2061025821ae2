//! The local store: content-addressed blob files, the sled index, manifests kept hot in memory
//! (moka), and the single-flight map of in-flight fills.
//!
//! Layout under `storage.path`:
//! ```text
//! blobs/sha256/<2 hex>/<64 hex>   committed, verified blobs (written only by rename from tmp/)
//! tmp/<64 hex>.<rand>.partial     fills in progress; anything here at startup is garbage
//! index/                          the sled database (see [`index`])
//! ```

pub mod fill;
pub mod index;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::oci::{Digest, ErrorCode, RegistryError, RepoName, Tag};
pub use fill::{BlobBody, BlobSource, ByteStream, Fill, FillMap, FillPolicy};
pub use index::{BlobMeta, Index, IndexError, RepoEntry, StoredManifest, TagEntry};

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

/// A committed blob, opened for reading.
pub struct CachedBlob {
    pub file: std::fs::File,
    pub size: u64,
}

/// The cache.
pub struct Cache {
    root: PathBuf,
    index: Index,
    fills: FillMap,
    fill_policy: FillPolicy,
    /// One permit per fill allowed to run at once.
    fill_slots: Arc<tokio::sync::Semaphore>,
    manifests: moka::sync::Cache<Digest, Arc<StoredManifest>>,
}

impl Cache {
    /// Opens the cache at `root`, creating its directories and discarding leftover temp files.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io_at(&blobs))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
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
        Ok(Cache {
            root: root.to_owned(),
            index,
            fills: Arc::default(),
            fill_policy: FillPolicy::default(),
            fill_slots: Arc::new(tokio::sync::Semaphore::new(
                FillPolicy::default().max_concurrent,
            )),
            manifests,
        })
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
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join("sha256")
            .join(&hex[..2])
            .join(hex)
    }

    /// Opens a committed blob, if the cache has it. An index entry whose file vanished is dropped.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<CachedBlob>, CacheError> {
        if self.index.blob(digest)?.is_none() {
            return Ok(None);
        }
        let path = self.blob_path(digest);
        match std::fs::File::open(&path) {
            Ok(file) => {
                let size = file.metadata().map_err(io_at(&path))?.len();
                Ok(Some(CachedBlob { file, size }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(%digest, "indexed blob file is missing; dropping the entry");
                self.index.remove_blob(digest)?;
                Ok(None)
            }
            Err(e) => Err(io_at(&path)(e)),
        }
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
        let fill = Fill::start(
            digest.clone(),
            make_source(),
            fill::FillContext {
                tmp_path,
                final_path: self.blob_path(digest),
                file,
                index: self.index.clone(),
                fills: self.fills.clone(),
                policy: self.fill_policy.clone(),
                slots: self.fill_slots.clone(),
            },
        );
        map.insert(digest.clone(), fill.clone());
        Ok((fill, false))
    }

    /// A manifest by digest, from memory or the index.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<Arc<StoredManifest>>, CacheError> {
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
        self.index.put_manifest(&m)?;
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
        Ok(self.index.tag(upstream, repo, tag)?)
    }

    pub fn put_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        e: &TagEntry,
    ) -> Result<(), CacheError> {
        Ok(self.index.put_tag(upstream, repo, tag, e)?)
    }

    pub fn touch_repo(&self, upstream: &str, repo: &RepoName) -> Result<(), CacheError> {
        Ok(self.index.touch_repo(upstream, repo)?)
    }

    pub fn repos(&self) -> Result<Vec<RepoEntry>, CacheError> {
        Ok(self.index.repos()?)
    }

    /// Number of fills in flight.
    pub fn fills_in_flight(&self) -> usize {
        self.fills.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Flushes the index (on shutdown).
    pub fn flush(&self) -> Result<(), CacheError> {
        Ok(self.index.flush()?)
    }
}
