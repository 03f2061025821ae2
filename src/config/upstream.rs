//! `[[upstreams]]`: the registries the mirror pulls from, and how long it trusts their answers.

use std::collections::HashSet;
use std::time::Duration;

use super::error::{invalid, ConfigError};
use super::raw::RawUpstream;
use super::units::parse_duration;
use crate::policy::{Pattern, RepoPolicy};

pub const DEFAULT_MANIFEST_TTL: &str = "5m";
pub const DEFAULT_NEGATIVE_TTL: &str = "30s";
pub const DEFAULT_REVALIDATE_TIMEOUT: &str = "10s";

#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The registry host clients name (`docker.io`, `ghcr.io`, `registry.local:5000`).
    pub host: String,
    /// Base URL of its API (`https://registry-1.docker.io`), without `/v2`.
    pub url: url::Url,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Connect timeout for upstream requests.
    pub connect_timeout: Duration,
    /// Longest silence tolerated while reading an upstream response.
    pub read_timeout: Duration,
    /// How long a tag answer is trusted without asking upstream (`manifest_ttl`, default 5m;
    /// zero = revalidate on every request).
    pub manifest_ttl: Duration,
    /// How long a mirrored referrers answer (`/v2/<name>/referrers/<digest>`) is trusted
    /// without asking upstream (`referrers_ttl`, default: this upstream's `manifest_ttl`).
    pub referrers_ttl: Duration,
    /// Tags matching any of these patterns never change once cached (`immutable_tags`).
    pub immutable_tags: Vec<regex::Regex>,
    /// How long past its last successful check a tag may still be served when the upstream
    /// fails (`max_stale`; `None` = without limit).
    pub max_stale: Option<Duration>,
    /// How long an upstream "no such tag" is remembered (`negative_ttl`, default 30s; zero = not).
    pub negative_ttl: Duration,
    /// Upper bound on a tag revalidation (`HEAD`) before the cached answer is served stale
    /// (`revalidate_timeout`, default 10s).
    pub revalidate_timeout: Duration,
    /// `allow` / `deny` repository patterns (see [`crate::policy`]).
    pub policy: RepoPolicy,
    /// What a manifest from this upstream must carry before it is cached
    /// (`require_signatures` with `signature_public_key`).
    pub signatures: SignaturePolicy,
}

/// `require_signatures`: whether manifests from an upstream must carry a verifying signature.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SignaturePolicy {
    /// `"none"` (the default): nothing is checked.
    #[default]
    None,
    /// `"sigstore"`: a sigstore signature (the `sha256-<hex>.sig` attachment skopeo, podman and
    /// cosign write) verifying with a key of the PEM file `public_key`.
    Sigstore { public_key: std::path::PathBuf },
}

/// A registry host name as routing compares it: trimmed, lowercase, and every name of Docker
/// Hub (`index.docker.io`, `registry-1.docker.io`, `registry.hub.docker.com`) as `docker.io`.
/// The one definition of "this is Docker Hub", for routing and for `library/`.
pub fn canonical_host(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB.into(),
        _ => h,
    }
}

const DOCKER_HUB: &str = "docker.io";

impl UpstreamConfig {
    /// Docker Hub keeps official images under `library/`.
    pub fn is_docker_hub(&self) -> bool {
        canonical_host(&self.host) == DOCKER_HUB
    }

    /// Whether `tag` matches one of the `immutable_tags` patterns.
    pub fn is_immutable(&self, tag: &str) -> bool {
        self.immutable_tags.iter().any(|r| r.is_match(tag))
    }
}

