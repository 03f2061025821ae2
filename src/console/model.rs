//! The console's vocabulary: how the API names repositories, how clients pull them, tag
//! freshness and platforms, counters as JSON, and the API's errors.

use serde_json::{json, Value};

use super::{ApiError, Console};
use crate::cache::index::unix_now_ms;
use crate::cache::stats::{CounterValues, RepoKey, HOSTED};
use crate::oci::{Digest, ErrorCode, RegistryError, RepoName};

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "console");
    ApiError(RegistryError::new(ErrorCode::Unknown, "internal error"))
}

pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(RegistryError::new(ErrorCode::Unsupported, message).with_status(400))
}

pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
    ApiError(RegistryError::new(ErrorCode::NameUnknown, message).with_status(404))
}

/// A repository as the API names it.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Mirrored { host: String, repo: RepoName },
    Hosted(RepoName),
}

impl Target {
    /// `<host>/<repo>` (mirrored) or the repository (hosted).
    pub(crate) fn parse(c: &Console, name: &str) -> Result<Target, ApiError> {
        let name = name.trim_matches('/');
        if let Some((first, rest)) = name.split_once('/') {
            if let Some(u) = c.mirror.router.by_host(first) {
                let repo = rest
                    .parse::<RepoName>()
                    .map_err(|e| bad_request(e.to_string()))?;
                return Ok(Target::Mirrored {
                    host: u.host().to_owned(),
                    repo,
                });
            }
        }
        let repo = name
            .parse::<RepoName>()
            .map_err(|e| bad_request(e.to_string()))?;
        match &c.hosted {
            Some(h) if h.holds_name(&repo) => Ok(Target::Hosted(repo)),
            _ => Err(not_found(format!(
                "{name} names no cached repository: mirrored ones are <upstream host>/<repository>"
            ))),
        }
    }

    pub(crate) fn key(&self) -> RepoKey {
        match self {
            Target::Mirrored { host, repo } => (host.clone(), repo.to_string()),
            Target::Hosted(repo) => (HOSTED.to_owned(), repo.to_string()),
        }
    }
}

/// The name a client pulls a repository by through this mirror: the repository itself on the
/// default (first) upstream and for hosted ones, else `<host>/<repository>`.
pub(crate) fn pull_name(c: &Console, key: &RepoKey) -> String {
    let default = c.mirror.router.upstreams().first().map(|u| u.host());
    if key.0 == HOSTED || Some(key.0.as_str()) == default {
        key.1.clone()
    } else {
        format!("{}/{}", key.0, key.1)
    }
}

/// The API's name of a repository.
pub(crate) fn api_name(key: &RepoKey) -> String {
    if key.0 == HOSTED {
        key.1.clone()
    } else {
        format!("{}/{}", key.0, key.1)
    }
}

/// Counter values as JSON fields.
pub(crate) fn counters(v: &CounterValues) -> Value {
    json!({
        "pulls": v.pulls,
        "bytes_served": v.bytes_served,
        "bytes_fetched": v.bytes_fetched,
        "last_pulled": (v.last_pulled > 0).then_some(v.last_pulled),
    })
}

/// `linux/amd64`-style platforms of a manifest: an index's entries, or an image's config (read
/// with `config`, when held).
pub(crate) fn platforms(bytes: &[u8], config: impl Fn(&Digest) -> Option<Vec<u8>>) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return Vec::new();
    };
    let fmt = |p: &Value| -> Option<String> {
        let os = p.get("os")?.as_str()?;
        let arch = p.get("architecture")?.as_str()?;
        Some(match p.get("variant").and_then(Value::as_str) {
            Some(var) => format!("{os}/{arch}/{var}"),
            None => format!("{os}/{arch}"),
        })
    };
    if let Some(list) = v.get("manifests").and_then(Value::as_array) {
        let mut out: Vec<String> = list
            .iter()
            .filter_map(|m| m.get("platform").and_then(fmt))
            .filter(|p| p != "unknown/unknown")
            .collect();
        out.dedup();
        return out;
    }
    let cfg = v
        .get("config")
        .and_then(|c| c.get("digest"))
        .and_then(Value::as_str)
        .and_then(|d| d.parse::<Digest>().ok());
    cfg.and_then(|d| config(&d))
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|c| fmt(&c))
        .into_iter()
        .collect()
}

/// Freshness of a mirrored tag: `immutable`, `fresh` within `manifest_ttl` of the last check,
/// else `stale` (revalidated at the next pull).
pub(crate) fn freshness(c: &Console, host: &str, tag: &str, checked_ms: u64) -> Value {
    let Some(u) = c.mirror.router.by_host(host) else {
        return json!({ "state": "unknown" });
    };
    let ttl = u.config.manifest_ttl.as_secs();
    let age = unix_now_ms().saturating_sub(checked_ms) / 1000;
    let state = if u.config.is_immutable(tag) {
        "immutable"
    } else if age < ttl {
        "fresh"
    } else {
        "stale"
    };
    json!({
        "state": state,
        "checked": (checked_ms > 0).then_some(checked_ms / 1000),
        "ttl_secs": ttl,
        "ttl_left_secs": ttl.saturating_sub(age),
    })
}

/// Reads a small blob file (a config), if present.
pub(crate) fn read_small(path: std::path::PathBuf) -> Option<Vec<u8>> {
    let meta = std::fs::metadata(&path).ok()?;
    if meta.len() > 1 << 20 {
        return None;
    }
    std::fs::read(path).ok()
}
