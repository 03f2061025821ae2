//! `--with-referrers`: an image's signatures, SBOMs and attestations travel with it, and so do
//! theirs (a signature of an SBOM). Two kinds, both followed: the OCI 1.1 referrers (the
//! referrers API, or the upstream's `sha256-<hex>` tag standing in for it) and cosign's
//! tag-based attachments (`sha256-<hex>.sig`, `.att`, `.sbom`) of every manifest of the image,
//! each platform's included.
//!
//! `prefetch` asks the mirror (so the referrers answers are cached, and the referring
//! manifests and their blobs filled like any content); `export` takes what the cache holds
//! ([`cached_referrers`]); `import` puts the referring manifests back and adds them to their
//! subject's referrers answer, which offline serving then answers from.

use std::collections::HashSet;

use crate::hosted::Hosted;
use crate::mirror::referrers::COSIGN_SUFFIXES;
use crate::mirror::Mirror;
use crate::oci::media::Accept;
use crate::oci::{Digest, Reference, RegistryError, RepoName, Tag};
use crate::upstream::referrers::referrers_tag;
use crate::upstream::Route;

pub use crate::mirror::referrers::{cached_referrers, CachedReferrer};

/// How deep referrers of referrers are followed.
const MAX_DEPTH: usize = 8;

/// The manifests that refer to `subject` upstream, through the mirror: its referrers answer
/// (cached as such) and cosign's attachment tags that exist (cached as tags).
async fn direct_referrers(
    mirror: &Mirror,
    route: &Route,
    subject: &Digest,
) -> Result<Vec<Digest>, RegistryError> {
    let answer = mirror.referrers(route, subject, None).await?;
    let mut out: Vec<Digest> = answer
        .manifests
        .iter()
        .filter_map(|d| d.get("digest")?.as_str()?.parse().ok())
        .collect();
    let accept = Accept::parse(&crate::oci::media::upstream_manifest_accept());
    for suffix in COSIGN_SUFFIXES {
        let Ok(tag) = format!("{}{suffix}", referrers_tag(subject)).parse::<Tag>() else {
            continue;
        };
        match mirror.manifest(route, &Reference::Tag(tag), &accept).await {
            Ok(a) => out.push(a.manifest.digest.clone()),
            Err(e) if e.status() == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The manifests that refer to `roots`, recursively (a signature of an SBOM), each once, the
/// roots excluded, breadth first and at most [`MAX_DEPTH`] levels deep; `direct` lists one
/// subject's referrers.
async fn walk<F, Fut>(roots: &[Digest], mut direct: F) -> Result<Vec<Digest>, RegistryError>
where
    F: FnMut(Digest) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Digest>, RegistryError>>,
{
    let mut seen: HashSet<Digest> = roots.iter().cloned().collect();
    let mut level: Vec<Digest> = roots.to_vec();
    let mut out = Vec::new();
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for subject in &level {
            for d in direct(subject.clone()).await? {
                if seen.insert(d.clone()) {
                    next.push(d);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        out.extend(next.iter().cloned());
        level = next;
    }
    Ok(out)
}

/// The referrers of `roots` upstream, recursively, each once (the roots excluded), through
/// the mirror: the manifests to fetch (each by digest, with what it references).
pub(super) async fn referrers_upstream(
    mirror: &Mirror,
    route: &Route,
    roots: &[Digest],
) -> Result<Vec<Digest>, RegistryError> {
    walk(roots, |s| async move {
        direct_referrers(mirror, route, &s).await
    })
    .await
}

/// The referrers of a hosted manifest, recursively, each once (the root excluded).
pub(super) fn hosted_referrers(
    hosted: &Hosted,
    repo: &RepoName,
    root: &Digest,
) -> Result<Vec<Digest>, RegistryError> {
    let direct = |subject: Digest| async move {
        let list = hosted.referrers(repo, &subject, None).await?;
        Ok(list
            .iter()
            .filter_map(|d| d.get("digest")?.as_str()?.parse().ok())
            .collect())
    };
    hosted
        .wait(walk(std::slice::from_ref(root), direct))
        .and_then(|r| r)
}
