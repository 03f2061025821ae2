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

pub mod gc;
pub mod index;
pub mod referrers;
pub mod shared;
pub mod uploads;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;

use crate::oci::manifest::{self, Parsed};
use crate::oci::{Digest, ErrorCode, Reference, RegistryError, RepoName, Tag};

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
        self.shared = Some(shared::SharedHosted::new(store, timeout));
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

    /// The path of a hosted blob file.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs/sha256")
            .join(hex.get(..2).unwrap_or("xx"))
            .join(hex)
    }

    // ---- pull side ------------------------------------------------------------------------

    /// A blob linked in `repo`: the local copy, else (with a shared store) the shared one,
    /// copied to local disk first.
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<HostedBlob, RegistryError> {
        let linked = self
            .index
            .link(repo, digest)
            .map_err(|e| internal("index", e))?
            .is_some();
        let path = self.blob_path(digest);
        if !linked || !path.exists() {
            let Some(shared) = &self.shared else {
                if linked {
                    tracing::error!(%repo, %digest, "hosted blob linked but its file is missing");
                }
                return Err(blob_unknown(repo, digest));
            };
            if shared.link(repo, digest).await?.is_none() {
                return Err(blob_unknown(repo, digest));
            }
            self.localize_blob(shared, repo, digest).await?;
        }
        let file = std::fs::File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                tracing::error!(%repo, %digest, "hosted blob linked but its file is missing");
                blob_unknown(repo, digest)
            } else {
                internal("open blob", e)
            }
        })?;
        let size = file.metadata().map_err(|e| internal("stat blob", e))?.len();
        Ok(HostedBlob { file, size })
    }

    /// A blob linked in `repo` on this node's disk, never the shared store (`export`, which
    /// reads synchronously).
    pub fn local_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<HostedBlob, RegistryError> {
        if self
            .index
            .link(repo, digest)
            .map_err(|e| internal("index", e))?
            .is_none()
        {
            return Err(blob_unknown(repo, digest));
        }
        let file = std::fs::File::open(self.blob_path(digest)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                blob_unknown(repo, digest)
            } else {
                internal("open blob", e)
            }
        })?;
        let size = file.metadata().map_err(|e| internal("stat blob", e))?.len();
        Ok(HostedBlob { file, size })
    }

    /// A manifest of `repo` on this node's disk, never the shared store (`export`).
    pub fn local_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest, RegistryError> {
        let digest = match reference {
            Reference::Tag(tag) => self
                .index
                .tag(repo, tag)
                .map_err(|e| internal("index", e))?
                .ok_or_else(|| manifest_unknown(repo, tag))?,
            Reference::Digest(d) => d.clone(),
        };
        if !self
            .index
            .has_mlink(repo, &digest)
            .map_err(|e| internal("index", e))?
        {
            return Err(manifest_unknown(repo, &digest));
        }
        self.index
            .manifest(&digest)
            .map_err(|e| internal("index", e))?
            .ok_or_else(|| manifest_unknown(repo, &digest))
    }

    /// The size of a blob linked in `repo`, without copying a shared blob to local disk (what a
    /// `HEAD` needs).
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64, RegistryError> {
        let linked = self
            .index
            .link(repo, digest)
            .map_err(|e| internal("index", e))?
            .is_some();
        if linked {
            if let Ok(meta) = std::fs::metadata(self.blob_path(digest)) {
                return Ok(meta.len());
            }
        }
        let Some(shared) = &self.shared else {
            return self.blob(repo, digest).await.map(|b| b.size);
        };
        if shared.link(repo, digest).await?.is_none() {
            return Err(blob_unknown(repo, digest));
        }
        shared
            .blob_size(digest)
            .await?
            .ok_or_else(|| blob_unknown(repo, digest))
    }

    /// Copies a blob the shared store links into `repo` to local disk (verified) and links it
    /// here too: the local copy is a cache of the shared one.
    async fn localize_blob(
        &self,
        shared: &shared::SharedHosted,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), RegistryError> {
        let dest = self.blob_path(digest);
        let held = |h: &Hosted| -> Result<Option<u64>, RegistryError> {
            let size = h.index.blob(digest).map_err(|e| internal("index", e))?;
            Ok(size.filter(|_| dest.exists()))
        };
        // Fetched outside the collector's lock (it can be long); placed and recorded under it.
        let mut fetched = None;
        if held(self)?.is_none() {
            let tmp = self.root.join("uploads").join(format!(
                "fetch-{}-{:08x}",
                digest.hex(),
                rand::random::<u32>()
            ));
            let Some(size) = shared.fetch_blob(digest, &tmp).await? else {
                tracing::error!(%repo, %digest, "shared store links a hosted blob it does not hold");
                return Err(blob_unknown(repo, digest));
            };
            fetched = Some((tmp, size));
        }
        let _push = self.gc_lock.read().await;
        let size = match (held(self)?, fetched) {
            (Some(size), Some((tmp, _))) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                size
            }
            (Some(size), None) => size,
            (None, Some((tmp, size))) => {
                self.place_fetched(&tmp, digest, size).await?;
                size
            }
            // Collected between the check and the lock: the next read fetches it again.
            (None, None) => return Err(blob_unknown(repo, digest)),
        };
        self.index
            .put_link(repo, digest, size)
            .map_err(|e| internal("index", e))?;
        self.index.flush().await.map_err(|e| internal("index", e))
    }

    /// Moves a verified copy of a shared blob into the blob layout and records it (counted in
    /// the hosted bytes, never refused: it is already acknowledged content).
    async fn place_fetched(
        &self,
        tmp: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<(), RegistryError> {
        let (from, to) = (tmp.to_path_buf(), self.blob_path(digest));
        let placed = tokio::task::spawn_blocking(move || place_rename(&from, &to))
            .await
            .map_err(|e| internal("place blob", e))
            .and_then(|r| r.map_err(|e| internal("place blob", e)));
        if let Err(e) = placed {
            let _ = tokio::fs::remove_file(tmp).await;
            return Err(e);
        }
        // Counted like a push's bytes; `record_blob` gives them back when already recorded.
        self.quota.add(size);
        self.record_blob(digest, size)
    }

    /// A manifest of `repo` by tag or digest: the local copy, else (with a shared store) the
    /// shared one, kept locally. With a shared store its tag records decide what a tag is.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest, RegistryError> {
        let (digest, tagged) = match reference {
            Reference::Tag(tag) => match self.resolve_tag(repo, tag).await? {
                Some(d) => (d, true),
                None => return Err(manifest_unknown(repo, tag)),
            },
            Reference::Digest(d) => (d.clone(), false),
        };
        let linked = self
            .index
            .has_mlink(repo, &digest)
            .map_err(|e| internal("index", e))?;
        if let (Some(shared), false) = (&self.shared, tagged) {
            self.check_shared_mlink(shared, repo, &digest, linked)
                .await?;
        }
        let local = self
            .index
            .manifest(&digest)
            .map_err(|e| internal("index", e))?;
        if let (true, Some(m)) = (linked, local) {
            return Ok(m);
        }
        let Some(shared) = &self.shared else {
            return Err(manifest_unknown(repo, &digest));
        };
        let m = shared
            .manifest(&digest)
            .await?
            .ok_or_else(|| manifest_unknown(repo, &digest))?;
        let _push = self.gc_lock.read().await;
        // The same bytes under the same key: a copy written meanwhile is simply replaced.
        if self
            .index
            .put_manifest(&m)
            .map_err(|e| internal("index", e))?
        {
            self.quota.add(m.bytes.len() as u64);
        }
        self.index
            .put_mlink(repo, &digest, now_secs())
            .map_err(|e| internal("index", e))?;
        self.index.flush().await.map_err(|e| internal("index", e))?;
        Ok(m)
    }

    /// A manifest asked for by digest must be linked in the shared store (it may have been
    /// deleted on another node: then the local link goes too). When the store cannot be read,
    /// the local link answers.
    async fn check_shared_mlink(
        &self,
        shared: &shared::SharedHosted,
        repo: &RepoName,
        digest: &Digest,
        linked: bool,
    ) -> Result<(), RegistryError> {
        match shared.has_mlink(repo, digest).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                if linked {
                    self.index
                        .remove_mlink(repo, digest)
                        .map_err(|e| internal("index", e))?;
                }
                Err(manifest_unknown(repo, digest))
            }
            Err(e) if linked => {
                tracing::warn!(%repo, %digest, error = %e.message, "hosted: answering from the local manifest link");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// What `tag` points to: the shared record when there is a shared store (the local record
    /// follows it; when the store cannot be read the local record answers), else the local one.
    async fn resolve_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<Digest>, RegistryError> {
        let local = self
            .index
            .tag(repo, tag)
            .map_err(|e| internal("index", e))?;
        let Some(shared) = &self.shared else {
            return Ok(local);
        };
        match shared.tag(repo, tag).await {
            Ok(Some(d)) => {
                if local.as_ref() != Some(&d) {
                    self.index
                        .put_tag(repo, tag, &d)
                        .map_err(|e| internal("index", e))?;
                }
                Ok(Some(d))
            }
            Ok(None) => {
                if local.is_some() {
                    self.index
                        .remove_tag(repo, tag.as_str())
                        .map_err(|e| internal("index", e))?;
                }
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(%repo, %tag, error = %e.message, "hosted: answering from the local tag record");
                Ok(local)
            }
        }
    }

    /// The tags of `repo`, sorted; `NAME_UNKNOWN` for a repository with no manifest. With a
    /// shared store, its tag records (the local ones when it cannot be read).
    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<String>, RegistryError> {
        if let Some(shared) = &self.shared {
            match shared.tags(repo).await {
                Ok(tags) if !tags.is_empty() => {
                    return Ok(tags.into_iter().map(|(t, _)| t).collect())
                }
                Ok(_) if shared.has_repository(repo).await? => return Ok(Vec::new()),
                Ok(_) => {
                    return Err(RegistryError::new(
                        ErrorCode::NameUnknown,
                        format!("repository {repo} is not known"),
                    ))
                }
                Err(e) => {
                    tracing::warn!(%repo, error = %e.message, "hosted: listing the local tags");
                }
            }
        }
        let tags: Vec<String> = self
            .index
            .tags_of(repo)
            .map_err(|e| internal("index", e))?
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        if tags.is_empty() && !self.has_repository(repo)? {
            return Err(RegistryError::new(
                ErrorCode::NameUnknown,
                format!("repository {repo} is not known"),
            ));
        }
        Ok(tags)
    }

    fn has_repository(&self, repo: &RepoName) -> Result<bool, RegistryError> {
        Ok(self
            .index
            .repositories()
            .map_err(|e| internal("index", e))?
            .iter()
            .any(|r| r == repo.as_str()))
    }

    /// Hosted repositories holding at least one manifest.
    pub fn repositories(&self) -> Result<Vec<String>, RegistryError> {
        self.index.repositories().map_err(|e| internal("index", e))
    }

    // ---- push side: blobs -----------------------------------------------------------------

    /// Links an existing hosted blob from `from` into `repo`; false when `from` does not hold it
    /// (locally, or in the shared store when there is one).
    pub async fn mount(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: &RepoName,
    ) -> Result<bool, RegistryError> {
        let _push = self.gc_lock.read().await;
        let path = self.blob_path(digest);
        let local = self
            .index
            .link(from, digest)
            .map_err(|e| internal("index", e))?
            .filter(|_| path.exists());
        if let Some(shared) = &self.shared {
            let size = match local {
                // Held here: the shared store gets the bytes too (one HEAD when it has them).
                Some(size) => shared.put_blob(digest, &path, size).await.map(|()| size)?,
                None => match shared.link(from, digest).await? {
                    Some(size) if shared.blob_size(digest).await?.is_some() => size,
                    _ => return Ok(false),
                },
            };
            shared.put_link(repo, digest, size).await?;
        }
        let Some(size) = local else {
            return Ok(self.shared.is_some());
        };
        self.index
            .put_link(repo, digest, size)
            .map_err(|e| internal("index", e))?;
        self.index.flush().await.map_err(|e| internal("index", e))?;
        Ok(true)
    }

    /// Adopts a verified blob file from outside hosted storage (a cached blob being mounted):
    /// hard-linked when possible (the bytes then live once on disk), else copied; counted in
    /// the hosted budget; linked into `repo`.
    pub async fn adopt(
        &self,
        repo: &RepoName,
        digest: &Digest,
        source: &Path,
    ) -> Result<(), RegistryError> {
        let size = tokio::fs::metadata(source)
            .await
            .map_err(|e| internal("stat cached blob", e))?
            .len();
        if let Some(shared) = &self.shared {
            shared.put_blob(digest, source, size).await?;
            shared.put_link(repo, digest, size).await?;
        }
        let _push = self.gc_lock.read().await;
        if self
            .index
            .blob(digest)
            .map_err(|e| internal("index", e))?
            .is_none()
        {
            self.quota.take(size)?;
            let dest = self.blob_path(digest);
            let tmp = self
                .root
                .join("uploads")
                .join(format!("adopt-{}", digest.hex()));
            let source = source.to_path_buf();
            let placed = tokio::task::spawn_blocking(move || place_copy(&source, &tmp, &dest))
                .await
                .map_err(|e| internal("adopt", e))
                .and_then(|r| r.map_err(|e| internal("adopt", e)));
            if let Err(e) = placed {
                self.quota.give(size);
                return Err(e);
            }
            self.record_blob(digest, size)?;
        }
        self.index
            .put_link(repo, digest, size)
            .map_err(|e| internal("index", e))?;
        self.index.flush().await.map_err(|e| internal("index", e))
    }

    /// Opens an upload session.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<String, RegistryError> {
        self.uploads.create(repo).await
    }

    /// Appends a request body to a session; the bytes it holds afterwards.
    pub async fn patch<S, E>(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        length: Option<u64>,
        body: S,
    ) -> Result<u64, RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let mut s = self.uploads.get(repo, id).await?;
        self.uploads.append(&mut s, start, length, body).await?;
        Ok(s.offset)
    }

    /// The bytes a session holds.
    pub async fn upload_offset(&self, repo: &RepoName, id: &str) -> Result<u64, RegistryError> {
        Ok(self.uploads.get(repo, id).await?.offset)
    }

    /// Cancels a session.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<(), RegistryError> {
        let s = self.uploads.get(repo, id).await?;
        self.uploads.cancel(s).await;
        Ok(())
    }

    /// Closes a session with its last bytes (possibly none) and commits the blob as `digest`.
    /// A body that breaks off or a digest that does not match ends the session, keeping nothing.
    pub async fn finish_upload<S, E>(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        length: Option<u64>,
        body: S,
    ) -> Result<(), RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let mut s = self.uploads.get(repo, id).await?;
        if let Err(e) = self.uploads.append(&mut s, None, length, body).await {
            self.uploads.cancel(s).await;
            return Err(e);
        }
        let finished = self.uploads.finish(s, digest).await?;
        self.commit_blob(repo, finished).await
    }

    /// Moves a verified upload into the blob layout and links it (module docs: the order).
    async fn commit_blob(
        &self,
        repo: &RepoName,
        f: uploads::Finished,
    ) -> Result<(), RegistryError> {
        // The shared copy first (outside the collector's lock: it can be long).
        if let Some(shared) = &self.shared {
            let shared_first = async {
                shared.put_blob(&f.digest, &f.path, f.size).await?;
                shared.put_link(repo, &f.digest, f.size).await
            };
            if let Err(e) = shared_first.await {
                let _ = tokio::fs::remove_file(&f.path).await;
                self.quota.give(f.size);
                return Err(e);
            }
        }
        let _push = self.gc_lock.read().await;
        let dest = self.blob_path(&f.digest);
        let known = self
            .index
            .blob(&f.digest)
            .map_err(|e| internal("index", e))?
            .is_some()
            && dest.exists();
        if known {
            // The same bytes are already held: this upload's copy is not needed.
            let _ = tokio::fs::remove_file(&f.path).await;
            self.quota.give(f.size);
        } else {
            let (from, to) = (f.path.clone(), dest.clone());
            let placed = tokio::task::spawn_blocking(move || place_rename(&from, &to))
                .await
                .map_err(|e| internal("commit blob", e))
                .and_then(|r| r.map_err(|e| internal("commit blob", e)));
            if let Err(e) = placed {
                let _ = tokio::fs::remove_file(&f.path).await;
                self.quota.give(f.size);
                return Err(e);
            }
            self.record_blob(&f.digest, f.size)?;
        }
        self.index
            .put_link(repo, &f.digest, f.size)
            .map_err(|e| internal("index", e))?;
        self.index.flush().await.map_err(|e| internal("index", e))
    }

    // ---- import (`stowage import` of a bundle) ----------------------------------------------

    /// Bytes the hosted budget still has room for.
    pub fn room(&self) -> u64 {
        self.quota.max().saturating_sub(self.quota.used())
    }

    /// Commits the file at `source` as blob `digest` of `repo`, as a push does: copied into the
    /// uploads directory while hashed, refused unless it hashes to `digest` (nothing kept),
    /// counted in `hosted.max_size`, then placed in the order of the module docs. A blob already
    /// held is only linked. Returns whether anything changed.
    pub async fn import_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        source: &Path,
    ) -> Result<bool, RegistryError> {
        let _push = self.gc_lock.read().await;
        let dest = self.blob_path(digest);
        let held = self.index.blob(digest).map_err(|e| internal("index", e))?;
        let (size, mut changed) = match held {
            Some(size) if dest.exists() => (size, false),
            _ => (self.place_import(digest, source, dest.clone()).await?, true),
        };
        if let Some(shared) = &self.shared {
            shared.put_blob(digest, &dest, size).await?;
            shared.put_link(repo, digest, size).await?;
        }
        if self
            .index
            .link(repo, digest)
            .map_err(|e| internal("index", e))?
            .is_none()
        {
            self.index
                .put_link(repo, digest, size)
                .map_err(|e| internal("index", e))?;
            changed = true;
        }
        self.index.flush().await.map_err(|e| internal("index", e))?;
        Ok(changed)
    }

    /// Copies, verifies and places a blob file that hosted storage does not hold; its size.
    async fn place_import(
        &self,
        digest: &Digest,
        source: &Path,
        dest: PathBuf,
    ) -> Result<u64, RegistryError> {
        let size = tokio::fs::metadata(source)
            .await
            .map_err(|e| internal("stat imported blob", e))?
            .len();
        self.quota.take(size)?;
        let tmp = self
            .root
            .join("uploads")
            .join(format!("import-{}", digest.hex()));
        let (source, want) = (source.to_path_buf(), digest.clone());
        let placed =
            tokio::task::spawn_blocking(move || place_verified(&source, &tmp, &dest, &want))
                .await
                .map_err(|e| internal("import blob", e))
                .and_then(|r| r);
        if let Err(e) = placed {
            self.quota.give(size);
            return Err(e);
        }
        self.record_blob(digest, size)?;
        Ok(size)
    }

    /// Stores a manifest as a push of it to `reference` would (the same checks, byte-exact,
    /// durable on return). Returns whether anything changed: a new manifest, its first link in
    /// `repo`, or a tag that moved.
    pub async fn import_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<bool, RegistryError> {
        let digest = Digest::of(&bytes);
        let present = self
            .index
            .has_mlink(repo, &digest)
            .map_err(|e| internal("index", e))?
            && self
                .index
                .manifest(&digest)
                .map_err(|e| internal("index", e))?
                .is_some();
        let tagged = match reference {
            Reference::Tag(t) => {
                self.index.tag(repo, t).map_err(|e| internal("index", e))? == Some(digest.clone())
            }
            Reference::Digest(_) => true,
        };
        if present && tagged {
            return Ok(false);
        }
        self.put_manifest(repo, reference, Some(media_type), bytes)
            .await?;
        Ok(true)
    }

    // ---- push side: manifests -------------------------------------------------------------

    /// Checks and stores a pushed manifest under `reference`; its digest and parsed form.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<(Digest, Parsed), RegistryError> {
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(RegistryError::new(
                ErrorCode::SizeInvalid,
                format!(
                    "manifest of {} bytes is over the {MAX_MANIFEST_SIZE}-byte limit",
                    bytes.len()
                ),
            )
            .with_status(413));
        }
        let digest = Digest::of(&bytes);
        if let Reference::Digest(d) = reference {
            if d != &digest {
                return Err(RegistryError::new(
                    ErrorCode::DigestInvalid,
                    format!("the manifest hashes to {digest}, not {d}"),
                ));
            }
        }
        let parsed = manifest::parse(&bytes, content_type)
            .map_err(|e| RegistryError::new(ErrorCode::ManifestInvalid, e.to_string()))?;
        let _push = self.gc_lock.read().await;
        self.check_references(repo, &parsed).await?;
        self.store_manifest(repo, reference, &digest, &parsed, bytes)
            .await?;
        Ok((digest, parsed))
    }

    /// Every blob (but foreign layers) and child manifest must be in `repo` (locally, or in
    /// the shared store when there is one).
    async fn check_references(
        &self,
        repo: &RepoName,
        parsed: &Parsed,
    ) -> Result<(), RegistryError> {
        for blob in &parsed.blobs {
            if blob
                .media_type
                .as_deref()
                .is_some_and(manifest::is_non_distributable)
            {
                continue;
            }
            let mut linked = self
                .index
                .link(repo, &blob.digest)
                .map_err(|e| internal("index", e))?
                .is_some();
            if let (false, Some(shared)) = (linked, &self.shared) {
                linked = shared.link(repo, &blob.digest).await?.is_some();
            }
            if !linked {
                return Err(RegistryError::new(
                    ErrorCode::ManifestBlobUnknown,
                    format!("blob {} is not in {repo}: push it first", blob.digest),
                ));
            }
        }
        for child in &parsed.children {
            let mut linked = self
                .index
                .has_mlink(repo, &child.digest)
                .map_err(|e| internal("index", e))?;
            if let (false, Some(shared)) = (linked, &self.shared) {
                linked = shared.has_mlink(repo, &child.digest).await?;
            }
            if !linked {
                return Err(RegistryError::new(
                    ErrorCode::ManifestBlobUnknown,
                    format!("manifest {} is not in {repo}: push it first", child.digest),
                ));
            }
        }
        Ok(())
    }

    async fn store_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        digest: &Digest,
        parsed: &Parsed,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        if let Some(shared) = &self.shared {
            let m = StoredManifest {
                digest: digest.clone(),
                media_type: parsed.media_type.clone(),
                bytes: bytes.clone(),
            };
            shared.put_manifest(&m).await?;
            shared.put_mlink(repo, digest, now_secs()).await?;
            if let Reference::Tag(tag) = reference {
                shared.put_tag(repo, tag, digest).await?;
            }
        }
        let new = self
            .index
            .manifest(digest)
            .map_err(|e| internal("index", e))?
            .is_none();
        if new {
            self.quota.take(bytes.len() as u64)?;
            let stored = StoredManifest {
                digest: digest.clone(),
                media_type: parsed.media_type.clone(),
                bytes,
            };
            match self.index.put_manifest(&stored) {
                Ok(true) => {}
                // Stored meanwhile by a concurrent push of the same bytes: counted once.
                Ok(false) => self.quota.give(stored.bytes.len() as u64),
                Err(e) => {
                    self.quota.give(stored.bytes.len() as u64);
                    return Err(internal("index", e));
                }
            }
        }
        self.index
            .put_mlink(repo, digest, now_secs())
            .map_err(|e| internal("index", e))?;
        if let Reference::Tag(tag) = reference {
            self.index
                .put_tag(repo, tag, digest)
                .map_err(|e| internal("index", e))?;
        }
        self.index.flush().await.map_err(|e| internal("index", e))
    }

    // ---- deletes --------------------------------------------------------------------------

    fn check_delete(&self) -> Result<(), RegistryError> {
        if self.settings.delete {
            Ok(())
        } else {
            Err(RegistryError::new(
                ErrorCode::Unsupported,
                "deletes are disabled (hosted.delete = false)",
            ))
        }
    }

    /// Deletes a manifest by digest (and every tag of `repo` pointing to it), or one tag. With a
    /// shared store the shared records go first, and they decide whether it existed.
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(), RegistryError> {
        self.check_delete()?;
        let shared_had = match &self.shared {
            Some(shared) => Some(self.delete_shared_manifest(shared, repo, reference).await?),
            None => None,
        };
        let idx = &self.index;
        let local_had = match reference {
            Reference::Tag(tag) => idx
                .remove_tag(repo, tag.as_str())
                .map_err(|e| internal("index", e))?,
            Reference::Digest(d) => {
                let had = idx
                    .remove_mlink(repo, d)
                    .map_err(|e| internal("index", e))?;
                for (tag, hex) in idx.tags_of(repo).map_err(|e| internal("index", e))? {
                    if hex == d.hex() {
                        idx.remove_tag(repo, &tag)
                            .map_err(|e| internal("index", e))?;
                    }
                }
                had
            }
        };
        idx.flush().await.map_err(|e| internal("index", e))?;
        if shared_had.unwrap_or(local_had) {
            Ok(())
        } else {
            Err(manifest_unknown(repo, reference))
        }
    }

    /// The shared half of [`Hosted::delete_manifest`]: whether the shared store held it.
    async fn delete_shared_manifest(
        &self,
        shared: &shared::SharedHosted,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<bool, RegistryError> {
        match reference {
            Reference::Tag(tag) => {
                let had = shared.tag(repo, tag).await?.is_some();
                shared.remove_tag(repo, tag.as_str()).await?;
                Ok(had)
            }
            Reference::Digest(d) => {
                let had = shared.has_mlink(repo, d).await?;
                for (tag, target) in shared.tags(repo).await? {
                    if &target == d {
                        shared.remove_tag(repo, &tag).await?;
                    }
                }
                shared.remove_mlink(repo, d).await?;
                Ok(had)
            }
        }
    }

    /// Unlinks a blob from `repo` (its file goes at the next `gc` if nothing else links it).
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<(), RegistryError> {
        self.check_delete()?;
        let shared_had = match &self.shared {
            Some(shared) => {
                let had = shared.link(repo, digest).await?.is_some();
                shared.remove_link(repo, digest).await?;
                Some(had)
            }
            None => None,
        };
        let local_had = self
            .index
            .remove_link(repo, digest)
            .map_err(|e| internal("index", e))?;
        self.index.flush().await.map_err(|e| internal("index", e))?;
        if shared_had.unwrap_or(local_had) {
            Ok(())
        } else {
            Err(blob_unknown(repo, digest))
        }
    }

    /// Purges upload sessions idle past `hosted.upload_timeout`.
    pub async fn purge_idle_uploads(&self) -> usize {
        self.uploads.purge_idle(self.settings.upload_timeout).await
    }

    /// A tag parsed for a push.
    pub fn tag_of(reference: &Reference) -> Option<&Tag> {
        match reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }
}

