//! What a registry checks in a pushed manifest: its media type (from `Content-Type` or the body,
//! which must agree), the blobs and child manifests it references, its `subject` and
//! `artifactType`. Pure: bytes in, a [`Parsed`] or a [`ManifestError`] out.

use serde_json::Value;

use super::media::{
    bare_content_type, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2, DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED, OCI_INDEX, OCI_MANIFEST,
};
use super::Digest;

/// A descriptor as a manifest writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: Option<String>,
    pub digest: Digest,
    pub size: u64,
}

/// A pushed manifest, checked for shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The media type it is stored and served with.
    pub media_type: String,
    /// Config and layers of an image manifest (empty for an index).
    pub blobs: Vec<Descriptor>,
    /// Child manifests of an index (empty for an image manifest).
    pub children: Vec<Descriptor>,
    /// The manifest this one refers to (OCI 1.1 `subject`).
    pub subject: Option<Digest>,
    /// `artifactType`, else the config's media type (what the referrers API reports).
    pub artifact_type: Option<String>,
}

/// Why a manifest is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not a JSON object: {0}")]
    NotJson(String),
    #[error("manifest media type {0:?} is not supported (push OCI or Docker schema 2 manifests)")]
    Unsupported(String),
    #[error("Content-Type {header:?} does not match the manifest's mediaType {body:?}")]
    TypeMismatch { header: String, body: String },
    #[error("manifest has no media type (neither Content-Type nor mediaType)")]
    NoMediaType,
    #[error("manifest schemaVersion must be 2")]
    SchemaVersion,
    #[error("manifest field {0} is missing or malformed")]
    Field(&'static str),
}

const PUSHABLE: [&str; 4] = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST_V2,
    DOCKER_MANIFEST_LIST,
];

/// Layers a registry need not hold (Windows base layers and other foreign layers).
pub fn is_non_distributable(media_type: &str) -> bool {
    media_type.contains(".foreign.") || media_type.contains(".nondistributable.")
}

/// Parses and checks a manifest pushed with `content_type`.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed, ManifestError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::NotJson(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| ManifestError::NotJson("not an object".into()))?;
    let media_type = media_type_of(&value, content_type)?;
    if obj.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(ManifestError::SchemaVersion);
    }
    let is_index = media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST;
    let mut parsed = Parsed {
        media_type,
        blobs: Vec::new(),
        children: Vec::new(),
        subject: None,
        artifact_type: obj
            .get("artifactType")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    if is_index {
        parsed.children = descriptors(obj.get("manifests"), "manifests")?;
    } else {
        let config = obj.get("config").ok_or(ManifestError::Field("config"))?;
        let config = descriptor(config).ok_or(ManifestError::Field("config"))?;
        if parsed.artifact_type.is_none() {
            parsed.artifact_type = config.media_type.clone();
        }
        parsed.blobs.push(config);
        parsed
            .blobs
            .extend(descriptors(obj.get("layers"), "layers")?);
    }
    if let Some(subject) = obj.get("subject") {
        let d = descriptor(subject).ok_or(ManifestError::Field("subject"))?;
        parsed.subject = Some(d.digest);
    }
    Ok(parsed)
}

/// The media type from `Content-Type` when it names a manifest type, else from the body; the
/// two must agree when both are given.
fn media_type_of(value: &Value, content_type: Option<&str>) -> Result<String, ManifestError> {
    let header = content_type.map(bare_content_type).map(str::to_string);
    let body = value
        .get("mediaType")
        .and_then(Value::as_str)
        .map(str::to_string);
    let is_manifest_type = |t: &str| PUSHABLE.contains(&t) || is_schema1(t);
    let chosen = match (header, body) {
        (Some(h), Some(b)) if is_manifest_type(&h) && h != b => {
            return Err(ManifestError::TypeMismatch { header: h, body: b })
        }
        (Some(h), _) if is_manifest_type(&h) => h,
        (_, Some(b)) => b,
        (_, None) => infer(value).ok_or(ManifestError::NoMediaType)?.to_string(),
    };
    if !PUSHABLE.contains(&chosen.as_str()) {
        return Err(ManifestError::Unsupported(chosen));
    }
    Ok(chosen)
}

fn is_schema1(t: &str) -> bool {
    t == DOCKER_SCHEMA1 || t == DOCKER_SCHEMA1_SIGNED
}

/// OCI allows `mediaType` to be left out: an object with `manifests` is an index, one with
/// `config` an image manifest.
fn infer(value: &Value) -> Option<&'static str> {
    if value.get("manifests").is_some() {
        Some(OCI_INDEX)
    } else if value.get("config").is_some() {
        Some(OCI_MANIFEST)
    } else {
        None
    }
}

