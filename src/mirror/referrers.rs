//! The OCI 1.1 referrers of a mirrored manifest (signatures, SBOMs, attestations).
//!
//! - Asked of the upstream's referrers API; an upstream without one (404 — ghcr.io, Docker Hub,
//!   distribution) is read through the referrers tag schema (`sha256-<hex>`, an index). Either
//!   way the answer is the API's: an image index of descriptors, sorted by digest, 200 and empty
//!   when nothing refers to the digest. The `artifactType` filter is applied here, on the whole
//!   cached list, so one cached answer serves every filter.
//! - The answer is cached in the index (per upstream, repository and subject), trusted for the
//!   upstream's `referrers_ttl`, then asked again (one request at a time per subject); served
//!   stale, with a `Warning`, within `max_stale` while the upstream fails; offline, the cached
//!   answer whatever its age, else the cached `sha256-<hex>` tag's index.
//! - The referring manifests are ordinary manifests: fetched by digest, they are cached like
//!   any other. Imported ones (an air-gap bundle) are added to the answer of their subject
//!   ([`remember_referrer`]), so the same answer comes back offline.
//! - cosign's tag-based attachments (`sha256-<hex>.sig`, `.att`, `.sbom`) are plain tags;
//!   [`cached_referrers`] finds them beside the API's referrers for `pin` and `export`.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use serde_json::Value;

use crate::cache::index::{unix_now_ms, ReferrersEntry};
use crate::cache::{Cache, CacheError, StoredManifest};
use crate::oci::manifest::referrer_descriptor;
use crate::oci::{Digest, ErrorCode, RegistryError, RepoName, Tag};
use crate::upstream::referrers::referrers_tag;
use crate::upstream::{Route, UpstreamError};

use super::{header_safe, offline_unknown, Mirror, Outcome};

/// The tag suffixes of cosign's tag-based attachments of a digest (`sha256-<hex><suffix>`).
pub const COSIGN_SUFFIXES: [&str; 3] = [".sig", ".att", ".sbom"];

/// A referrers answer for the edge: the whole list (filtered when asked), to be paged there.
pub struct ReferrersAnswer {
    /// Image-index descriptors, sorted by digest.
    pub manifests: Vec<Value>,
    pub outcome: Outcome,
    /// A `Warning` header text (stale answers).
    pub warning: Option<String>,
}

/// Descriptors sorted by digest, each digest once; entries without a digest dropped.
fn normalized(list: Vec<Value>) -> Vec<Value> {
    let mut by_digest = BTreeMap::new();
    for d in list {
        if let Some(k) = d
            .get("digest")
            .and_then(Value::as_str)
            .filter(|k| k.parse::<Digest>().is_ok())
        {
            by_digest.entry(k.to_owned()).or_insert(d);
        }
    }
    by_digest.into_values().collect()
}

/// Only the descriptors of `artifact_type`, when one is asked for.
fn filtered(list: Vec<Value>, artifact_type: Option<&str>) -> Vec<Value> {
    match artifact_type {
        None => list,
        Some(t) => list
            .into_iter()
            .filter(|d| d.get("artifactType").and_then(Value::as_str) == Some(t))
            .collect(),
    }
}

/// The digests a descriptor list names.
fn digests(list: &[Value]) -> Vec<Digest> {
    list.iter()
        .filter_map(|d| d.get("digest")?.as_str()?.parse().ok())
        .collect()
}

