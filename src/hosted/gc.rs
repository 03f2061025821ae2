//! Garbage collection of hosted content, safe while pushes go on.
//!
//! Mark, per repository: the manifests its tags reach (through index children), the manifests
//! pushed within the grace period (a multi-arch push's children arrive before their index), and
//! the manifests whose `subject` is marked (signatures and attestations live as long as their
//! image). The blobs those manifests reference stay linked, as do links younger than the grace
//! period (a blob pushed before its manifest). Sweep: every other manifest link and blob link,
//! then manifest bytes no repository links and blob files no repository links.
//!
//! Pushes hold the collector's lock shared from their reference check to their index flush; the
//! collector holds it exclusively from mark to the last file removed, so no push can link a blob
//! the sweep is removing. Cached content is another store and is never looked at.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::oci::manifest;
use crate::oci::{Digest, ErrorCode, RegistryError};

use super::{internal, now_secs, Hosted};

/// What a collection removed (or, dry, would remove).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// (repository, manifest digest) links removed.
    pub manifests: Vec<(String, String)>,
    /// Blob links removed.
    pub links: usize,
    /// Blob files removed, with their sizes.
    pub blobs: Vec<(String, u64)>,
    /// Bytes freed (blob files and manifests).
    pub bytes: u64,
}

/// Per repository: manifest hex → pushed at, blob hex → linked at, tag targets.
#[derive(Default)]
pub(super) struct Repo {
    pub(super) manifests: BTreeMap<String, u64>,
    pub(super) links: BTreeMap<String, u64>,
    pub(super) tagged: BTreeSet<String>,
}

impl Hosted {
    /// Collects what no tag reaches (module docs). `dry_run` reports without removing.
    /// Blocking: call it from a thread outside the async runtime (`spawn_blocking`).
    pub fn gc(&self, grace: Duration, dry_run: bool) -> Result<GcReport, RegistryError> {
        let _exclusive = self.gc_lock.blocking_write();
        let repos = self.load_repos()?;
        let cutoff = now_secs().saturating_sub(grace.as_secs());
        let mut report = GcReport::default();
        let mut kept_manifests = BTreeSet::new();
        let mut kept_blobs = BTreeSet::new();
        for (name, repo) in &repos {
            let (manifests, blobs) = self.mark(repo, cutoff)?;
            for hex in repo.manifests.keys().filter(|h| !manifests.contains(*h)) {
                report.manifests.push((name.clone(), hex.clone()));
                if !dry_run {
                    self.index
                        .remove_mlink_raw(name, hex)
                        .map_err(|e| internal("index", e))?;
                }
            }
            for hex in repo.links.keys().filter(|h| !blobs.contains(*h)) {
                report.links += 1;
                if !dry_run {
                    self.index
                        .remove_link_raw(name, hex)
                        .map_err(|e| internal("index", e))?;
                }
            }
            kept_manifests.extend(manifests);
            kept_blobs.extend(blobs);
        }
        self.sweep(&kept_manifests, &kept_blobs, dry_run, &mut report)?;
        if !dry_run {
            self.remove_orphans(cutoff, &mut report)?;
            self.index
                .flush_blocking()
                .map_err(|e| internal("index", e))?;
        }
        Ok(report)
    }

    fn load_repos(&self) -> Result<BTreeMap<String, Repo>, RegistryError> {
        let mut repos: BTreeMap<String, Repo> = BTreeMap::new();
        for (repo, hex, at) in self.index.all_mlinks().map_err(|e| internal("index", e))? {
            repos.entry(repo).or_default().manifests.insert(hex, at);
        }
        for (repo, hex, at) in self.index.all_links().map_err(|e| internal("index", e))? {
            repos.entry(repo).or_default().links.insert(hex, at);
        }
        for (repo, _, hex) in self.index.all_tags().map_err(|e| internal("index", e))? {
            repos.entry(repo).or_default().tagged.insert(hex);
        }
        Ok(repos)
    }