fn descriptors(
    list: Option<&Value>,
    field: &'static str,
) -> Result<Vec<Descriptor>, ManifestError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    list.as_array()
        .ok_or(ManifestError::Field(field))?
        .iter()
        .map(|d| descriptor(d).ok_or(ManifestError::Field(field)))
        .collect()
}

fn descriptor(d: &Value) -> Option<Descriptor> {
    Some(Descriptor {
        media_type: d
            .get("mediaType")
            .and_then(Value::as_str)
            .map(str::to_string),
        digest: d.get("digest")?.as_str()?.parse().ok()?,
        size: d.get("size")?.as_u64()?,
    })
}

/// The referrers-API descriptor of the manifest `bytes` (stored as `media_type`, addressed as
/// `digest`) and the digest it refers to, when it has a `subject`: media type, digest, size,
/// `artifactType` (else the config's media type) and its annotations.
pub fn referrer_descriptor(
    bytes: &[u8],
    media_type: &str,
    digest: &Digest,
) -> Option<(Digest, Value)> {
    let parsed = parse(bytes, Some(media_type)).ok()?;
    let subject = parsed.subject?;
    let mut d = serde_json::json!({
        "mediaType": parsed.media_type,
        "digest": digest.to_string(),
        "size": bytes.len(),
    });
    if let Some(t) = &parsed.artifact_type {
        d["artifactType"] = Value::from(t.as_str());
    }
    if let Some(a) = serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("annotations").cloned())
    {
        d["annotations"] = a;
    }
    Some((subject, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    fn image(media_type: Option<&str>) -> Vec<u8> {
        let mut v = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d(1), "size": 10},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d(2), "size": 20}
            ]
        });
        if let Some(t) = media_type {
            v["mediaType"] = t.into();
        }
        v.to_string().into_bytes()
    }

    #[test]
    fn an_image_manifest_lists_config_and_layers() {
        let p = parse(&image(Some(OCI_MANIFEST)), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(p.media_type, OCI_MANIFEST);
        assert_eq!(p.blobs.len(), 2);
        assert_eq!(p.blobs[1].size, 20);
        assert!(p.children.is_empty());
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn media_type_comes_from_the_header_or_the_body_and_they_must_agree() {
        assert_eq!(
            parse(&image(None), Some(OCI_MANIFEST)).unwrap().media_type,
            OCI_MANIFEST
        );
        assert_eq!(
            parse(&image(Some(OCI_MANIFEST)), Some("application/json"))
                .unwrap()
                .media_type,
            OCI_MANIFEST
        );
        assert_eq!(parse(&image(None), None).unwrap().media_type, OCI_MANIFEST);
        assert!(matches!(
            parse(&image(Some(OCI_MANIFEST)), Some(DOCKER_MANIFEST_V2)),
            Err(ManifestError::TypeMismatch { .. })
        ));
        assert!(matches!(
            parse(&image(None), Some(DOCKER_SCHEMA1_SIGNED)),
            Err(ManifestError::Unsupported(_))
        ));
    }

    #[test]
    fn an_index_lists_children_and_a_subject_is_kept() {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": d(3), "size": 5}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": d(4), "size": 6}
        });
        let p = parse(body.to_string().as_bytes(), None).unwrap();
        assert_eq!(p.children.len(), 1);
        assert_eq!(p.subject.map(|s| s.to_string()), Some(d(4)));
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        assert!(matches!(
            parse(b"not json", None),
            Err(ManifestError::NotJson(_))
        ));
        assert!(matches!(
            parse(b"[1]", None),
            Err(ManifestError::NotJson(_))
        ));
        let no_version = serde_json::json!({"config": {"digest": d(1), "size": 1}});
        assert_eq!(
            parse(no_version.to_string().as_bytes(), None),
            Err(ManifestError::SchemaVersion)
        );
        let bad_layer = serde_json::json!({
            "schemaVersion": 2, "config": {"digest": d(1), "size": 1},
            "layers": [{"digest": "sha256:short", "size": 1}]
        });
        assert_eq!(
            parse(bad_layer.to_string().as_bytes(), None),
            Err(ManifestError::Field("layers"))
        );
    }

    #[test]
    fn foreign_layers_are_non_distributable() {
        assert!(is_non_distributable(
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        ));
        assert!(is_non_distributable(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        ));
        assert!(!is_non_distributable(
            "application/vnd.oci.image.layer.v1.tar+gzip"
        ));
    }
}
