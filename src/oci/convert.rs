//! Docker schema 2 → OCI: the same image described with OCI media types.
//!
//! Some readers of an OCI image layout (skopeo's `oci:` / `oci-archive:` transports among them)
//! only accept `index.json` entries typed as an OCI manifest or index. A Docker schema 2 manifest
//! converts losslessly: the config and layer blobs stay byte-for-byte the same, only the media
//! types in the manifest change (so the manifest's digest changes). A Docker manifest list
//! becomes an OCI index over converted children.

use std::collections::HashMap;

use serde_json::Value;

use super::media::{DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2, OCI_INDEX, OCI_MANIFEST};
use super::Digest;

/// The OCI media type for a Docker schema 2 config or layer type; `None` when there is no
/// OCI counterpart (the type is then left as it is).
pub fn oci_blob_type(docker: &str) -> Option<&'static str> {
    Some(match docker {
        "application/vnd.docker.container.image.v1+json" => {
            "application/vnd.oci.image.config.v1+json"
        }
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        }
        "application/vnd.docker.image.rootfs.diff.tar" => "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        }
        _ => return None,
    })
}

fn retype(descriptor: &mut Value) {
    if let Some(t) = descriptor.get_mut("mediaType") {
        if let Some(oci) = t.as_str().and_then(oci_blob_type) {
            *t = Value::String(oci.to_owned());
        }
    }
}

/// A Docker schema 2 manifest rewritten with OCI media types (same config and layers); `None`
/// when `bytes` is not a Docker schema 2 manifest.
pub fn docker_manifest_to_oci(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(bytes).ok()?;
    if v.get("mediaType")?.as_str()? != DOCKER_MANIFEST_V2 {
        return None;
    }
    v["mediaType"] = Value::String(OCI_MANIFEST.to_owned());
    retype(v.get_mut("config")?);
    for layer in v.get_mut("layers")?.as_array_mut()? {
        retype(layer);
    }
    serde_json::to_vec(&v).ok()
}

/// A converted child of a list: its new digest and size, and its (OCI) media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// A Docker manifest list rewritten as an OCI index whose entries point at the replacements
/// of its children (keyed by the child's original digest). Entries without a replacement (the
/// platforms not held) are dropped; platforms and annotations are kept. `None` when `bytes` is
/// not a Docker manifest list or no entry remains.
pub fn docker_list_to_oci(
    bytes: &[u8],
    children: &HashMap<Digest, Replacement>,
) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(bytes).ok()?;
    if v.get("mediaType")?.as_str()? != DOCKER_MANIFEST_LIST {
        return None;
    }
    v["mediaType"] = Value::String(OCI_INDEX.to_owned());
    let entries = v.get_mut("manifests")?.as_array_mut()?;
    entries.retain_mut(|e| {
        let Some(r) = e
            .get("digest")
            .and_then(Value::as_str)
            .and_then(|d| d.parse::<Digest>().ok())
            .and_then(|d| children.get(&d))
        else {
            return false;
        };
        e["digest"] = Value::String(r.digest.to_string());
        e["size"] = Value::from(r.size);
        e["mediaType"] = Value::String(r.media_type.clone());
        true
    });
    if entries.is_empty() {
        return None;
    }
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker_manifest() -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_V2,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": 7, "digest": format!("sha256:{}", "c".repeat(64)),
            },
            "layers": [
                {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                 "size": 10, "digest": format!("sha256:{}", "a".repeat(64))},
                {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                 "size": 11, "digest": format!("sha256:{}", "b".repeat(64)),
                 "urls": ["https://example.com/layer"]},
                {"mediaType": "application/x-unknown", "size": 12,
                 "digest": format!("sha256:{}", "d".repeat(64))},
            ],
        }))
        .expect("json")
    }

    #[test]
    fn a_docker_manifest_keeps_its_blobs_and_gets_oci_types() {
        let out = docker_manifest_to_oci(&docker_manifest()).expect("converts");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["mediaType"], OCI_MANIFEST);
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(
            v["config"]["mediaType"],
            "application/vnd.oci.image.config.v1+json"
        );
        assert_eq!(v["config"]["digest"], format!("sha256:{}", "c".repeat(64)));
        let types: Vec<&str> = v["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["mediaType"].as_str().expect("type"))
            .collect();
        assert_eq!(
            types,
            [
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                "application/x-unknown",
            ]
        );
        assert_eq!(v["layers"][1]["urls"][0], "https://example.com/layer");
        assert_eq!(v["layers"][0]["size"], 10);
    }

    #[test]
    fn only_docker_types_convert() {
        let oci = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": [],
        }))
        .expect("json");
        assert_eq!(docker_manifest_to_oci(&oci), None);
        assert_eq!(docker_manifest_to_oci(b"not json"), None);
        assert_eq!(
            docker_list_to_oci(&docker_manifest(), &HashMap::new()),
            None
        );
    }

    #[test]
    fn a_list_points_at_its_converted_children_and_drops_the_rest() {
        let (amd, arm) = (Digest::of(b"amd64"), Digest::of(b"arm64"));
        let list = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [
                {"mediaType": DOCKER_MANIFEST_V2, "size": 1, "digest": amd.to_string(),
                 "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": DOCKER_MANIFEST_V2, "size": 2, "digest": arm.to_string(),
                 "platform": {"architecture": "arm64", "os": "linux"}},
            ],
        }))
        .expect("json");
        let new = Digest::of(b"converted amd64");
        let children = HashMap::from([(
            amd,
            Replacement {
                digest: new.clone(),
                size: 99,
                media_type: OCI_MANIFEST.to_owned(),
            },
        )]);
        let out = docker_list_to_oci(&list, &children).expect("converts");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["mediaType"], OCI_INDEX);
        let entries = v["manifests"].as_array().expect("manifests");
        assert_eq!(entries.len(), 1, "the platform not held is dropped");
        assert_eq!(entries[0]["digest"], new.to_string());
        assert_eq!(entries[0]["size"], 99);
        assert_eq!(entries[0]["mediaType"], OCI_MANIFEST);
        assert_eq!(entries[0]["platform"]["architecture"], "amd64");
        assert_eq!(
            docker_list_to_oci(&list, &HashMap::new()),
            None,
            "nothing left"
        );
    }
}
