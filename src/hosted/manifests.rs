//! Hosted manifests: read by tag or digest (with a shared store, its records decide), pushed
//! (checked, stored byte-exact, durable before the `201`), imported, deleted.

use bytes::Bytes;

use crate::oci::manifest::{self, Parsed};
use crate::oci::{Digest, ErrorCode, Reference, RegistryError, RepoName, Tag};

use super::{
    internal, manifest_unknown, now_secs, shared, Hosted, StoredManifest, MAX_MANIFEST_SIZE,
};

impl Hosted {
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
        if let Some(shared) = &self.shared {
            // Before anything is checked: the shared collector must not remove what this push
            // references (`shared_gc`).
            shared
                .clear_candidates(&referenced_keys(repo, &digest, &parsed))
                .await?;
        }
        self.check_references(repo, &parsed).await?;
        self.store_manifest(repo, reference, &digest, &parsed, bytes)
            .await?;
        Ok((digest, parsed))
    }

    /// Every blob (but foreign layers) and child manifest must be in `repo`: with a shared
    /// store, in it (the source of truth).
    async fn check_references(
        &self,
        repo: &RepoName,
        parsed: &Parsed,
    ) -> Result<(), RegistryError> {
        for blob in distributable(parsed) {
            if !self.blob_in(repo, &blob.digest).await? {
                return Err(RegistryError::new(
                    ErrorCode::ManifestBlobUnknown,
                    format!("blob {} is not in {repo}: push it first", blob.digest),
                ));
            }
        }
        for child in &parsed.children {
            if !self.manifest_in(repo, &child.digest).await? {
                return Err(RegistryError::new(
                    ErrorCode::ManifestBlobUnknown,
                    format!("manifest {} is not in {repo}: push it first", child.digest),
                ));
            }
        }
        Ok(())
    }

    /// Whether blob `digest` is in `repo`. A blob this node holds that the shared store no
    /// longer links (collected or unlinked elsewhere after the client's `HEAD` here) is shared
    /// again from the verified local copy: the manifest being pushed references it.
    async fn blob_in(&self, repo: &RepoName, digest: &Digest) -> Result<bool, RegistryError> {
        let here = self.held_here(repo, digest)?;
        let Some(shared) = &self.shared else {
            return Ok(here);
        };
        if shared.link(repo, digest).await?.is_some() {
            return Ok(true);
        }
        if !here {
            return Ok(false);
        }
        let path = self.blob_path(digest);
        let size = std::fs::metadata(&path)
            .map_err(|e| internal("stat blob", e))?
            .len();
        shared.share_blob(repo, digest, &path, size).await?;
        Ok(true)
    }

    /// Whether manifest `digest` is in `repo`; as [`Hosted::blob_in`], a local one the shared
    /// store lacks is shared again.
    async fn manifest_in(&self, repo: &RepoName, digest: &Digest) -> Result<bool, RegistryError> {
        let idx = &self.index;
        let here = idx
            .has_mlink(repo, digest)
            .map_err(|e| internal("index", e))?;
        let Some(shared) = &self.shared else {
            return Ok(here);
        };
        if shared.has_mlink(repo, digest).await? {
            return Ok(true);
        }
        let local = match here {
            true => idx.manifest(digest).map_err(|e| internal("index", e))?,
            false => None,
        };
        let Some(m) = local else {
            return Ok(false);
        };
        shared.put_manifest(&m).await?;
        shared.put_mlink(repo, digest, now_secs()).await?;
        Ok(true)
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
            if let Some(subject) = &parsed.subject {
                let descriptor = super::referrers::descriptor(&m, parsed);
                shared
                    .put_referrer(repo, subject, digest, &descriptor)
                    .await?;
            }
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

    pub(super) fn check_delete(&self) -> Result<(), RegistryError> {
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
                if let Some(subject) = self.subject_of(shared, d).await? {
                    shared.remove_referrer(repo, &subject, d).await?;
                }
                Ok(had)
            }
        }
    }

    /// The subject manifest `digest` names, if any (read locally, else from the shared store).
    async fn subject_of(
        &self,
        shared: &shared::SharedHosted,
        digest: &Digest,
    ) -> Result<Option<Digest>, RegistryError> {
        let local = self
            .index
            .manifest(digest)
            .map_err(|e| internal("index", e))?;
        let m = match local {
            Some(m) => Some(m),
            None => shared.manifest(digest).await?,
        };
        Ok(
            m.and_then(|m| manifest::parse(&m.bytes, Some(&m.media_type)).ok())
                .and_then(|p| p.subject),
        )
    }

    /// A tag parsed for a push.
    pub fn tag_of(reference: &Reference) -> Option<&Tag> {
        match reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }
}

/// The blobs of a manifest that are pushed (foreign layers never are).
fn distributable(parsed: &Parsed) -> impl Iterator<Item = &manifest::Descriptor> {
    parsed.blobs.iter().filter(|b| {
        !b.media_type
            .as_deref()
            .is_some_and(manifest::is_non_distributable)
    })
}

/// The shared keys a push of this manifest into `repo` references: its own, its blobs' and its
/// children's.
fn referenced_keys(repo: &RepoName, digest: &Digest, parsed: &Parsed) -> Vec<String> {
    let mut keys = shared::manifest_keys(repo, digest).to_vec();
    for b in distributable(parsed) {
        keys.extend(shared::blob_keys(repo, &b.digest));
    }
    for c in &parsed.children {
        keys.extend(shared::manifest_keys(repo, &c.digest));
    }
    keys
}
