//! `require_signatures = "sigstore"`: a manifest fetched from such an upstream enters the cache
//! only once a sigstore signature of it verifies with the upstream's `signature_public_key`.
//!
//! The check runs on the manifest's own digest, index or platform manifest alike (what
//! containers/image checks when it pulls, and what skopeo / podman sign when they copy). The
//! signature is the `sha256-<hex>.sig` attachment in the same upstream repository; its payload
//! must name this digest and this repository (`critical.identity.docker-reference`, compared as
//! a repository: registry and path, tag and digest ignored, Docker Hub's aliases equal). A
//! manifest that is itself a signature, attestation or SBOM
//! ([`sigstore::is_supply_chain_artifact`]) needs none, so clients can fetch the attachments.
//! Manifests already in the cache are served as they are: the check guards the way in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::config::{canonical_host, Config, SignaturePolicy};
use crate::oci::media::{DOCKER_MANIFEST_V2, OCI_MANIFEST};
use crate::oci::sigstore::{self, Candidate, PublicKeys};
use crate::oci::{Digest, ErrorCode, RegistryError};
use crate::upstream::{Route, UpstreamError};

/// How long a verified manifest is trusted without fetching its signature again.
const VERIFIED_TTL: Duration = Duration::from_secs(600);
const VERIFIED_MAX: u64 = 100_000;

/// Why a manifest was not admitted.
enum Refusal {
    /// No signature verifies: 403 DENIED with this reason.
    Denied(String),
    /// The signature could not be fetched (the upstream failed): its error.
    Failed(RegistryError),
}

/// The keys of every upstream that requires signatures, and the manifests verified lately.
pub(super) struct Signatures {
    keys: HashMap<String, Arc<PublicKeys>>,
    /// `host \0 repo \0 digest` of manifests whose signature verified within [`VERIFIED_TTL`].
    verified: moka::sync::Cache<String, ()>,
}

