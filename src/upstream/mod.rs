//! Talking to upstream registries: one [`Upstream`] client per configured registry, routing of a
//! client's request to one of them ([`route`]), token auth ([`auth`]), and redirects followed by
//! hand so that credentials never leave the registry's origin. Each client keeps the latest
//! Docker Hub `ratelimit-limit` / `ratelimit-remaining` it was sent ([`Upstream::ratelimit`]).

pub mod auth;
pub mod referrers;
pub mod route;

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use reqwest::Response;

use crate::config::UpstreamConfig;
use crate::oci::{Digest, ErrorCode, RegistryError, RepoName};
use crate::stream::BlobBody;
use auth::{Challenge, Secret, TokenCache};

pub use referrers::{ReferrersSource, UpstreamReferrers};
pub use route::{Route, Router};

/// Largest manifest accepted from upstream (containerd's limit is ~4 MiB).
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;
const MAX_REDIRECTS: usize = 5;

/// What went wrong talking to an upstream.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect, timed out, or the connection broke.
    #[error("upstream {host} unreachable: {message}")]
    Unreachable { host: String, message: String },
    /// The upstream answered with an error status.
    #[error("upstream {host} answered {status}{}", code.map(|c| format!(" {}", c.as_str())).unwrap_or_default())]
    Status {
        host: String,
        status: u16,
        code: Option<ErrorCode>,
        retry_after: Option<u64>,
    },
    /// The upstream answered something we cannot use.
    #[error("upstream {host}: {message}")]
    Protocol { host: String, message: String },
    /// 401 even with a freshly fetched bearer token: how Docker Hub answers for a repository
    /// that does not exist (or that the mirror's credentials cannot see). The client gets the
    /// `404 NAME_UNKNOWN` a registry gives for a missing repository.
    #[error("upstream {host} answered 401 even with a fresh token")]
    NotVisible { host: String },
}

impl UpstreamError {
    /// Whether the upstream could not be asked at all (connection, timeout, 5xx): the case where
    /// serving from cache is the right fallback.
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. } => true,
            UpstreamError::Status { status, .. } => *status >= 500 || *status == 429,
            UpstreamError::Protocol { .. } | UpstreamError::NotVisible { .. } => false,
        }
    }

    /// The upstream's HTTP status, when it answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            UpstreamError::Status { status, .. } => Some(*status),
            UpstreamError::NotVisible { .. } => Some(401),
            _ => None,
        }
    }

    /// Whether the upstream says the thing asked for does not exist: a 404, or Docker Hub's
    /// "401 even with a fresh token" for a repository it does not have.
    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::NotVisible { .. }) || self.status() == Some(404)
    }

    /// The error a client sees, for a request about `what` (blob / manifest).
    pub fn to_registry_error(&self, not_found: ErrorCode) -> RegistryError {
        match self {
            UpstreamError::Unreachable { .. } => {
                RegistryError::new(ErrorCode::Unavailable, self.to_string())
            }
            UpstreamError::Status {
                status,
                code,
                retry_after,
                ..
            } => match status {
                // A 404 stays a 404 whatever code the upstream used (Harbor: `NOT_FOUND`).
                404 => RegistryError::new(
                    code.filter(|c| c.status() == 404).unwrap_or(not_found),
                    self.to_string(),
                ),
                401 | 403 => RegistryError::new(
                    ErrorCode::NameUnknown,
                    format!("{self}: repository not found upstream, or not visible with the mirror's credentials"),
                ),
                429 => RegistryError::new(ErrorCode::TooManyRequests, self.to_string())
                    .with_retry_after(*retry_after),
                400..=499 => match code.filter(|c| *c != ErrorCode::Unknown) {
                    Some(c) => RegistryError::new(c, self.to_string()),
                    // No code, or one we do not know: keep the upstream's status.
                    None => RegistryError::new(ErrorCode::Unknown, self.to_string())
                        .with_status(*status),
                },
                _ => RegistryError::new(ErrorCode::Unavailable, self.to_string())
                    .with_retry_after(*retry_after),
            },
            UpstreamError::Protocol { .. } => {
                RegistryError::new(ErrorCode::Unknown, self.to_string()).with_status(502)
            }
            UpstreamError::NotVisible { .. } => RegistryError::new(
                ErrorCode::NameUnknown,
                format!("{self}: repository not found upstream, or not visible with the mirror's credentials"),
            ),
        }
    }
}

