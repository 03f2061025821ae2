//! Operator commands on a cache: `pin`, `unpin`, `ls`, `verify [--repair]`, `gc`, and `purge`
//! (the console's removal of a mirrored repository or tag).
//!
//! Each works on an open [`Cache`]. The command line opens the cache itself when no server runs
//! (taking the cache's lock: sled allows one process per database, and a second writer behind a
//! server's back would break its budget accounting); while `stowage serve` runs on the same
//! `storage.path`, the command is executed inside the server instead, through its admin socket.
//! Either way the command writes its report as text, and the progress of the long operations
//! goes out as [`Event`]s, defined here: whoever runs an operation carries and renders them.
//!
//! Image references use Docker's syntax: `alpine:3.19`, `docker.io/library/alpine:3.19`,
//! `ghcr.io/org/app@sha256:...`. A first component with a `.` or `:` (or `localhost`) names the
//! upstream host; otherwise the default (first) upstream. Docker Hub names get `library/`.

use std::collections::HashSet;
use std::io::Write;

use crate::cache::index::unix_now;
use crate::cache::{Cache, CacheError, Pin};
use crate::config::{canonical_host, Config};
use crate::oci::references;
use crate::oci::{Digest, Reference, RepoName, Tag};

mod event;
mod gc;
pub mod hosted;
mod pins;
mod purge;
mod verify;

pub use event::Event;
pub use gc::{gc, GcReport};
pub use pins::{pin, unpin};
pub use purge::{purge, PurgeRefused, PurgeReport};
pub use verify::{verify, VerifyReport};

/// An operator command failure: a message for the terminal.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Index(#[from] crate::cache::IndexError),
    #[error("{0}")]
    Usage(String),
}

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub host: String,
    pub repo: RepoName,
    pub reference: Reference,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{t}", self.host, self.repo),
            Reference::Digest(d) => write!(f, "{}/{}@{d}", self.host, self.repo),
        }
    }
}