/// Validates `[[upstreams]]` (absent: Docker Hub alone); hosts must be distinct.
pub(super) fn upstreams_config(
    raw: Option<Vec<RawUpstream>>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<UpstreamConfig>, ConfigError> {
    let raw_upstreams = raw.unwrap_or_else(|| vec![RawUpstream::docker_hub()]);
    if raw_upstreams.is_empty() {
        return Err(invalid(
            "upstreams",
            "at least one [[upstreams]] entry is needed",
        ));
    }
    let mut seen = HashSet::new();
    let mut upstreams = Vec::with_capacity(raw_upstreams.len());
    for (i, u) in raw_upstreams.into_iter().enumerate() {
        let key = format!("upstreams[{i}].host");
        let host = upstream_host(&u.host, &key)?;
        if !seen.insert(host.clone()) {
            return Err(invalid(key, format!("{host:?} is configured twice")));
        }
        upstreams.push(upstream_config(i, host, u, env)?);
    }
    Ok(upstreams)
}

/// Timeouts and tag-freshness settings of one upstream, parsed.
struct Timing {
    connect_timeout: Duration,
    read_timeout: Duration,
    manifest_ttl: Duration,
    referrers_ttl: Duration,
    negative_ttl: Duration,
    revalidate_timeout: Duration,
    max_stale: Option<Duration>,
}

/// `upstreams[i]`, its `host` already checked: every error names `upstreams[i].<key>`.
fn upstream_config(
    i: usize,
    host: String,
    u: RawUpstream,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<UpstreamConfig, ConfigError> {
    let key = |k: &str| format!("upstreams[{i}].{k}");
    let url = upstream_url(&u.url, &key("url"))?;
    let password = upstream_password(&u, &key, env)?;
    let timing = upstream_timing(&u, &key)?;
    let signatures = signature_policy(&u, &key)?;
    let immutable_tags = immutable_tags(u.immutable_tags.unwrap_or_default(), &key)?;
    let policy = RepoPolicy {
        allow: policy_patterns(u.allow, &key("allow"))?,
        deny: policy_patterns(u.deny, &key("deny"))?,
    };
    Ok(UpstreamConfig {
        host,
        url,
        username: u.username,
        password,
        connect_timeout: timing.connect_timeout,
        read_timeout: timing.read_timeout,
        manifest_ttl: timing.manifest_ttl,
        referrers_ttl: timing.referrers_ttl,
        immutable_tags,
        max_stale: timing.max_stale,
        negative_ttl: timing.negative_ttl,
        revalidate_timeout: timing.revalidate_timeout,
        policy,
        signatures,
    })
}

/// `require_signatures` (`"none"` or `"sigstore"`) and `signature_public_key`, which
/// `"sigstore"` needs and which means nothing without it. The key file is read (and its keys
/// checked) when the mirror starts.
fn signature_policy(
    u: &RawUpstream,
    key: &impl Fn(&str) -> String,
) -> Result<SignaturePolicy, ConfigError> {
    let path = u
        .signature_public_key
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty());
    match (u.require_signatures.as_deref().map(str::trim), path) {
        (None | Some("none"), None) => Ok(SignaturePolicy::None),
        (None | Some("none"), Some(_)) => Err(invalid(
            key("signature_public_key"),
            "has no effect unless require_signatures = \"sigstore\"",
        )),
        (Some("sigstore"), Some(p)) => Ok(SignaturePolicy::Sigstore {
            public_key: p.into(),
        }),
        (Some("sigstore"), None) => Err(invalid(
            key("signature_public_key"),
            "require_signatures = \"sigstore\" needs the PEM file of the public key",
        )),
        (Some(other), _) => Err(invalid(
            key("require_signatures"),
            format!("{other:?} is not \"sigstore\" or \"none\""),
        )),
    }
}

/// A registry host (`docker.io`, `registry.local:5000`), lowercased.
fn upstream_host(text: &str, key: &str) -> Result<String, ConfigError> {
    let host = text.trim().to_ascii_lowercase();
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:_".contains(&b));
    if !valid {
        return Err(invalid(
            key,
            format!("{text:?} is not a registry host like \"docker.io\""),
        ));
    }
    Ok(host)
}

fn upstream_url(text: &str, key: &str) -> Result<url::Url, ConfigError> {
    let url = url::Url::parse(text).map_err(|e| invalid(key, format!("{text:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            key,
            format!("{text:?} must be an http:// or https:// URL"),
        ));
    }
    Ok(url)
}

/// `password`, or the variable `password_env` names; either needs `username`.
fn upstream_password(
    u: &RawUpstream,
    key: &impl Fn(&str) -> String,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, ConfigError> {
    let password_key = if u.password_env.is_some() {
        "password_env"
    } else {
        "password"
    };
    let password = match (&u.password, &u.password_env) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key("password_env"),
                "set either password or password_env, not both",
            ))
        }
        (Some(p), None) => Some(p.clone()),
        (None, Some(var)) => match env(var) {
            Some(p) if !p.is_empty() => Some(p),
            _ => {
                return Err(invalid(
                    key("password_env"),
                    format!("environment variable {var:?} is not set or empty"),
                ))
            }
        },
        (None, None) => None,
    };
    if password.is_some() && u.username.is_none() {
        return Err(invalid(key(password_key), "a password needs a username"));
    }
    Ok(password)
}

fn upstream_timing(u: &RawUpstream, key: &impl Fn(&str) -> String) -> Result<Timing, ConfigError> {
    let duration = |value: &Option<String>, default: &str, k: &str| {
        parse_duration(value.as_deref().unwrap_or(default)).map_err(|m| invalid(key(k), m))
    };
    let connect_timeout = duration(&u.connect_timeout, "10s", "connect_timeout")?;
    let read_timeout = duration(&u.read_timeout, "60s", "read_timeout")?;
    let manifest_ttl = duration(&u.manifest_ttl, DEFAULT_MANIFEST_TTL, "manifest_ttl")?;
    let referrers_ttl = match &u.referrers_ttl {
        Some(t) => parse_duration(t).map_err(|m| invalid(key("referrers_ttl"), m))?,
        None => manifest_ttl,
    };
    let negative_ttl = duration(&u.negative_ttl, DEFAULT_NEGATIVE_TTL, "negative_ttl")?;
    let revalidate_timeout = duration(
        &u.revalidate_timeout,
        DEFAULT_REVALIDATE_TIMEOUT,
        "revalidate_timeout",
    )?;
    if revalidate_timeout.is_zero() {
        return Err(invalid(key("revalidate_timeout"), "must be more than zero"));
    }
    let max_stale = match u.max_stale.as_deref().map(str::trim) {
        None | Some("unlimited") => None,
        Some(t) => Some(
            parse_duration(t)
                .map_err(|m| invalid(key("max_stale"), format!("{m} (or \"unlimited\")")))?,
        ),
    };
    Ok(Timing {
        connect_timeout,
        read_timeout,
        manifest_ttl,
        referrers_ttl,
        negative_ttl,
        revalidate_timeout,
        max_stale,
    })
}

/// `immutable_tags`: regular expressions; an error names `immutable_tags[j]`.
fn immutable_tags(
    patterns: Vec<String>,
    key: &impl Fn(&str) -> String,
) -> Result<Vec<regex::Regex>, ConfigError> {
    patterns
        .iter()
        .enumerate()
        .map(|(j, pattern)| {
            regex::Regex::new(pattern).map_err(|e| {
                invalid(
                    key(&format!("immutable_tags[{j}]")),
                    format!("{pattern:?} is not a regular expression: {e}"),
                )
            })
        })
        .collect()
}

/// `allow` / `deny`: repository patterns; an error names `<key>[j]`.
fn policy_patterns(list: Option<Vec<String>>, key: &str) -> Result<Vec<Pattern>, ConfigError> {
    list.unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(j, p)| Pattern::new(p).map_err(|m| invalid(format!("{key}[{j}]"), m)))
        .collect()
}
