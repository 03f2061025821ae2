//! Garbage collection of hosted content in the fleet's shared store (`stowage gc` on any node
//! with a shared store), safe while other nodes push.
//!
//! Mark as the local collector does ([`super::gc`]), from the shared records: per repository,
//! the manifests its tags reach (through index children), those pushed within the grace period,
//! the referrers of marked manifests, and the blobs of all of those. Everything else is
//! unreferenced: manifest links, blob links, manifest objects and blob objects.
//!
//! No lock spans the fleet, so time does the work a lock would: an unreferenced object is first
//! only *recorded* (`hosted/_gc/candidates/<key>`, holding the time), and removed by a later run
//! at least the grace period (`hosted.upload_timeout`) after the record, if it is still
//! unreferenced and its record is still there. Every push that references an object (a blob
//! upload, mount, adoption or import; a manifest push, for the manifest itself, its blobs and
//! its children) removes the records of those objects before it checks or writes anything.
//! The last step is a handshake: the collector writes a removal record, then re-reads the
//! candidate record, then deletes; a push removes the candidate record, then waits while a
//! removal record of its objects exists, then checks that they exist. Whatever the
//! interleaving, the collector sees the push's removal (and keeps the object) or the push sees
//! the collector's removal (and then finds the object gone and is refused): an acknowledged
//! push never loses an object. A collector slower than `REMOVAL_WINDOW` between its removal
//! record and its delete gives up on that object. A node trusts an empty listing of these
//! records for a moment, well below the grace period (`SharedHosted::clear_candidates` says why
//! that keeps the guarantee).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::oci::manifest::{self, Parsed};
use crate::oci::{Digest, RegistryError, RepoName};

use super::gc::{mark, Repo};
use super::shared::{
    candidate_key, removing_key, SharedHosted, CANDIDATES, REMOVAL_WINDOW, REMOVING,
};
use super::{now_secs, Hosted};

/// What a collection of the shared store did (or, dry, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedGcReport {
    /// (repository, manifest hex) links removed.
    pub manifests: Vec<(String, String)>,
    /// Blob links removed.
    pub links: usize,
    /// Manifest and blob objects removed.
    pub objects: usize,
    /// Bytes of the objects removed.
    pub bytes: u64,
    /// Unreferenced objects recorded by this run (removed by a run a grace period later).
    pub recorded: usize,
    /// Unreferenced objects recorded by an earlier run, still within the grace period.
    pub waiting: usize,
    /// Referrer records written for linked manifests that lacked one.
    pub referrers: usize,
}

/// One unreferenced shared object.
struct Garbage {
    key: String,
    size: u64,
    /// For a manifest link: its repository and hex (the referrer record goes with it).
    mlink: Option<(String, String)>,
    link: bool,
}

/// The shared records, per repository, and the manifests they link, parsed.
struct Loaded {
    repos: BTreeMap<String, Repo>,
    parsed: BTreeMap<String, Parsed>,
    /// Referrer descriptors of the linked manifests that have a subject, by hex.
    descriptors: BTreeMap<String, serde_json::Value>,
    /// (repository, subject hex, hex) of every referrer record.
    referrers: BTreeSet<(String, String, String)>,
}

