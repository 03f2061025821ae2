//! The OCI 1.1 referrers of a hosted manifest: every manifest of the same repository whose
//! `subject` is that digest (signatures, SBOMs, attestations), as image-index descriptors.
//! Read from the manifests themselves on each request, so pushes, deletes and `gc` can never
//! leave the answer stale; the subject need not exist.

use serde_json::{json, Value};

use crate::oci::manifest;
use crate::oci::{Digest, RegistryError, RepoName};

use super::{internal, Hosted};

impl Hosted {
    /// Descriptors of the manifests in `repo` that refer to `subject`, sorted by digest; only
    /// those of `artifact_type` when given.
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
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
            if parsed.subject.as_ref() != Some(subject) {
                continue;
            }
            if artifact_type.is_some_and(|t| parsed.artifact_type.as_deref() != Some(t)) {
                continue;
            }
            let mut d = json!({
                "mediaType": m.media_type,
                "digest": digest.to_string(),
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
            out.push(d);
        }
        out.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
        Ok(out)
    }
}
