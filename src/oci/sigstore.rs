//! Sigstore image signatures as skopeo / podman (containers/image) and cosign attach them, and
//! their verification with a public key. Pure: bytes in, a verdict out; the mirror fetches the
//! bytes.
//!
//! The attachment of a manifest `sha256:<hex>` is the image manifest tagged
//! `sha256-<hex>.sig` in the same repository ([`signature_tag`]). Each of its layers of type
//! [`SIMPLE_SIGNING`] is one signature: the layer blob is the signed payload (simple-signing
//! JSON) and the layer's [`SIGNATURE_ANNOTATION`] holds the base64 ECDSA signature over it
//! (ASN.1 DER, over the SHA-256 of the payload, as containers/image and cosign verify it).
//! A payload is accepted when the signature verifies with one of the configured
//! [`PublicKeys`], its `critical.type` is [`PAYLOAD_TYPE`], and its
//! `critical.image.docker-manifest-digest` is the manifest's digest; the caller then matches
//! `critical.identity.docker-reference` ([`reference_repository`]).

use base64::Engine as _;
use p256::pkcs8::DecodePublicKey;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::Digest;

/// The layer media type of a simple-signing payload.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature over the payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of a container image signature payload.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";
/// Largest payload blob read (containers/image refuses larger signatures too).
pub const MAX_PAYLOAD_SIZE: u64 = 4 * 1024 * 1024;

/// Why a signature (or a key) is not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SigstoreError {
    #[error("no PUBLIC KEY block in the PEM file")]
    NoKey,
    #[error("the PEM file is not valid PEM: {0}")]
    Pem(String),
    #[error("public key {0} is not an ECDSA P-256 or P-384 key (the key types cosign and skopeo generate)")]
    UnsupportedKey(usize),
    #[error("the signature manifest is not valid JSON")]
    NotJson,
    #[error("the signature manifest has no {SIMPLE_SIGNING} layer with a signature annotation")]
    NoSignature,
    #[error("the signature annotation is not valid base64")]
    SignatureEncoding,
    #[error("the signature does not verify with the configured public key")]
    BadSignature,
    #[error("the signed payload is not a simple-signing JSON document: {0}")]
    Payload(String),
    #[error("the signed payload is for manifest {signed}, not {wanted}")]
    WrongManifest { signed: String, wanted: String },
}

/// The tag of the sigstore attachment of `digest`: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &Digest) -> String {
    format!("{}-{}.sig", digest.algorithm(), digest.hex())
}

/// One public key of a PEM file.
#[derive(Clone, Debug)]
enum PublicKey {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
}

/// The keys a signature may verify with: every `PUBLIC KEY` block of a PEM file (any one
/// verifying suffices).
#[derive(Clone, Debug)]
pub struct PublicKeys(Vec<PublicKey>);

impl PublicKeys {
    /// Reads every `PUBLIC KEY` block (SubjectPublicKeyInfo, as `cosign generate-key-pair` and
    /// `skopeo generate-sigstore-key` write it). Other blocks are ignored; a file without a usable
    /// key is an error.
    pub fn from_pem(text: &[u8]) -> Result<PublicKeys, SigstoreError> {
        let blocks = pem::parse_many(text).map_err(|e| SigstoreError::Pem(e.to_string()))?;
        let mut keys = Vec::new();
        for (i, block) in blocks
            .iter()
            .filter(|b| b.tag() == "PUBLIC KEY")
            .enumerate()
        {
            let der = block.contents();
            let key = if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_der(der) {
                PublicKey::P256(k)
            } else if let Ok(k) = p384::ecdsa::VerifyingKey::from_public_key_der(der) {
                PublicKey::P384(k)
            } else {
                return Err(SigstoreError::UnsupportedKey(i + 1));
            };
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(SigstoreError::NoKey);
        }
        Ok(PublicKeys(keys))
    }

    /// How many keys the file held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: a key set holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `signature` (ASN.1 DER ECDSA) over SHA-256(`payload`) verifies with any key.
    fn verifies(&self, payload: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let prehash = Sha256::digest(payload);
        self.0.iter().any(|key| match key {
            PublicKey::P256(k) => p256::ecdsa::Signature::from_der(signature)
                .is_ok_and(|s| k.verify_prehash(&prehash, &s).is_ok()),
            PublicKey::P384(k) => p384::ecdsa::Signature::from_der(signature)
                .is_ok_and(|s| k.verify_prehash(&prehash, &s).is_ok()),
        })
    }
}