/// A manifest as the upstream sent it.
#[derive(Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// The upstream's answer to a manifest HEAD.
#[derive(Debug)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
}

/// Docker Hub's pull-rate headers as last seen from an upstream
/// (`ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Pulls allowed per window.
    pub limit: u64,
    /// Pulls left in the current window.
    pub remaining: u64,
    /// The window in seconds (`w=`), when sent.
    pub window_secs: Option<u64>,
    /// When the headers were seen.
    pub observed: std::time::SystemTime,
}

impl RateLimit {
    /// Reads the headers of one response; `None` when it carries no (valid) rate-limit headers,
    /// which on Docker Hub means the pull is not limited.
    pub fn from_headers(h: &HeaderMap) -> Option<RateLimit> {
        // `<n>;w=<secs>`
        fn parse(v: &HeaderValue) -> Option<(u64, Option<u64>)> {
            let v = v.to_str().ok()?;
            let mut parts = v.split(';');
            let n = parts.next()?.trim().parse().ok()?;
            let w = parts.find_map(|p| p.trim().strip_prefix("w=")?.trim().parse().ok());
            Some((n, w))
        }
        let (limit, w1) = parse(h.get("ratelimit-limit")?)?;
        let (remaining, w2) = parse(h.get("ratelimit-remaining")?)?;
        Some(RateLimit {
            limit,
            remaining,
            window_secs: w2.or(w1),
            observed: std::time::SystemTime::now(),
        })
    }
}

/// One configured upstream registry.
pub struct Upstream {
    pub config: UpstreamConfig,
    client: reqwest::Client,
    tokens: TokenCache,
    /// How each repository scope authenticates, learnt from its first challenge.
    modes: Mutex<HashMap<String, AuthMode>>,
    /// The latest rate-limit headers seen.
    ratelimit: Mutex<Option<RateLimit>>,
    /// Until when a manifest 429's `Retry-After` asks us to stay away.
    backoff: Mutex<Option<std::time::Instant>>,
}

/// Longest `Retry-After` honoured for backing off (a bogus huge value must not stop revalidation
/// for days).
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(3600);

