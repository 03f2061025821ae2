//! An upstream's answer about the referrers of a digest (OCI 1.1): its referrers API, every
//! page of it, or — for a registry without one — the referrers tag schema (`sha256-<hex>`, a
//! tag holding an image index).

use http::{HeaderMap, HeaderValue, Method};
use serde_json::Value;

use crate::oci::media::OCI_INDEX;
use crate::oci::{Digest, RepoName};

use super::{read_limited, ReadError, Upstream, UpstreamError, MAX_MANIFEST_SIZE};

/// Pages of one referrers answer followed at most; a longer chain is refused.
const MAX_PAGES: usize = 64;

/// Where an upstream's referrers answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferrersSource {
    /// Its referrers API.
    Api,
    /// Its `sha256-<hex>` tag (or the absence of one: nothing refers to the digest).
    TagSchema,
}

/// The descriptors of the manifests whose `subject` is a digest, as an upstream listed them.
#[derive(Clone, Debug)]
pub struct UpstreamReferrers {
    pub manifests: Vec<Value>,
    pub source: ReferrersSource,
}

/// The referrers tag of `subject`: `sha256-<hex>`.
pub fn referrers_tag(subject: &Digest) -> String {
    format!("{}-{}", subject.algorithm(), subject.hex())
}

/// The `manifests` of an image index, or `None` when `body` is not one.
fn index_manifests(body: &[u8]) -> Option<Vec<Value>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("manifests")?.as_array().cloned()
}

/// The path after `/v2/<repo>/` of a `Link: <...>; rel="next"` target, when it stays in the
/// repository (a link elsewhere is not followed).
fn next_page(link: &str, repo: &RepoName) -> Option<String> {
    if !link.contains("rel=\"next\"") && !link.contains("rel=next") {
        return None;
    }
    let target = link.split_once('<')?.1.split_once('>')?.0;
    let path = match url::Url::parse(target) {
        Ok(u) => match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        },
        Err(_) => target.to_owned(),
    };
    path.strip_prefix(&format!("/v2/{repo}/"))
        .filter(|rest| rest.starts_with("referrers/"))
        .map(str::to_owned)
}

impl Upstream {
    /// The referrers of `subject` in `repo`: from the upstream's referrers API (following its
    /// `Link` pages), else — when it has none (a 404, or an answer that is not an image index)
    /// — from the `sha256-<hex>` tag; no such tag means nothing refers to `subject`. Never
    /// filtered upstream: the caller filters, so that one cached answer serves every filter.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<UpstreamReferrers, UpstreamError> {
        if let Some(manifests) = self.referrers_api(repo, subject).await? {
            return Ok(UpstreamReferrers {
                manifests,
                source: ReferrersSource::Api,
            });
        }
        // A `HEAD` first: most digests have no such tag, and a `HEAD` is free on Docker Hub.
        let tag = referrers_tag(subject);
        let head = match self.head_manifest(repo, &tag, OCI_INDEX).await {
            Ok(h) => h,
            Err(e) if e.status() == Some(404) => {
                return Ok(UpstreamReferrers {
                    manifests: Vec::new(),
                    source: ReferrersSource::TagSchema,
                })
            }
            Err(e) => return Err(e),
        };
        let reference = head.digest.as_ref().map(Digest::to_string);
        let reference = reference.as_deref().unwrap_or(&tag);
        let manifests = match self
            .get_manifest(repo, reference, head.digest.as_ref(), OCI_INDEX)
            .await
        {
            Ok(m) => index_manifests(&m.bytes).unwrap_or_default(),
            Err(e) if e.status() == Some(404) => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(UpstreamReferrers {
            manifests,
            source: ReferrersSource::TagSchema,
        })
    }

    /// `GET /v2/<repo>/referrers/<subject>`, every page; `None` when there is no such API.
    async fn referrers_api(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Option<Vec<Value>>, UpstreamError> {
        let mut rest = format!("referrers/{subject}");
        let mut out = Vec::new();
        for page in 0..MAX_PAGES {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::ACCEPT, HeaderValue::from_static(OCI_INDEX));
            let resp = match self.send(Method::GET, repo, &rest, headers).await {
                Err(e) if page == 0 && matches!(e.status(), Some(404 | 405)) => return Ok(None),
                r => r?,
            };
            let next = resp
                .headers()
                .get_all(http::header::LINK)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|l| next_page(l, repo));
            let body = read_limited(resp, MAX_MANIFEST_SIZE)
                .await
                .map_err(|e| match e {
                    ReadError::Transport(_) => self.unreachable(format!("referrers: {e}")),
                    ReadError::TooLarge(_) => self.protocol(format!("referrers: {e}")),
                })?;
            match index_manifests(&body) {
                Some(list) => out.extend(list),
                None if page == 0 => return Ok(None),
                None => return Err(self.protocol("a referrers page is not an image index")),
            }
            match next {
                Some(n) => rest = n,
                None => return Ok(Some(out)),
            }
        }
        Err(self.protocol(format!(
            "the referrers answer has more than {MAX_PAGES} pages"
        )))
    }

    fn protocol(&self, message: impl Into<String>) -> UpstreamError {
        UpstreamError::Protocol {
            host: self.config.host.clone(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_pages_stay_in_the_repository() {
        let repo: RepoName = "a/b".parse().unwrap();
        assert_eq!(
            next_page(
                "</v2/a/b/referrers/sha256:00?n=2&last=x>; rel=\"next\"",
                &repo
            ),
            Some("referrers/sha256:00?n=2&last=x".into())
        );
        assert_eq!(
            next_page(
                "<https://r.io/v2/a/b/referrers/sha256:00?page=2>; rel=\"next\"",
                &repo
            ),
            Some("referrers/sha256:00?page=2".into())
        );
        assert_eq!(
            next_page("</v2/other/referrers/sha256:00>; rel=\"next\"", &repo),
            None
        );
        assert_eq!(
            next_page("</v2/a/b/manifests/x>; rel=\"next\"", &repo),
            None
        );
        assert_eq!(
            next_page("</v2/a/b/referrers/sha256:00>; rel=\"prev\"", &repo),
            None
        );
    }

    #[test]
    fn the_referrers_tag_is_the_digest_with_a_dash() {
        let d = Digest::of(b"x");
        assert_eq!(referrers_tag(&d), format!("sha256-{}", d.hex()));
    }
}
