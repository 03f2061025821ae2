//! `FakeUpstream`: an in-process, fault-injecting stand-in for an upstream registry.
//!
//! A real `registry:2` container cannot do what Docker Hub does (bearer-token auth with a separate
//! token service, 307 blob redirects to a CDN on another host) and will never serve bytes that do
//! not match their digest. This fake can. It is deliberately small and strict: it serves exactly
//! the manifests and blobs a test registers, records every request it sees, and enforces the parts
//! of the protocol the mirror must get right (scoped tokens, no `Authorization` at the CDN, signed
//! redirect URLs).
//!
//! It runs on its own background thread with its own tokio runtime, so both blocking tests
//! (`reqwest::blocking`) and async tests can use it; dropping the handle stops it.
//!
//! ```ignore
//! let fake = FakeUpstream::builder().token_auth().redirect_blobs_to_cdn().start();
//! let layer = fake.add_blob("library/alpine", b"layer bytes".to_vec());
//! // ... point stowage at fake.url(), pull, then inspect fake.requests() / fake.count(..)
//! ```
//!
//! Behaviour, by listener:
//! - registry (`http://127.0.0.1:<port>`): `/v2/`, `/v2/<name>/manifests/<ref>` (GET, HEAD),
//!   `/v2/<name>/blobs/<digest>` (GET, HEAD, single `Range`), `/v2/<name>/tags/list`, and the token
//!   endpoint `/token`. Routes are parsed from the right end of the path.
//! - CDN (`http://127.0.0.2:<port>`, only with [`FakeUpstreamBuilder::redirect_blobs_to_cdn`]):
//!   `/registry-v2/docker/registry/v2/blobs/sha256/<2hex>/<hex>/data?verify=<expiry>-<sig>`. Like a
//!   pre-signed S3/Cloudflare URL it answers 403 to a missing or wrong signature and 400 to a
//!   request that also carries `Authorization` (only one auth mechanism is allowed).
//!
//! Faults for the blob fill engine: [`FakeUpstream::push_faults`] queues one-shot [`Fault`]s per
//! blob (cut the connection or stall at an offset, hold the rest until
//! [`FakeUpstream::release_holds`], answer a 5xx, ignore `Range`), and
//! [`FakeUpstream::blob_gets`] lists the `GET`s of a blob with their `Range` headers.
//! [`FakeUpstream::push_manifest_faults`] does the same for manifest `GET`s (cut / stall / status).
//!
//! The OCI 1.1 referrers API (`/v2/<name>/referrers/<digest>`, computed from the registered
//! manifests' `subject`, never filtered, paged with [`FakeUpstream::page_referrers`]) is served
//! only with [`FakeUpstreamBuilder::referrers_api`]; without it the path is a 404, as on
//! registries that have none.
//!
//! Other registries' quirks: [`FakeUpstreamBuilder::not_found_code`] answers missing manifests and
//! blobs with a non-standard error code (Harbor's `NOT_FOUND`), and
//! [`FakeUpstream::revoke_tokens_after`] makes tokens stop working early (key rotation,
//! revocation, clock skew) while they are still valid by their `expires_in`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};

use super::sha256_digest;

/// The `service` the fake's token challenge names and its token endpoint insists on.
pub const SERVICE: &str = "fake.registry";

/// Path prefix of redirected blob URLs on the CDN listener (the shape Docker Hub uses).
const CDN_PREFIX: &str = "/registry-v2/docker/registry/v2/blobs/sha256/";

/// Secret mixed into the CDN URL signature.
const CDN_SECRET: &str = "fake-cdn-signing-secret";

/// Which of the fake's listeners saw a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The registry API and token endpoint on 127.0.0.1.
    Registry,
    /// The blob CDN on 127.0.0.2 (a different host from the registry).
    Cdn,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub listener: Listener,
    pub method: String,
    pub path: String,
    /// Raw query string, without the `?`.
    pub query: Option<String>,
    /// The full `Authorization` header value, if any.
    pub authorization: Option<String>,
    pub range: Option<String>,
    /// Every `Accept` header line, in order.
    pub accept: Vec<String>,
}

impl RecordedRequest {
    /// Whether an `Authorization` header arrived.
    pub fn has_authorization(&self) -> bool {
        self.authorization.is_some()
    }

    /// The bearer token presented, if the request was `Authorization: Bearer <token>`.
    pub fn bearer(&self) -> Option<&str> {
        self.authorization.as_deref()?.strip_prefix("Bearer ")
    }

    /// All values of query parameter `name` (percent-decoded).
    pub fn query_param(&self, name: &str) -> Vec<String> {
        query_params(self.query.as_deref())
            .into_iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }
}

/// How to serve a blob whose bytes should not be trusted (see [`FakeUpstream::serve_wrong_bytes`]).
#[derive(Clone, Debug)]
pub enum WrongBytes {
    /// Same length as the real blob, one byte flipped in the middle: only the hash can tell.
    FlippedByte,
    /// Only the first `n` bytes, announced honestly (`Content-Length: n`).
    Truncated(usize),
    /// Exactly these bytes instead of the real ones.
    Replaced(Vec<u8>),
    /// The real `Content-Length`, but the connection drops after the first `n` correct bytes.
    /// Applies to whole-blob requests only; ranged requests (resumes) are served correctly, like a
    /// flaky network in front of a healthy server.
    CutOff(usize),
}

/// A one-shot fault for the next `GET` of a blob (see [`FakeUpstream::push_faults`]). Offsets are
/// absolute positions in the blob, so a resumed (ranged) request is cut at the same place in the
/// blob whatever offset it starts from.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Send the bytes before this offset, then reset the connection.
    CutAt(u64),
    /// Send the bytes before this offset, then go silent for this long, then reset.
    StallAt(u64, Duration),
    /// Send the bytes before this offset, then wait for [`FakeUpstream::release_holds`] and send
    /// the rest normally.
    HoldAt(u64),
    /// Answer with this status (and an OCI error body) instead of the blob.
    Status(u16),
    /// Ignore any `Range` header: answer 200 with the whole blob.
    IgnoreRange,
}

