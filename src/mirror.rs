//! The mirror's policy: answer from the cache when it can, from the upstream otherwise.
//!
//! - Manifests by digest are content-addressed: a cached one is served without asking upstream.
//! - Manifests by tag are revalidated upstream with a `HEAD` (free against Docker Hub's rate
//!   limit); a `GET` follows only for a digest we do not hold. If the upstream cannot be reached,
//!   the cached tag is served with a `Warning`.
//! - A manifest whose type the client does not accept (a list for a client that wants one image)
//!   is fetched again upstream with the client's own `Accept`, never handed over.
//! - Blobs: a hit streams the file; a miss joins or starts a fill (see [`crate::cache::fill`]).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::cache::{
    BlobBody, BlobSource, Cache, CachedBlob, Fill, FillPolicy, StoredManifest, TagEntry,
};
use crate::config::Config;
use crate::oci::media::{self, Accept};
use crate::oci::{Digest, ErrorCode, Reference, RegistryError, RepoName, Tag};
use crate::upstream::{Route, Router, Upstream, UpstreamError};

/// How a request was answered, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From the cache, upstream not asked.
    Hit,
    /// From the cache after upstream confirmed the tag.
    Revalidated,
    /// From the cache because the upstream could not be asked.
    Stale,
    /// Fetched from upstream (and cached).
    Miss,
    /// Attached to a fill already in flight.
    Joined,
    /// Answered by the upstream without caching (HEAD of an uncached blob, tag lists).
    Upstream,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Miss => "miss",
            Outcome::Joined => "joined",
            Outcome::Upstream => "upstream",
        }
    }
}

/// A manifest to send.
pub struct ManifestAnswer {
    pub manifest: Arc<StoredManifest>,
    pub outcome: Outcome,
    /// A `Warning` header text (stale answers).
    pub warning: Option<String>,
}

/// A blob to send.
pub enum BlobAnswer {
    /// A committed file.
    Cached(CachedBlob),
    /// A fill in progress; `total` is the size if the upstream said.
    Filling {
        fill: Arc<Fill>,
        total: Option<u64>,
        joined: bool,
    },
    /// The answer to a HEAD for a blob we do not hold.
    Head { size: Option<u64> },
}

/// The mirror: cache + upstreams.
pub struct Mirror {
    pub config: Config,
    pub cache: Cache,
    pub router: Router,
}

/// A fill source reading a blob from an upstream repository.
struct UpstreamSource {
    upstream: Arc<Upstream>,
    repo: RepoName,
    digest: Digest,
}

impl BlobSource for UpstreamSource {
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<BlobBody, RegistryError>> {
        Box::pin(async move {
            self.upstream
                .get_blob(&self.repo, &self.digest, offset)
                .await
                .map_err(|e| e.to_registry_error(ErrorCode::BlobUnknown))
        })
    }

    fn idle_timeout(&self) -> Option<std::time::Duration> {
        Some(self.upstream.config.read_timeout)
    }
}

impl Mirror {
    /// Opens the cache and builds the upstream clients.
    pub fn new(config: Config) -> Result<Mirror, crate::Error> {
        let cache = Cache::open(&config.storage.path)?.with_fill_policy(FillPolicy {
            max_concurrent: config.storage.max_concurrent_fills,
            retries: config.storage.fill_retries,
            ..FillPolicy::default()
        });
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for u in &config.upstreams {
            upstreams.push(Arc::new(Upstream::new(u.clone()).map_err(|e| {
                crate::Error::Startup(format!("upstream {}: {e}", u.host))
            })?));
        }
        Ok(Mirror {
            config,
            cache,
            router: Router::new(upstreams),
        })
    }

    /// Routes a client's repository name.
    pub fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Route, RegistryError> {
        self.router.route(name, ns)
    }

    /// A manifest by tag or digest.
    pub async fn manifest(
        &self,
        route: &Route,
        reference: &Reference,
        accept: &Accept,
    ) -> Result<ManifestAnswer, RegistryError> {
        let answer = match reference {
            Reference::Digest(d) => self.manifest_by_digest(route, d).await?,
            Reference::Tag(t) => self.manifest_by_tag(route, t).await?,
        };
        if accept.allows(&answer.manifest.media_type) || matches!(reference, Reference::Digest(_)) {
            return Ok(answer);
        }
        // The client does not accept what the tag points to (e.g. a list): ask upstream for the
        // variant it does accept, with its own Accept. Cached by digest, not under the tag.
        let Reference::Tag(tag) = reference else {
            return Ok(answer);
        };
        let client_accept = accept.types().join(", ");
        let fetched = route
            .upstream
            .get_manifest(&route.repo, tag.as_str(), None, &client_accept)
            .await
            .map_err(|e| e.to_registry_error(ErrorCode::ManifestUnknown))?;
        if !accept.allows(&fetched.media_type) {
            return Err(RegistryError::new(
                ErrorCode::ManifestUnknown,
                format!(
                    "{}:{tag} is a {} and the client's Accept header does not allow it",
                    route.repo, fetched.media_type
                ),
            ));
        }
        let manifest = self
            .store_manifest(route, fetched.digest, fetched.media_type, fetched.bytes)
            .await?;
        Ok(ManifestAnswer {
            manifest,
            outcome: Outcome::Miss,
            warning: None,
        })
    }

