//! How a blob becomes hosted content: an upload session closed with its digest, a mount from
//! another repository, a cached blob adopted, a bundle's blob imported. Each follows the order of
//! the module docs (shared objects first, then the file, its record and link, the index flushed).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::Stream;

use crate::oci::{Digest, RegistryError, RepoName};

use super::blobs::{place_copy, place_rename, place_verified};
use super::{internal, shared, uploads, Hosted};

impl Hosted {
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
            shared
                .clear_candidates(&shared::blob_keys(repo, digest))
                .await?;
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
            shared.share_blob(repo, digest, source, size).await?;
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
            if let Err(e) = shared.share_blob(repo, &f.digest, &f.path, f.size).await {
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
        self.quota.room()
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
            shared.share_blob(repo, digest, &dest, size).await?;
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

    /// Purges upload sessions idle past `hosted.upload_timeout`.
    pub async fn purge_idle_uploads(&self) -> usize {
        self.uploads.purge_idle(self.settings.upload_timeout).await
    }
}