/// Builder for [`FakeUpstream`]. All options are off by default: an anonymous registry that serves
/// blobs directly.
#[derive(Clone, Debug, Default)]
pub struct FakeUpstreamBuilder {
    token_auth: bool,
    credentials: Option<(String, String)>,
    redirect_blobs: bool,
    not_found_code: Option<String>,
    referrers_api: bool,
}

impl FakeUpstreamBuilder {
    /// Docker Hub-like bearer auth: every `/v2/...` request needs a token from `/token`, scoped to
    /// its repository.
    pub fn token_auth(mut self) -> Self {
        self.token_auth = true;
        self
    }

    /// Token endpoint requires `Authorization: Basic base64(user:password)`. Implies token auth.
    pub fn token_credentials(mut self, username: &str, password: &str) -> Self {
        self.token_auth = true;
        self.credentials = Some((username.to_owned(), password.to_owned()));
        self
    }

    /// Blob GETs answer `307` to a signed URL on the CDN listener (127.0.0.2).
    pub fn redirect_blobs_to_cdn(mut self) -> Self {
        self.redirect_blobs = true;
        self
    }

    /// Missing manifests and blobs get a 404 with this error code instead of `MANIFEST_UNKNOWN`
    /// / `BLOB_UNKNOWN` (Harbor answers `{"errors":[{"code":"NOT_FOUND"}]}`).
    pub fn not_found_code(mut self, code: &str) -> Self {
        self.not_found_code = Some(code.to_owned());
        self
    }

    /// Serve the OCI 1.1 referrers API (else its path is a 404, as on registries without it).
    pub fn referrers_api(mut self) -> Self {
        self.referrers_api = true;
        self
    }

    /// Bind the listeners and start serving on a background thread.
    pub fn start(self) -> FakeUpstream {
        FakeUpstream::start_with(self)
    }
}

#[derive(Clone)]
struct StoredManifest {
    media_type: String,
    bytes: Bytes,
}

#[derive(Default)]
struct Repo {
    /// By tag and by digest.
    manifests: HashMap<String, StoredManifest>,
    tags: HashSet<String>,
    blobs: HashMap<String, Bytes>,
}

#[derive(Default)]
struct Content {
    repos: BTreeMap<String, Repo>,
    wrong: HashMap<String, WrongBytes>,
    /// Per blob digest, faults consumed one per `GET` (registry or CDN, not redirects).
    faults: HashMap<String, std::collections::VecDeque<Fault>>,
    /// Per manifest reference (tag or digest), faults consumed one per `GET`.
    manifest_faults: HashMap<String, std::collections::VecDeque<Fault>>,
    /// How many repository requests a token is accepted for (see
    /// [`FakeUpstream::revoke_tokens_after`]); `None` = until revoked.
    token_uses_allowed: Option<usize>,
    /// token -> repository requests it was accepted for.
    token_uses: HashMap<String, usize>,
    hidden: HashSet<String>,
    /// token -> repositories it grants pull on.
    tokens: HashMap<String, HashSet<String>>,
    /// Every token ever issued, in order (revocation does not remove them from here).
    issued: Vec<String>,
}

struct Shared {
    options: FakeUpstreamBuilder,
    registry_addr: SocketAddr,
    cdn_addr: Option<SocketAddr>,
    content: Mutex<Content>,
    log: Mutex<Vec<RecordedRequest>>,
    /// Opened by [`FakeUpstream::release_holds`]; [`Fault::HoldAt`] waits for it.
    holds: tokio::sync::watch::Sender<bool>,
    hooks: Hooks,
}

/// Test hooks applied around every registry response (see [`FakeUpstream::hold_blob`] and
/// [`FakeUpstream::send_ratelimit`]).
#[derive(Default)]
struct Hooks {
    /// Blob digests whose GET responses wait until released.
    held: Mutex<HashSet<String>>,
    /// A `ratelimit-remaining` value sent on every registry response.
    ratelimit_remaining: Mutex<Option<String>>,
    /// Default page size of `tags/list` (see [`FakeUpstream::page_tags_by_default`]).
    tag_page: Mutex<Option<usize>>,
    /// Blob digests served without `Content-Length` (see [`FakeUpstream::serve_chunked`]).
    chunked: Mutex<HashSet<String>>,
    /// Page size of referrers answers (see [`FakeUpstream::page_referrers`]).
    referrer_page: Mutex<Option<usize>>,
}

impl Shared {
    fn content(&self) -> MutexGuard<'_, Content> {
        self.content.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake upstream registry. Stops when dropped.
pub struct FakeUpstream {
    shared: Arc<Shared>,
    _server: InProcessServer,
}

impl FakeUpstream {
    pub fn builder() -> FakeUpstreamBuilder {
        FakeUpstreamBuilder::default()
    }

    /// An anonymous fake with no redirects.
    pub fn start() -> Self {
        Self::builder().start()
    }

    fn start_with(options: FakeUpstreamBuilder) -> Self {
        let registry = StdTcpListener::bind("127.0.0.1:0").expect("bind fake registry");
        let cdn = options
            .redirect_blobs
            .then(|| StdTcpListener::bind("127.0.0.2:0").expect("bind fake CDN on 127.0.0.2"));
        let shared = Arc::new(Shared {
            registry_addr: registry.local_addr().unwrap(),
            cdn_addr: cdn.as_ref().map(|l| l.local_addr().unwrap()),
            options,
            content: Mutex::default(),
            log: Mutex::default(),
            hooks: Hooks::default(),
            holds: tokio::sync::watch::channel(false).0,
        });
        let state = shared.clone();
        let server = InProcessServer::start("fake upstream", move || {
            let app = Router::new()
                .fallback(registry_handler)
                .layer(axum::middleware::from_fn_with_state(state.clone(), hooks))
                .with_state(state.clone());
            let mut apps = vec![(registry, app)];
            if let Some(cdn) = cdn {
                apps.push((cdn, Router::new().fallback(cdn_handler).with_state(state)));
            }
            apps
        });
        FakeUpstream {
            shared,
            _server: server,
        }
    }

