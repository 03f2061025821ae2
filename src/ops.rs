//! Operator commands on a cache: `pin`, `unpin`, `ls`, `verify [--repair]`, `gc`.
//!
//! Each works on an open [`Cache`]. The command line opens the cache itself when no server runs
//! (taking the cache's lock: sled allows one process per database, and a second writer behind a
//! server's back would break its budget accounting); while `stowage serve` runs on the same
//! `storage.path`, the command is executed inside the server instead, through its admin socket
//! ([`crate::admin`]).
//!
//! Image references use Docker's syntax: `alpine:3.19`, `docker.io/library/alpine:3.19`,
//! `ghcr.io/org/app@sha256:...`. A first component with a `.` or `:` (or `localhost`) names the
//! upstream host; otherwise the default (first) upstream. Docker Hub names get `library/`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::time::Duration;

use crate::cache::index::unix_now;
use crate::cache::{Cache, CacheError, Pin};
use crate::config::{canonical_host, Config};
use crate::oci::{references, Digest, Reference, RepoName, Tag};

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

/// `stowage pin REF...`: one pin per (digest, reference). The pins written apply to the
/// running budget even when a later reference fails.
pub fn pin(
    cache: &Cache,
    config: &Config,
    refs: &[String],
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let result = pin_each(cache, config, refs, out);
    apply_pins(cache, result)
}

fn pin_each(
    cache: &Cache,
    config: &Config,
    refs: &[String],
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    for text in refs {
        let r = parse_image_ref(text, config)?;
        let digest = resolve(cache, &r)?;
        cache.index().put_pin(
            &digest,
            &Pin {
                reference: r.to_string(),
                pinned: unix_now(),
            },
        )?;
        let (manifests, blobs) = closure(cache, &digest)?;
        let held = blobs
            .iter()
            .filter(|(b, _)| cache.budget().contains(b.hex()))
            .count();
        let _ = writeln!(
            out,
            "pinned {r} ({digest}): {} manifest(s), {} blob(s), {held} of them cached now",
            manifests.len(),
            blobs.len()
        );
    }
    Ok(())
}

/// Applies the pins in the index to the running budget and flushes, whatever `result` is (pins
/// written before a failure must not be recorded yet ignored by eviction); then `result`.
fn apply_pins(cache: &Cache, result: Result<(), OpsError>) -> Result<(), OpsError> {
    let refreshed = cache.refresh_pins();
    let flushed = cache.index().flush();
    result?;
    refreshed?;
    flushed?;
    Ok(())
}

/// `stowage unpin REF...`: a tag reference removes the pins recorded for that reference, whatever
/// digest they hold now (the tag may have moved since); a digest reference removes every pin of
/// that digest.
pub fn unpin(
    cache: &Cache,
    config: &Config,
    refs: &[String],
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let result = unpin_each(cache, config, refs, out);
    apply_pins(cache, result)
}

fn unpin_each(
    cache: &Cache,
    config: &Config,
    refs: &[String],
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    for text in refs {
        let r = parse_image_ref(text, config)?;
        let removed: Vec<(Digest, String)> = match &r.reference {
            Reference::Digest(d) => cache
                .index()
                .remove_pins_of_digest(d)?
                .into_iter()
                .map(|p| (d.clone(), p.reference))
                .collect(),
            Reference::Tag(_) => {
                // Recorded references are compared as parsed, so that another spelling of the
                // same image (say from a bundle's `import --pin`) matches too.
                let mut removed = Vec::new();
                for (d, p) in cache.index().pins()? {
                    let same = p.reference == r.to_string()
                        || parse_image_ref(&p.reference, config).is_ok_and(|q| q == r);
                    if same && cache.index().remove_pin(&d, &p.reference)? {
                        removed.push((d, p.reference));
                    }
                }
                removed
            }
        };
        for (digest, reference) in &removed {
            let _ = writeln!(out, "unpinned {reference} ({digest})");
        }
        if removed.is_empty() {
            // Say so when the tag's digest is pinned by other references.
            let current = match &r.reference {
                Reference::Tag(t) => cache.index().tag(&r.host, &r.repo, t)?,
                Reference::Digest(_) => None,
            };
            let others: Vec<String> = match &current {
                Some(e) => cache
                    .index()
                    .pins()?
                    .into_iter()
                    .filter(|(d, _)| d.to_string() == e.digest)
                    .map(|(_, p)| p.reference)
                    .collect(),
                None => Vec::new(),
            };
            match current {
                Some(e) if !others.is_empty() => {
                    let _ = writeln!(
                        out,
                        "{r} was not pinned; its digest {} is pinned as {} (unpin that, or the digest)",
                        e.digest,
                        others.join(", ")
                    );
                }
                _ => {
                    let _ = writeln!(out, "{r} was not pinned");
                }
            }
        }
    }
    Ok(())
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
        let total: u64 = blobs.iter().map(|(_, s)| s).sum();
        let cached: u64 = blobs
            .iter()
            .filter(|(b, _)| cache.budget().contains(b.hex()))
            .map(|(_, s)| s)
            .sum();
        let key = {
            let mut k = vec![b't'];
            k.extend_from_slice(format!("{}\0{}\0{}", t.upstream, t.repo, t.tag).as_bytes());
            k
        };
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
    // Pins no tag reaches any more (the tag moved, or was removed): only `unpin` frees them.
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
        let total: u64 = blobs.iter().map(|(_, s)| s).sum();
        let cached: u64 = blobs
            .iter()
            .filter(|(b, _)| cache.budget().contains(b.hex()))
            .map(|(_, s)| s)
            .sum();
        let _ = writeln!(
            out,
            "{:<50} {:>10} {:>10} {:<12} {digest}",
            pin.reference,
            human(cached),
            human(total),
            ago(pin.pinned)
        );
    }
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

