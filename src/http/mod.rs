//! The HTTP edge (axum): parses requests into typed endpoints ([`route`]), asks the
//! [`Mirror`], and turns answers and [`RegistryError`]s into responses
//! — the one place where errors become OCI error bodies. Also the per-request observability
//! (request id, request metrics, cache hit / miss counters, the log line), `/metrics`,
//! `/healthz`, `/readyz`, the `Docker-Distribution-API-Version` header, `/v1/search`, and
//! graceful shutdown, and blob `Range` answers ([`range`]). Below the router, [`listener`] owns connections (TLS from [`tls`], limits); [`auth`] is the
//! client-authentication middleware.

pub mod auth;
pub mod listener;
mod peer;
mod push;
pub mod range;
pub mod route;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::StreamExt as _;
use http::{header, HeaderValue, Method, StatusCode};
use serde::Deserialize;
use tracing::Instrument as _;

use crate::cache::Tally;
use crate::config::Action;
use crate::hosted::Hosted;
use crate::metrics::{method_label, metrics, Kind, Source};
use crate::mirror::{BlobAnswer, ManifestAnswer, Mirror, Outcome, TagPage};
use crate::oci::{Accept, Digest, ErrorCode, Reference, RegistryError, RepoName};
use range::RangeRequest;
use route::Endpoint;

/// Shared state of the HTTP edge.
pub type AppState = Arc<Mirror>;

/// The hosted repositories beside the mirror (`[hosted]`), handed to handlers as an extension.
pub type HostedState = Option<Arc<Hosted>>;

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

/// Builds the router; `auth` (from `[auth]`) guards everything but its open paths and the
/// fleet's peer endpoint, which checks a fill lease's token instead.
pub fn router(mirror: AppState, hosted: HostedState, auth: Option<Arc<auth::Auth>>) -> Router {
    let console = crate::console::router(mirror.clone(), hosted.clone())
        .layer(axum::middleware::from_fn(console_viewer));
    Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics_endpoint))
        .route("/v1/search", axum::routing::get(search))
        .merge(console)
        .fallback(dispatch)
        .layer(axum::middleware::from_fn_with_state(
            auth.clone(),
            auth::require,
        ))
        .route(
            &format!("{}{{digest}}", crate::fleet::PEER_PATH),
            axum::routing::get(peer::fleet_blob),
        )
        .layer(axum::middleware::from_fn(observe))
        .layer(axum::Extension(hosted))
        .with_state(mirror)
}

/// The caller as the console sees it: its user and what `[[auth.access]]` grants it.
struct CallerPermissions(auth::Caller);

impl crate::console::Permissions for CallerPermissions {
    fn user(&self) -> Option<&str> {
        self.0.user.as_deref()
    }

    fn may_delete(&self, repo: &RepoName) -> bool {
        self.0.check(repo, Action::Delete).is_ok()
    }
}

/// Hands the authenticated caller (if `[auth]` is on) to the console.
async fn console_viewer(mut req: Request, next: Next) -> Response {
    if let Some(c) = req.extensions().get::<auth::Caller>().cloned() {
        let viewer = crate::console::Viewer(Arc::new(CallerPermissions(c)));
        req.extensions_mut().insert(viewer);
    }
    next.run(req).await
}

/// The router of the optional `server.metrics_listen` listener: `/metrics` and health only,
/// behind the same client authentication (its open paths apply).
pub fn metrics_router(mirror: AppState, auth: Option<Arc<auth::Auth>>) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(metrics_endpoint))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .layer(axum::middleware::from_fn_with_state(auth, auth::require))
        .layer(axum::middleware::from_fn(observe))
        .with_state(mirror)
}

/// Serves until `shutdown` resolves, then lets requests in flight finish for up to `grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mirror: AppState,
    hosted: HostedState,
    security: listener::Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app = router(mirror, hosted, security.auth.clone());
    listener::run(
        listener,
        app,
        security.tls,
        security.limits,
        shutdown,
        grace,
    )
    .await
}

/// Serves the metrics router on its own listener until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    mirror: AppState,
    auth: Option<Arc<auth::Auth>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_router(mirror, auth))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Request ids accepted from a client's `X-Request-Id`: short and plain, so they are safe in
/// logs. Anything else is replaced by an id of our own.
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

const REQUEST_ID: &str = "x-request-id";

/// The `route` label: a template, never the raw path, so label cardinality stays bounded.
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/v2" | "/v2/" => return "base",
        "/v2/_catalog" => return "catalog",
        "/v1/search" => return "search",
        "/metrics" => return "metrics",
        "/healthz" | "/readyz" => return "health",
        p if p.starts_with(crate::fleet::PEER_PATH) => return "fleet",
        p if p.starts_with("/api/v1/") || p == "/ui" || p.starts_with("/ui/") => return "console",
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return "other";
    };
    if rest.ends_with("/tags/list") {
        "tags"
    } else if rest.contains("/manifests/") {
        "manifests"
    } else if rest.contains("/blobs/") {
        "blobs"
    } else if rest.contains("/referrers/") {
        "referrers"
    } else {
        "other"
    }
}

/// Which cache counter an answered request moves: `(kind, hit)`. Only manifest and blob
/// answers count; tag lists, the catalog and search are not cache lookups.
fn cache_event(route: &str, outcome: Outcome) -> Option<(Kind, bool)> {
    let kind = match route {
        "manifests" => Kind::Manifest,
        "blobs" => Kind::Blob,
        _ => return None,
    };
    let hit = match outcome {
        Outcome::Hit | Outcome::Revalidated | Outcome::Stale => true,
        Outcome::Miss | Outcome::Joined | Outcome::Upstream => false,
    };
    Some((kind, hit))
}