    async fn manifest_by_digest(
        &self,
        route: &Route,
        digest: &Digest,
    ) -> Result<ManifestAnswer, RegistryError> {
        if let Some(m) = self.cache.manifest(digest)? {
            return Ok(ManifestAnswer {
                manifest: m,
                outcome: Outcome::Hit,
                warning: None,
            });
        }
        let fetched = route
            .upstream
            .get_manifest(
                &route.repo,
                &digest.to_string(),
                Some(digest),
                &media::upstream_manifest_accept(),
            )
            .await
            .map_err(|e| e.to_registry_error(ErrorCode::ManifestUnknown))?;
        let manifest = self
            .store_manifest(route, fetched.digest, fetched.media_type, fetched.bytes)
            .await?;
        Ok(ManifestAnswer {
            manifest,
            outcome: Outcome::Miss,
            warning: None,
        })
    }

    async fn manifest_by_tag(
        &self,
        route: &Route,
        tag: &Tag,
    ) -> Result<ManifestAnswer, RegistryError> {
        let host = route.host();
        let cached = self.cache.tag(host, &route.repo, tag)?;
        let accept_all = media::upstream_manifest_accept();
        let head = route
            .upstream
            .head_manifest(&route.repo, tag.as_str(), &accept_all)
            .await;
        match head {
            Ok(h) => {
                if let Some(d) = &h.digest {
                    if let Some(m) = self.cache.manifest(d)? {
                        self.remember_tag(route, tag, &m, cached.as_ref()).await?;
                        return Ok(ManifestAnswer {
                            manifest: m,
                            outcome: Outcome::Revalidated,
                            warning: None,
                        });
                    }
                }
                // Unknown digest (or none sent): fetch it — by digest when we know it.
                let reference = h.digest.as_ref().map(Digest::to_string);
                let fetched = route
                    .upstream
                    .get_manifest(
                        &route.repo,
                        reference.as_deref().unwrap_or(tag.as_str()),
                        h.digest.as_ref(),
                        &accept_all,
                    )
                    .await
                    .map_err(|e| e.to_registry_error(ErrorCode::ManifestUnknown))?;
                let m = self
                    .store_manifest(route, fetched.digest, fetched.media_type, fetched.bytes)
                    .await?;
                self.remember_tag(route, tag, &m, cached.as_ref()).await?;
                Ok(ManifestAnswer {
                    manifest: m,
                    outcome: Outcome::Miss,
                    warning: None,
                })
            }
            Err(e) if e.is_unavailable() => self.stale_tag(route, tag, cached, e),
            Err(e) => Err(e.to_registry_error(ErrorCode::ManifestUnknown)),
        }
    }

    fn stale_tag(
        &self,
        route: &Route,
        tag: &Tag,
        cached: Option<TagEntry>,
        err: UpstreamError,
    ) -> Result<ManifestAnswer, RegistryError> {
        let manifest = match cached
            .as_ref()
            .and_then(|c| c.digest.parse::<Digest>().ok())
        {
            Some(d) => self.cache.manifest(&d)?,
            None => None,
        };
        match manifest {
            Some(m) => {
                tracing::warn!(upstream = %route.host(), repo = %route.repo, %tag, error = %err, "upstream unavailable; serving cached tag");
                Ok(ManifestAnswer {
                    manifest: m,
                    outcome: Outcome::Stale,
                    warning: Some(format!("stale: upstream {} unavailable", route.host())),
                })
            }
            None => Err(err.to_registry_error(ErrorCode::ManifestUnknown)),
        }
    }

    async fn store_manifest(
        &self,
        route: &Route,
        digest: Digest,
        media_type: String,
        bytes: Bytes,
    ) -> Result<Arc<StoredManifest>, RegistryError> {
        let m = self.cache.put_manifest(StoredManifest {
            digest,
            media_type,
            bytes,
        })?;
        self.cache.touch_repo(route.host(), &route.repo)?;
        self.cache.index().durable().await;
        Ok(m)
    }

    async fn remember_tag(
        &self,
        route: &Route,
        tag: &Tag,
        m: &StoredManifest,
        previous: Option<&TagEntry>,
    ) -> Result<(), RegistryError> {
        let digest = m.digest.to_string();
        if previous.is_some_and(|p| p.digest == digest) {
            return Ok(());
        }
        self.cache.put_tag(
            route.host(),
            &route.repo,
            tag,
            &TagEntry {
                digest,
                media_type: m.media_type.clone(),
                checked: crate::cache::index::unix_now(),
            },
        )?;
        self.cache.touch_repo(route.host(), &route.repo)?;
        self.cache.index().durable().await;
        Ok(())
    }

