//! Reading hosted blobs: the local copy, else (with a shared store) the shared one, verified and
//! kept locally; unlinking them; placing verified files into the blob layout durably.

use std::path::Path;

use crate::oci::{Digest, ErrorCode, RegistryError, RepoName};

use super::{blob_unknown, internal, shared, Hosted, HostedBlob};

impl Hosted {
    /// Whether `repo` links `digest` on this node with its file present. A link whose file is
    /// missing is logged: it answers as absent (and, with a shared store, is fetched again).
    pub(super) fn held_here(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let linked = self
            .index
            .link(repo, digest)
            .map_err(|e| internal("index", e))?
            .is_some();
        let present = linked && self.blob_path(digest).exists();
        if linked && !present {
            tracing::error!(%repo, %digest, "hosted blob linked but its file is missing");
        }
        Ok(present)
    }

    /// The shared store, when it links `digest` into `repo`; else `BLOB_UNKNOWN`.
    async fn shared_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<&shared::SharedHosted, RegistryError> {
        match &self.shared {
            Some(shared) if shared.link(repo, digest).await?.is_some() => Ok(shared),
            _ => Err(blob_unknown(repo, digest)),
        }
    }

    /// A blob linked in `repo`: the local copy, else (with a shared store) the shared one,
    /// copied to local disk first (verified).
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<HostedBlob, RegistryError> {
        if !self.held_here(repo, digest)? {
            let shared = self.shared_link(repo, digest).await?;
            self.localize_blob(shared, repo, digest).await?;
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

    /// The size of a blob linked in `repo`, without copying a shared blob to local disk (what a
    /// `HEAD` needs). A shared blob's collector records are removed first.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64, RegistryError> {
        if self.held_here(repo, digest)? {
            if let Ok(meta) = std::fs::metadata(self.blob_path(digest)) {
                return Ok(meta.len());
            }
        }
        let shared = self.shared_link(repo, digest).await?;
        // A push asks this before it skips an upload: the collector must not remove the blob
        // it is about to reference (`shared_gc`). The handshake covers only what is checked
        // after the records are cleared, so the link is checked again, then the object.
        shared
            .clear_candidates(&shared::blob_keys(repo, digest))
            .await?;
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
}

/// Renames a verified file into the blob layout, durably (file then directory fsynced).
pub(super) fn place_rename(from: &Path, to: &Path) -> std::io::Result<()> {
    let dir = to
        .parent()
        .ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    std::fs::rename(from, to)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Copies `source` to `tmp` while hashing it; refuses (removing `tmp`) unless it hashes to
/// `want`; else fsyncs it and renames it to `dest` durably.
pub(super) fn place_verified(
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
pub(super) fn place_copy(source: &Path, tmp: &Path, dest: &Path) -> std::io::Result<()> {
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
