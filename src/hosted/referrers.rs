//! The OCI 1.1 referrers of a hosted manifest: every manifest of the same repository whose
//! `subject` is that digest (signatures, SBOMs, attestations), as image-index descriptors; the
//! subject need not exist. Without a shared store they are read from the manifests themselves
//! on each request, so pushes, deletes and `gc` can never leave the answer stale. With one, from
//! the per-subject records a push writes beside the manifest's link (`shared`), kept only while
//! that link exists, so every node gives the same answer.

use serde_json::{json, Value};

use crate::oci::manifest::{self, Parsed};
use crate::oci::{Digest, RegistryError, RepoName};

use super::{internal, Hosted, StoredManifest};

/// The descriptor of manifest `m` in a referrers answer.
pub(super) fn descriptor(m: &StoredManifest, parsed: &Parsed) -> Value {
    let mut d = json!({
        "mediaType": m.media_type,
        "digest": m.digest.to_string(),
        "size": m.bytes.len(),
    });
    if let Some(t) = &parsed.artifact_type {
        d["artifactType"] = json!(t);
    }
    if let Some(a) = serde_json::from_slice::<Value>(&m.bytes)
        .ok()
        .and_then(|v| v.get("annotations").cloned())
    {
        d["annotations"] = a;
    }
    d
}

impl Hosted {
    /// Descriptors of the manifests in `repo` that refer to `subject`, sorted by digest; only
    /// those of `artifact_type` when given. With a shared store, its records (this node's
    /// manifests when it cannot be read).
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Value>, RegistryError> {
        let shared = match &self.shared {
            Some(shared) => match shared.referrers(repo, subject).await {
                Ok(found) => Some(found),
                Err(e) => {
                    tracing::warn!(%repo, %subject, error = %e.message, "hosted: listing the local referrers");
                    None
                }
            },
            None => None,
        };
        let mut out = match shared {
            Some(found) => found,
            None => self.local_referrers(repo, subject)?,
        };
        if let Some(t) = artifact_type {
            out.retain(|d| d["artifactType"].as_str() == Some(t));
        }
        out.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
        Ok(out)
    }

    /// The referrers of `subject` among the manifests this node links in `repo`.
    fn local_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<Value>, RegistryError> {
        let mut out = Vec::new();
        for hex in self
            .index
            .mlinks_of(repo)
            .map_err(|e| internal("index", e))?
        {
            let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
                continue;
            };
            let Some(m) = self
                .index
                .manifest(&digest)
                .map_err(|e| internal("index", e))?
            else {
                continue;
            };
            let Ok(parsed) = manifest::parse(&m.bytes, Some(&m.media_type)) else {
                continue;
            };
            if parsed.subject.as_ref() == Some(subject) {
                out.push(descriptor(&m, &parsed));
            }
        }
        Ok(out)
    }
}