    /// Base URL of the registry, e.g. `http://127.0.0.1:41234` (what stowage's config takes).
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.registry_addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.registry_addr
    }

    /// Base URL of the CDN listener, if redirects are enabled.
    pub fn cdn_url(&self) -> Option<String> {
        self.shared.cdn_addr.map(|a| format!("http://{a}"))
    }

    /// The token endpoint named as `realm` in challenges.
    pub fn realm(&self) -> String {
        format!("{}/token", self.url())
    }

    /// The content of `repo`, created empty on first use.
    fn with_repo<T>(&self, repo: &str, f: impl FnOnce(&mut Repo) -> T) -> T {
        f(self
            .shared
            .content()
            .repos
            .entry(repo.to_owned())
            .or_default())
    }

    /// Register a manifest under `tag` (and its digest); returns the digest of `bytes`.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        let bytes = bytes.into();
        let digest = self.add_manifest_by_digest(repo, media_type, bytes);
        let mut content = self.shared.content();
        let repo = content.repos.get_mut(repo).unwrap();
        let stored = repo.manifests[&digest].clone();
        repo.manifests.insert(tag.to_owned(), stored);
        repo.tags.insert(tag.to_owned());
        digest
    }

    /// Register a manifest reachable only by digest; returns the digest.
    pub fn add_manifest_by_digest(
        &self,
        repo: &str,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        let stored = StoredManifest {
            media_type: media_type.to_owned(),
            bytes,
        };
        self.with_repo(repo, |r| r.manifests.insert(digest.clone(), stored));
        digest
    }

    /// Register a blob in `repo`; returns its digest.
    pub fn add_blob(&self, repo: &str, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        self.with_repo(repo, |r| r.blobs.insert(digest.clone(), bytes));
        digest
    }

    /// From now on, serve `digest` wrongly (on the registry and the CDN alike).
    pub fn serve_wrong_bytes(&self, digest: &str, how: WrongBytes) {
        self.shared.content().wrong.insert(digest.to_owned(), how);
    }

    /// Undo [`Self::serve_wrong_bytes`]: serve the real bytes again.
    pub fn serve_correct_bytes(&self, digest: &str) {
        self.shared.content().wrong.remove(digest);
    }

    /// Queue faults for the next `GET`s of `digest`: each blob `GET` (on the registry, or on the
    /// CDN when redirecting) takes the next one; when the queue is empty blobs are served
    /// normally. Combines with [`Self::serve_wrong_bytes`].
    pub fn push_faults(&self, digest: &str, faults: impl IntoIterator<Item = Fault>) {
        let mut content = self.shared.content();
        enqueue(&mut content.faults, digest, faults);
    }

    /// Lets every response held by [`Fault::HoldAt`] (now or later) continue.
    pub fn release_holds(&self) {
        self.shared.holds.send_replace(true);
    }

    /// Every `GET` that asked for the bytes of `digest` (registry or CDN), in arrival order.
    /// `range` shows which of them were resumes.
    pub fn blob_gets(&self, digest: &str) -> Vec<RecordedRequest> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.contains(hex))
            .filter(|r| r.listener == Listener::Cdn || self.shared.cdn_addr.is_none())
            .collect()
    }

    /// Make `repo` invisible to the token server: tokens are still issued for it (with an empty
    /// access list, as the token spec demands), but the registry keeps answering 401.
    pub fn hide_repo(&self, repo: &str) {
        self.shared.content().hidden.insert(repo.to_owned());
    }

    /// Invalidate every token issued so far (as if they all expired early).
    pub fn revoke_all_tokens(&self) {
        self.shared.content().tokens.clear();
    }

    /// From now on every token (issued before or after) is accepted for `uses` repository
    /// requests (`/v2/<name>/...`), then revoked: the registry answers 401 with a fresh
    /// challenge although the token's `expires_in` has not passed (signing key rotated, token
    /// revoked, clock skew). Uses already counted stay counted.
    pub fn revoke_tokens_after(&self, uses: usize) {
        self.shared.content().token_uses_allowed = Some(uses);
    }

    /// Queue faults for the next `GET`s of the manifest `reference` (a tag or a digest, as the
    /// client names it): each `GET` takes the next one; `HEAD`s are never faulted. Supports
    /// [`Fault::CutAt`], [`Fault::StallAt`], [`Fault::HoldAt`] and [`Fault::Status`].
    pub fn push_manifest_faults(&self, reference: &str, faults: impl IntoIterator<Item = Fault>) {
        let mut content = self.shared.content();
        enqueue(&mut content.manifest_faults, reference, faults);
    }

    /// Every token value the token endpoint has handed out.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.content().issued.clone()
    }

    /// Every request seen so far, on both listeners, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log().clone()
    }

    /// Requests to the token endpoint.
    pub fn token_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.listener == Listener::Registry && r.path == "/token")
            .collect()
    }

    /// Requests that reached the CDN listener.
    pub fn cdn_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.listener == Listener::Cdn)
            .collect()
    }

    /// Number of requests with this method whose path contains `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.shared
            .log()
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.contains(path_contains))
            .count()
    }

    /// Forget the request log.
    pub fn clear_requests(&self) {
        self.shared.log().clear();
    }

    /// From now on, `GET /v2/<name>/blobs/<digest>` waits (before any response byte) until
    /// [`Self::release_blob`]: a cold blob whose fill a test can keep in flight.
    pub fn hold_blob(&self, digest: &str) {
        lock(&self.shared.hooks.held).insert(digest.to_owned());
    }

    /// Lets held and future GETs of `digest` proceed.
    pub fn release_blob(&self, digest: &str) {
        lock(&self.shared.hooks.held).remove(digest);
    }

    /// Sends Docker Hub's `ratelimit-limit` / `ratelimit-remaining` headers on every registry
    /// response from now on (`remaining;w=21600`).
    pub fn send_ratelimit(&self, remaining: u32) {
        *lock(&self.shared.hooks.ratelimit_remaining) = Some(format!("{remaining};w=21600"));
    }

    /// From now on `tags/list` pages like Quay or GAR: at most `n` tags per answer (the client's
    /// `n` if smaller), after `last`, with `Link: </v2/<name>/tags/list?n=..&last=..>;
    /// rel="next"` while more remain — also when the client sent no `n`.
    pub fn page_tags_by_default(&self, n: usize) {
        *lock(&self.shared.hooks.tag_page) = Some(n);
    }

    /// From now on referrers answers hold at most `n` descriptors, with `Link: </v2/<name>/
    /// referrers/<digest>?last=..>; rel="next"` while more remain.
    pub fn page_referrers(&self, n: usize) {
        *lock(&self.shared.hooks.referrer_page) = Some(n);
    }

    /// Forgets a manifest registered by digest (and every tag pointing at it).
    pub fn remove_manifest(&self, repo: &str, digest: &str) {
        self.with_repo(repo, |r| {
            let Some(m) = r.manifests.remove(digest) else {
                return;
            };
            let tags: Vec<String> = r
                .manifests
                .iter()
                .filter(|(k, v)| !k.starts_with("sha256:") && v.bytes == m.bytes)
                .map(|(k, _)| k.clone())
                .collect();
            for t in tags {
                r.manifests.remove(&t);
                r.tags.remove(&t);
            }
        });
    }

    /// From now on `GET`s of `digest` answer without `Content-Length` (chunked transfer
    /// encoding): the size is unknown until the body ends. Combines with [`Fault`]s.
    pub fn serve_chunked(&self, digest: &str) {
        lock(&self.shared.hooks.chunked).insert(digest.to_owned());
    }
}