    /// A blob: the cached file, a fill (started or joined), or for HEAD the upstream's size.
    pub async fn blob(
        &self,
        route: &Route,
        digest: &Digest,
        head: bool,
    ) -> Result<BlobAnswer, RegistryError> {
        if let Some(b) = self.cache.open_blob(digest)? {
            return Ok(BlobAnswer::Cached(b));
        }
        if head {
            let size = route
                .upstream
                .head_blob(&route.repo, digest)
                .await
                .map_err(|e| e.to_registry_error(ErrorCode::BlobUnknown))?;
            return Ok(BlobAnswer::Head { size });
        }
        let (fill, joined) = self.cache.fill(digest, || {
            Box::new(UpstreamSource {
                upstream: route.upstream.clone(),
                repo: route.repo.clone(),
                digest: digest.clone(),
            })
        })?;
        let total = fill.started().await?;
        Ok(BlobAnswer::Filling {
            fill,
            total,
            joined,
        })
    }

    /// A page of the upstream's tag list, in lexical order with `n` / `last` applied here (some
    /// registries ignore them), named as the client named the repository. `next` is the `last`
    /// value for the following page, when there is one.
    pub async fn tags(
        &self,
        route: &Route,
        client_name: &RepoName,
        page: &TagPage,
    ) -> Result<TagList, RegistryError> {
        // Ask upstream for the same window; a registry that honours it saves transfer, one that
        // does not is windowed below. An upstream `Link` means it holds more than it sent.
        let query = {
            // (The serializer is not `Send`; keep it out of the await below.)
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            if let Some(n) = page.n {
                q.append_pair("n", &n.to_string());
            }
            if let Some(l) = &page.last {
                q.append_pair("last", l);
            }
            q.finish()
        };
        let (body, link) = route
            .upstream
            .tags_list(&route.repo, Some(&query))
            .await
            .map_err(|e| e.to_registry_error(ErrorCode::NameUnknown))?;
        #[derive(serde::Deserialize)]
        struct Upstream {
            tags: Option<Vec<String>>,
        }
        let parsed: Upstream = serde_json::from_slice(&body).map_err(|e| {
            RegistryError::new(
                ErrorCode::Unknown,
                format!("upstream tag list is not valid JSON: {e}"),
            )
            .with_status(502)
        })?;
        let mut tags = parsed.tags.unwrap_or_default();
        let upstream_has_more = link.is_some();
        let (tags, truncated) = window_tags(&mut tags, page);
        let next = (truncated || (upstream_has_more && page.n != Some(0)))
            .then(|| tags.last().cloned())
            .flatten();
        Ok(TagList {
            name: client_name.to_string(),
            tags,
            next,
        })
    }

    /// Repositories in the cache, as clients name them: bare for the default upstream,
    /// `<host>/<repo>` for the others.
    pub fn catalog(&self) -> Result<Vec<String>, RegistryError> {
        let default = self.router.upstreams().first().map(|u| u.host().to_owned());
        let mut names: Vec<String> = self
            .cache
            .repos()?
            .into_iter()
            .map(|r| {
                if Some(&r.upstream) == default.as_ref() {
                    r.repo
                } else {
                    format!("{}/{}", r.upstream, r.repo)
                }
            })
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

/// Which page of a tag list a client asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagPage {
    pub n: Option<usize>,
    pub last: Option<String>,
}

/// A page of tags, as the client sees it.
#[derive(Debug, serde::Serialize)]
pub struct TagList {
    pub name: String,
    pub tags: Vec<String>,
    /// `last` for the next page, if there is one.
    #[serde(skip)]
    pub next: Option<String>,
}

/// Sorts, drops tags up to `last` (exclusive), keeps `n`. Returns the page and whether it was cut.
fn window_tags(tags: &mut Vec<String>, page: &TagPage) -> (Vec<String>, bool) {
    tags.sort();
    tags.dedup();
    let start = match &page.last {
        Some(l) => tags.partition_point(|t| t.as_str() <= l.as_str()),
        None => 0,
    };
    let rest = &tags[start..];
    match page.n {
        Some(n) if rest.len() > n => (rest[..n].to_vec(), n > 0),
        _ => (rest.to_vec(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_windows_are_lexical_and_exclusive_of_last() {
        let all = || {
            vec![
                "latest".to_string(),
                "2.0".into(),
                "1.1".into(),
                "1.0".into(),
            ]
        };
        let page = |n: Option<usize>, last: Option<&str>| TagPage {
            n,
            last: last.map(str::to_owned),
        };
        assert_eq!(
            window_tags(&mut all(), &page(None, None)),
            (
                vec!["1.0".into(), "1.1".into(), "2.0".into(), "latest".into()],
                false
            )
        );
        assert_eq!(
            window_tags(&mut all(), &page(Some(2), None)),
            (vec!["1.0".into(), "1.1".into()], true)
        );
        assert_eq!(
            window_tags(&mut all(), &page(Some(2), Some("1.1"))),
            (vec!["2.0".into(), "latest".into()], false)
        );
        assert_eq!(
            window_tags(&mut all(), &page(Some(0), None)),
            (vec![], false)
        );
        assert_eq!(
            window_tags(&mut all(), &page(None, Some("1.05"))),
            (vec!["1.1".into(), "2.0".into(), "latest".into()], false)
        );
    }
}