/// Renames a verified file into the blob layout, durably (file then directory fsynced).
fn place_rename(from: &Path, to: &Path) -> std::io::Result<()> {
    let dir = to
        .parent()
        .ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    std::fs::rename(from, to)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Copies `source` to `tmp` while hashing it; refuses (removing `tmp`) unless it hashes to
/// `want`; else fsyncs it and renames it to `dest` durably.
fn place_verified(
    source: &Path,
    tmp: &Path,
    dest: &Path,
    want: &Digest,
) -> Result<(), RegistryError> {
    use sha2::Digest as _;
    use std::io::{Read, Write};
    let copy = || -> std::io::Result<Digest> {
        let mut input = std::fs::File::open(source)?;
        let mut output = std::fs::File::create(tmp)?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let chunk = buf.get(..n).unwrap_or_default();
            hasher.update(chunk);
            output.write_all(chunk)?;
        }
        output.sync_all()?;
        Ok(Digest::from_hasher(hasher))
    };
    let got = match copy() {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            return Err(internal("import blob", e));
        }
    };
    if &got != want {
        let _ = std::fs::remove_file(tmp);
        return Err(RegistryError::new(
            ErrorCode::DigestInvalid,
            format!("{} hashes to {got}, not {want}", source.display()),
        ));
    }
    place_rename(tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        internal("import blob", e)
    })
}