/// Appends `faults` to the queue of `key` in `queues`.
fn enqueue(
    queues: &mut HashMap<String, std::collections::VecDeque<Fault>>,
    key: &str,
    faults: impl IntoIterator<Item = Fault>,
) {
    queues.entry(key.to_owned()).or_default().extend(faults);
}

/// Axum apps served on their listeners from a thread of their own with its own runtime (the
/// tests are synchronous), until dropped: the fake upstream and its CDN, a gate. Dropping the
/// runtime aborts the servers and any open connections.
pub struct InProcessServer {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl InProcessServer {
    /// Starts the apps `apps` builds (inside the runtime) and returns once they all listen.
    pub fn start(
        name: &str,
        apps: impl FnOnce() -> Vec<(StdTcpListener, Router)> + Send + 'static,
    ) -> InProcessServer {
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("in-process server runtime");
                rt.block_on(async move {
                    for (listener, app) in apps() {
                        listener
                            .set_nonblocking(true)
                            .expect("nonblocking listener");
                        let listener =
                            tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
                    }
                    ready_tx.send(()).ok();
                    stop.await.ok();
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .unwrap_or_else(|e| panic!("spawn {name} thread: {e}"));
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{name} did not start"));
        InProcessServer {
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            tx.send(()).ok();
        }
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Applies [`Hooks`]: holds blob GETs that a test asked to hold, adds rate-limit headers.
async fn hooks(
    State(state): State<Arc<Shared>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let blob = (req.method() == Method::GET)
        .then(|| {
            req.uri()
                .path()
                .rsplit_once("/blobs/")
                .map(|(_, d)| d.to_owned())
        })
        .flatten();
    if let Some(digest) = &blob {
        while lock(&state.hooks.held).contains(digest) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let tags_query = (req.method() == Method::GET && req.uri().path().ends_with("/tags/list"))
        .then(|| req.uri().query().unwrap_or("").to_owned());
    let mut resp = next.run(req).await;
    if let Some(query) = tags_query {
        resp = page_tags(&state, &query, resp).await;
    }
    if blob.is_some_and(|d| lock(&state.hooks.chunked).contains(&d)) {
        resp = without_content_length(resp);
    }
    if let Some(v) = lock(&state.hooks.ratelimit_remaining).clone() {
        let h = resp.headers_mut();
        h.insert("ratelimit-limit", HeaderValue::from_static("100;w=21600"));
        h.insert("ratelimit-remaining", HeaderValue::from_str(&v).unwrap());
    }
    resp
}

/// Applies [`FakeUpstream::page_tags_by_default`] to a `tags/list` answer: the whole sorted list
/// cut to one page after `last`, with a `Link` to the next while more remain.
async fn page_tags(state: &Shared, query: &str, resp: Response) -> Response {
    let Some(page) = *lock(&state.hooks.tag_page) else {
        return resp;
    };
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let name = list["name"].as_str().unwrap_or("").to_owned();
    let params = query_params(Some(query));
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let n = param("n")
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(page, |n| n.min(page));
    let last = param("last");
    let after: Vec<String> = list["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
        .filter(|t| last.as_deref().is_none_or(|l| *t > l))
        .map(str::to_owned)
        .collect();
    let tags: Vec<&String> = after.iter().take(n).collect();
    let mut resp = json(
        StatusCode::OK,
        &serde_json::json!({ "name": name, "tags": tags }).to_string(),
    );
    if let (true, Some(l)) = (after.len() > n, tags.last()) {
        let link = format!("</v2/{name}/tags/list?n={n}&last={l}>; rel=\"next\"");
        resp.headers_mut()
            .insert(header::LINK, HeaderValue::from_str(&link).unwrap());
    }
    resp
}

/// Applies [`FakeUpstream::serve_chunked`]: the same status, headers and bytes, but no
/// `Content-Length` and a body of unknown size, so hyper sends it chunked.
fn without_content_length(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from_stream(body.into_data_stream()))
}

fn record(state: &Shared, listener: Listener, req: &Request) {
    let headers = req.headers();
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let entry = RecordedRequest {
        listener,
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        authorization: text(header::AUTHORIZATION),
        range: text(header::RANGE),
        accept: headers
            .get_all(header::ACCEPT)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect(),
    };
    state.log().push(entry);
}

async fn registry_handler(State(state): State<Arc<Shared>>, req: Request) -> Response {
    record(&state, Listener::Registry, &req);
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let head = method == Method::HEAD;

    if path == "/token" {
        return token_endpoint(&state, &req);
    }
    if path == "/v2/" || path == "/v2" {
        if state.options.token_auth && bearer_grant(&state, req.headers()).is_none() {
            return challenge(&state, None, false, head);
        }
        return respond(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"{}"),
            head,
        );
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route", head);
    };

    // Parse from the right: <name>/manifests/<ref>, <name>/blobs/<digest>, <name>/tags/list.
    let mut parts = rest.rsplitn(3, '/');
    let (last, kind, repo) = match (parts.next(), parts.next(), parts.next()) {
        (Some(last), Some(kind), Some(repo)) if !repo.is_empty() => (last, kind, repo),
        _ => return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such route", head),
    };

    if state.options.token_auth {
        if !use_token(&state, req.headers()) {
            return challenge(&state, Some(repo), false, head);
        }
        match bearer_grant(&state, req.headers()) {
            Some(grant) if grant.contains(repo) => {}
            Some(_) => return challenge(&state, Some(repo), true, head),
            None => return challenge(&state, Some(repo), false, head),
        }
    }

    match (kind, last) {
        ("tags", "list") if method == Method::GET => tags_list(&state, repo),
        ("referrers", digest) if method == Method::GET && state.options.referrers_api => {
            referrers(&state, repo, digest, req.uri().query())
        }
        ("manifests", reference) if method == Method::GET || head => {
            manifest(&state, repo, reference, head)
        }
        ("blobs", digest) if method == Method::GET || head => {
            registry_blob(&state, repo, digest, head, req.headers())
        }
        ("tags", "list") | ("manifests", _) | ("blobs", _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the fake upstream is read-only",
            head,
        ),
        _ => error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such route", head),
    }
}

async fn cdn_handler(State(state): State<Arc<Shared>>, req: Request) -> Response {
    record(&state, Listener::Cdn, &req);
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let Some(hex) = req
        .uri()
        .path()
        .strip_prefix(CDN_PREFIX)
        .and_then(|p| p.strip_suffix("/data"))
        .and_then(|p| p.split_once('/'))
        .map(|(_, hex)| hex.to_owned())
    else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    let digest = format!("sha256:{hex}");
    let verify = query_params(req.uri().query())
        .into_iter()
        .find(|(k, _)| k == "verify")
        .map(|(_, v)| v);
    if verify.as_deref() != Some(cdn_signature(&digest).as_str()) {
        return plain(StatusCode::FORBIDDEN, "bad or missing signature");
    }
    if req.headers().contains_key(header::AUTHORIZATION) {
        return plain(
            StatusCode::BAD_REQUEST,
            "only one auth mechanism allowed: the URL is pre-signed, do not send Authorization",
        );
    }
    let found = {
        let content = state.content();
        content
            .repos
            .values()
            .find_map(|r| r.blobs.get(&digest).cloned())
            .map(|bytes| (bytes, content.wrong.get(&digest).cloned()))
    };
    match found {
        Some((bytes, wrong)) => {
            let fault = take_fault(&state, &digest, head);
            serve_blob(&state, &digest, bytes, wrong, fault, req.headers(), head)
        }
        None => plain(StatusCode::NOT_FOUND, "not found"),
    }
}

fn token_endpoint(state: &Shared, req: &Request) -> Response {
    if req.method() != Method::GET {
        return json(StatusCode::METHOD_NOT_ALLOWED, r#"{"details":"use GET"}"#);
    }
    if let Some((user, password)) = &state.options.credentials {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let got = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if got != Some(expected.as_bytes()) {
            let mut resp = json(
                StatusCode::UNAUTHORIZED,
                r#"{"details":"incorrect username or password"}"#,
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="fake token service""#),
            );
            return resp;
        }
    }
    let params = query_params(req.uri().query());
    if !params.iter().any(|(k, v)| k == "service" && v == SERVICE) {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"details":"missing or unknown service"}"#,
        );
    }

    let mut content = state.content();
    // Each `scope` parameter may itself hold several space-separated scopes.
    let mut grant = HashSet::new();
    for (_, scope) in params.iter().filter(|(k, _)| k == "scope") {
        for scope in scope.split_whitespace() {
            let Some((resource, actions)) = scope.rsplit_once(':') else {
                continue;
            };
            let Some(repo) = resource.strip_prefix("repository:") else {
                continue;
            };
            // A repo the caller cannot see is not an error: the token just grants nothing on it.
            if actions.split(',').any(|a| a == "pull") && !content.hidden.contains(repo) {
                grant.insert(repo.to_owned());
            }
        }
    }
    let token = format!("fake-bearer-{:032x}", rand::random::<u128>());
    content.tokens.insert(token.clone(), grant);
    content.issued.push(token.clone());
    drop(content);

    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": 300,
        "issued_at": rfc3339_now(),
    });
    json(StatusCode::OK, &body.to_string())
}

/// Counts one use of the request's bearer token; `false` (and the token revoked) once it has
/// been used more often than [`FakeUpstream::revoke_tokens_after`] allows.
fn use_token(state: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return true;
    };
    let mut content = state.content();
    let Some(allowed) = content.token_uses_allowed else {
        return true;
    };
    if !content.tokens.contains_key(token) {
        return true;
    }
    let used = content.token_uses.entry(token.to_owned()).or_default();
    *used += 1;
    if *used > allowed {
        content.tokens.remove(token);
        return false;
    }
    true
}

/// The repositories the request's bearer token grants, or `None` without a known token.
fn bearer_grant(state: &Shared, headers: &HeaderMap) -> Option<HashSet<String>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?;
    state.content().tokens.get(token).cloned()
}