    /// The manifests and blobs of one repository that stay.
    fn mark(
        &self,
        repo: &Repo,
        cutoff: u64,
    ) -> Result<(BTreeSet<String>, BTreeSet<String>), RegistryError> {
        let mut parsed = BTreeMap::new();
        for hex in repo.manifests.keys() {
            let digest: Digest = format!("sha256:{hex}")
                .parse()
                .map_err(|e| RegistryError::new(ErrorCode::Unknown, format!("{e}")))?;
            if let Some(m) = self
                .index
                .manifest(&digest)
                .map_err(|e| internal("index", e))?
            {
                if let Ok(p) = manifest::parse(&m.bytes, Some(&m.media_type)) {
                    parsed.insert(hex.clone(), p);
                }
            }
        }
        Ok(mark(repo, &parsed, cutoff))
    }

    /// Removes manifest bytes and blob files that no repository links any more.
    fn sweep(
        &self,
        kept_manifests: &BTreeSet<String>,
        kept_blobs: &BTreeSet<String>,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<(), RegistryError> {
        for (hex, size) in self
            .index
            .manifest_sizes()
            .map_err(|e| internal("index", e))?
        {
            if kept_manifests.contains(&hex) {
                continue;
            }
            report.bytes += size;
            if !dry_run {
                if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
                    let n = self
                        .index
                        .remove_manifest(&d)
                        .map_err(|e| internal("index", e))?;
                    self.quota.give(n);
                }
            }
        }
        for (digest, size) in self.index.blobs().map_err(|e| internal("index", e))? {
            if kept_blobs.contains(digest.hex()) {
                continue;
            }
            report.blobs.push((digest.to_string(), size));
            report.bytes += size;
            if !dry_run {
                // Record first: a crash after it leaves a file no record names, which is
                // unreachable and removed by the next collection's orphan pass.
                self.index
                    .remove_blob(&digest)
                    .map_err(|e| internal("index", e))?;
                match std::fs::remove_file(self.blob_path(&digest)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(internal("remove blob", e))
                    }
                    _ => {
                        self.quota.give(size);
                        self.blob_count
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(())
    }

    /// Blob files no record names (a crash between rename and index), older than the grace
    /// period.
    fn remove_orphans(&self, cutoff: u64, report: &mut GcReport) -> Result<(), RegistryError> {
        let known: BTreeSet<String> = self
            .index
            .blobs()
            .map_err(|e| internal("index", e))?
            .into_iter()
            .map(|(d, _)| d.hex().to_string())
            .collect();
        let root = self.root.join("blobs/sha256");
        for (path, size) in orphan_files(&root, &known, cutoff) {
            if std::fs::remove_file(&path).is_ok() {
                report.blobs.push((path.display().to_string(), size));
                report.bytes += size;
            }
        }
        Ok(())
    }
}

/// The manifests and blobs of `repo` that stay (module docs), given its manifests parsed (hex
/// → parsed; one that cannot be read marks nothing).
pub(super) fn mark(
    repo: &Repo,
    parsed: &BTreeMap<String, manifest::Parsed>,
    cutoff: u64,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut marked: BTreeSet<String> = repo
        .manifests
        .iter()
        .filter(|(hex, at)| **at > cutoff || repo.tagged.contains(*hex))
        .map(|(hex, _)| hex.clone())
        .collect();
    // To a fixpoint: children of marked indexes, referrers of marked subjects.
    loop {
        let before = marked.len();
        for (hex, p) in parsed
            .iter()
            .filter(|(h, _)| repo.manifests.contains_key(*h))
        {
            let refers_to_marked = p.subject.as_ref().is_some_and(|s| marked.contains(s.hex()));
            if refers_to_marked {
                marked.insert(hex.clone());
            }
            if marked.contains(hex) {
                for child in &p.children {
                    if repo.manifests.contains_key(child.digest.hex()) {
                        marked.insert(child.digest.hex().to_string());
                    }
                }
            }
        }
        if marked.len() == before {
            break;
        }
    }
    let mut blobs: BTreeSet<String> = repo
        .links
        .iter()
        .filter(|(_, at)| **at > cutoff)
        .map(|(hex, _)| hex.clone())
        .collect();
    for hex in &marked {
        if let Some(p) = parsed.get(hex) {
            blobs.extend(p.blobs.iter().map(|b| b.digest.hex().to_string()));
        }
    }
    (marked, blobs)
}

fn orphan_files(
    root: &std::path::Path,
    known: &BTreeSet<String>,
    cutoff: u64,
) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(root) else {
        return out;
    };
    for dir in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let Ok(meta) = f.metadata() else { continue };
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            if !known.contains(&name) && modified < cutoff {
                out.push((f.path(), meta.len()));
            }
        }
    }
    out
}
