//! Manifest media types and `Accept` negotiation.
//!
//! Clients send Accept as one header line per type (dockerd) or comma-joined (containerd), in any
//! order, sometimes with parameters or q-values. We read every line, split on commas and ignore
//! parameters, like distribution does.

use http::HeaderMap;

pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// The manifest types stowage asks upstream for and caches. Schema 1 is deliberately absent: its
/// digest is not the hash of its bytes, so it cannot be verified and cached.
pub const MANIFEST_TYPES: [&str; 4] = [
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST_V2,
];

/// The value of the `Accept` header stowage sends upstream for manifests.
pub fn upstream_manifest_accept() -> String {
    MANIFEST_TYPES.join(", ")
}

/// Whether a media type names a list of manifests (manifest list or OCI index).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// What a client accepts, parsed from every `Accept` header line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accept {
    types: Vec<String>,
    wildcard: bool,
}

impl Accept {
    /// Parses every `Accept` line of a request.
    pub fn from_headers(headers: &HeaderMap) -> Accept {
        let mut accept = Accept::default();
        for value in headers.get_all(http::header::ACCEPT) {
            let Ok(value) = value.to_str() else { continue };
            accept.add_line(value);
        }
        accept
    }

    /// Parses one header value (comma separated, parameters ignored).
    pub fn parse(value: &str) -> Accept {
        let mut accept = Accept::default();
        accept.add_line(value);
        accept
    }

    fn add_line(&mut self, value: &str) {
        for item in value.split(',') {
            let ty = item
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if ty.is_empty() {
                continue;
            }
            if ty == "*/*" || ty == "application/*" {
                self.wildcard = true;
            } else if !self.types.contains(&ty) {
                self.types.push(ty);
            }
        }
    }

    /// True when the client sent no Accept at all.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty() && !self.wildcard
    }

    /// The explicitly listed types (no wildcards), in the order first seen.
    pub fn types(&self) -> &[String] {
        &self.types
    }

    /// Whether a manifest of `media_type` may be handed to this client.
    ///
    /// Reference behaviour (distribution): a client that names no manifest type at all gets what
    /// there is (old clients), `*/*` accepts everything, otherwise the type must be listed —
    /// except that a plain Docker v2 manifest is always acceptable, as distribution serves it to
    /// everyone. Lists and indexes are never handed to a client that did not ask for them.
    pub fn allows(&self, media_type: &str) -> bool {
        if self.wildcard || self.types.iter().any(|t| t == media_type) {
            return true;
        }
        let names_a_manifest_type = self
            .types
            .iter()
            .any(|t| MANIFEST_TYPES.contains(&t.as_str()));
        if !names_a_manifest_type {
            // No manifest type named (no Accept, or e.g. only application/json): legacy client.
            return !is_index(media_type) || self.is_empty();
        }
        media_type == DOCKER_MANIFEST_V2
    }

    /// A normalised key for this accept set (sorted manifest types), for variant caching.
    pub fn variant_key(&self) -> String {
        if self.wildcard {
            return "*/*".to_owned();
        }
        let mut t: Vec<&str> = self
            .types
            .iter()
            .map(String::as_str)
            .filter(|t| MANIFEST_TYPES.contains(t))
            .collect();
        t.sort_unstable();
        t.join(",")
    }
}

/// Reads `mediaType` from a manifest's JSON, if present.
pub fn media_type_in_json(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes).ok()?.media_type
}

/// Strips parameters from a `Content-Type` value (`type; charset=...` → `type`).
pub fn bare_content_type(value: &str) -> &str {
    value.split(';').next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn reads_every_accept_line_and_comma_lists() {
        let mut h = HeaderMap::new();
        h.append("accept", HeaderValue::from_static(OCI_INDEX));
        h.append(
            "accept",
            HeaderValue::from_static(
                "application/vnd.docker.distribution.manifest.v2+json; q=0.9, application/vnd.oci.image.manifest.v1+json",
            ),
        );
        let a = Accept::from_headers(&h);
        assert_eq!(a.types(), [OCI_INDEX, DOCKER_MANIFEST_V2, OCI_MANIFEST]);
        assert!(a.allows(OCI_INDEX));
        assert!(!a.allows(DOCKER_MANIFEST_LIST));
    }

    #[test]
    fn wildcard_accepts_everything() {
        let a = Accept::parse("application/vnd.docker.distribution.manifest.v2+json, */*");
        assert!(a.allows(OCI_INDEX));
        assert!(a.allows(DOCKER_MANIFEST_LIST));
    }

    #[test]
    fn lists_are_not_given_to_clients_that_do_not_ask() {
        let a = Accept::parse(DOCKER_MANIFEST_V2);
        assert!(a.allows(DOCKER_MANIFEST_V2));
        assert!(!a.allows(DOCKER_MANIFEST_LIST));
        assert!(!a.allows(OCI_INDEX));
        assert!(!a.allows(OCI_MANIFEST));
        let a = Accept::parse("application/json");
        assert!(!a.allows(OCI_INDEX));
        assert!(a.allows(OCI_MANIFEST));
    }

    #[test]
    fn no_accept_gets_what_there_is() {
        let a = Accept::from_headers(&HeaderMap::new());
        assert!(a.is_empty());
        assert!(a.allows(DOCKER_MANIFEST_LIST));
    }

    #[test]
    fn variant_key_is_order_independent() {
        let a = Accept::parse(&format!("{OCI_MANIFEST}, {DOCKER_MANIFEST_V2}"));
        let b = Accept::parse(&format!("{DOCKER_MANIFEST_V2},{OCI_MANIFEST};q=1"));
        assert_eq!(a.variant_key(), b.variant_key());
    }

    #[test]
    fn media_type_is_read_from_manifest_json() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#;
        assert_eq!(media_type_in_json(m).as_deref(), Some(OCI_INDEX));
        assert_eq!(media_type_in_json(b"not json"), None);
        assert_eq!(
            bare_content_type("application/json; charset=utf-8"),
            "application/json"
        );
    }
}