/// How requests for a repository are authenticated.
#[derive(Clone, Debug)]
enum AuthMode {
    /// With the bearer token cached under this [`TokenCache`] key.
    Bearer(String),
    /// With the configured username and password.
    Basic,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.config.host)
            .finish()
    }
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Result<Upstream, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .user_agent(concat!("stowage/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Upstream {
            config,
            client,
            tokens: TokenCache::default(),
            modes: Mutex::default(),
            ratelimit: Mutex::default(),
            backoff: Mutex::default(),
        })
    }

    /// The configured host name (`docker.io`).
    pub fn host(&self) -> &str {
        &self.config.host
    }

    /// The latest Docker Hub rate-limit headers this upstream sent (for metrics and operators);
    /// `None` until a response carried them.
    pub fn ratelimit(&self) -> Option<RateLimit> {
        self.ratelimit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// While a manifest request's 429 `Retry-After` has not passed: how long is left. The mirror
    /// then serves cached tags without asking (uncached ones still ask).
    pub fn backing_off(&self) -> Option<std::time::Duration> {
        let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let left = b.and_then(|until| until.checked_duration_since(std::time::Instant::now()));
        if left.is_none() {
            *b = None;
        }
        left.filter(|d| !d.is_zero())
    }

    /// Notes the outcome of a manifest request for the backoff: a 429 with `Retry-After` starts
    /// it, a success ends it.
    fn note_manifest_result<T>(&self, r: &Result<T, UpstreamError>) {
        let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(_) => *b = None,
            Err(UpstreamError::Status {
                status: 429,
                retry_after: Some(secs),
                ..
            }) => {
                let d = std::time::Duration::from_secs(*secs).min(MAX_BACKOFF);
                *b = Some(std::time::Instant::now() + d);
                tracing::warn!(upstream = %self.config.host, retry_after = secs, "upstream rate limit reached; backing off tag revalidation");
            }
            Err(_) => {}
        }
    }

    fn record_ratelimit(&self, headers: &HeaderMap) {
        if let Some(r) = RateLimit::from_headers(headers) {
            tracing::debug!(upstream = %self.config.host, limit = r.limit, remaining = r.remaining, "upstream rate limit");
            crate::metrics::metrics().ratelimit_remaining(self.host(), r.remaining);
            *self.ratelimit.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }
    }

    fn api_url(&self, repo: &RepoName, rest: &str) -> String {
        let base = self.config.url.as_str().trim_end_matches('/');
        format!("{base}/v2/{repo}/{rest}")
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::Unreachable {
            host: self.config.host.clone(),
            message: e.to_string(),
        }
    }

    fn basic_auth(&self) -> Option<HeaderValue> {
        use base64::Engine as _;
        let user = self.config.username.as_deref()?;
        let pass = self.config.password.as_deref().unwrap_or("");
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    fn default_scope(repo: &RepoName) -> String {
        format!("repository:{repo}:pull")
    }

    /// Sends a request to `/v2/<repo>/<rest>`, doing the auth dance and following redirects.
    /// Non-2xx answers become [`UpstreamError::Status`]; a 401 on a request that carried a
    /// token drops that token and is retried once with a fresh one, and a 401 even then becomes
    /// [`UpstreamError::NotVisible`].
    pub async fn send(
        &self,
        method: Method,
        repo: &RepoName,
        rest: &str,
        headers: HeaderMap,
    ) -> Result<Response, UpstreamError> {
        let url = self.api_url(repo, rest);
        let scope = Self::default_scope(repo);
        // A token we already hold for this repository, from an earlier challenge.
        let mut auth = self.cached_auth(&scope);
        let mut retried_auth = false;
        // Whether the last request carried a token fetched after a 401 (not one that was refused).
        let mut fresh_token = false;
        loop {
            let resp = self
                .send_following_redirects(&method, &url, &headers, auth.clone())
                .await?;
            self.record_ratelimit(resp.headers());
            if resp.status() == StatusCode::UNAUTHORIZED && !retried_auth {
                retried_auth = true;
                let challenge = resp
                    .headers()
                    .get_all(http::header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(auth::parse_challenge);
                match challenge {
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope: challenged,
                    }) => {
                        let challenged = challenged.unwrap_or_else(|| scope.clone());
                        let key = TokenCache::key(&realm, service.as_deref(), Some(&challenged));
                        if let Some(sent) = &auth {
                            // The token we sent was refused (signing key rotated, revoked, clock
                            // skew, short-lived): never retry with it; fetch a fresh one.
                            self.drop_refused(&scope, &key, sent);
                        }
                        let token = self
                            .fetch_token(&realm, service.as_deref(), &challenged)
                            .await?;
                        // Remember which token serves this repository from now on.
                        self.set_mode(&scope, AuthMode::Bearer(key));
                        auth = Some(bearer(&token));
                        fresh_token = true;
                        continue;
                    }
                    Some(Challenge::Basic) if self.config.username.is_some() => {
                        auth = self.basic_auth();
                        self.set_mode(&scope, AuthMode::Basic);
                        continue;
                    }
                    _ => {}
                }
            }
            if resp.status() == StatusCode::UNAUTHORIZED {
                // A fresh token that still is not enough: the repository is not visible to us.
                self.forget_auth(&scope);
                if fresh_token {
                    // (Reads the bounded error body, so the connection can be reused.)
                    let _ = self.check_status(resp).await;
                    return Err(UpstreamError::NotVisible {
                        host: self.config.host.clone(),
                    });
                }
            }
            return self.check_status(resp).await;
        }
    }

    async fn send_following_redirects(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        auth: Option<HeaderValue>,
    ) -> Result<Response, UpstreamError> {
        let origin = reqwest::Url::parse(url).map_err(|e| self.unreachable(e))?;
        let mut current = origin.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self
                .client
                .request(method.clone(), current.clone())
                .headers(headers.clone());
            // Credentials go only to the registry's own origin, never to a CDN.
            if let Some(a) = &auth {
                if same_origin(&origin, &current) {
                    req = req.header(http::header::AUTHORIZATION, a.clone());
                }
            }
            let resp = req.send().await;
            crate::metrics::metrics().upstream_response(
                self.host(),
                method,
                resp.as_ref().ok().map(|r| r.status()),
            );
            let resp = resp.map_err(|e| self.unreachable(describe(&e)))?;
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(location) = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
            else {
                return Ok(resp);
            };
            current = current
                .join(location)
                .map_err(|e| UpstreamError::Protocol {
                    host: self.config.host.clone(),
                    message: format!("bad redirect location: {e}"),
                })?;
            tracing::debug!(upstream = %self.config.host, to = %current.host_str().unwrap_or(""), "following redirect");
        }
        Err(UpstreamError::Protocol {
            host: self.config.host.clone(),
            message: "too many redirects".into(),
        })
    }

    async fn check_status(&self, resp: Response) -> Result<Response, UpstreamError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        // Read a bounded prefix of the error body for its OCI code.
        let code = read_error_code(resp).await;
        Err(UpstreamError::Status {
            host: self.config.host.clone(),
            status: status.as_u16(),
            code,
            retry_after,
        })
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Secret, UpstreamError> {
        let key = TokenCache::key(realm, service, Some(scope));
        if let Some(t) = self.tokens.get(&key) {
            return Ok(t);
        }
        let mut url = reqwest::Url::parse(realm).map_err(|e| UpstreamError::Protocol {
            host: self.config.host.clone(),
            message: format!("bad token realm: {e}"),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.client.get(url);
        if let Some(basic) = self.basic_auth() {
            req = req.header(http::header::AUTHORIZATION, basic);
        }
        let resp = req.send().await;
        crate::metrics::metrics().upstream_response(
            self.host(),
            &Method::GET,
            resp.as_ref().ok().map(|r| r.status()),
        );
        let resp = resp.map_err(|e| self.unreachable(describe(&e)))?;
        let resp = self.check_status(resp).await?;
        let body = read_limited(resp, 1 << 20)
            .await
            .map_err(|e| self.unreachable(e))?;
        let parsed: auth::TokenResponse =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::Protocol {
                host: self.config.host.clone(),
                message: format!("token endpoint answered invalid JSON: {e}"),
            })?;
        let (token, lifetime) = parsed.into_token().ok_or_else(|| UpstreamError::Protocol {
            host: self.config.host.clone(),
            message: "token endpoint answered no token".into(),
        })?;
        self.tokens.put(key, token.clone(), lifetime);
        Ok(token)
    }

    fn set_mode(&self, repo_scope: &str, mode: AuthMode) {
        let mut modes = self.modes.lock().unwrap_or_else(|p| p.into_inner());
        if modes.len() > 100_000 {
            modes.clear();
        }
        modes.insert(repo_scope.to_owned(), mode);
    }

    fn mode(&self, repo_scope: &str) -> Option<AuthMode> {
        let modes = self.modes.lock().unwrap_or_else(|p| p.into_inner());
        modes.get(repo_scope).cloned()
    }

    /// The bearer token `sent` was refused: drop it wherever it is cached (the repository's
    /// token and the one the new challenge names), unless a newer one replaced it meanwhile.
    fn drop_refused(&self, repo_scope: &str, challenged_key: &str, sent: &HeaderValue) {
        let refused = |t: &Secret| bearer(t) == *sent;
        if let Some(AuthMode::Bearer(key)) = self.mode(repo_scope) {
            self.tokens.remove_if(&key, refused);
        }
        self.tokens.remove_if(challenged_key, refused);
    }

    // A fresh token was not enough: drop it so the next request asks again.
    fn forget_auth(&self, repo_scope: &str) {
        if let Some(AuthMode::Bearer(key)) = self.mode(repo_scope) {
            self.tokens.remove(&key);
        }
    }

    fn cached_auth(&self, repo_scope: &str) -> Option<HeaderValue> {
        match self.mode(repo_scope)? {
            AuthMode::Basic => self.basic_auth(),
            AuthMode::Bearer(key) => self.tokens.get(&key).map(|t| bearer(&t)),
        }
    }

    fn manifest_headers(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(accept) {
            h.insert(http::header::ACCEPT, v);
        }
        h
    }

    /// `HEAD /v2/<repo>/manifests/<reference>` — free against Docker Hub's rate limit.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        accept: &str,
    ) -> Result<ManifestHead, UpstreamError> {
        let resp = self
            .manifest_request(Method::HEAD, repo, reference, accept)
            .await?;
        Ok(ManifestHead {
            digest: digest_header(resp.headers()),
            media_type: content_type(resp.headers()),
        })
    }

    /// Sends a manifest request with `accept`, noting the outcome (rate-limit backoff).
    async fn manifest_request(
        &self,
        method: Method,
        repo: &RepoName,
        reference: &str,
        accept: &str,
    ) -> Result<Response, UpstreamError> {
        let resp = self
            .send(
                method,
                repo,
                &format!("manifests/{reference}"),
                Self::manifest_headers(accept),
            )
            .await;
        self.note_manifest_result(&resp);
        resp
    }

    /// `GET /v2/<repo>/manifests/<reference>`: the exact bytes, their digest and media type.
    /// A by-digest fetch is verified against the digest asked for; a by-tag fetch against the
    /// upstream's `Docker-Content-Digest` when it sends one.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        expected: Option<&Digest>,
        accept: &str,
    ) -> Result<FetchedManifest, UpstreamError> {
        let resp = self
            .manifest_request(Method::GET, repo, reference, accept)
            .await?;
        let header_digest = digest_header(resp.headers());
        let content_type = content_type(resp.headers());
        let bytes = read_limited(resp, MAX_MANIFEST_SIZE)
            .await
            .map_err(|e| match e {
                // The connection broke or went quiet mid-body: the upstream is unavailable
                // (a cached tag is then served stale), not wrong.
                ReadError::Transport(_) => self.unreachable(format!("manifest {reference}: {e}")),
                ReadError::TooLarge(_) => UpstreamError::Protocol {
                    host: self.config.host.clone(),
                    message: format!("manifest {reference}: {e}"),
                },
            })?;
        let digest = Digest::of(&bytes);
        if let Some(want) = expected.or(header_digest.as_ref()) {
            if *want != digest {
                return Err(UpstreamError::Protocol {
                    host: self.config.host.clone(),
                    message: format!(
                        "manifest {reference}: expected {want}, bytes hash to {digest}"
                    ),
                });
            }
        }
        // The manifest's own mediaType is authoritative; fall back to the Content-Type.
        let media_type = crate::oci::media::media_type_in_json(&bytes)
            .or(content_type)
            .ok_or_else(|| UpstreamError::Protocol {
                host: self.config.host.clone(),
                message: format!("manifest {reference} has no media type"),
            })?;
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// `HEAD /v2/<repo>/blobs/<digest>`: the blob's size, without downloading it.
    pub async fn head_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let resp = self
            .send(
                Method::HEAD,
                repo,
                &format!("blobs/{digest}"),
                HeaderMap::new(),
            )
            .await?;
        Ok(content_length(resp.headers()))
    }

    /// `GET /v2/<repo>/blobs/<digest>` from `offset` on (`Range: bytes=<offset>-`). Each call is
    /// a fresh request: the registry's redirect is followed again (a fresh signed CDN URL) and an
    /// expired token is renewed by [`Upstream::send`]. Returns where the body starts (0 if the
    /// upstream ignored the range and answered 200), the total size (when known) and the body
    /// stream. Bytes are requested as-is (no content coding).
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobBody, UpstreamError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if offset > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                headers.insert(http::header::RANGE, v);
            }
        }
        let resp = self
            .send(Method::GET, repo, &format!("blobs/{digest}"), headers)
            .await?;
        // The hash covers the stored bytes: an HTTP content coding would change them.
        if let Some(coding) = resp
            .headers()
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .filter(|c| !c.trim().eq_ignore_ascii_case("identity"))
        {
            return Err(UpstreamError::Protocol {
                host: self.config.host.clone(),
                message: format!("blob {digest} came with Content-Encoding: {coding}"),
            });
        }
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        let len = content_length(resp.headers());
        let (start, total) = if partial {
            let cr = resp
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            match cr {
                Some((s, t)) => (s, t),
                None => {
                    return Err(UpstreamError::Protocol {
                        host: self.config.host.clone(),
                        message: "206 without a usable Content-Range".into(),
                    })
                }
            }
        } else {
            (0, len)
        };
        let host = self.config.host.clone();
        let stream = resp.bytes_stream().map(move |r| {
            if let Ok(b) = &r {
                crate::metrics::metrics().upstream_bytes(&host, b.len() as u64);
            }
            r.map_err(|e| std::io::Error::other(format!("upstream {host}: {}", describe(&e))))
        });
        Ok(BlobBody {
            start,
            total,
            stream: Box::pin(stream),
        })
    }

    /// `GET /v2/<repo>/tags/list?<query>`: the body and the `Link` header, as sent.
    pub async fn tags_list(
        &self,
        repo: &RepoName,
        query: Option<&str>,
    ) -> Result<(Bytes, Option<String>), UpstreamError> {
        let rest = match query {
            Some(q) if !q.is_empty() => format!("tags/list?{q}"),
            _ => "tags/list".to_owned(),
        };
        let resp = self
            .send(Method::GET, repo, &rest, HeaderMap::new())
            .await?;
        let link = resp
            .headers()
            .get(http::header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_limited(resp, 16 << 20)
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok((body, link))
    }

    /// `GET /v2/` with a short timeout, for the readiness report: the status the registry
    /// answered (a 401 challenge still means reachable), or why it could not be asked.
    pub async fn ping(&self, timeout: std::time::Duration) -> Result<u16, UpstreamError> {
        let base = self.config.url.as_str().trim_end_matches('/');
        let resp = self
            .client
            .get(format!("{base}/v2/"))
            .timeout(timeout)
            .send()
            .await;
        crate::metrics::metrics().upstream_response(
            self.host(),
            &Method::GET,
            resp.as_ref().ok().map(|r| r.status()),
        );
        resp.map(|r| r.status().as_u16())
            .map_err(|e| self.unreachable(describe(&e)))
    }
}