impl Mirror {
    /// The referrers of `subject` in the routed repository (see the module's description),
    /// only those of `artifact_type` when given.
    pub async fn referrers(
        &self,
        route: &Route,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ReferrersAnswer, RegistryError> {
        let (manifests, outcome, warning) = self.all_referrers(route, subject).await?;
        Ok(ReferrersAnswer {
            manifests: filtered(manifests, artifact_type),
            outcome,
            warning,
        })
    }

    fn referrers_record(
        &self,
        route: &Route,
        subject: &Digest,
    ) -> Result<Option<ReferrersEntry>, RegistryError> {
        Ok(self
            .cache
            .index()
            .referrers(route.host(), &route.repo, subject)
            .map_err(CacheError::from)?)
    }

    fn referrers_fresh(route: &Route, entry: &ReferrersEntry) -> bool {
        entry.checked > 0
            && Duration::from_millis(unix_now_ms().saturating_sub(entry.checked))
                < route.upstream.config.referrers_ttl
    }

    async fn all_referrers(
        &self,
        route: &Route,
        subject: &Digest,
    ) -> Result<(Vec<Value>, Outcome, Option<String>), RegistryError> {
        let cached = self.referrers_record(route, subject)?;
        if self.config.offline {
            return self.offline_referrers(route, subject, cached);
        }
        if let Some(e) = cached.as_ref().filter(|e| Self::referrers_fresh(route, e)) {
            return Ok((e.manifests.clone(), Outcome::Hit, None));
        }
        // One upstream request per subject at a time; the others take its answer.
        let gate = self.revalidations.gate(&format!(
            "{}\0{}\0referrers\0{}",
            route.host(),
            route.repo,
            subject.hex()
        ));
        let _turn = gate.lock().await;
        let cached = self.referrers_record(route, subject)?;
        if let Some(e) = cached.as_ref().filter(|e| Self::referrers_fresh(route, e)) {
            return Ok((e.manifests.clone(), Outcome::Hit, None));
        }
        match self.ask_referrers(route, subject, cached.is_some()).await {
            Ok(list) => {
                let outcome = match &cached {
                    Some(c) if c.manifests == list => Outcome::Revalidated,
                    _ => Outcome::Miss,
                };
                let entry = ReferrersEntry {
                    checked: unix_now_ms(),
                    manifests: list,
                };
                self.cache
                    .index()
                    .put_referrers(route.host(), &route.repo, subject, &entry)
                    .map_err(CacheError::from)?;
                self.cache.touch_repo(route.host(), &route.repo)?;
                self.cache.index().durable().await;
                Ok((entry.manifests, outcome, None))
            }
            Err(e) => self.referrers_failed(route, subject, cached, e),
        }
    }

    /// The upstream's answer, normalized; bounded by `revalidate_timeout` when there is a
    /// cached answer to fall back on.
    async fn ask_referrers(
        &self,
        route: &Route,
        subject: &Digest,
        have_cached: bool,
    ) -> Result<Vec<Value>, UpstreamError> {
        let config = &route.upstream.config;
        let call = route.upstream.referrers(&route.repo, subject);
        let got = if have_cached {
            tokio::time::timeout(config.revalidate_timeout, call)
                .await
                .unwrap_or_else(|_| {
                    Err(UpstreamError::Unreachable {
                        host: route.host().to_owned(),
                        message: format!(
                            "no answer within revalidate_timeout ({:?})",
                            config.revalidate_timeout
                        ),
                    })
                })?
        } else {
            call.await?
        };
        Ok(normalized(got.manifests))
    }

    /// Asking the upstream failed: the cached answer, marked stale, while the upstream is
    /// unavailable and the answer is within `max_stale`; else the upstream's error.
    fn referrers_failed(
        &self,
        route: &Route,
        subject: &Digest,
        cached: Option<ReferrersEntry>,
        err: UpstreamError,
    ) -> Result<(Vec<Value>, Outcome, Option<String>), RegistryError> {
        let client_error = err.to_registry_error(ErrorCode::NameUnknown);
        let Some(entry) = cached.filter(|_| err.is_unavailable()) else {
            return Err(client_error);
        };
        let age = Duration::from_millis(unix_now_ms().saturating_sub(entry.checked));
        let config = &route.upstream.config;
        if entry.checked > 0 && config.max_stale.is_some_and(|max| age > max) {
            tracing::warn!(upstream = %route.host(), repo = %route.repo, %subject, age_secs = age.as_secs(), error = %err, "upstream unavailable and the cached referrers are older than max_stale");
            return Err(client_error);
        }
        tracing::warn!(target: "stowage::stale", upstream = %route.host(), repo = %route.repo, %subject, age_secs = age.as_secs(), error = %err, "upstream unavailable; serving the cached referrers");
        crate::metrics::metrics().stale(route.host());
        let warning = format!(
            "stale: the referrers of {}@{subject} could not be revalidated ({err}); last checked {}",
            route.repo,
            if entry.checked > 0 {
                format!("{}s ago", age.as_secs())
            } else {
                "never (imported)".to_owned()
            }
        );
        Ok((
            entry.manifests,
            Outcome::Stale,
            Some(header_safe(&warning, 512)),
        ))
    }

    /// Offline: the cached answer whatever its age, else the cached `sha256-<hex>` tag's index.
    fn offline_referrers(
        &self,
        route: &Route,
        subject: &Digest,
        cached: Option<ReferrersEntry>,
    ) -> Result<(Vec<Value>, Outcome, Option<String>), RegistryError> {
        if let Some(e) = cached {
            return Ok((e.manifests, Outcome::Hit, None));
        }
        let tag_index = referrers_tag(subject)
            .parse::<Tag>()
            .ok()
            .and_then(|t| self.cache.tag(route.host(), &route.repo, &t).transpose())
            .transpose()?
            .and_then(|e| e.digest.parse::<Digest>().ok())
            .map(|d| self.cache.manifest(&d))
            .transpose()?
            .flatten();
        match tag_index.and_then(|m| {
            serde_json::from_slice::<Value>(&m.bytes)
                .ok()?
                .get("manifests")?
                .as_array()
                .cloned()
        }) {
            Some(list) => Ok((normalized(list), Outcome::Hit, None)),
            None => Err(offline_unknown(
                ErrorCode::NameUnknown,
                format_args!("the referrers of {}@{subject}", route.repo),
            )),
        }
    }
}

/// Adds an imported manifest that has a `subject` to the cached referrers answer of that
/// subject (keeping the answer's check time). Returns whether it was added.
pub fn remember_referrer(
    cache: &Cache,
    host: &str,
    repo: &RepoName,
    m: &StoredManifest,
) -> Result<bool, CacheError> {
    let Some((subject, descriptor)) = referrer_descriptor(&m.bytes, &m.media_type, &m.digest)
    else {
        return Ok(false);
    };
    let index = cache.index();
    let mut entry = index.referrers(host, repo, &subject)?.unwrap_or_default();
    let digest = m.digest.to_string();
    if entry
        .manifests
        .iter()
        .any(|d| d.get("digest").and_then(Value::as_str) == Some(&digest))
    {
        return Ok(false);
    }
    entry.manifests.push(descriptor);
    entry.manifests = normalized(std::mem::take(&mut entry.manifests));
    index.put_referrers(host, repo, &subject, &entry)?;
    Ok(true)
}

/// A manifest the cache holds that refers to an image: by the referrers API (no tag) or as
/// a tag (`sha256-<hex>` holding a referrers index, cosign's `sha256-<hex>.sig`...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedReferrer {
    pub digest: Digest,
    pub tag: Option<Tag>,
}