/// Query parameters whose values never reach the log.
fn redact_query(query: &str) -> std::borrow::Cow<'_, str> {
    const SENSITIVE: &[&str] = &[
        "token",
        "password",
        "passwd",
        "secret",
        "auth",
        "key",
        "sig",
        "credential",
    ];
    let sensitive = |k: &str| {
        let k = k.to_ascii_lowercase();
        SENSITIVE.iter().any(|s| k.contains(s))
    };
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if !pairs.iter().any(|(k, _)| sensitive(k)) {
        return query.into();
    }
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in &pairs {
        out.append_pair(k, if sensitive(k) { "REDACTED" } else { v });
    }
    out.finish().into()
}

/// Decrements the in-flight gauge however the request ends (also when the client goes away).
struct InFlight;

impl InFlight {
    fn start() -> InFlight {
        metrics().http_requests_in_flight.inc();
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics().http_requests_in_flight.dec();
    }
}

/// Per-request observability: a request id (accepted from `X-Request-Id` or made up, returned in
/// `X-Request-Id`, and on every log line of the request through a span), the request metrics, the
/// cache hit / miss counters, and one log line per request with the cache outcome, bytes and
/// duration. Headers are never logged (so neither is `Authorization`); sensitive-looking query
/// parameters are redacted.
async fn observe(req: Request, next: Next) -> Response {
    let id = request_id(req.headers());
    let method = req.method().clone();
    let uri = req.uri().clone();
    let route = route_label(uri.path());
    let _in_flight = InFlight::start();
    let start = Instant::now();
    let span = tracing::info_span!("request", id = %id);
    let mut resp = next.run(req).instrument(span).await;
    let elapsed = start.elapsed();
    let headers = resp.headers_mut();
    headers.insert("docker-distribution-api-version", API_VERSION);
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    let status = resp.status().as_u16();
    let outcome = resp.extensions().get::<Outcome>().copied();
    let m = metrics();
    m.http_requests
        .with_label_values(&[route, method_label(&method), &status.to_string()])
        .inc();
    m.http_request_duration
        .with_label_values(&[route])
        .observe(elapsed.as_secs_f64());
    match outcome.and_then(|o| cache_event(route, o)) {
        Some((kind, true)) => m.hit(kind),
        Some((kind, false)) => m.miss(kind),
        None => {}
    }
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    tracing::info!(
        req = %id,
        method = %method,
        path = %uri.path(),
        query = %redact_query(uri.query().unwrap_or("")),
        route,
        status,
        cache = outcome.map(|o| o.as_str()).unwrap_or("-"),
        bytes = %bytes,
        ms = elapsed.as_millis() as u64,
        "request"
    );
    resp
}

