//! `gc`: removes what was not used within `storage.gc_max_age`, top down.
//!
//! Tags first (never a pinned one), then the repositories left without a tag, then manifests
//! that no kept tag, pin or recent use reaches, and last the blobs that no kept manifest
//! references and that were not used recently. Each step keeps what the one before kept, so a
//! kept image always keeps its whole closure.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::time::Duration;

use crate::cache::budget::blob_key;
use crate::cache::index::unix_now;
use crate::cache::{manifest_access_key, Cache};
use crate::oci::references;
use crate::oci::Digest;

use super::{ago, closure, human, tag_access_key_raw, OpsError};

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
    let mut access: HashMap<Vec<u8>, u64> = HashMap::new();
    for rec in cache.index().access_records() {
        let (k, _, unix) = rec?;
        access.insert(k, unix);
    }
    let mut sweep = Sweep {
        cache,
        access,
        cutoff: unix_now().saturating_sub(max_age.as_secs()),
        report: GcReport::default(),
        out,
    };
    let (pinned_manifests, pinned_blobs) = cache.pinned_closure()?;
    let kept_roots = sweep.tags(&pinned_manifests)?;
    let referenced = sweep.manifests(&kept_roots, pinned_manifests, pinned_blobs)?;
    sweep.blobs(&referenced)?;
    cache.flush()?;
    let Sweep { report, out, .. } = sweep;
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

/// One `gc` run: the last use of everything, and what was removed so far.
struct Sweep<'a> {
    cache: &'a Cache,
    /// Last use (unix seconds) by access-record key.
    access: HashMap<Vec<u8>, u64>,
    /// Unused since before this (unix seconds) means unused.
    cutoff: u64,
    report: GcReport,
    out: &'a mut dyn Write,
}

impl Sweep<'_> {
    /// When the record `key` was last used (0: never).
    fn last_use(&self, key: &[u8]) -> u64 {
        self.access.get(key).copied().unwrap_or(0)
    }

    /// Removes the tags not used since the cutoff (never one naming a pinned manifest), then the
    /// repositories left without a tag. Returns the manifests the kept tags name.
    fn tags(&mut self, pinned_manifests: &HashSet<String>) -> Result<Vec<Digest>, OpsError> {
        let cache = self.cache;
        let mut kept_roots: Vec<Digest> = Vec::new();
        let mut emptied: BTreeSet<(String, String)> = BTreeSet::new();
        for t in cache.index().tags()? {
            let key = tag_access_key_raw(&t.upstream, &t.repo, &t.tag);
            // Access records are in seconds; a tag's `checked` in milliseconds.
            let last = self.last_use(&key).max(t.entry.checked / 1000);
            let digest = t.entry.digest.parse::<Digest>().ok();
            let pinned = digest
                .as_ref()
                .is_some_and(|d| pinned_manifests.contains(d.hex()));
            if last < self.cutoff && !pinned {
                cache.index().remove_tag_raw(&t.upstream, &t.repo, &t.tag)?;
                cache.budget().forget_key(key);
                emptied.insert((t.upstream.clone(), t.repo.clone()));
                self.report.tags += 1;
                let _ = writeln!(
                    self.out,
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
        Ok(kept_roots)
    }

    /// Keeps the manifests that the kept tags and the pins reach, and those used since the
    /// cutoff (with what they reach); removes the others. Returns the blobs (hex) the kept
    /// manifests and the pins reference.
    fn manifests(
        &mut self,
        kept_roots: &[Digest],
        pinned_manifests: HashSet<String>,
        pinned_blobs: HashSet<String>,
    ) -> Result<HashSet<String>, OpsError> {
        let cache = self.cache;
        let mut all_manifests = Vec::new();
        for rec in cache.index().manifest_sizes() {
            let (hex, _) = rec?;
            if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
                all_manifests.push(d);
            }
        }
        let mut keep: HashSet<String> = pinned_manifests;
        for root in kept_roots {
            for m in closure(cache, root)?.0 {
                keep.insert(m.hex().to_owned());
            }
        }
        for d in &all_manifests {
            if self.last_use(&manifest_access_key(d)) >= self.cutoff {
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
                self.report.manifests += 1;
                let _ = writeln!(self.out, "removed manifest {d}");
            }
        }
        Ok(referenced)
    }

    /// Removes the blobs nothing kept references that were not used since the cutoff.
    fn blobs(&mut self, referenced: &HashSet<String>) -> Result<(), OpsError> {
        let cache = self.cache;
        let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
        for rec in cache.index().blobs() {
            let (hex, meta) = rec?;
            sizes.insert(hex, meta.map(|m| m.size).unwrap_or(0));
        }
        for (hex, size) in sizes {
            if referenced.contains(&hex) || self.last_use(&blob_key(&hex)) >= self.cutoff {
                continue;
            }
            if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
                cache.remove_blob(&d)?;
                self.report.blobs += 1;
                self.report.bytes += size;
                let _ = writeln!(self.out, "removed orphaned blob {d} ({})", human(size));
            }
        }
        Ok(())
    }
}