/// Parses a Docker-style image reference against the configured upstreams.
pub fn parse_image_ref(text: &str, config: &Config) -> Result<ImageRef, OpsError> {
    let bad = |m: &str| OpsError::Usage(format!("image reference {text:?}: {m}"));
    let (name_part, reference) = if let Some((n, d)) = text.split_once('@') {
        let d: Digest = d.parse().map_err(|e| bad(&format!("{e}")))?;
        (n, Reference::Digest(d))
    } else {
        let last_slash = text.rfind('/').map(|i| i + 1).unwrap_or(0);
        match text[last_slash..].rfind(':') {
            Some(i) => {
                let tag: Tag = text[last_slash + i + 1..]
                    .parse()
                    .map_err(|e| bad(&format!("{e}")))?;
                (&text[..last_slash + i], Reference::Tag(tag))
            }
            None => (
                text,
                Reference::Tag("latest".parse().map_err(|_| bad("tag"))?),
            ),
        }
    };
    let default_host = config
        .upstreams
        .first()
        .map(|u| canonical_host(&u.host))
        .unwrap_or_else(|| "docker.io".into());
    let (host, path) = match name_part.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (canonical_host(first), rest)
        }
        _ => (default_host, name_part),
    };
    let upstream = config
        .upstreams
        .iter()
        .find(|u| canonical_host(&u.host) == host)
        .ok_or_else(|| {
            bad(&format!(
                "no upstream {host:?} is configured (configured: {})",
                config
                    .upstreams
                    .iter()
                    .map(|u| u.host.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let mut repo: RepoName = path.parse().map_err(|e| bad(&format!("{e}")))?;
    if upstream.is_docker_hub() {
        repo = repo.with_library_prefix();
    }
    Ok(ImageRef {
        host: upstream.host.clone(),
        repo,
        reference,
    })
}

/// The manifest digest a reference names in the cache.
pub(crate) fn resolve(cache: &Cache, r: &ImageRef) -> Result<Digest, OpsError> {
    let digest = match &r.reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => {
            let entry = cache.index().tag(&r.host, &r.repo, t)?.ok_or_else(|| {
                OpsError::Usage(format!(
                    "{r} is not in the cache; pull it through the mirror first"
                ))
            })?;
            entry
                .digest
                .parse()
                .map_err(|_| OpsError::Usage(format!("{r}: the cached tag holds a bad digest")))?
        }
    };
    if cache.manifest_untouched(&digest)?.is_none() {
        return Err(OpsError::Usage(format!(
            "{r}: manifest {digest} is not in the cache; pull it through the mirror first"
        )));
    }
    Ok(digest)
}

/// Manifests held and blobs (with descriptor sizes) reachable from a manifest.
pub(crate) type Closure = (Vec<Digest>, Vec<(Digest, u64)>);

/// Every manifest and blob reachable from `root` that the cache holds: (manifests, blobs).
pub(crate) fn closure(cache: &Cache, root: &Digest) -> Result<Closure, OpsError> {
    let mut manifests = Vec::new();
    let mut blobs = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let Some(m) = cache.manifest_untouched(&d)? else {
            continue;
        };
        manifests.push(d);
        let refs = references(&m.bytes);
        blobs.extend(refs.blobs);
        stack.extend(refs.children);
    }
    blobs.sort();
    blobs.dedup();
    Ok((manifests, blobs))
}

/// `1.5 MiB`: bytes for people.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// What `blobs` (digest, descriptor size) weigh: (the part the cache holds, in all).
fn cached_and_total(cache: &Cache, blobs: &[(Digest, u64)]) -> (u64, u64) {
    let total: u64 = blobs.iter().map(|(_, s)| s).sum();
    let cached: u64 = blobs
        .iter()
        .filter(|(b, _)| cache.budget().contains(b.hex()))
        .map(|(_, s)| s)
        .sum();
    (cached, total)
}

/// The access-record key of a tag as the index lists it (unparsed strings).
fn tag_access_key_raw(upstream: &str, repo: &str, tag: &str) -> Vec<u8> {
    let mut k = vec![b't'];
    k.extend_from_slice(format!("{upstream}\0{repo}\0{tag}").as_bytes());
    k
}

/// `5m ago`: how long ago `unix` (seconds) was, for people.
fn ago(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let s = unix_now().saturating_sub(unix);
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `stowage ls`: cached tags with their size held, last use and pin state, pins no tag reaches,
/// then totals.
pub fn ls(cache: &Cache, out: &mut dyn Write) -> Result<(), OpsError> {
    let (pinned_manifests, _) = cache.pinned_closure()?;
    let mut tags = cache.index().tags()?;
    tags.sort_by(|a, b| (&a.upstream, &a.repo, &a.tag).cmp(&(&b.upstream, &b.repo, &b.tag)));
    let _ = writeln!(
        out,
        "{:<50} {:<19} {:>10} {:>10} {:<12} PINNED",
        "IMAGE", "DIGEST", "CACHED", "TOTAL", "LAST USE"
    );
    let mut tagged: HashSet<String> = HashSet::new();
    for t in &tags {
        let Ok(digest) = t.entry.digest.parse::<Digest>() else {
            continue;
        };
        let (manifests, blobs) = closure(cache, &digest)?;
        let (cached, total) = cached_and_total(cache, &blobs);
        let key = tag_access_key_raw(&t.upstream, &t.repo, &t.tag);
        let last = cache
            .index()
            .access(&key)?
            .map(|(_, u)| u)
            .unwrap_or(t.entry.checked / 1000); // checked is in milliseconds
        let pinned = manifests.iter().any(|m| pinned_manifests.contains(m.hex()));
        tagged.extend(manifests.iter().map(|m| m.hex().to_owned()));
        let _ = writeln!(
            out,
            "{:<50} {:<19} {:>10} {:>10} {:<12} {}",
            format!("{}/{}:{}", t.upstream, t.repo, t.tag),
            format!("sha256:{}", &digest.hex()[..12]),
            human(cached),
            human(total),
            ago(last),
            if pinned { "yes" } else { "no" }
        );
    }
    list_untagged_pins(cache, &tagged, out)?;
    let s = cache.stats();
    let _ = writeln!(
        out,
        "\n{} blob(s), {} of {} budget ({} blobs, {} manifests, {} pinned)",
        s.blob_count,
        human(s.size_bytes),
        human(s.budget_bytes),
        human(s.blob_bytes),
        human(s.manifest_bytes),
        human(s.pinned_blob_bytes)
    );
    Ok(())
}

/// `ls`'s second table: pins no tag reaches any more (the tag moved, or was removed), which only
/// `unpin` frees. `tagged`: the manifests (hex) that the listed tags reach.
fn list_untagged_pins(
    cache: &Cache,
    tagged: &HashSet<String>,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let mut untagged: Vec<(Digest, Pin)> = cache
        .index()
        .pins()?
        .into_iter()
        .filter(|(d, _)| !tagged.contains(d.hex()))
        .collect();
    untagged.sort_by(|a, b| (&a.1.reference, &a.0).cmp(&(&b.1.reference, &b.0)));
    if !untagged.is_empty() {
        let _ = writeln!(
            out,
            "\npinned, not tagged (`stowage unpin` the reference or the digest to release):\n\
             {:<50} {:>10} {:>10} {:<12} DIGEST",
            "REFERENCE", "CACHED", "TOTAL", "PINNED"
        );
    }
    for (digest, pin) in &untagged {
        let (_, blobs) = closure(cache, digest)?;
        let (cached, total) = cached_and_total(cache, &blobs);
        let _ = writeln!(
            out,
            "{:<50} {:>10} {:>10} {:<12} {digest}",
            pin.reference,
            human(cached),
            human(total),
            ago(pin.pinned)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml(
            "[[upstreams]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:1\"\n\
             [[upstreams]]\nhost = \"ghcr.io\"\nurl = \"http://127.0.0.1:2\"",
        )
        .unwrap()
    }

    #[test]
    fn image_refs_follow_docker_syntax() {
        let c = config();
        let r = parse_image_ref("alpine:3.19", &c).unwrap();
        assert_eq!(r.to_string(), "docker.io/library/alpine:3.19");
        let r = parse_image_ref("docker.io/library/alpine:3.19", &c).unwrap();
        assert_eq!(r.to_string(), "docker.io/library/alpine:3.19");
        let r = parse_image_ref("index.docker.io/alpine", &c).unwrap();
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse_image_ref(&format!("ghcr.io/org/app@{d}"), &c).unwrap();
        assert_eq!(r.host, "ghcr.io");
        assert_eq!(r.repo.as_str(), "org/app");
        assert_eq!(r.reference, Reference::Digest(d.parse().unwrap()));
        assert!(parse_image_ref("quay.io/x/y:1", &c)
            .unwrap_err()
            .to_string()
            .contains("quay.io"));
        assert!(parse_image_ref("Alpine:1", &c).is_err());
    }
}