impl Hosted {
    /// Collects unreferenced hosted content in the shared store (module docs); nothing without
    /// one. `dry_run` reports without writing or removing anything.
    pub async fn gc_shared(
        &self,
        grace: Duration,
        dry_run: bool,
    ) -> Result<SharedGcReport, RegistryError> {
        let Some(shared) = &self.shared else {
            return Ok(SharedGcReport::default());
        };
        let now = now_secs();
        let cutoff = now.saturating_sub(grace.as_secs());
        let loaded = load(shared).await?;
        let garbage = unreferenced(shared, &loaded, cutoff).await?;
        let mut report = SharedGcReport {
            referrers: restore_referrers(shared, &loaded, dry_run).await?,
            ..SharedGcReport::default()
        };
        let mut recorded = BTreeMap::new();
        for o in shared.list(CANDIDATES).await? {
            let at: Option<u64> = shared.get_text(&o.key).await?.and_then(|t| t.parse().ok());
            recorded.insert(o.key, at);
        }
        let mut live = BTreeSet::new();
        for g in &garbage {
            let record = candidate_key(&g.key);
            live.insert(record.clone());
            match recorded.get(&record).copied().flatten() {
                Some(at) if at <= cutoff => {
                    if dry_run || remove(shared, &loaded, g, &record).await? {
                        count(&mut report, g);
                    }
                }
                Some(_) => report.waiting += 1,
                None => {
                    report.recorded += 1;
                    if !dry_run {
                        shared.put_text(&record, now.to_string()).await?;
                    }
                }
            }
        }
        if !dry_run {
            // Records of objects referenced again (or gone), and removal records a stopped
            // collector left behind: dropped.
            for key in recorded.keys().filter(|k| !live.contains(*k)) {
                shared.delete(key).await?;
            }
            drop_stale_removals(shared, now).await?;
        }
        Ok(report)
    }
}

/// Removes removal records older than ten windows: their collector stopped before its delete.
async fn drop_stale_removals(shared: &SharedHosted, now: u64) -> Result<(), RegistryError> {
    let stale = now.saturating_sub(10 * REMOVAL_WINDOW.as_secs());
    for o in shared.list(REMOVING).await? {
        let at: Option<u64> = shared.get_text(&o.key).await?.and_then(|t| t.parse().ok());
        if at.is_none_or(|at| at < stale) {
            shared.delete(&o.key).await?;
        }
    }
    Ok(())
}

/// Writes the referrer record a linked manifest with a subject lacks (pushed before such records
/// existed, or by a push that stopped between its record and its link's removal); how many.
async fn restore_referrers(
    shared: &SharedHosted,
    loaded: &Loaded,
    dry_run: bool,
) -> Result<usize, RegistryError> {
    let mut restored = 0;
    for (name, repo) in &loaded.repos {
        for hex in repo.manifests.keys() {
            let (Some(p), Some(descriptor)) = (loaded.parsed.get(hex), loaded.descriptors.get(hex))
            else {
                continue;
            };
            let Some(subject) = &p.subject else { continue };
            let record = (name.clone(), subject.hex().to_string(), hex.clone());
            if loaded.referrers.contains(&record) {
                continue;
            }
            restored += 1;
            let names = (
                name.parse::<RepoName>(),
                format!("sha256:{hex}").parse::<Digest>(),
            );
            if let (false, Ok(repo), Ok(digest)) = (dry_run, names.0, names.1) {
                shared
                    .put_referrer(&repo, subject, &digest, descriptor)
                    .await?;
            }
        }
    }
    Ok(restored)
}

fn count(report: &mut SharedGcReport, g: &Garbage) {
    match (&g.mlink, g.link) {
        (Some(m), _) => report.manifests.push(m.clone()),
        (None, true) => report.links += 1,
        (None, false) => {
            report.objects += 1;
            report.bytes += g.size;
        }
    }
}

/// Removes one unreferenced object whose record is older than the grace period, unless a push
/// removed the record meanwhile (checked after the removal record is written: see the module
/// docs). Whether it went.
async fn remove(
    shared: &SharedHosted,
    loaded: &Loaded,
    g: &Garbage,
    record: &str,
) -> Result<bool, RegistryError> {
    let removing = removing_key(&g.key);
    let started = std::time::Instant::now();
    shared.put_text(&removing, now_secs().to_string()).await?;
    let claimed = shared.get_text(record).await?.is_none();
    if claimed || started.elapsed() >= REMOVAL_WINDOW {
        shared.delete(&removing).await?;
        return Ok(false);
    }
    shared.delete(&g.key).await?;
    if let Some((repo, hex)) = &g.mlink {
        let subject = loaded.parsed.get(hex).and_then(|p| p.subject.clone());
        let names = (
            repo.parse::<RepoName>(),
            format!("sha256:{hex}").parse::<Digest>(),
        );
        if let (Some(subject), Ok(repo), Ok(digest)) = (subject, names.0, names.1) {
            shared.remove_referrer(&repo, &subject, &digest).await?;
        }
    }
    shared.delete(record).await?;
    shared.delete(&removing).await?;
    Ok(true)
}