/// `GET /metrics`: the Prometheus text format.
async fn metrics_endpoint() -> Response {
    match metrics().render() {
        Ok(body) => Response::builder()
            .status(StatusCode::OK)
            .header(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .body(Body::from(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// `GET /healthz`: the process is alive and answering.
async fn healthz() -> &'static str {
    "ok\n"
}

/// How long `/readyz` waits for each upstream's `/v2/`.
const UPSTREAM_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /readyz`: 200 when the cache directory is writable and the index answers, else 503.
/// Upstream reachability is reported in the body but never makes the mirror unready: with a warm
/// cache it is useful offline.
async fn readyz(State(mirror): State<AppState>) -> Response {
    let writable = probe_writable(&mirror).await;
    let index = mirror
        .cache
        .index()
        .manifest(&Digest::of(b"stowage readiness probe"));
    let (upstreams, (object_store, degraded)) =
        tokio::join!(probe_upstreams(&mirror), probe_shared_store(&mirror));
    let ready = writable.is_ok() && index.is_ok();
    if let Err(e) = &writable {
        tracing::warn!(error = %e, "not ready: cache directory is not writable");
    }
    if let Err(e) = &index {
        tracing::warn!(error = %e, "not ready: index does not answer");
    }
    let body = serde_json::json!({
        "ready": ready,
        "cache": {
            "writable": writable.is_ok(),
            "error": writable.as_ref().err().map(|e| e.to_string()),
        },
        "index": {
            "open": index.is_ok(),
            "error": index.as_ref().err().map(|e| e.to_string()),
        },
        "upstreams": upstreams,
        "object_store": object_store,
        "degraded": degraded,
        "offline": mirror.config.offline,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut resp = json_response(body.to_string().into_bytes(), false, None);
    *resp.status_mut() = status;
    resp
}

/// Writes and removes a file in the cache's `tmp/`: the cache directory takes writes.
async fn probe_writable(mirror: &Mirror) -> std::io::Result<()> {
    let tmp = mirror.cache.root().join("tmp");
    tokio::task::spawn_blocking(move || {
        let probe = tmp.join(format!(".readyz-{:016x}", rand::random::<u64>()));
        std::fs::write(&probe, b"ok")?;
        std::fs::remove_file(&probe)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r)
}

/// Each upstream's answer to `/v2/`, concurrently. Offline: no upstream is contacted, not
/// even to probe it.
async fn probe_upstreams(mirror: &Mirror) -> Vec<serde_json::Value> {
    let probed = if mirror.config.offline {
        &[][..]
    } else {
        mirror.router.upstreams()
    };
    let probes = probed.iter().map(|u| async move {
        let answer = u.ping(UPSTREAM_PROBE_TIMEOUT).await;
        serde_json::json!({
            "host": u.host(),
            "reachable": answer.is_ok(),
            "status": answer.as_ref().ok(),
            "proxy": u.proxy(),
            "error": answer.as_ref().err().map(|e| e.to_string()),
        })
    });
    futures_util::future::join_all(probes).await
}

/// The fleet's shared store, and whether it makes the node degraded. Reported, but not a
/// reason to leave the load balancer: the node still serves its local tier and fills from the
/// upstream (like an unreachable upstream, which does not make a node unready either).
async fn probe_shared_store(mirror: &Mirror) -> (serde_json::Value, bool) {
    let Some(fleet) = &mirror.fleet else {
        return (serde_json::Value::Null, false);
    };
    let probe = fleet.probe().await;
    if let Err(e) = &probe {
        tracing::warn!(store = %fleet.describe(), error = %e, "degraded: the shared object store does not answer");
    }
    let degraded = probe.is_err();
    let report = serde_json::json!({
        "store": fleet.describe(),
        "reachable": probe.is_ok(),
        "error": probe.err(),
    });
    (report, degraded)
}

/// Counts blob bytes as they are handed to the connection.
fn counted(
    stream: crate::stream::ByteStream,
    source: Source,
    tally: Tally,
) -> crate::stream::ByteStream {
    Box::pin(stream.inspect(move |chunk| {
        if let Ok(b) = chunk {
            metrics().served(source, b.len() as u64);
            tally.served(b.len() as u64, source == Source::Cache);
        }
    }))
}

/// The one mapping from [`RegistryError`] to an HTTP response.
pub(crate) fn error_response(e: &RegistryError, head: bool) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = e.body();
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(s) = e.retry_after {
        resp = resp.header(header::RETRY_AFTER, s);
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from(body)
    };
    resp.body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A request's query as (key, value) pairs in order, through axum's `Query` extractor.
/// A parameter given twice counts with its last value, as in distribution.
struct Params(Vec<(String, String)>);

impl Params {
    fn of(uri: &http::Uri) -> Result<Params, QueryRejection> {
        Query::<Vec<(String, String)>>::try_from_uri(uri).map(|Query(p)| Params(p))
    }

    /// The last value of `key`.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Answers a `/v2/` request; containerd's `ns` is echoed in `OCI-Namespace` on every answer,
/// errors included.
async fn dispatch(
    State(mirror): State<AppState>,
    axum::Extension(hosted): axum::Extension<HostedState>,
    req: Request,
) -> Response {
    let head = req.method() == Method::HEAD;
    // containerd's `ns`: the registry the client meant.
    let ns = match Params::of(req.uri()) {
        Ok(p) => p.get("ns").map(str::to_string),
        Err(e) => return error_response(&bad_query(e), head),
    };
    let caller = req.extensions().get::<auth::Caller>().cloned();
    let mut resp = match handle(&mirror, hosted.as_deref(), req, ns.as_deref()).await {
        Ok(r) => r,
        Err(e) => error_response(&e, head),
    };
    if resp.status() == StatusCode::UNAUTHORIZED && caller.is_some() {
        // An anonymous caller a rule did not allow: tell it to log in.
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(auth::CHALLENGE),
        );
    }
    echo_ns(&mut resp, ns.as_deref());
    resp
}

async fn handle(
    mirror: &Mirror,
    hosted: Option<&Hosted>,
    req: Request,
    ns: Option<&str>,
) -> Result<Response, RegistryError> {
    let (req, body) = req.into_parts();
    let path = req.uri.path();
    let rest = if path == "/v2" {
        ""
    } else if let Some(rest) = path.strip_prefix("/v2/") {
        rest
    } else {
        return Err(RegistryError::new(
            ErrorCode::NameUnknown,
            "not found: the registry API is under /v2/",
        )
        .with_status(404));
    };
    let endpoint = route::parse(rest).map_err(|e| pull_or_push_error(e, &req.method))?;
    let caller = req.extensions.get::<auth::Caller>().cloned();
    if let Some(c) = &caller {
        authorize(c, &endpoint, &req.method)?;
    }
    if let Some(hosted) = hosted {
        if let Some(endpoint) = hosted_endpoint(mirror, hosted, &endpoint, ns) {
            let pulled = hosted_pull(&endpoint, &req.method);
            let answer =
                push::handle(hosted, &mirror.cache, caller.as_ref(), endpoint, req, body).await;
            hosted.publish();
            if let (Some(pull), Ok(resp)) = (pulled, &answer) {
                count_hosted_pull(mirror, pull, resp);
            }
            return answer;
        }
    }
    // Only the head matters for a pull: the body goes unread.
    drop(body);
    let method = req.method.clone();
    if method != Method::GET && method != Method::HEAD {
        return Err(not_pushable(hosted.is_some()));
    }
    let head = method == Method::HEAD;
    match endpoint {
        Endpoint::Base => Ok(json_response(b"{}".to_vec(), head, None)),
        Endpoint::Catalog => catalog(mirror, hosted, caller.as_ref(), &req.uri, head).await,
        Endpoint::Upload(..) => Err(not_pushable(hosted.is_some())),
        Endpoint::Referrers(name, digest) => {
            mirrored_referrers(mirror, &name, &digest, ns, &req.uri, head).await
        }
        Endpoint::Tags(name) => tags_list(mirror, &name, ns, &req.uri, head).await,
        Endpoint::Manifest(name, reference) => {
            let route = mirror.route(&name, ns)?;
            let accept = Accept::from_headers(&req.headers);
            let answer = mirror.manifest(&route, &reference, &accept).await?;
            count_manifest(mirror, &route, &reference, head, &answer);
            Ok(manifest_response(answer, head))
        }
        Endpoint::Blob(name, digest) => {
            let route = mirror.route(&name, ns)?;
            let mut answer = mirror.blob(&route, &digest, head).await?;
            let range = blob_range(&req.headers, &digest);
            if !head && range.needs_size() {
                size_for_range(&mut answer).await?;
            }
            let activity = mirror.cache.activity();
            activity.request(matches!(answer, BlobAnswer::Cached(_)));
            let tally = activity.tally(&(route.host().to_owned(), route.repo.to_string()));
            blob_response(answer, &digest, head, range, tally).await
        }
    }
}

/// What a hosted GET counts in the console's statistics, once answered.
enum HostedPull {
    /// A manifest: a pull of the repository (and of the tag, by tag).
    Manifest(crate::cache::stats::RepoKey, Option<String>),
    /// A blob: the bytes sent.
    Blob(crate::cache::stats::RepoKey),
}

/// A GET of a hosted manifest or blob, to count once answered.
fn hosted_pull(endpoint: &push::HostedEndpoint, method: &Method) -> Option<HostedPull> {
    if method != Method::GET {
        return None;
    }
    let key = |n: &RepoName| (crate::cache::stats::HOSTED.to_owned(), n.to_string());
    match endpoint {
        push::HostedEndpoint::Manifest(n, r) => {
            let tag = match r {
                Reference::Tag(t) => Some(t.to_string()),
                Reference::Digest(_) => None,
            };
            Some(HostedPull::Manifest(key(n), tag))
        }
        push::HostedEndpoint::Blob(n, _) => Some(HostedPull::Blob(key(n))),
        _ => None,
    }
}

/// Counts an answered hosted GET: a manifest as a pull, a blob (whole or a range) by the bytes
/// its answer carries.
fn count_hosted_pull(mirror: &Mirror, pull: HostedPull, resp: &Response) {
    let activity = mirror.cache.activity();
    match pull {
        HostedPull::Manifest(key, tag) if resp.status() == StatusCode::OK => {
            activity.pulled(&key, tag.as_deref());
        }
        HostedPull::Blob(key)
            if matches!(resp.status(), StatusCode::OK | StatusCode::PARTIAL_CONTENT) =>
        {
            let len = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            activity.hosted_served(&key, len.unwrap_or(0));
        }
        _ => {}
    }
}

/// Counts a manifest answer in the console's statistics: a GET is a pull of the repository (and
/// of the tag, by tag); a miss fetched the manifest's bytes from the upstream.
fn count_manifest(
    mirror: &Mirror,
    route: &crate::upstream::Route,
    reference: &Reference,
    head: bool,
    answer: &ManifestAnswer,
) {
    let hit = cache_event("manifests", answer.outcome).is_some_and(|(_, hit)| hit);
    let fetched = if answer.outcome == Outcome::Miss {
        answer.manifest.bytes.len() as u64
    } else {
        0
    };
    let tag = match reference {
        Reference::Tag(t) => Some(t.as_str()),
        Reference::Digest(_) => None,
    };
    let key = (route.host().to_owned(), route.repo.to_string());
    mirror
        .cache
        .activity()
        .manifest_answered(&key, tag, !head, hit, fetched);
}

/// The endpoint as a hosted one, when its name is hosted. A `ns` that names an upstream keeps
/// the request on the mirror (containerd asking for that registry's repository).
fn hosted_endpoint(
    mirror: &Mirror,
    hosted: &Hosted,
    endpoint: &Endpoint,
    ns: Option<&str>,
) -> Option<push::HostedEndpoint> {
    let name = match endpoint {
        Endpoint::Tags(n)
        | Endpoint::Manifest(n, _)
        | Endpoint::Blob(n, _)
        | Endpoint::Upload(n, _)
        | Endpoint::Referrers(n, _) => n,
        Endpoint::Base | Endpoint::Catalog => return None,
    };
    if !hosted.holds_name(name) || (ns.is_some() && mirror.route(name, ns).is_ok()) {
        return None;
    }
    Some(match endpoint {
        Endpoint::Tags(n) => push::HostedEndpoint::Tags(n.clone()),
        Endpoint::Manifest(n, r) => push::HostedEndpoint::Manifest(n.clone(), r.clone()),
        Endpoint::Blob(n, d) => push::HostedEndpoint::Blob(n.clone(), d.clone()),
        Endpoint::Upload(n, None) => push::HostedEndpoint::Uploads(n.clone()),
        Endpoint::Upload(n, Some(id)) => push::HostedEndpoint::Session(n.clone(), id.clone()),
        Endpoint::Referrers(n, d) => push::HostedEndpoint::Referrers(n.clone(), d.clone()),
        Endpoint::Base | Endpoint::Catalog => return None,
    })
}

/// A reference that breaks the tag grammar names no manifest: a pull of it is a
/// `404 MANIFEST_UNKNOWN`; a push of it stays `400 TAG_INVALID`.
fn pull_or_push_error(e: RegistryError, method: &Method) -> RegistryError {
    let pull = method == Method::GET || method == Method::HEAD;
    if pull && e.code == ErrorCode::TagInvalid {
        RegistryError::new(
            ErrorCode::ManifestUnknown,
            format!("manifest unknown: {}", e.message),
        )
    } else {
        e
    }
}

/// `[[auth.access]]` for one request: reads are `pull`, uploads and manifest PUTs `push`,
/// DELETEs of manifests and blobs `delete` (cancelling an upload is part of a push).
fn authorize(
    caller: &auth::Caller,
    endpoint: &Endpoint,
    method: &Method,
) -> Result<(), RegistryError> {
    let read = method == Method::GET || method == Method::HEAD;
    let (name, action) = match endpoint {
        Endpoint::Base | Endpoint::Catalog => return Ok(()),
        Endpoint::Upload(n, _) => (n, Action::Push),
        Endpoint::Tags(n) | Endpoint::Referrers(n, _) => (n, Action::Pull),
        Endpoint::Manifest(n, _) | Endpoint::Blob(n, _) if read => (n, Action::Pull),
        Endpoint::Manifest(n, _) | Endpoint::Blob(n, _) if method == Method::DELETE => {
            (n, Action::Delete)
        }
        Endpoint::Manifest(n, _) | Endpoint::Blob(n, _) => (n, Action::Push),
    };
    caller.check(name, action)
}

/// A push or delete of a name that is not hosted.
fn not_pushable(hosted_configured: bool) -> RegistryError {
    RegistryError::new(
        ErrorCode::Unsupported,
        if hosted_configured {
            "this name is mirrored, not hosted: push and delete go to names in hosted.repositories"
        } else {
            "this is a pull-through mirror: push and delete are not supported"
        },
    )
}

/// `GET /v2/<name>/tags/list`: a page of the upstream's tags, with a `Link` to the next one.
async fn tags_list(
    mirror: &Mirror,
    name: &RepoName,
    ns: Option<&str>,
    uri: &http::Uri,
    head: bool,
) -> Result<Response, RegistryError> {
    let route = mirror.route(name, ns)?;
    let (n, last) = pagination(uri)?;
    let page = TagPage { n, last };
    let list = mirror.tags(&route, name, &page).await?;
    let body = serde_json::to_vec(&list)
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    let mut resp = json_response(body, head, Some(Outcome::Upstream));
    // Whenever there is more (also when only the upstream pages, by its default page
    // size), in the client's namespace: its prefix in the path, its `ns`, its `n`.
    link_next(
        &mut resp,
        &format!("/v2/{name}/tags/list"),
        n,
        list.next.as_deref(),
        &[("ns", ns)],
    );
    Ok(resp)
}

/// A query string that does not read as the parameters of its endpoint (a parameter given
/// twice): the client's error.
fn bad_query(e: QueryRejection) -> RegistryError {
    RegistryError::new(ErrorCode::Unsupported, e.body_text()).with_status(400)
}

fn echo_ns(resp: &mut Response, ns: Option<&str>) {
    if let Some(v) = ns.and_then(|n| HeaderValue::from_str(n).ok()) {
        resp.headers_mut().insert("oci-namespace", v);
    }
}

fn json_response(body: Vec<u8>, head: bool, outcome: Option<Outcome>) -> Response {
    let len = body.len();
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, len)
        .body(if head {
            Body::empty()
        } else {
            Body::from(body)
        })
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    if let Some(o) = outcome {
        resp.extensions_mut().insert(o);
    }
    resp
}

fn digest_value(d: &Digest) -> HeaderValue {
    HeaderValue::from_str(&d.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn manifest_response(answer: ManifestAnswer, head: bool) -> Response {
    let m = &answer.manifest;
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, m.media_type.as_str())
        .header(header::CONTENT_LENGTH, m.bytes.len())
        .header("docker-content-digest", digest_value(&m.digest))
        .header(header::ETAG, format!("\"{}\"", m.digest));
    if let Some(w) = &answer.warning {
        builder = builder.header(
            header::WARNING,
            format!("299 - \"{}\"", w.replace('"', "'")),
        );
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from(m.bytes.clone())
    };
    let mut resp = builder
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    resp.extensions_mut().insert(answer.outcome);
    resp
}

/// The blob answer as a response: 200 with the whole blob, 206 for a satisfiable single `Range`
/// (also while the blob is still being filled: the range streams as its bytes arrive), 416 with
/// `Content-Range: bytes */<size>` for an unsatisfiable or malformed one. A multi-range request
/// gets the whole blob. A range of a fill of unknown size is answered once the size is known
/// ([`size_for_range`]); should it still be unknown here, the whole blob.
async fn blob_response(
    answer: BlobAnswer,
    digest: &Digest,
    head: bool,
    range: RangeRequest,
    tally: Tally,
) -> Result<Response, RegistryError> {
    let (size, outcome) = match &answer {
        BlobAnswer::Cached(b) => (Some(b.size), Outcome::Hit),
        BlobAnswer::Filling { total, joined, .. } => (
            *total,
            if *joined {
                Outcome::Joined
            } else {
                Outcome::Miss
            },
        ),
        BlobAnswer::Head { size } => (*size, Outcome::Upstream),
    };
    // `None`: the whole blob; `Some(Ok(span))`: a 206; `Some(Err(size))`: a 416.
    let part = match (range, size, head) {
        (_, _, true) | (_, None, _) | (RangeRequest::Whole | RangeRequest::Multiple, _, _) => None,
        (RangeRequest::Single(r), Some(size), false) => Some(r.resolve(size).ok_or(size)),
        (RangeRequest::Invalid, Some(size), false) => Some(Err(size)),
    };
    if let Some(Err(size)) = part {
        return Ok(unsatisfiable(digest, size, head, outcome));
    }
    let span = part.and_then(Result::ok);
    let mut builder = Response::builder()
        .status(if span.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", digest_value(digest))
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::CACHE_CONTROL, "max-age=31536000");
    let length = match (span, size) {
        (Some(span), Some(size)) => {
            builder = builder.header(header::CONTENT_RANGE, span.content_range(size));
            Some(span.len())
        }
        _ => size,
    };
    if let Some(l) = length {
        builder = builder.header(header::CONTENT_LENGTH, l);
    }
    let body = blob_body(answer, head, span, tally).await?;
    let mut resp = builder
        .body(body)
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    resp.extensions_mut().insert(outcome);
    Ok(resp)
}

/// The 416 for a range outside the blob (or a malformed one), with `Content-Range: bytes
/// */<size>`.
fn unsatisfiable(digest: &Digest, size: u64, head: bool, outcome: Outcome) -> Response {
    let e = RegistryError::new(
        ErrorCode::RangeInvalid,
        format!("requested range not satisfiable for {digest} ({size} bytes)"),
    );
    let mut resp = error_response(&e, head);
    if let Ok(v) = HeaderValue::from_str(&range::unsatisfied_content_range(size)) {
        resp.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    resp.headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    resp.extensions_mut().insert(outcome);
    resp
}

/// The bytes of a blob answer (the whole blob, or `span` of it), counted as they are sent;
/// nothing for a HEAD. A fill's body is started only once its first chunk is in hand
/// ([`primed`]).
async fn blob_body(
    answer: BlobAnswer,
    head: bool,
    span: Option<range::Span>,
    tally: Tally,
) -> Result<Body, RegistryError> {
    Ok(match answer {
        _ if head => Body::empty(),
        BlobAnswer::Cached(b) => {
            let (start, len) = span.map_or((0, b.size), |s| (s.start, s.len()));
            // The stream holds the blob's read lease: it is not evicted while being sent.
            Body::from_stream(counted(b.into_stream(start, len), Source::Cache, tally))
        }
        BlobAnswer::Filling { fill, .. } => {
            let reader = match span {
                Some(s) => fill.reader_range(s.start, Some(s.end + 1)),
                None => fill.reader(),
            };
            let reader = primed(reader).await.map_err(|e| match fill.state().phase {
                // The fill's own error keeps its status (e.g. 507 from the budget).
                crate::cache::fill::Phase::Failed(failed) => failed,
                _ => e,
            })?;
            Body::from_stream(counted(reader, Source::Fill, tally))
        }
        BlobAnswer::Head { .. } => Body::empty(),
    })
}

/// How long a fill's answer waits for its first chunk before its headers go out anyway (a range
/// far ahead of the fill, a slow upstream: the client then sees headers now, bytes later).
const FIRST_CHUNK_WAIT: Duration = Duration::from_secs(3);

/// `stream` with its first item already taken if it comes within [`FIRST_CHUNK_WAIT`]: a fill
/// failing before its first byte (bytes that do not verify, an upstream giving up) is answered
/// with its error status and OCI body, not with a response closed before its status line.
/// (Once headers have been sent, a failure can only abort the connection.)
async fn primed(
    mut stream: crate::stream::ByteStream,
) -> Result<crate::stream::ByteStream, RegistryError> {
    // `next` is cancel-safe: a chunk still on its way stays in the stream.
    let Ok(first) = tokio::time::timeout(FIRST_CHUNK_WAIT, stream.next()).await else {
        return Ok(stream);
    };
    match first {
        Some(Ok(first)) => Ok(Box::pin(
            futures_util::stream::once(async move { Ok(first) }).chain(stream),
        )),
        Some(Err(e)) => Err(RegistryError::new(ErrorCode::Unavailable, e.to_string())),
        None => Ok(stream),
    }
}

/// A range of a blob still filling from an upstream that did not say its size (no
/// `Content-Length`) cannot be answered with a 206 yet — dockerd's resume needs one, with a
/// `Content-Range` ending at the blob's last byte. Waits until the fill is over (its size is
/// set when the blob verifies) and sets the size on the answer; a failed fill is the error.
async fn size_for_range(answer: &mut BlobAnswer) -> Result<(), RegistryError> {
    let BlobAnswer::Filling {
        fill,
        total: total @ None,
        ..
    } = answer
    else {
        return Ok(());
    };
    let settled = fill.settled().await;
    // Verified is enough: a commit failing after that does not make the bytes wrong (readers
    // still hold the file).
    let s = fill.state();
    match (s.verified, s.total, settled) {
        (true, Some(size), _) => {
            *total = Some(size);
            Ok(())
        }
        (_, _, Err(e)) => Err(e),
        (_, _, Ok(())) => {
            *total = Some(s.written);
            Ok(())
        }
    }
}

/// The client's `Range`, unless an `If-Range` names another version than this blob's ETag.
fn blob_range(headers: &http::HeaderMap, digest: &Digest) -> RangeRequest {
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        if if_range.as_bytes() != format!("\"{digest}\"").as_bytes() {
            return RangeRequest::Whole;
        }
    }
    RangeRequest::parse(
        headers
            .get(header::RANGE)
            .map(|v| v.to_str().unwrap_or("invalid")),
    )
}

/// `n` and `last` of a paginated request; an `n` that is not a non-negative integer is a
/// `PAGINATION_NUMBER_INVALID`.
fn pagination(uri: &http::Uri) -> Result<(Option<usize>, Option<String>), RegistryError> {
    let invalid = || {
        RegistryError::new(
            ErrorCode::PaginationNumberInvalid,
            "n must be a non-negative integer",
        )
    };
    let params = Params::of(uri).map_err(|_| invalid())?;
    let n = match params.get("n") {
        Some(v) => Some(v.parse::<usize>().map_err(|_| invalid())?),
        None => None,
    };
    Ok((n, params.get("last").map(str::to_string)))
}

async fn catalog(
    mirror: &Mirror,
    hosted: Option<&Hosted>,
    caller: Option<&auth::Caller>,
    uri: &http::Uri,
    head: bool,
) -> Result<Response, RegistryError> {
    let (n, last) = pagination(uri)?;
    let mut all = all_repositories(mirror, hosted).await?;
    if let Some(c) = caller {
        // Only what the caller may pull is listed.
        all.retain(|r| {
            r.parse::<RepoName>()
                .is_ok_and(|name| c.check(&name, Action::Pull).is_ok())
        });
    }
    let page_asked = TagPage { n, last };
    let (page, more) = crate::mirror::window_tags(&mut all, &page_asked);
    let body = serde_json::to_vec(&serde_json::json!({ "repositories": page }))
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    let mut resp = json_response(body, head, Some(Outcome::Hit));
    if more {
        link_next(
            &mut resp,
            "/v2/_catalog",
            page_asked.n,
            page.last().map(String::as_str),
            &[],
        );
    }
    Ok(resp)
}

/// `Link: <path?n=..&last=..&..>; rel="next"` on a page that has more after it: the client's
/// `n` (when it gave one), `last` and the `extra` parameters it must keep (`ns`,
/// `artifactType`). The one `Link` of every paged list.
fn link_next(
    resp: &mut Response,
    path: &str,
    n: Option<usize>,
    last: Option<&str>,
    extra: &[(&str, Option<&str>)],
) {
    let Some(l) = last else {
        return;
    };
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(n) = n {
        q.append_pair("n", &n.to_string());
    }
    q.append_pair("last", l);
    for (k, v) in extra {
        if let Some(v) = v {
            q.append_pair(k, v);
        }
    }
    let link = format!("<{path}?{}>; rel=\"next\"", q.finish());
    if let Ok(v) = HeaderValue::from_str(&link) {
        resp.headers_mut().insert(header::LINK, v);
    }
}

/// Referrers answered per page: at most this many descriptors when the client gives no `n`.
const REFERRERS_PAGE: usize = 1000;

/// The referrers answer of `subject` in `name` (its whole list, sorted by digest, already
/// filtered when `artifact_type` is given): one page of it as an image index, `n` and `last`
/// (a digest) as tag lists take them, a `Link` while more remain, `OCI-Filters-Applied`
/// exactly when the filter was applied. Hosted and mirrored answers both go through here.
pub(crate) fn referrers_page(
    name: &RepoName,
    subject: &Digest,
    manifests: Vec<serde_json::Value>,
    artifact_type: Option<&str>,
    uri: &http::Uri,
    ns: Option<&str>,
    head: bool,
) -> Result<Response, RegistryError> {
    let (n, last) = pagination(uri)?;
    let page = TagPage {
        n: Some(n.unwrap_or(REFERRERS_PAGE)),
        last,
    };
    fn key(d: &serde_json::Value) -> &str {
        d.get("digest").and_then(|v| v.as_str()).unwrap_or("")
    }
    let (page_items, more) = crate::mirror::window(&manifests, key, &page);
    let next = page_items.last().map(|d| key(d).to_owned());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::media::OCI_INDEX,
        "manifests": page_items,
    });
    let body = serde_json::to_vec(&index)
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    let mut resp = json_response(body, head, None);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::oci::media::OCI_INDEX),
    );
    if artifact_type.is_some() {
        resp.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    if more {
        link_next(
            &mut resp,
            &format!("/v2/{name}/referrers/{subject}"),
            n,
            next.as_deref(),
            &[("artifactType", artifact_type), ("ns", ns)],
        );
    }
    Ok(resp)
}

/// `GET /v2/<name>/referrers/<digest>` of a mirrored name: the upstream's answer, cached.
async fn mirrored_referrers(
    mirror: &Mirror,
    name: &RepoName,
    subject: &Digest,
    ns: Option<&str>,
    uri: &http::Uri,
    head: bool,
) -> Result<Response, RegistryError> {
    let route = mirror.route(name, ns)?;
    let params = Params::of(uri).map_err(bad_query)?;
    let artifact_type = params.get("artifactType").filter(|t| !t.is_empty());
    // (`n` is checked before the upstream is asked.)
    pagination(uri)?;
    let answer = mirror.referrers(&route, subject, artifact_type).await?;
    let mut resp = referrers_page(
        name,
        subject,
        answer.manifests,
        artifact_type,
        uri,
        ns,
        head,
    )?;
    if let Some(w) = &answer.warning {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "'"))) {
            resp.headers_mut().insert(header::WARNING, v);
        }
    }
    resp.extensions_mut().insert(answer.outcome);
    Ok(resp)
}