/// How deep referrers of referrers are followed (a signature of an SBOM of an image is 2).
const MAX_DEPTH: usize = 8;

/// The referrers the cache holds of the manifests `roots` in one mirrored repository,
/// recursively (a signature of an SBOM): those of the cached referrers answers, those of the
/// cached `sha256-<hex>` tags, and cosign's `sha256-<hex>.sig` / `.att` / `.sbom` tags. Only
/// referrers whose manifest is cached; each once, in the order found.
pub fn cached_referrers(
    cache: &Cache,
    host: &str,
    repo: &RepoName,
    roots: &[Digest],
) -> Result<Vec<CachedReferrer>, CacheError> {
    let index = cache.index();
    let mut seen: HashSet<Digest> = roots.iter().cloned().collect();
    let mut queue: VecDeque<(Digest, usize)> = roots.iter().map(|d| (d.clone(), 0)).collect();
    let mut out = Vec::new();
    // A tag is listed even when its digest was found before (the tag itself is content).
    let mut found = |d: Digest, tag: Option<Tag>, depth: usize, queue: &mut VecDeque<_>| {
        let new = seen.insert(d.clone());
        if new {
            queue.push_back((d.clone(), depth + 1));
        }
        if new || tag.is_some() {
            out.push(CachedReferrer { digest: d, tag });
        }
    };
    while let Some((subject, depth)) = queue.pop_front() {
        if depth >= MAX_DEPTH {
            continue;
        }
        let mut listed = index
            .referrers(host, repo, &subject)?
            .map(|e| digests(&e.manifests))
            .unwrap_or_default();
        let base = referrers_tag(&subject);
        let tagged = std::iter::once(base.clone())
            .chain(COSIGN_SUFFIXES.iter().map(|s| format!("{base}{s}")));
        for name in tagged {
            let Ok(tag) = name.parse::<Tag>() else {
                continue;
            };
            let Some(d) = index
                .tag(host, repo, &tag)?
                .and_then(|e| e.digest.parse::<Digest>().ok())
            else {
                continue;
            };
            let Some(m) = index.manifest(&d)? else {
                continue;
            };
            if name == base {
                // The referrers index itself: its entries are referrers of `subject`.
                if let Ok(v) = serde_json::from_slice::<Value>(&m.bytes) {
                    let list = v.get("manifests").and_then(Value::as_array);
                    listed.extend(list.map(|l| digests(l)).unwrap_or_default());
                }
            }
            found(d, Some(tag), depth, &mut queue);
        }
        for d in listed {
            if index.has_manifest(&d)? {
                found(d, None, depth, &mut queue);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_sorted_by_digest_deduplicated_and_filtered() {
        let a = Digest::of(b"a").to_string();
        let b = Digest::of(b"b").to_string();
        let list = vec![
            json!({"digest": b, "artifactType": "x"}),
            json!({"digest": a, "artifactType": "y"}),
            json!({"digest": b, "artifactType": "x"}),
            json!({"digest": "not-a-digest"}),
        ];
        let n = normalized(list);
        let mut want = vec![a.clone(), b.clone()];
        want.sort();
        assert_eq!(
            n.iter()
                .map(|d| d["digest"].as_str().unwrap())
                .collect::<Vec<_>>(),
            want
        );
        let only_x = filtered(n, Some("x"));
        assert_eq!(only_x.len(), 1);
        assert_eq!(only_x[0]["digest"], b);
    }
}