fn bearer(token: &Secret) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.0))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    v.set_sensitive(true);
    v
}

fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// reqwest's error with its causes, for logs (URLs only; they carry no credentials).
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// `Docker-Content-Digest`, when present and a digest we accept.
fn digest_header(h: &HeaderMap) -> Option<Digest> {
    h.get("docker-content-digest")?.to_str().ok()?.parse().ok()
}

/// `Content-Type` without parameters.
fn content_type(h: &HeaderMap) -> Option<String> {
    let v = h.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    Some(crate::oci::media::bare_content_type(v).to_owned())
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `bytes <start>-<end>/<total>` → (start, total).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

/// Why a body could not be read whole.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// Larger than the limit (announced or sent).
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    /// The connection broke, or no byte came within `read_timeout`.
    #[error("reading the body failed: {0}")]
    Transport(String),
}

async fn read_limited(resp: Response, limit: usize) -> Result<Bytes, ReadError> {
    if content_length(resp.headers()).is_some_and(|l| l > limit as u64) {
        return Err(ReadError::TooLarge(limit));
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ReadError::Transport(describe(&e)))?;
        if out.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

async fn read_error_code(resp: Response) -> Option<ErrorCode> {
    let body = read_limited(resp, 64 * 1024).await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let code = v.get("errors")?.get(0)?.get("code")?.as_str()?;
    Some(match code {
        "BLOB_UNKNOWN" => ErrorCode::BlobUnknown,
        "MANIFEST_UNKNOWN" => ErrorCode::ManifestUnknown,
        "NAME_UNKNOWN" => ErrorCode::NameUnknown,
        "NAME_INVALID" => ErrorCode::NameInvalid,
        "TAG_INVALID" => ErrorCode::TagInvalid,
        "DIGEST_INVALID" => ErrorCode::DigestInvalid,
        "MANIFEST_INVALID" => ErrorCode::ManifestInvalid,
        "DENIED" => ErrorCode::Denied,
        "UNAUTHORIZED" => ErrorCode::Unauthorized,
        "TOOMANYREQUESTS" => ErrorCode::TooManyRequests,
        "UNSUPPORTED" => ErrorCode::Unsupported,
        _ => ErrorCode::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 10-99/100"),
            Some((10, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, None)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn origin_comparison_includes_port_and_scheme() {
        let a = reqwest::Url::parse("https://registry-1.docker.io/v2/x").unwrap();
        let b = reqwest::Url::parse("https://registry-1.docker.io:443/other").unwrap();
        let c = reqwest::Url::parse("https://production.cloudflare.docker.com/x").unwrap();
        let d = reqwest::Url::parse("http://registry-1.docker.io/v2/x").unwrap();
        assert!(same_origin(&a, &b));
        assert!(!same_origin(&a, &c));
        assert!(!same_origin(&a, &d));
    }

    #[test]
    fn a_429_with_retry_after_starts_a_backoff_that_a_success_ends() {
        let c = crate::config::Config::from_toml(
            "[[upstreams]]\nhost = \"a.io\"\nurl = \"http://127.0.0.1:1\"",
        )
        .unwrap();
        let up = Upstream::new(c.upstreams[0].clone()).unwrap();
        assert_eq!(up.backing_off(), None);
        let limited = |retry_after| -> Result<(), UpstreamError> {
            Err(UpstreamError::Status {
                host: "a.io".into(),
                status: 429,
                code: None,
                retry_after,
            })
        };
        up.note_manifest_result(&limited(None));
        assert_eq!(up.backing_off(), None, "no Retry-After, no backoff");
        up.note_manifest_result(&limited(Some(30)));
        let left = up.backing_off().unwrap();
        assert!(left <= Duration::from_secs(30), "{left:?}");
        up.note_manifest_result(&limited(Some(10_000_000)));
        assert!(up.backing_off().unwrap() <= MAX_BACKOFF);
        up.note_manifest_result(&Ok::<(), UpstreamError>(()));
        assert_eq!(up.backing_off(), None);
    }

    #[test]
    fn ratelimit_headers_are_parsed() {
        let mut h = HeaderMap::new();
        assert_eq!(RateLimit::from_headers(&h), None);
        h.insert("ratelimit-limit", HeaderValue::from_static("100;w=21600"));
        h.insert(
            "ratelimit-remaining",
            HeaderValue::from_static("76;w=21600"),
        );
        let r = RateLimit::from_headers(&h).unwrap();
        assert_eq!(
            (r.limit, r.remaining, r.window_secs),
            (100, 76, Some(21600))
        );
        h.insert("ratelimit-remaining", HeaderValue::from_static("many"));
        assert_eq!(RateLimit::from_headers(&h), None);
    }

    #[test]
    fn upstream_errors_map_to_client_errors() {
        let e = UpstreamError::Status {
            host: "h".into(),
            status: 404,
            code: None,
            retry_after: None,
        };
        assert_eq!(
            e.to_registry_error(ErrorCode::BlobUnknown).code,
            ErrorCode::BlobUnknown
        );
        let e = UpstreamError::Status {
            host: "h".into(),
            status: 429,
            code: Some(ErrorCode::TooManyRequests),
            retry_after: Some(30),
        };
        let r = e.to_registry_error(ErrorCode::ManifestUnknown);
        assert_eq!((r.status(), r.retry_after), (429, Some(30)));
        let e = UpstreamError::Unreachable {
            host: "h".into(),
            message: "refused".into(),
        };
        assert!(e.is_unavailable());
        assert_eq!(e.to_registry_error(ErrorCode::BlobUnknown).status(), 503);
    }

    fn status(status: u16, code: Option<ErrorCode>) -> UpstreamError {
        UpstreamError::Status {
            host: "h".into(),
            status,
            code,
            retry_after: None,
        }
    }

    #[test]
    fn a_404_with_an_unknown_code_stays_a_404() {
        // Harbor: 404 `{"errors":[{"code":"NOT_FOUND"}]}` (read as `Unknown`).
        let e = status(404, Some(ErrorCode::Unknown));
        for want in [ErrorCode::ManifestUnknown, ErrorCode::BlobUnknown] {
            let r = e.to_registry_error(want);
            assert_eq!((r.status(), r.code), (404, want));
        }
        assert!(e.is_not_found() && !e.is_unavailable());
        // A 404-class code the upstream chose is kept.
        let r = status(404, Some(ErrorCode::NameUnknown)).to_registry_error(ErrorCode::BlobUnknown);
        assert_eq!((r.status(), r.code), (404, ErrorCode::NameUnknown));
        // Another 4xx with an unknown (or no) code keeps the upstream's status.
        for code in [Some(ErrorCode::Unknown), None] {
            let r = status(410, code).to_registry_error(ErrorCode::ManifestUnknown);
            assert_eq!(r.status(), 410);
        }
        let r = status(400, Some(ErrorCode::ManifestInvalid))
            .to_registry_error(ErrorCode::ManifestUnknown);
        assert_eq!((r.status(), r.code), (400, ErrorCode::ManifestInvalid));
    }

    #[test]
    fn a_401_with_a_fresh_token_is_not_found() {
        let e = UpstreamError::NotVisible { host: "h".into() };
        assert!(e.is_not_found() && !e.is_unavailable());
        let r = e.to_registry_error(ErrorCode::ManifestUnknown);
        assert_eq!((r.status(), r.code), (404, ErrorCode::NameUnknown));
        assert!(!status(401, None).is_not_found());
    }
}