/// Cached and hosted repository names, sorted, each once.
async fn all_repositories(
    mirror: &Mirror,
    hosted: Option<&Hosted>,
) -> Result<Vec<String>, RegistryError> {
    let mut all = mirror.catalog()?;
    if let Some(h) = hosted {
        all.extend(h.repositories().await?);
        all.sort();
        all.dedup();
    }
    Ok(all)
}

/// The parameters of `/v1/search`: the term and the page size.
#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
    n: Option<usize>,
}

/// `GET /v1/search?q=term`: Docker's v1 search over the cached repositories, so
/// `docker search <mirror>/<term>` works.
async fn search(
    State(mirror): State<AppState>,
    axum::Extension(hosted): axum::Extension<HostedState>,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error_response(
            &RegistryError::new(ErrorCode::PaginationNumberInvalid, "bad search query"),
            false,
        );
    };
    let term = q.q.unwrap_or_default().to_ascii_lowercase();
    let names = match all_repositories(&mirror, hosted.as_deref()).await {
        Ok(n) => n,
        Err(e) => return error_response(&e, false),
    };
    let results: Vec<serde_json::Value> = names
        .iter()
        .filter(|n| n.contains(&term))
        .take(q.n.unwrap_or(100).min(1000))
        .map(|n| {
            let display = n.strip_prefix("library/").unwrap_or(n);
            serde_json::json!({
                "name": display,
                "description": "",
                "star_count": 0,
                "is_official": n.starts_with("library/"),
                "is_automated": false,
            })
        })
        .collect();
    let body = serde_json::json!({
        "num_results": results.len(),
        "query": term,
        "page": 1,
        "num_pages": 1,
        "page_size": results.len(),
        "results": results,
    });
    json_response(body.to_string().into_bytes(), false, Some(Outcome::Hit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_are_templates() {
        for (path, label) in [
            ("/v2/", "base"),
            ("/v2", "base"),
            ("/v2/_catalog", "catalog"),
            ("/v2/library/alpine/tags/list", "tags"),
            ("/v2/library/alpine/manifests/3.19", "manifests"),
            ("/v2/ghcr.io/a/b/manifests/sha256:00", "manifests"),
            ("/v2/library/alpine/blobs/sha256:00", "blobs"),
            ("/v2/library/alpine/blobs/uploads/", "blobs"),
            ("/v1/search", "search"),
            ("/metrics", "metrics"),
            ("/healthz", "health"),
            ("/readyz", "health"),
            ("/api/v1/repositories/docker.io/library/alpine", "console"),
            ("/ui/", "console"),
            ("/ui/app.js", "console"),
            ("/_stowage/fleet/blobs/sha256:00", "fleet"),
            ("/uix", "other"),
            ("/v2/library/alpine/referrers/sha256:00", "referrers"),
            ("/v2/library/alpine", "other"),
            ("/favicon.ico", "other"),
        ] {
            assert_eq!(route_label(path), label, "{path}");
        }
    }

    #[test]
    fn only_manifest_and_blob_answers_move_cache_counters() {
        assert_eq!(
            cache_event("manifests", Outcome::Revalidated),
            Some((Kind::Manifest, true))
        );
        assert_eq!(
            cache_event("manifests", Outcome::Stale),
            Some((Kind::Manifest, true))
        );
        assert_eq!(
            cache_event("manifests", Outcome::Miss),
            Some((Kind::Manifest, false))
        );
        assert_eq!(cache_event("blobs", Outcome::Hit), Some((Kind::Blob, true)));
        assert_eq!(
            cache_event("blobs", Outcome::Joined),
            Some((Kind::Blob, false))
        );
        assert_eq!(
            cache_event("blobs", Outcome::Upstream),
            Some((Kind::Blob, false))
        );
        assert_eq!(cache_event("catalog", Outcome::Hit), None);
        assert_eq!(cache_event("tags", Outcome::Upstream), None);
    }

    #[test]
    fn a_repeated_query_parameter_counts_with_its_last_value() {
        let uri: http::Uri = "/v2/a/tags/list?n=1&ns=x&n=2&ns=ghcr.io".parse().unwrap();
        let p = Params::of(&uri).unwrap();
        assert_eq!(
            (p.get("ns"), p.get("n"), p.get("last")),
            (Some("ghcr.io"), Some("2"), None)
        );
        assert_eq!(pagination(&uri).unwrap(), (Some(2), None));
    }

    #[test]
    fn sensitive_query_values_are_redacted() {
        assert_eq!(redact_query("ns=docker.io&n=10"), "ns=docker.io&n=10");
        let r = redact_query("ns=x&access_token=abc&X-Amz-Signature=def&password=p");
        assert!(
            !r.contains("abc") && !r.contains("def") && !r.contains("=p"),
            "{r}"
        );
        assert!(r.contains("ns=x"), "{r}");
    }

    #[test]
    fn request_ids_from_clients_must_be_short_and_plain() {
        let mut h = http::HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("pull-42.a"));
        assert_eq!(request_id(&h), "pull-42.a");
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
        let long = "a".repeat(65);
        h.insert(REQUEST_ID, HeaderValue::from_str(&long).unwrap());
        assert_eq!(request_id(&http::HeaderMap::new()).len(), 16);
        assert_ne!(request_id(&h), long);
    }
}