fn challenge(state: &Shared, repo: Option<&str>, insufficient: bool, head: bool) -> Response {
    let mut value = format!(
        r#"Bearer realm="http://{}/token",service="{SERVICE}""#,
        state.registry_addr
    );
    if let Some(repo) = repo {
        value.push_str(&format!(r#",scope="repository:{repo}:pull""#));
    }
    if insufficient {
        value.push_str(r#",error="insufficient_scope""#);
    }
    let mut resp = error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required",
        head,
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_str(&value).unwrap(),
    );
    resp
}

fn tags_list(state: &Shared, repo: &str) -> Response {
    let content = state.content();
    let Some(r) = content.repos.get(repo) else {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known to registry",
            false,
        );
    };
    let mut tags: Vec<&String> = r.tags.iter().collect();
    tags.sort();
    let body = serde_json::json!({ "name": repo, "tags": tags });
    json(StatusCode::OK, &body.to_string())
}

/// The referrers of `subject`: every registered manifest whose `subject` names it, sorted by
/// digest, after `last`, at most the page size (with a `Link` while more remain).
fn referrers(state: &Shared, repo: &str, subject: &str, query: Option<&str>) -> Response {
    let mut list: Vec<serde_json::Value> = {
        let content = state.content();
        let Some(r) = content.repos.get(repo) else {
            return error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "no such repository",
                false,
            );
        };
        r.manifests
            .iter()
            .filter(|(k, _)| k.starts_with("sha256:"))
            .filter_map(|(digest, m)| {
                let v: serde_json::Value = serde_json::from_slice(&m.bytes).ok()?;
                if v["subject"]["digest"].as_str() != Some(subject) {
                    return None;
                }
                let mut d = serde_json::json!({
                    "mediaType": m.media_type,
                    "digest": digest,
                    "size": m.bytes.len(),
                });
                let t = v["artifactType"]
                    .as_str()
                    .or(v["config"]["mediaType"].as_str());
                if let Some(t) = t {
                    d["artifactType"] = t.into();
                }
                if let Some(a) = v.get("annotations") {
                    d["annotations"] = a.clone();
                }
                Some(d)
            })
            .collect()
    };
    list.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    let last = query_params(query)
        .into_iter()
        .find(|(k, _)| k == "last")
        .map(|(_, v)| v);
    if let Some(l) = last {
        list.retain(|d| d["digest"].as_str().is_some_and(|x| x > l.as_str()));
    }
    let page = *lock(&state.hooks.referrer_page);
    let mut link = None;
    if let Some(n) = page.filter(|n| list.len() > *n) {
        list.truncate(n);
        let l = list.last().and_then(|d| d["digest"].as_str()).unwrap_or("");
        link = Some(format!(
            "</v2/{repo}/referrers/{subject}?last={l}>; rel=\"next\""
        ));
    }
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": list,
    });
    let mut resp = respond(
        StatusCode::OK,
        "application/vnd.oci.image.index.v1+json",
        Bytes::from(body.to_string()),
        false,
    );
    if let Some(l) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LINK, l);
    }
    resp
}