/// Reads every repository's manifest links (with their push times), blob links and tags, and
/// parses the manifests they link. A store failure aborts the collection.
async fn load(shared: &SharedHosted) -> Result<Loaded, RegistryError> {
    let mut repos: BTreeMap<String, Repo> = BTreeMap::new();
    let mut referrers = BTreeSet::new();
    for o in shared.list("hosted/repos/").await? {
        let Some((repo, rest)) = o
            .key
            .strip_prefix("hosted/repos/")
            .and_then(|r| r.split_once("/_"))
        else {
            continue;
        };
        let entry = repos.entry(repo.to_string()).or_default();
        if let Some(hex) = rest.strip_prefix("manifests/") {
            let at = shared.get_text(&o.key).await?.and_then(|t| t.parse().ok());
            entry.manifests.insert(hex.to_string(), at.unwrap_or(0));
        } else if let Some(hex) = rest.strip_prefix("links/") {
            // Blob links carry no time: the candidate records give them their grace.
            entry.links.insert(hex.to_string(), 0);
        } else if let Some((subject, hex)) = rest
            .strip_prefix("referrers/")
            .and_then(|r| r.split_once('/'))
        {
            referrers.insert((repo.to_string(), subject.to_string(), hex.to_string()));
        } else if rest.starts_with("tags/") {
            let target = shared.get_text(&o.key).await?;
            if let Some(d) = target.and_then(|t| t.parse::<Digest>().ok()) {
                entry.tagged.insert(d.hex().to_string());
            }
        }
    }
    let (mut parsed, mut descriptors) = (BTreeMap::new(), BTreeMap::new());
    let linked: BTreeSet<&String> = repos.values().flat_map(|r| r.manifests.keys()).collect();
    for hex in linked {
        let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
            continue;
        };
        if let Some(m) = shared.manifest(&digest).await? {
            if let Ok(p) = manifest::parse(&m.bytes, Some(&m.media_type)) {
                if p.subject.is_some() {
                    descriptors.insert(hex.clone(), super::referrers::descriptor(&m, &p));
                }
                parsed.insert(hex.clone(), p);
            }
        }
    }
    Ok(Loaded {
        repos,
        parsed,
        descriptors,
        referrers,
    })
}

/// Every unreferenced shared object: links first (they name the objects), then manifests and
/// blobs.
async fn unreferenced(
    shared: &SharedHosted,
    loaded: &Loaded,
    cutoff: u64,
) -> Result<Vec<Garbage>, RegistryError> {
    let mut out = Vec::new();
    let (mut kept_manifests, mut kept_blobs) = (BTreeSet::new(), BTreeSet::new());
    for (name, repo) in &loaded.repos {
        let (manifests, blobs) = mark(repo, &loaded.parsed, cutoff);
        for hex in repo.manifests.keys().filter(|h| !manifests.contains(*h)) {
            out.push(Garbage {
                key: format!("hosted/repos/{name}/_manifests/{hex}"),
                size: 0,
                mlink: Some((name.clone(), hex.clone())),
                link: false,
            });
        }
        for hex in repo.links.keys().filter(|h| !blobs.contains(*h)) {
            out.push(Garbage {
                key: format!("hosted/repos/{name}/_links/{hex}"),
                size: 0,
                mlink: None,
                link: true,
            });
        }
        kept_manifests.extend(manifests);
        kept_blobs.extend(blobs);
    }
    for (prefix, kept) in [
        ("hosted/manifests/sha256/", &kept_manifests),
        ("hosted/blobs/sha256/", &kept_blobs),
    ] {
        for o in shared.list(prefix).await? {
            let hex = o.key.strip_prefix(prefix).unwrap_or_default();
            if !kept.contains(hex) {
                out.push(Garbage {
                    key: o.key.clone(),
                    size: o.size,
                    mlink: None,
                    link: false,
                });
            }
        }
    }
    Ok(out)
}