/// One signature of an attachment: the payload blob to fetch and the signature over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub payload: Digest,
    pub size: u64,
    /// The annotation's base64 text.
    pub signature: String,
}

/// The signatures an attachment manifest (`sha256-<hex>.sig`) carries, in layer order.
pub fn candidates(attachment: &[u8]) -> Result<Vec<Candidate>, SigstoreError> {
    let value: Value = serde_json::from_slice(attachment).map_err(|_| SigstoreError::NotJson)?;
    let layers = value.get("layers").and_then(Value::as_array);
    let found: Vec<Candidate> = layers
        .into_iter()
        .flatten()
        .filter(|l| l.get("mediaType").and_then(Value::as_str) == Some(SIMPLE_SIGNING))
        .filter_map(|l| {
            Some(Candidate {
                payload: l.get("digest")?.as_str()?.parse().ok()?,
                size: l.get("size")?.as_u64()?,
                signature: l
                    .get("annotations")?
                    .get(SIGNATURE_ANNOTATION)?
                    .as_str()?
                    .to_owned(),
            })
        })
        .collect();
    if found.is_empty() {
        return Err(SigstoreError::NoSignature);
    }
    Ok(found)
}

/// What a verified payload claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// `critical.identity.docker-reference`.
    pub docker_reference: String,
}

/// Verifies one signature: the payload bytes (already checked against the candidate's digest)
/// signed by one of `keys`, of type [`PAYLOAD_TYPE`], for the manifest `manifest`.
pub fn verify(
    keys: &PublicKeys,
    candidate: &Candidate,
    payload: &[u8],
    manifest: &Digest,
) -> Result<Claims, SigstoreError> {
    let signature = base64::engine::general_purpose::STANDARD
        .decode(candidate.signature.trim())
        .map_err(|_| SigstoreError::SignatureEncoding)?;
    if !keys.verifies(payload, &signature) {
        return Err(SigstoreError::BadSignature);
    }
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| SigstoreError::Payload(format!("not JSON: {e}")))?;
    let critical = value
        .get("critical")
        .ok_or_else(|| SigstoreError::Payload("no critical section".into()))?;
    let field = |section: &str, name: &str| {
        critical
            .get(section)
            .and_then(|s| s.get(name))
            .and_then(Value::as_str)
            .ok_or_else(|| SigstoreError::Payload(format!("no critical.{section}.{name}")))
    };
    let kind = critical.get("type").and_then(Value::as_str);
    if kind != Some(PAYLOAD_TYPE) {
        return Err(SigstoreError::Payload(format!(
            "critical.type is {kind:?}, not {PAYLOAD_TYPE:?}"
        )));
    }
    let signed = field("image", "docker-manifest-digest")?;
    if signed != manifest.to_string() {
        return Err(SigstoreError::WrongManifest {
            signed: signed.to_owned(),
            wanted: manifest.to_string(),
        });
    }
    Ok(Claims {
        docker_reference: field("identity", "docker-reference")?.to_owned(),
    })
}

/// The repository a Docker reference names, normalised as Docker normalises names: `(registry,
/// path)`, the registry `docker.io` when the first component is not a host (has no `.` or `:`
/// and is not `localhost`), `library/` before a one-component Docker Hub path; the tag and
/// digest dropped. The registry is lowercased and left for the caller to map aliases.
pub fn reference_repository(reference: &str) -> Option<(String, String)> {
    let name = reference.split('@').next()?;
    let name = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    };
    let (first, rest) = match name.split_once('/') {
        Some((f, r)) if f.contains(['.', ':']) || f == "localhost" => (f.to_ascii_lowercase(), r),
        _ => ("docker.io".to_owned(), name),
    };
    if rest.is_empty() || first.is_empty() {
        return None;
    }
    let hub = matches!(
        first.as_str(),
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    );
    let path = if hub && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest.to_owned()
    };
    Some((first, path))
}

