//! `purge`: removes the cached content of a mirrored repository or of one of its tags.
//!
//! The tags go first (a pinned one refuses the purge: unpin it first), then the manifests they
//! reached that no remaining tag or pin reaches, then the blobs of those manifests that no
//! manifest left in the index references and no pin holds. The repository leaves the catalog
//! and its counters go once it has no tag left. Hosted content is never touched: it lives in
//! its own store.

use std::collections::HashSet;

use crate::cache::{tag_access_key, Cache};
use crate::oci::{references, Digest, RepoName, Tag};

use super::{closure, OpsError};

/// What a purge removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PurgeReport {
    pub tags: u64,
    pub manifests: u64,
    pub blobs: u64,
    pub bytes: u64,
}

/// Why a purge did nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeRefused {
    /// No cached tag matches.
    NotCached,
    /// These tags are pinned.
    Pinned(Vec<String>),
}

/// Purges the tags of `upstream`/`repo` (all of them, or `tag`).
pub fn purge(
    cache: &Cache,
    upstream: &str,
    repo: &RepoName,
    tag: Option<&Tag>,
) -> Result<Result<PurgeReport, PurgeRefused>, OpsError> {
    cache.flush()?;
    let (doomed, kept): (Vec<_>, Vec<_>) = cache.index().tags()?.into_iter().partition(|t| {
        t.upstream == upstream && t.repo == repo.as_str() && tag.is_none_or(|x| x.as_str() == t.tag)
    });
    if doomed.is_empty() {
        return Ok(Err(PurgeRefused::NotCached));
    }
    let (pinned_manifests, pinned_blobs) = cache.pinned_closure()?;
    let digest = |d: &str| d.parse::<Digest>().ok();
    let pinned: Vec<String> = doomed
        .iter()
        .filter(|t| digest(&t.entry.digest).is_some_and(|d| pinned_manifests.contains(d.hex())))
        .map(|t| t.tag.clone())
        .collect();
    if !pinned.is_empty() {
        return Ok(Err(PurgeRefused::Pinned(pinned)));
    }
    let mut report = PurgeReport::default();
    let mut keep: HashSet<String> = pinned_manifests;
    for t in &kept {
        if let Some(d) = digest(&t.entry.digest) {
            keep.extend(closure(cache, &d)?.0.iter().map(|m| m.hex().to_owned()));
        }
    }
    let mut gone_manifests = Vec::new();
    for t in &doomed {
        let (Ok(r), Ok(tg)) = (t.repo.parse::<RepoName>(), t.tag.parse::<Tag>()) else {
            continue;
        };
        cache.index().remove_tag(upstream, &r, &tg)?;
        cache.budget().forget_key(tag_access_key(upstream, &r, &tg));
        report.tags += 1;
        if let Some(d) = digest(&t.entry.digest) {
            gone_manifests.extend(closure(cache, &d)?.0);
        }
    }
    let mut candidates: HashSet<String> = HashSet::new();
    for m in gone_manifests {
        if keep.contains(m.hex()) {
            continue;
        }
        if let Some(stored) = cache.manifest_untouched(&m)? {
            candidates.extend(
                references(&stored.bytes)
                    .blobs
                    .iter()
                    .map(|(b, _)| b.hex().to_owned()),
            );
            cache.remove_manifest(&m)?;
            report.manifests += 1;
        }
    }
    remove_unreferenced(cache, candidates, &pinned_blobs, &mut report)?;
    if kept
        .iter()
        .all(|t| t.upstream != upstream || t.repo != repo.as_str())
    {
        cache.index().remove_repo_raw(upstream, repo.as_str())?;
    }
    let key = (upstream.to_owned(), repo.to_string());
    let forgotten = cache.activity().forget(&key, tag.map(Tag::as_str));
    cache
        .index()
        .write_stats(forgotten.into_iter().map(|k| (k, None)).collect())?;
    cache.flush()?;
    Ok(Ok(report))
}

/// Removes the `candidates` (blob hex) that no manifest left in the index references and no pin
/// holds.
fn remove_unreferenced(
    cache: &Cache,
    mut candidates: HashSet<String>,
    pinned_blobs: &HashSet<String>,
    report: &mut PurgeReport,
) -> Result<(), OpsError> {
    candidates.retain(|h| !pinned_blobs.contains(h));
    if candidates.is_empty() {
        return Ok(());
    }
    for rec in cache.index().manifest_sizes() {
        let (hex, _) = rec?;
        let Ok(d) = format!("sha256:{hex}").parse::<Digest>() else {
            continue;
        };
        if let Some(m) = cache.manifest_untouched(&d)? {
            for (b, _) in references(&m.bytes).blobs {
                candidates.remove(b.hex());
            }
        }
    }
    for hex in candidates {
        let Ok(d) = format!("sha256:{hex}").parse::<Digest>() else {
            continue;
        };
        if let Some(size) = cache.budget().blob_size(&hex) {
            cache.remove_blob(&d)?;
            report.blobs += 1;
            report.bytes += size;
        }
    }
    Ok(())
}