/// A 404 with `code`, or the code the fake was told to use instead (Harbor's `NOT_FOUND`).
fn not_found(state: &Shared, code: &str, message: &str, head: bool) -> Response {
    let code = state.options.not_found_code.as_deref().unwrap_or(code);
    error(StatusCode::NOT_FOUND, code, message, head)
}

fn manifest(state: &Shared, repo: &str, reference: &str, head: bool) -> Response {
    let found = state
        .content()
        .repos
        .get(repo)
        .and_then(|r| r.manifests.get(reference).cloned());
    let Some(m) = found else {
        return not_found(state, "MANIFEST_UNKNOWN", "manifest unknown", head);
    };
    let digest = sha256_digest(&m.bytes);
    let fault = if head {
        None
    } else {
        state
            .content()
            .manifest_faults
            .get_mut(reference)
            .and_then(|q| q.pop_front())
    };
    if let Some(Fault::Status(code)) = fault {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return error(status, "UNAVAILABLE", "injected fault", head);
    }
    let mut resp = match &fault {
        Some(Fault::CutAt(at) | Fault::StallAt(at, _) | Fault::HoldAt(at)) => {
            let at = *at;
            Response::builder()
                .status(StatusCode::OK)
                .header("docker-distribution-api-version", "registry/2.0")
                .header(header::CONTENT_TYPE, &m.media_type)
                .header(header::CONTENT_LENGTH, m.bytes.len().to_string())
                .body(broken_body(state, m.bytes.clone(), 0, at, fault.clone()))
                .unwrap()
        }
        _ => respond(StatusCode::OK, &m.media_type, m.bytes, head),
    };
    let headers = resp.headers_mut();
    headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(&digest).unwrap(),
    );
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{digest}\"")).unwrap(),
    );
    resp
}