/// What `verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub checked: u64,
    pub corrupt: Vec<Digest>,
    pub missing: Vec<Digest>,
    pub repaired: bool,
}

impl VerifyReport {
    pub fn clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty()
    }
}

/// `stowage verify [--repair]`: re-hashes every indexed blob. With `repair`, corrupt and missing
/// blobs are dropped from the index (and disk) so that the next pull refills them. With
/// `progress`, a bar on stderr when it is a terminal, else a line every 5% (`false` inside
/// `serve`, whose stderr is its log).
pub fn verify(
    cache: &Cache,
    repair: bool,
    progress: bool,
    out: &mut dyn Write,
) -> Result<VerifyReport, OpsError> {
    let mut entries = Vec::new();
    for rec in cache.index().blobs() {
        let (hex, meta) = rec?;
        entries.push((hex, meta.map(|m| m.size).unwrap_or(0)));
    }
    let total_bytes: u64 = entries.iter().map(|(_, s)| s).sum();
    let tty = progress && std::io::stderr().is_terminal();
    let bar = if tty {
        let b = indicatif::ProgressBar::new(total_bytes);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "verify [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut report = VerifyReport::default();
    let n = entries.len();
    let step = (n / 20).max(1);
    for (i, (hex, size)) in entries.iter().enumerate() {
        let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
            continue;
        };
        let path = cache.blob_path(&digest);
        let mut vanished = false;
        match crate::cache::hash_file(&path, |c| bar.inc(c)) {
            Ok((actual, got)) if actual == digest && got == *size => {}
            Ok((actual, got)) => {
                bar.suspend(|| {
                    let _ = writeln!(
                        out,
                        "corrupt {digest}: {got} bytes hashing to {actual} (indexed size {size})"
                    );
                });
                report.corrupt.push(digest);
            }
            // Evicted (or removed by gc) since the listing: not damage.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && cache.index().blob(&digest)?.is_none() =>
            {
                vanished = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bar.suspend(|| {
                    let _ = writeln!(out, "missing {digest}: no file at {}", path.display());
                });
                report.missing.push(digest);
            }
            Err(e) => {
                bar.suspend(|| {
                    let _ = writeln!(out, "corrupt {digest}: cannot read {}: {e}", path.display());
                });
                report.corrupt.push(digest);
            }
        }
        if !vanished {
            report.checked += 1;
        }
        if progress && !tty && ((i + 1) % step == 0 || i + 1 == n) {
            eprintln!("verify: {}/{} blobs checked", i + 1, n);
        }
    }
    bar.finish_and_clear();
    if repair {
        for d in report.corrupt.iter().chain(report.missing.iter()) {
            cache.remove_blob(d)?;
            let _ = writeln!(
                out,
                "repaired {d}: dropped from the cache; it refills on the next pull"
            );
        }
        report.repaired = true;
        cache.flush()?;
    }
    let _ = writeln!(
        out,
        "verified {} blob(s): {} corrupt, {} missing{}",
        report.checked,
        report.corrupt.len(),
        report.missing.len(),
        if report.clean() {
            " — cache is clean"
        } else if repair {
            " — repaired"
        } else {
            " — run `stowage verify --repair` to drop them so they refill"
        }
    );
    Ok(report)
}

/// What `gc` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub tags: u64,
    pub manifests: u64,
    pub blobs: u64,
    pub bytes: u64,
}

