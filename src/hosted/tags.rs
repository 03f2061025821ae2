//! Hosted tags and repositories: with a shared store its records are what a tag is and which
//! repositories exist (the local records follow them, and answer when the store cannot be read).

use crate::oci::{Digest, ErrorCode, RegistryError, RepoName, Tag};

use super::{internal, Hosted};

impl Hosted {
    /// What `tag` points to: the shared record when there is a shared store (the local record
    /// follows it; when the store cannot be read the local record answers), else the local one.
    pub(super) async fn resolve_tag(
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

    /// The tags of `repo` with their digests, sorted by tag; `NAME_UNKNOWN` for a repository
    /// with no manifest. With a shared store, its records (the local ones when it cannot be
    /// read).
    pub async fn tagged(&self, repo: &RepoName) -> Result<Vec<(String, Digest)>, RegistryError> {
        let unknown = || {
            RegistryError::new(
                ErrorCode::NameUnknown,
                format!("repository {repo} is not known"),
            )
        };
        if let Some(shared) = &self.shared {
            match shared.tags(repo).await {
                Ok(tags) if !tags.is_empty() => return Ok(tags),
                Ok(_) if shared.has_repository(repo).await? => return Ok(Vec::new()),
                Ok(_) => return Err(unknown()),
                Err(e) => {
                    tracing::warn!(%repo, error = %e.message, "hosted: listing the local tags");
                }
            }
        }
        let tags: Vec<(String, Digest)> = self
            .index
            .tags_of(repo)
            .map_err(|e| internal("index", e))?
            .into_iter()
            .filter_map(|(t, hex)| Some((t, format!("sha256:{hex}").parse().ok()?)))
            .collect();
        let local_repos = self
            .index
            .repositories()
            .map_err(|e| internal("index", e))?;
        if tags.is_empty() && !local_repos.iter().any(|r| r == repo.as_str()) {
            return Err(unknown());
        }
        Ok(tags)
    }

    /// The tags of `repo`, sorted (as [`Hosted::tagged`]).
    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<String>, RegistryError> {
        Ok(self
            .tagged(repo)
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .collect())
    }

    /// Hosted repositories holding at least one manifest, sorted. With a shared store, those
    /// it links manifests in (this node's when it cannot be read).
    pub async fn repositories(&self) -> Result<Vec<String>, RegistryError> {
        if let Some(shared) = &self.shared {
            match shared.repositories().await {
                Ok(repos) => return Ok(repos),
                Err(e) => {
                    tracing::warn!(error = %e.message, "hosted: listing the local repositories");
                }
            }
        }
        self.index.repositories().map_err(|e| internal("index", e))
    }
}