fn registry_blob(
    state: &Shared,
    repo: &str,
    digest: &str,
    head: bool,
    headers: &HeaderMap,
) -> Response {
    let found = {
        let content = state.content();
        content
            .repos
            .get(repo)
            .and_then(|r| r.blobs.get(digest).cloned())
            .map(|bytes| (bytes, content.wrong.get(digest).cloned()))
    };
    let Some((bytes, wrong)) = found else {
        return not_found(state, "BLOB_UNKNOWN", "blob unknown to registry", head);
    };
    if let (Some(cdn), false) = (state.cdn_addr, head) {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let location = format!(
            "http://{cdn}{CDN_PREFIX}{}/{hex}/data?verify={}",
            &hex[..2.min(hex.len())],
            cdn_signature(digest)
        );
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, location)
            .header("docker-distribution-api-version", "registry/2.0")
            .header(header::CONTENT_LENGTH, "0")
            .body(Body::empty())
            .unwrap();
    }
    let fault = take_fault(state, digest, head);
    serve_blob(state, digest, bytes, wrong, fault, headers, head)
}

fn take_fault(state: &Shared, digest: &str, head: bool) -> Option<Fault> {
    if head {
        return None;
    }
    state
        .content()
        .faults
        .get_mut(digest)
        .and_then(|q| q.pop_front())
}

/// Serve blob bytes (honouring a single `Range` and any injected fault).
fn serve_blob(
    state: &Shared,
    digest: &str,
    real: Bytes,
    wrong: Option<WrongBytes>,
    fault: Option<Fault>,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    if let Some(Fault::Status(code)) = fault {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return error(status, "UNAVAILABLE", "injected fault", head);
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = if matches!(fault, Some(Fault::IgnoreRange)) {
        None
    } else {
        range
    };
    let served = match &wrong {
        Some(WrongBytes::FlippedByte) => {
            let mut v = real.to_vec();
            if !v.is_empty() {
                let mid = v.len() / 2;
                v[mid] ^= 0xff;
            }
            Bytes::from(v)
        }
        Some(WrongBytes::Truncated(n)) => real.slice(..(*n).min(real.len())),
        Some(WrongBytes::Replaced(v)) => Bytes::from(v.clone()),
        Some(WrongBytes::CutOff(_)) | None => real,
    };
    let total = served.len();

    let mut status = StatusCode::OK;
    let mut body = served.clone();
    let mut content_range = None;
    let mut body_start = 0u64;
    if let Some(range) = range {
        match parse_range(range, total) {
            RangeSpec::Whole => {}
            RangeSpec::Part(start, end) => {
                body_start = start as u64;
                status = StatusCode::PARTIAL_CONTENT;
                body = served.slice(start..=end);
                content_range = Some(format!("bytes {start}-{end}/{total}"));
            }
            RangeSpec::Unsatisfiable => {
                return Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                    .header(header::CONTENT_LENGTH, "0")
                    .body(Body::empty())
                    .unwrap();
            }
        }
    }

    let builder = Response::builder()
        .status(status)
        .header("docker-distribution-api-version", "registry/2.0")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", digest)
        .header(header::ETAG, format!("\"{digest}\""));
    let builder = match content_range {
        Some(cr) => builder.header(header::CONTENT_RANGE, cr),
        None => builder,
    };

    if let (Some(WrongBytes::CutOff(n)), None, false) = (&wrong, range, head) {
        // Announce the full length, send a prefix, then fail the body: hyper aborts the connection.
        let prefix = body.slice(..(*n).min(body.len()));
        // The pause makes the body stream return Pending, so hyper flushes the headers and the
        // prefix before the error tears the connection down.
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(prefix)]).chain(
            futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "fake cut-off",
                ))
            }),
        );
        return builder
            .header(header::CONTENT_LENGTH, body.len().to_string())
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let broken_at = match &fault {
        Some(Fault::CutAt(n) | Fault::StallAt(n, _) | Fault::HoldAt(n)) if !head => Some(*n),
        _ => None,
    };
    if let Some(at) = broken_at {
        return builder
            .header(header::CONTENT_LENGTH, body.len().to_string())
            .body(broken_body(state, body, body_start, at, fault))
            .unwrap();
    }
    let len = body.len();
    builder
        .header(header::CONTENT_LENGTH, len.to_string())
        .body(if head {
            Body::empty()
        } else {
            Body::from(body)
        })
        .unwrap()
}

/// A body of `body` (which starts at absolute offset `body_start`) that sends the bytes before
/// the absolute offset `at`, then misbehaves as `fault` says (cut, stall then cut, or hold
/// until [`FakeUpstream::release_holds`] and finish).
fn broken_body(
    state: &Shared,
    body: Bytes,
    body_start: u64,
    at: u64,
    fault: Option<Fault>,
) -> Body {
    // Send the bytes before `at` (absolute), then misbehave. The pause / wait makes the body
    // stream return Pending, so hyper flushes the headers and the prefix first.
    let split = (at.saturating_sub(body_start) as usize).min(body.len());
    let prefix = body.slice(..split);
    let rest = body.slice(split..);
    let mut holds = state.holds.subscribe();
    let tail = futures_util::stream::once(async move {
        match fault {
            Some(Fault::HoldAt(_)) => {
                let _ = holds.wait_for(|open| *open).await;
                Ok(rest)
            }
            Some(Fault::StallAt(_, pause)) => {
                tokio::time::sleep(pause).await;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "fake stall ended",
                ))
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "fake cut",
                ))
            }
        }
    });
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(prefix)]).chain(tail);
    Body::from_stream(stream)
}

enum RangeSpec {
    Whole,
    Part(usize, usize),
    Unsatisfiable,
}

/// Single `bytes=N-`, `bytes=N-M` or `bytes=-K`; anything else is ignored (served whole).
fn parse_range(value: &str, total: usize) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeSpec::Whole;
    };
    if spec.contains(',') {
        return RangeSpec::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeSpec::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(k) = b.parse::<usize>() else {
            return RangeSpec::Whole;
        };
        if k == 0 || total == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Part(total - k.min(total), total - 1);
    }
    let Ok(start) = a.parse::<usize>() else {
        return RangeSpec::Whole;
    };
    if start >= total {
        return RangeSpec::Unsatisfiable;
    }
    let end = if b.is_empty() {
        total - 1
    } else {
        match b.parse::<usize>() {
            Ok(e) if e >= start => e.min(total - 1),
            _ => return RangeSpec::Whole,
        }
    };
    RangeSpec::Part(start, end)
}

