//! The operator commands on hosted repositories: `gc` collects what no tag reaches, `ls`
//! lists hosted repositories apart from cached ones, `verify` re-hashes every hosted blob.
//! Pushed content is never repaired by deletion: `verify` reports, the operator decides.

use std::io::Write;

use crate::hosted::Hosted;
use crate::oci::{Digest, RepoName};

use super::{human, OpsError};

fn registry(e: crate::oci::RegistryError) -> OpsError {
    OpsError::Usage(e.to_string())
}

/// `gc` of hosted content, with `hosted.upload_timeout` as the grace period (what was pushed
/// more recently may still be waiting for its manifest): this node's copies, then, with a
/// shared store, the shared store's content. `dry_run` reports without removing anything.
pub fn gc(hosted: &Hosted, dry_run: bool, out: &mut dyn Write) -> Result<(), OpsError> {
    let grace = hosted.settings().upload_timeout;
    let done = if dry_run { "would remove" } else { "removed" };
    let report = hosted.gc(grace, dry_run).map_err(registry)?;
    for (repo, hex) in &report.manifests {
        let _ = writeln!(out, "hosted: {done} untagged manifest {repo}@sha256:{hex}");
    }
    let _ = writeln!(
        out,
        "hosted: {done} {} manifests, {} blob links, {} blob files; {} {}",
        report.manifests.len(),
        report.links,
        report.blobs.len(),
        if dry_run { "would free" } else { "freed" },
        human(report.bytes)
    );
    if hosted.is_shared() {
        let shared = hosted
            .wait(hosted.gc_shared(grace, dry_run))
            .and_then(|r| r)
            .map_err(registry)?;
        for (repo, hex) in &shared.manifests {
            let _ = writeln!(
                out,
                "hosted (shared store): {done} untagged manifest {repo}@sha256:{hex}"
            );
        }
        if shared.referrers > 0 {
            let _ = writeln!(
                out,
                "hosted (shared store): {} referrer record(s) {}",
                shared.referrers,
                if dry_run { "missing" } else { "restored" }
            );
        }
        let _ = writeln!(
            out,
            "hosted (shared store): {done} {} manifests, {} blob links, {} objects ({}); {} newly unreferenced, {} waiting for the grace period ({})",
            shared.manifests.len(),
            shared.links,
            shared.objects,
            human(shared.bytes),
            shared.recorded,
            shared.waiting,
            humantime::format_duration(grace)
        );
    }
    hosted.publish();
    Ok(())
}

/// `ls` of hosted repositories: each repository's tags with their digests (with a shared store,
/// the fleet's).
pub fn ls(hosted: &Hosted, out: &mut dyn Write) -> Result<(), OpsError> {
    let repos = hosted
        .wait(hosted.repositories())
        .and_then(|r| r)
        .map_err(registry)?;
    let (bytes, blobs) = hosted.usage();
    let _ = writeln!(
        out,
        "\nhosted repositories ({} blobs, {} of {}{}):",
        blobs,
        human(bytes),
        human(hosted.settings().max_size),
        if hosted.is_shared() {
            " on this node"
        } else {
            ""
        }
    );
    if repos.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for repo in repos {
        let Ok(name) = repo.parse::<RepoName>() else {
            continue;
        };
        let tags = match hosted.wait(hosted.tagged(&name)).and_then(|r| r) {
            Ok(tags) => tags,
            Err(e) => {
                let _ = writeln!(out, "  {repo}  (tags unreadable: {})", e.message);
                continue;
            }
        };
        if tags.is_empty() {
            let _ = writeln!(out, "  {repo}  (untagged)");
        }
        for (tag, digest) in tags {
            let hex = digest.hex();
            let _ = writeln!(out, "  {repo}:{tag}  sha256:{}", &hex[..12.min(hex.len())]);
        }
    }
    Ok(())
}

/// `verify` of hosted blobs: every file present and hashing to its name; every link naming a
/// blob that is held. True when everything is sound.
pub fn verify(hosted: &Hosted, out: &mut dyn Write) -> Result<bool, OpsError> {
    let idx = hosted.index();
    let blobs = idx.blobs().map_err(|e| OpsError::Usage(e.to_string()))?;
    let mut bad = 0usize;
    for (digest, size) in &blobs {
        let path = hosted.blob_path(digest);
        match crate::cache::hash_file(&path, |_| {}) {
            Ok((got, n)) if &got == digest && n == *size => {}
            Ok((got, n)) => {
                bad += 1;
                let _ = writeln!(
                    out,
                    "hosted blob {digest}: corrupt ({n} bytes hashing to {got})"
                );
            }
            Err(e) => {
                bad += 1;
                let _ = writeln!(out, "hosted blob {digest}: missing or unreadable: {e}");
            }
        }
    }
    let held: std::collections::HashSet<&str> = blobs.iter().map(|(d, _)| d.hex()).collect();
    for (repo, hex, _) in idx
        .all_links()
        .map_err(|e| OpsError::Usage(e.to_string()))?
    {
        if !held.contains(hex.as_str()) {
            bad += 1;
            let d = format!("sha256:{hex}")
                .parse::<Digest>()
                .map(|d| d.to_string())
                .unwrap_or(hex);
            let _ = writeln!(out, "hosted link {repo} -> {d}: the blob is not held");
        }
    }
    let _ = writeln!(
        out,
        "hosted: verified {} blobs, {} problem(s)",
        blobs.len(),
        bad
    );
    Ok(bad == 0)
}