/// `stowage gc`: removes tags and manifests not used within `max_age` (never pinned ones, never
/// manifests a kept tag or index still references), then blobs no kept manifest references that
/// were not used within `max_age`.
pub fn gc(cache: &Cache, max_age: Duration, out: &mut dyn Write) -> Result<GcReport, OpsError> {
    // Inside `serve`, recency and tag check times wait in memory for their batch: write them
    // first, or what was just used would count as unused.
    cache.flush()?;
    let cutoff = unix_now().saturating_sub(max_age.as_secs());
    let mut access: HashMap<Vec<u8>, u64> = HashMap::new();
    for rec in cache.index().access_records() {
        let (k, _, unix) = rec?;
        access.insert(k, unix);
    }
    let (pinned_manifests, pinned_blobs) = cache.pinned_closure()?;
    let mut report = GcReport::default();
    // Tags.
    let mut kept_roots: Vec<Digest> = Vec::new();
    let mut emptied: BTreeSet<(String, String)> = BTreeSet::new();
    for t in cache.index().tags()? {
        let mut key = vec![b't'];
        key.extend_from_slice(format!("{}\0{}\0{}", t.upstream, t.repo, t.tag).as_bytes());
        // Access records are in seconds; a tag's `checked` in milliseconds.
        let last = access
            .get(&key)
            .copied()
            .unwrap_or(0)
            .max(t.entry.checked / 1000);
        let digest = t.entry.digest.parse::<Digest>().ok();
        let pinned = digest
            .as_ref()
            .is_some_and(|d| pinned_manifests.contains(d.hex()));
        if last < cutoff && !pinned {
            cache.index().remove_tag_raw(&t.upstream, &t.repo, &t.tag)?;
            cache.budget().forget_key(key);
            emptied.insert((t.upstream.clone(), t.repo.clone()));
            report.tags += 1;
            let _ = writeln!(
                out,
                "removed tag {}/{}:{} (last used {})",
                t.upstream,
                t.repo,
                t.tag,
                ago(last)
            );
        } else if let Some(d) = digest {
            kept_roots.push(d);
        }
    }
    // Repositories whose last tag went: out of `/v2/_catalog`.
    for t in cache.index().tags()? {
        emptied.remove(&(t.upstream, t.repo));
    }
    for (upstream, repo) in &emptied {
        cache.index().remove_repo_raw(upstream, repo)?;
    }
    // Manifests: keep what kept tags and pins reach, and what was used recently.
    let mut all_manifests = Vec::new();
    for rec in cache.index().manifest_sizes() {
        let (hex, _) = rec?;
        if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
            all_manifests.push(d);
        }
    }
    let mut keep: HashSet<String> = pinned_manifests.clone();
    for root in &kept_roots {
        for m in closure(cache, root)?.0 {
            keep.insert(m.hex().to_owned());
        }
    }
    for d in &all_manifests {
        let mut key = vec![b'm'];
        key.extend_from_slice(d.hex().as_bytes());
        if access.get(&key).copied().unwrap_or(0) >= cutoff {
            for m in closure(cache, d)?.0 {
                keep.insert(m.hex().to_owned());
            }
        }
    }
    let mut referenced: HashSet<String> = pinned_blobs;
    for d in &all_manifests {
        if keep.contains(d.hex()) {
            if let Some(m) = cache.manifest_untouched(d)? {
                referenced.extend(
                    references(&m.bytes)
                        .blobs
                        .iter()
                        .map(|(b, _)| b.hex().to_owned()),
                );
            }
        } else {
            cache.remove_manifest(d)?;
            report.manifests += 1;
            let _ = writeln!(out, "removed manifest {d}");
        }
    }
    // Blobs nothing kept references, unused for max_age.
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for rec in cache.index().blobs() {
        let (hex, meta) = rec?;
        sizes.insert(hex, meta.map(|m| m.size).unwrap_or(0));
    }
    for (hex, size) in sizes {
        if referenced.contains(&hex) {
            continue;
        }
        let mut key = vec![b'b'];
        key.extend_from_slice(hex.as_bytes());
        if access.get(&key).copied().unwrap_or(0) >= cutoff {
            continue;
        }
        if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
            cache.remove_blob(&d)?;
            report.blobs += 1;
            report.bytes += size;
            let _ = writeln!(out, "removed orphaned blob {d} ({})", human(size));
        }
    }
    cache.flush()?;
    let _ = writeln!(
        out,
        "gc: removed {} tag(s), {} manifest(s), {} blob(s) ({})",
        report.tags,
        report.manifests,
        report.blobs,
        human(report.bytes)
    );
    Ok(report)
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