impl Signatures {
    /// Reads the `signature_public_key` of each upstream with `require_signatures = "sigstore"`;
    /// a missing file or one without a usable key stops startup.
    pub(super) fn load(config: &Config) -> Result<Signatures, crate::Error> {
        let mut keys = HashMap::new();
        for u in &config.upstreams {
            let SignaturePolicy::Sigstore { public_key } = &u.signatures else {
                continue;
            };
            let fail = |why: String| {
                crate::Error::Startup(format!(
                    "upstream {}: signature_public_key {}: {why}",
                    u.host,
                    public_key.display()
                ))
            };
            let text = std::fs::read(public_key).map_err(|e| fail(e.to_string()))?;
            let parsed = PublicKeys::from_pem(&text).map_err(|e| fail(e.to_string()))?;
            crate::metrics::metrics().init_signature_checks(&u.host);
            keys.insert(u.host.clone(), Arc::new(parsed));
        }
        Ok(Signatures {
            keys,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_MAX)
                .time_to_live(VERIFIED_TTL)
                .build(),
        })
    }

    /// Admits `manifest` (bytes hashing to `digest`) from `route`'s upstream, or refuses it:
    /// 403 DENIED naming the reason, or the upstream's error when the signature could not be
    /// fetched. Upstreams without `require_signatures` admit everything.
    pub(super) async fn admit(
        &self,
        route: &Route,
        digest: &Digest,
        manifest: &[u8],
    ) -> Result<(), RegistryError> {
        let Some(keys) = self.keys.get(route.host()) else {
            return Ok(());
        };
        if sigstore::is_supply_chain_artifact(manifest) {
            return Ok(());
        }
        let key = format!("{}\0{}\0{digest}", route.host(), route.repo);
        if self.verified.contains_key(&key) {
            return Ok(());
        }
        let host = route.host();
        let metrics = crate::metrics::metrics();
        match self.check(route, digest, keys).await {
            Ok(()) => {
                metrics.signature_check(host, "verified");
                tracing::info!(upstream = %host, repo = %route.repo, %digest, "sigstore signature verified");
                self.verified.insert(key, ());
                Ok(())
            }
            Err(Refusal::Denied(reason)) => {
                metrics.signature_check(host, "refused");
                tracing::warn!(upstream = %host, repo = %route.repo, %digest, %reason, "manifest refused: no verifying signature");
                Err(RegistryError::new(
                    ErrorCode::Denied,
                    format!(
                        "{}@{digest} from upstream {host} is refused (require_signatures = \"sigstore\"): {reason}",
                        route.repo
                    ),
                ))
            }
            Err(Refusal::Failed(e)) => {
                metrics.signature_check(host, "error");
                tracing::warn!(upstream = %host, repo = %route.repo, %digest, error = %e, "could not fetch the manifest's signature");
                Err(e)
            }
        }
    }

    /// Fetches the attachment and tries each signature in it until one verifies.
    async fn check(
        &self,
        route: &Route,
        digest: &Digest,
        keys: &PublicKeys,
    ) -> Result<(), Refusal> {
        let tag = sigstore::signature_tag(digest);
        let accept = format!("{OCI_MANIFEST}, {DOCKER_MANIFEST_V2}");
        let attachment = route
            .upstream
            .get_manifest(&route.repo, &tag, None, &accept)
            .await
            .map_err(|e| match e.is_not_found() {
                true => Refusal::Denied(format!("it has no sigstore signature (no tag {tag})")),
                false => Refusal::Failed(e.to_registry_error(ErrorCode::ManifestUnknown)),
            })?;
        let candidates = sigstore::candidates(&attachment.bytes)
            .map_err(|e| Refusal::Denied(format!("tag {tag}: {e}")))?;
        let mut reasons = Vec::new();
        for candidate in &candidates {
            match self.try_one(route, digest, keys, candidate).await {
                Ok(()) => return Ok(()),
                Err(Refusal::Denied(why)) => reasons.push(why),
                Err(failed) => return Err(failed),
            }
        }
        reasons.dedup();
        Err(Refusal::Denied(format!(
            "none of the {} signature(s) in {tag} is accepted: {}",
            candidates.len(),
            reasons.join("; ")
        )))
    }

    /// One signature: its payload blob fetched and hashed, the signature verified, the payload's
    /// manifest digest and repository matched.
    async fn try_one(
        &self,
        route: &Route,
        digest: &Digest,
        keys: &PublicKeys,
        candidate: &Candidate,
    ) -> Result<(), Refusal> {
        let payload = payload_blob(route, candidate).await?;
        let claims = sigstore::verify(keys, candidate, &payload, digest)
            .map_err(|e| Refusal::Denied(e.to_string()))?;
        let wanted = (canonical_host(route.host()), route.repo.to_string());
        match sigstore::reference_repository(&claims.docker_reference) {
            Some((host, path)) if canonical_host(&host) == wanted.0 && path == wanted.1 => Ok(()),
            _ => Err(Refusal::Denied(format!(
                "signed for {:?}, not for repository {}/{}",
                claims.docker_reference, wanted.0, wanted.1
            ))),
        }
    }
}

/// The payload blob of `candidate` from the upstream, at most [`sigstore::MAX_PAYLOAD_SIZE`]
/// bytes, checked against its digest.
async fn payload_blob(route: &Route, candidate: &Candidate) -> Result<Vec<u8>, Refusal> {
    let denied = |why: String| Refusal::Denied(format!("payload {}: {why}", candidate.payload));
    if candidate.size > sigstore::MAX_PAYLOAD_SIZE {
        return Err(denied(format!("{} bytes is too large", candidate.size)));
    }
    let upstream_failed = |e: UpstreamError| match e.is_not_found() {
        true => denied("not found upstream".into()),
        false => Refusal::Failed(e.to_registry_error(ErrorCode::BlobUnknown)),
    };
    let mut body = route
        .upstream
        .get_blob(&route.repo, &candidate.payload, 0)
        .await
        .map_err(upstream_failed)?;
    let mut bytes = Vec::new();
    while let Some(chunk) = body.stream.next().await {
        let chunk = chunk.map_err(|e| {
            Refusal::Failed(RegistryError::new(ErrorCode::Unavailable, e.to_string()))
        })?;
        bytes.extend_from_slice(&chunk);
        if bytes.len() as u64 > sigstore::MAX_PAYLOAD_SIZE {
            return Err(denied("larger than its descriptor allows".into()));
        }
    }
    if Digest::of(&bytes) != candidate.payload {
        return Err(denied("the bytes do not match the digest".into()));
    }
    Ok(bytes)
}