fn cdn_signature(digest: &str) -> String {
    let expiry = 4_102_444_800u64; // 2100-01-01: signed URLs in tests never expire
    let sig = hex::encode(Sha256::digest(format!("{CDN_SECRET}{digest}{expiry}")));
    format!("{expiry}-{}", &sig[..32])
}

// ---------------------------------------------------------------------------------------------
// Response helpers

fn respond(status: StatusCode, content_type: &str, body: Bytes, head: bool) -> Response {
    Response::builder()
        .status(status)
        .header("docker-distribution-api-version", "registry/2.0")
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len().to_string())
        .body(if head {
            Body::empty()
        } else {
            Body::from(body)
        })
        .unwrap()
}

fn error(status: StatusCode, code: &str, message: &str, head: bool) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] });
    respond(
        status,
        "application/json",
        Bytes::from(body.to_string()),
        head,
    )
}

fn json(status: StatusCode, body: &str) -> Response {
    respond(
        status,
        "application/json",
        Bytes::from(body.to_owned()),
        false,
    )
}

fn plain(status: StatusCode, body: &'static str) -> Response {
    respond(
        status,
        "text/plain",
        Bytes::from_static(body.as_bytes()),
        false,
    )
}

fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Current UTC time as RFC 3339 (`2024-01-02T03:04:05Z`).
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Gate: a switchable front for any upstream (429 / 5xx injection)

/// A fault the [`Gate`] answers with instead of forwarding.
#[derive(Clone, Debug)]
pub struct GateFault {
    /// HTTP status, e.g. 429 or 503; 0 = never answer.
    pub status: u16,
    /// `Retry-After` value to send, if any.
    pub retry_after: Option<String>,
}

struct GateState {
    target: String,
    fault: Mutex<Option<GateFault>>,
    /// `(method, path?query)` of every request, in arrival order.
    seen: Mutex<Vec<(String, String)>>,
}

/// An in-process HTTP front for a real upstream ([`super::registry::Registry`] or a
/// [`FakeUpstream`]): it forwards every request unchanged until [`Gate::fail_with`], after which
/// every `/v2/<name>/...` request is answered with that status (and `Retry-After`, and an OCI
/// error body: `TOOMANYREQUESTS` for 429, `UNAVAILABLE` otherwise) without reaching the target,
/// or — after [`Gate::hang`] — not answered at all.
/// `/v2/` itself keeps being forwarded. Stops when dropped.
pub struct Gate {
    state: Arc<GateState>,
    addr: SocketAddr,
    _server: InProcessServer,
}

impl Gate {
    /// Starts a gate forwarding to `target_url` (e.g. `registry.url()`).
    pub fn start(target_url: &str) -> Gate {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind gate");
        let addr = listener.local_addr().expect("gate addr");
        let state = Arc::new(GateState {
            target: target_url.trim_end_matches('/').to_owned(),
            fault: Mutex::new(None),
            seen: Mutex::default(),
        });
        let s = state.clone();
        let server = InProcessServer::start("gate", move || {
            let client = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("gate client");
            let app = Router::new().fallback(gate_handler).with_state((s, client));
            vec![(listener, app)]
        });
        Gate {
            state,
            addr,
            _server: server,
        }
    }

    /// `http://127.0.0.1:<port>`: configure this as the upstream's `url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on answer `/v2/<name>/...` with `status` (and `Retry-After: retry_after`).
    pub fn fail_with(&self, status: u16, retry_after: Option<&str>) {
        *self.state.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(GateFault {
            status,
            retry_after: retry_after.map(str::to_owned),
        });
    }

    /// From now on never answer `/v2/<name>/...` (the connection stays open, silent).
    pub fn hang(&self) {
        self.fail_with(0, None);
    }

    /// Forward everything again.
    pub fn pass(&self) {
        *self.state.fault.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// `(method, path?query)` of every request the gate saw (forwarded or failed).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many requests with `method` had a path containing `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.requests()
            .iter()
            .filter(|(m, p)| m == method && p.contains(path_contains))
            .count()
    }
}

async fn gate_handler(
    State((state, client)): State<(Arc<GateState>, reqwest::Client)>,
    req: Request,
) -> Response {
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    state
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((method.to_string(), target.clone()));
    let head = method == Method::HEAD;
    let fault = state
        .fault
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let path = req.uri().path();
    if let Some(f) = fault.filter(|_| path != "/v2/" && path != "/v2") {
        if f.status == 0 {
            std::future::pending::<()>().await;
        }
        let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let code = if f.status == 429 {
            "TOOMANYREQUESTS"
        } else {
            "UNAVAILABLE"
        };
        let mut resp = error(status, code, "injected by the test gate", head);
        if let Some(ra) = f.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_str(&ra).unwrap());
        }
        return resp;
    }
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let mut out = client.request(parts.method, format!("{}{target}", state.target));
    for (name, value) in &parts.headers {
        if name != header::HOST {
            out = out.header(name, value);
        }
    }
    match out.body(body).send().await {
        Ok(resp) => {
            let mut builder = Response::builder().status(resp.status());
            for (name, value) in resp.headers() {
                builder = builder.header(name, value);
            }
            let bytes = resp.bytes().await.unwrap_or_default();
            builder
                .body(if head {
                    Body::empty()
                } else {
                    Body::from(bytes)
                })
                .unwrap()
        }
        Err(e) => respond(
            StatusCode::BAD_GATEWAY,
            "text/plain",
            Bytes::from(e.to_string()),
            false,
        ),
    }
}