/// Places a copy of `source` at `dest`: a hard link when the file system allows, else a copy
/// through `tmp` (fsynced, renamed).
fn place_copy(source: &Path, tmp: &Path, dest: &Path) -> std::io::Result<()> {
    let dir = dest
        .parent()
        .ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    match std::fs::hard_link(source, dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => {
            std::fs::copy(source, tmp)?;
            std::fs::File::open(tmp)?.sync_all()?;
            std::fs::rename(tmp, dest)?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Pattern;
    use std::time::Duration;

    fn settings() -> Settings {
        Settings {
            repositories: vec![Pattern::new("team/**").unwrap()],
            max_size: 1 << 20,
            delete: true,
            upload_timeout: Duration::from_secs(60),
        }
    }

    fn once(bytes: &'static [u8]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::iter(vec![Ok(Bytes::from_static(bytes))])
    }

    async fn push_blob(h: &Hosted, repo: &RepoName, bytes: &'static [u8]) -> Digest {
        let d = Digest::of(bytes);
        let id = h.start_upload(repo).await.unwrap();
        h.finish_upload(repo, &id, &d, None, once(bytes))
            .await
            .unwrap();
        d
    }

    fn image(config: &Digest, layer: &Digest, subject: Option<&Digest>) -> Bytes {
        let mut v = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::oci::media::OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": 5}]
        });
        if let Some(s) = subject {
            v["subject"] = serde_json::json!({"mediaType": crate::oci::media::OCI_MANIFEST, "digest": s.to_string(), "size": 1});
        }
        Bytes::from(v.to_string())
    }

    #[tokio::test]
    async fn a_push_is_visible_only_in_its_repository_and_checks_its_references() {
        let dir = tempfile::tempdir().unwrap();
        let h = Hosted::open(settings(), dir.path()).unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let other: RepoName = "team/other".parse().unwrap();
        assert!(h.holds_name(&repo));
        assert!(!h.holds_name(&"library/alpine".parse().unwrap()));
        let config = push_blob(&h, &repo, b"{}").await;
        let bytes = image(&config, &Digest::of(b"layer"), None);
        let tag = Reference::Tag("1".parse().unwrap());
        let e = h
            .put_manifest(&repo, &tag, None, bytes.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::ManifestBlobUnknown);
        let layer = push_blob(&h, &repo, b"layer").await;
        let (digest, _) = h
            .put_manifest(&repo, &tag, None, bytes.clone())
            .await
            .unwrap();
        assert_eq!(h.manifest(&repo, &tag).await.unwrap().bytes, bytes);
        assert_eq!(h.blob(&repo, &layer).await.unwrap().size, 5);
        assert_eq!(
            h.blob(&other, &layer).await.unwrap_err().code,
            ErrorCode::BlobUnknown
        );
        assert_eq!(
            h.manifest(&other, &Reference::Digest(digest))
                .await
                .unwrap_err()
                .code,
            ErrorCode::ManifestUnknown
        );
        assert!(h.mount(&other, &layer, &repo).await.unwrap());
        assert_eq!(h.blob(&other, &layer).await.unwrap().size, 5);
        assert_eq!(h.repositories().unwrap(), vec!["team/app"]);
    }

    fn shared_pair(store_dir: &Path) -> (tempfile::TempDir, Hosted, tempfile::TempDir, Hosted) {
        let store: Arc<dyn crate::store::BlobStore> =
            Arc::new(crate::store::fs::FsStore::new(store_dir.to_path_buf()));
        let timeout = Duration::from_secs(5);
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Hosted::open(settings(), da.path())
            .unwrap()
            .with_shared_store(store.clone(), timeout);
        let b = Hosted::open(settings(), db.path())
            .unwrap()
            .with_shared_store(store, timeout);
        (da, a, db, b)
    }

    #[tokio::test]
    async fn with_a_shared_store_every_node_serves_what_one_acknowledged() {
        let shared = tempfile::tempdir().unwrap();
        let (da, a, _db, b) = shared_pair(shared.path());
        let repo: RepoName = "team/app".parse().unwrap();
        let config = push_blob(&a, &repo, b"{}").await;
        let layer = push_blob(&a, &repo, b"layer").await;
        let v1 = image(&config, &layer, None);
        let tag = Reference::Tag("1".parse().unwrap());
        let (d1, _) = a.put_manifest(&repo, &tag, None, v1.clone()).await.unwrap();

        // Node B has nothing locally, and serves all of it from the shared store.
        assert!(b.index.link(&repo, &layer).unwrap().is_none());
        assert_eq!(b.manifest(&repo, &tag).await.unwrap().bytes, v1);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut b.blob(&repo, &layer).await.unwrap().file, &mut got)
            .unwrap();
        assert_eq!(got, b"layer");
        assert!(b.blob_path(&layer).exists(), "B keeps a local copy");
        assert_eq!(b.tags(&repo).await.unwrap(), vec!["1"]);
        let other: RepoName = "team/other".parse().unwrap();
        assert_eq!(
            b.blob(&other, &layer).await.unwrap_err().code,
            ErrorCode::BlobUnknown
        );

        // An imported blob is shared like a pushed one.
        let source = da.path().join("imported");
        std::fs::write(&source, b"imported").unwrap();
        let imported = Digest::of(b"imported");
        assert!(a.import_blob(&repo, &imported, &source).await.unwrap());
        assert_eq!(b.blob(&repo, &imported).await.unwrap().size, 8);

        // A tag moved on B (a manifest whose blobs were pushed to A) is what A serves.
        let layer2 = push_blob(&a, &repo, b"layer-2").await;
        let v2 = image(&config, &layer2, None);
        let (d2, _) = b.put_manifest(&repo, &tag, None, v2.clone()).await.unwrap();
        assert_ne!(d1, d2);
        assert_eq!(a.manifest(&repo, &tag).await.unwrap().bytes, v2);
        // A tag deleted on B is gone on A; so is a manifest deleted by digest.
        b.delete_manifest(&repo, &tag).await.unwrap();
        assert_eq!(
            a.manifest(&repo, &tag).await.unwrap_err().code,
            ErrorCode::ManifestUnknown
        );
        let by_digest = Reference::Digest(d1);
        assert!(a.manifest(&repo, &by_digest).await.is_ok());
        b.delete_manifest(&repo, &by_digest).await.unwrap();
        assert_eq!(
            a.manifest(&repo, &by_digest).await.unwrap_err().code,
            ErrorCode::ManifestUnknown
        );

        // The store failing: the push is 503 and nothing is acknowledged or linked.
        std::fs::remove_dir_all(shared.path().join(".tmp")).unwrap();
        std::fs::write(shared.path().join(".tmp"), b"not a directory").unwrap();
        let bytes: &'static [u8] = b"after the store broke";
        let d = Digest::of(bytes);
        let id = a.start_upload(&repo).await.unwrap();
        let e = a
            .finish_upload(&repo, &id, &d, None, once(bytes))
            .await
            .unwrap_err();
        assert_eq!(e.status(), 503, "{e:?}");
        assert!(a.index.link(&repo, &d).unwrap().is_none());
        assert!(!a.blob_path(&d).exists());
        let e = a
            .put_manifest(&repo, &Reference::Tag("2".parse().unwrap()), None, v1)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 503, "{e:?}");
        assert!(a.index.tag(&repo, &"2".parse().unwrap()).unwrap().is_none());
    }

    #[tokio::test]
    async fn gc_keeps_what_tags_reach_and_their_referrers_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let h = Hosted::open(settings(), dir.path()).unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let config = push_blob(&h, &repo, b"{}").await;
        let kept_layer = push_blob(&h, &repo, b"layer").await;
        let old_layer = push_blob(&h, &repo, b"old-layer").await;
        let stray = push_blob(&h, &repo, b"never referenced").await;
        let tagged = image(&config, &kept_layer, None);
        let (tagged_digest, _) = h
            .put_manifest(&repo, &Reference::Tag("1".parse().unwrap()), None, tagged)
            .await
            .unwrap();
        let untagged = image(&config, &old_layer, None);
        let (untagged_digest, _) = h
            .put_manifest(&repo, &Reference::Tag("2".parse().unwrap()), None, untagged)
            .await
            .unwrap();
        // Tag 2 moves away: its old manifest is reached by nothing.
        let signature = image(&config, &kept_layer, Some(&tagged_digest));
        let (sig_digest, _) = h
            .put_manifest(
                &repo,
                &Reference::Digest(Digest::of(&signature)),
                None,
                signature,
            )
            .await
            .unwrap();
        h.index.remove_tag(&repo, "2").unwrap();

        // gc blocks: run it on a thread of its own, as `stowage gc` does.
        let gc = |grace: Duration, dry: bool| {
            std::thread::scope(|s| s.spawn(|| h.gc(grace, dry)).join().unwrap()).unwrap()
        };
        // Within the grace period nothing goes.
        let report = gc(Duration::from_secs(3600), false);
        assert_eq!(report, gc::GcReport::default());
        let dry = gc(Duration::ZERO, true);
        assert_eq!(
            dry.manifests,
            vec![("team/app".to_string(), untagged_digest.hex().to_string())]
        );
        assert!(
            h.blob(&repo, &old_layer).await.is_ok(),
            "a dry run removes nothing"
        );
        let report = gc(Duration::ZERO, false);
        assert_eq!(report, dry);
        assert_eq!(report.blobs.len(), 2, "{report:?}");
        assert!(h
            .manifest(&repo, &Reference::Digest(tagged_digest))
            .await
            .is_ok());
        assert!(h
            .manifest(&repo, &Reference::Digest(sig_digest))
            .await
            .is_ok());
        assert!(h
            .manifest(&repo, &Reference::Digest(untagged_digest))
            .await
            .is_err());
        assert!(h.blob(&repo, &kept_layer).await.is_ok());
        for gone in [&old_layer, &stray] {
            assert!(h.blob(&repo, gone).await.is_err());
            assert!(!h.blob_path(gone).exists());
        }
        assert!(h.blob_path(&config).exists());
    }

    #[tokio::test]
    async fn an_import_verifies_its_blobs_fits_the_budget_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let h = Hosted::open(settings(), dir.path()).unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let put = |name: &str, bytes: &[u8]| {
            let p = src.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let (config, layer) = (put("c", b"{}"), put("l", b"layer"));
        let (cd, ld) = (Digest::of(b"{}"), Digest::of(b"layer"));

        // A file that does not hash to its digest is refused, and nothing stays.
        let e = h.import_blob(&repo, &ld, &config).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::DigestInvalid);
        assert!(!h.blob_path(&ld).exists() && h.blob(&repo, &ld).await.is_err());
        assert_eq!(h.usage(), (0, 0));
        assert_eq!(
            std::fs::read_dir(dir.path().join("hosted/uploads"))
                .unwrap()
                .count(),
            0
        );

        assert!(h.import_blob(&repo, &cd, &config).await.unwrap());
        assert!(h.import_blob(&repo, &ld, &layer).await.unwrap());
        assert!(!h.import_blob(&repo, &ld, &layer).await.unwrap(), "held");
        let bytes = image(&cd, &ld, None);
        let tag = Reference::Tag("1".parse().unwrap());
        let t = crate::oci::media::OCI_MANIFEST;
        assert!(h
            .import_manifest(&repo, &tag, t, bytes.clone())
            .await
            .unwrap());
        assert!(!h
            .import_manifest(&repo, &tag, t, bytes.clone())
            .await
            .unwrap());
        assert_eq!(h.manifest(&repo, &tag).await.unwrap().bytes, bytes);
        assert_eq!(h.blob(&repo, &ld).await.unwrap().size, 5);
        let used = 2 + 5 + bytes.len() as u64;
        assert_eq!(h.usage(), (used, 2));
        assert_eq!(h.room(), (1 << 20) - used);

        // Past hosted.max_size: refused, nothing kept.
        let big = put("big", &vec![7u8; 1 << 20]);
        let bd = Digest::of(&vec![7u8; 1 << 20]);
        let e = h.import_blob(&repo, &bd, &big).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Denied, "{e}");
        assert!(!h.blob_path(&bd).exists());
        assert_eq!(h.usage(), (used, 2));
    }
}
