//! Reading what a manifest points at: the digests (and sizes) of an image manifest's config and
//! layers, and the child manifests of an index. Protocol vocabulary: it parses bytes already in
//! hand and does no I/O. Unparseable JSON or malformed descriptors yield nothing rather than an
//! error, because callers use it on manifests that were verified when stored.

use super::Digest;

/// What a manifest references: blobs (config, layers) with their sizes, and child manifests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct References {
    pub blobs: Vec<(Digest, u64)>,
    pub children: Vec<Digest>,
}

/// Parses the descriptors of an image manifest (config, layers) or index (manifests).
pub fn references(bytes: &[u8]) -> References {
    let mut out = References::default();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return out;
    };
    let desc = |d: &serde_json::Value| -> Option<(Digest, u64)> {
        let digest = d.get("digest")?.as_str()?.parse().ok()?;
        Some((digest, d.get("size").and_then(|s| s.as_u64()).unwrap_or(0)))
    };
    // A missing or non-array list is an empty one.
    let list = |key: &str| v.get(key).and_then(|l| l.as_array()).into_iter().flatten();
    out.blobs.extend(v.get("config").and_then(desc));
    out.blobs.extend(list("layers").filter_map(desc));
    out.children
        .extend(list("manifests").filter_map(desc).map(|(d, _)| d));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_descriptors_are_blobs_and_index_entries_are_children() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let image = format!(
            r#"{{"config":{{"digest":"{}","size":7}},"layers":[{{"digest":"{}","size":9}},{{"digest":"bad"}}]}}"#,
            d('a'),
            d('b')
        );
        let refs = references(image.as_bytes());
        assert_eq!(
            refs.blobs,
            vec![(d('a').parse().unwrap(), 7), (d('b').parse().unwrap(), 9)]
        );
        assert!(refs.children.is_empty());
        let index = format!(r#"{{"manifests":[{{"digest":"{}","size":3}}]}}"#, d('c'));
        let refs = references(index.as_bytes());
        assert_eq!(refs.children, vec![d('c').parse().unwrap()]);
        assert!(refs.blobs.is_empty());
        assert_eq!(references(b"not json"), References::default());
    }
}