/// Layer media types of signatures, attestations and SBOMs: content that describes an image and
/// is never unpacked as a filesystem.
fn is_supply_chain_type(media_type: &str) -> bool {
    const PREFIXES: [&str; 7] = [
        "application/vnd.dev.cosign.",
        "application/vnd.dev.sigstore.",
        "application/vnd.dsse.envelope",
        "application/vnd.in-toto",
        "application/vnd.cyclonedx",
        "application/spdx",
        "text/spdx",
    ];
    PREFIXES.iter().any(|p| media_type.starts_with(p))
}

/// A layer clients unpack into a container's filesystem.
fn is_filesystem_layer(media_type: &str) -> bool {
    media_type.contains(".image.layer.") || media_type.contains(".image.rootfs.")
}

/// Whether a manifest is itself a signature, attestation or SBOM of another one rather than an
/// image to run: an image manifest with at least one layer and none a filesystem layer, whose
/// layers are all supply-chain types or which names a `subject`; or an index whose every entry
/// carries an `artifactType` (a referrers list: each entry is still checked when fetched).
/// Such a manifest needs no signature of its own.
pub fn is_supply_chain_artifact(manifest: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<Value>(manifest) else {
        return false;
    };
    let types = |field: &str, key: &str| -> Option<Vec<String>> {
        let list = value.get(field)?.as_array()?;
        list.iter()
            .map(|d| d.get(key).and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    if let Some(entries) = value.get("manifests").and_then(Value::as_array) {
        return !entries.is_empty() && types("manifests", "artifactType").is_some();
    }
    let Some(layers) = types("layers", "mediaType") else {
        return false;
    };
    if layers.is_empty() || layers.iter().any(|t| is_filesystem_layer(t)) {
        return false;
    }
    value.get("subject").is_some() || layers.iter().all(|t| is_supply_chain_type(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::EncodePublicKey;

    fn key(seed: u8) -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn keys_of(signer: &p256::ecdsa::SigningKey) -> PublicKeys {
        let der = signer.verifying_key().to_public_key_der().unwrap();
        let text = pem::encode(&pem::Pem::new("PUBLIC KEY", der.as_bytes().to_vec()));
        PublicKeys::from_pem(text.as_bytes()).unwrap()
    }

    fn payload(digest: &Digest, reference: &str) -> Vec<u8> {
        serde_json::json!({
            "critical": {
                "identity": {"docker-reference": reference},
                "image": {"docker-manifest-digest": digest.to_string()},
                "type": PAYLOAD_TYPE
            },
            "optional": null
        })
        .to_string()
        .into_bytes()
    }

    fn signed(signer: &p256::ecdsa::SigningKey, payload: &[u8]) -> Candidate {
        let sig: p256::ecdsa::Signature = signer.sign(payload);
        Candidate {
            payload: Digest::of(payload),
            size: payload.len() as u64,
            signature: base64::engine::general_purpose::STANDARD.encode(sig.to_der()),
        }
    }

    #[test]
    fn a_signature_by_the_key_for_the_manifest_verifies() {
        let manifest = Digest::of(b"manifest");
        let p = payload(&manifest, "docker.io/library/alpine:3.19");
        let claims = verify(&keys_of(&key(1)), &signed(&key(1), &p), &p, &manifest).unwrap();
        assert_eq!(claims.docker_reference, "docker.io/library/alpine:3.19");
    }

    #[test]
    fn another_key_another_manifest_or_a_changed_payload_is_refused() {
        let manifest = Digest::of(b"manifest");
        let p = payload(&manifest, "docker.io/library/alpine:3.19");
        let keys = keys_of(&key(1));
        assert_eq!(
            verify(&keys, &signed(&key(2), &p), &p, &manifest),
            Err(SigstoreError::BadSignature)
        );
        let other = Digest::of(b"other");
        assert!(matches!(
            verify(&keys, &signed(&key(1), &p), &p, &other),
            Err(SigstoreError::WrongManifest { .. })
        ));
        let mut changed = p.clone();
        changed[5] ^= 1;
        assert_eq!(
            verify(&keys, &signed(&key(1), &p), &changed, &manifest),
            Err(SigstoreError::BadSignature)
        );
        let bad = Candidate {
            signature: "not base64!".into(),
            ..signed(&key(1), &p)
        };
        assert_eq!(
            verify(&keys, &bad, &p, &manifest),
            Err(SigstoreError::SignatureEncoding)
        );
    }

    #[test]
    fn a_payload_of_another_type_is_refused_even_when_signed() {
        let manifest = Digest::of(b"manifest");
        let p = serde_json::json!({"critical": {"type": "something else",
            "image": {"docker-manifest-digest": manifest.to_string()},
            "identity": {"docker-reference": "a/b"}}})
        .to_string()
        .into_bytes();
        assert!(matches!(
            verify(&keys_of(&key(1)), &signed(&key(1), &p), &p, &manifest),
            Err(SigstoreError::Payload(_))
        ));
    }

    #[test]
    fn keys_files_need_a_usable_public_key() {
        assert_eq!(
            PublicKeys::from_pem(b"nothing here").unwrap_err(),
            SigstoreError::NoKey
        );
        let junk = pem::encode(&pem::Pem::new("PUBLIC KEY", vec![1, 2, 3]));
        assert_eq!(
            PublicKeys::from_pem(junk.as_bytes()).unwrap_err(),
            SigstoreError::UnsupportedKey(1)
        );
    }

    #[test]
    fn the_attachment_lists_signed_layers_only() {
        let d = Digest::of(b"payload");
        let m = serde_json::json!({"schemaVersion": 2, "layers": [
            {"mediaType": SIMPLE_SIGNING, "digest": d.to_string(), "size": 7,
             "annotations": {SIGNATURE_ANNOTATION: "c2ln"}},
            {"mediaType": SIMPLE_SIGNING, "digest": d.to_string(), "size": 7},
            {"mediaType": "application/octet-stream", "digest": d.to_string(), "size": 7,
             "annotations": {SIGNATURE_ANNOTATION: "c2ln"}}
        ]});
        let found = candidates(m.to_string().as_bytes()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].signature, "c2ln");
        assert_eq!(
            candidates(br#"{"layers": []}"#),
            Err(SigstoreError::NoSignature)
        );
        assert_eq!(signature_tag(&d), format!("sha256-{}.sig", d.hex()));
    }

    #[test]
    fn references_name_repositories_as_docker_normalises_them() {
        let r = |s: &str| reference_repository(s).unwrap();
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(r("alpine"), pair("docker.io", "library/alpine"));
        assert_eq!(
            r("docker.io/alpine:3.19"),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(r("user/app@sha256:abc"), pair("docker.io", "user/app"));
        assert_eq!(
            r("127.0.0.1:5000/team/app:1"),
            pair("127.0.0.1:5000", "team/app")
        );
        assert_eq!(r("localhost/app"), pair("localhost", "app"));
        assert_eq!(r("Ghcr.IO/o/app:v1@sha256:1"), pair("ghcr.io", "o/app"));
        assert_eq!(reference_repository("ghcr.io/"), None);
    }

    #[test]
    fn signatures_and_attestations_need_no_signature_of_their_own() {
        let layer = |t: &str| serde_json::json!({"mediaType": t, "digest": "sha256:00", "size": 1});
        let image = |layers: Vec<Value>, subject: bool| {
            let mut v = serde_json::json!({"schemaVersion": 2, "layers": layers});
            if subject {
                v["subject"] = layer("application/vnd.oci.image.manifest.v1+json");
            }
            v.to_string().into_bytes()
        };
        assert!(is_supply_chain_artifact(&image(
            vec![layer(SIMPLE_SIGNING)],
            false
        )));
        assert!(is_supply_chain_artifact(&image(
            vec![layer("application/vnd.dsse.envelope.v1+json")],
            false
        )));
        assert!(is_supply_chain_artifact(&image(
            vec![layer("application/x-anything")],
            true
        )));
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        assert!(!is_supply_chain_artifact(&image(vec![layer(gz)], true)));
        assert!(!is_supply_chain_artifact(&image(
            vec![layer(SIMPLE_SIGNING), layer(gz)],
            false
        )));
        assert!(!is_supply_chain_artifact(&image(vec![], true)));
        assert!(!is_supply_chain_artifact(&image(
            vec![layer("application/x-anything")],
            false
        )));
        let index = |with_type: bool| {
            let mut e = layer("application/vnd.oci.image.manifest.v1+json");
            if with_type {
                e["artifactType"] = SIMPLE_SIGNING.into();
            }
            serde_json::json!({"schemaVersion": 2, "manifests": [e]})
                .to_string()
                .into_bytes()
        };
        assert!(is_supply_chain_artifact(&index(true)));
        assert!(!is_supply_chain_artifact(&index(false)));
    }
}
