//! The mirror's policy: answer from the cache when it can, from the upstream otherwise.
//!
//! - Offline (`offline = true` / `serve --offline`): the cache only. Cached tags are served
//!   whatever their age, tag lists come from the cached tags, and anything missing is a 404 whose
//!   message says the mirror is offline; no upstream is ever contacted.
//! - Manifests by digest are content-addressed: a cached one is served without asking upstream.
//! - Manifests by tag are answered from the cache within the upstream's `manifest_ttl` (forever
//!   for `immutable_tags`), then revalidated with a `HEAD` (free against Docker Hub's rate
//!   limit); a `GET` (by digest) follows only for a digest we do not hold. If the upstream fails
//!   (connection, timeout, 5xx, 429) the cached tag is served with a `Warning`, within
//!   `max_stale`; after a 429 with `Retry-After`, cached tags are not revalidated until it has
//!   passed. An upstream 404 (or Docker Hub's 401 even with a fresh token) is remembered for
//!   `negative_ttl`.
//! - A manifest whose type the client does not accept (a list for a client that wants one image)
//!   is never handed over: the tag's variant for the client's Accept set is fetched once with
//!   the client's own `Accept` and kept beside the tag until it moves.
//! - Blobs: a hit streams the file; a miss joins or starts a fill (see [`crate::cache::fill`]).
//! - Referrers (OCI 1.1 `/v2/<name>/referrers/<digest>`): see [`referrers`].
//! - With a shared store (`storage.backend`, [`crate::fleet`]): local misses of blobs,
//!   manifests and tags look in the fleet's store before the upstream, and what the upstream
//!   gives is shared (verified blobs after commit; manifests; tag records with their check
//!   time, so a tag confirmed by another node within `manifest_ttl` needs no upstream request).
//! - `require_signatures = "sigstore"`: a manifest from that upstream is stored only once its
//!   signature verifies (`mirror/signatures.rs`); otherwise 403 DENIED.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::cache::index::{unix_now_ms, TagVariant};
use crate::cache::{
    BlobSource, Cache, CachedBlob, Fill, FillPolicy, StoredManifest, TagEntry, Tally,
};
use crate::config::Config;
use crate::fleet::Fleet;
use crate::oci::media::{self, Accept};
use crate::oci::{Digest, ErrorCode, Reference, RegistryError, RepoName, Tag};
use crate::stream::BlobBody;
use crate::upstream::{ManifestHead, Route, Router, Upstream, UpstreamError};

pub mod referrers;
mod signatures;
pub use referrers::ReferrersAnswer;

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
    /// The fleet's shared store, when `storage.backend` names one.
    pub fleet: Option<Arc<Fleet>>,
    /// Tags upstream said do not exist, until when.
    negative: NegativeCache,
    /// One revalidation (or first resolution) per tag at a time; the others wait for its result.
    revalidations: Gates,
    /// The `require_signatures` gate in front of the cache.
    signatures: signatures::Signatures,
}

/// Per-key async locks, dropped when nobody holds or waits for them. The lock holds the last
/// failure of the work it guards, so that waiters can share it instead of repeating the work.
#[derive(Default)]
struct Gates(Mutex<HashMap<String, std::sync::Weak<Gate>>>);

type Gate = tokio::sync::Mutex<Option<(Instant, UpstreamError)>>;

impl Gates {
    fn gate(&self, key: &str) -> Arc<Gate> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = map.get(key).and_then(std::sync::Weak::upgrade) {
            return g;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let g = Arc::new(tokio::sync::Mutex::new(None));
        map.insert(key.to_owned(), Arc::downgrade(&g));
        g
    }
}

/// The lock on one tag's upstream check, holding that check's last failure.
type TurnGuard = tokio::sync::OwnedMutexGuard<Option<(Instant, UpstreamError)>>;

/// What waiting for a tag's turn to ask upstream gave.
enum Turn {
    /// The check another request made answered this one too.
    Answered(ManifestAnswer),
    /// This request checks the tag; the record as it stands when the turn was taken.
    Mine(TurnGuard, Option<TagEntry>),
}

/// The key of a tag in the negative cache and among the revalidation gates.
fn negative_key(route: &Route, tag: &Tag) -> String {
    format!("{}\0{}\0{tag}", route.host(), route.repo)
}

/// Whether a tag record can be served without asking upstream: within `manifest_ttl` of the
/// last upstream check, or the tag matches `immutable_tags` (never rechecked).
fn is_fresh(route: &Route, tag: &Tag, entry: &TagEntry) -> bool {
    let config = &route.upstream.config;
    config.is_immutable(tag.as_str())
        || Duration::from_millis(unix_now_ms().saturating_sub(entry.checked)) < config.manifest_ttl
}

fn answer(manifest: Arc<StoredManifest>, outcome: Outcome) -> ManifestAnswer {
    ManifestAnswer {
        manifest,
        outcome,
        warning: None,
    }
}

/// Which digest of a tag entry this client may be given: the tag's own manifest if its type is
/// acceptable, else the variant stored for the client's Accept set (if still acceptable).
/// `None` when the variant has yet to be fetched.
fn pick(entry: &TagEntry, accept: &Accept) -> Option<Digest> {
    if accept.allows(&entry.media_type) {
        return entry.digest.parse().ok();
    }
    let v = entry.variants.get(&accept.variant_key())?;
    if !accept.allows(&v.media_type) {
        return None;
    }
    v.digest.parse().ok()
}

/// `text` reduced to what a header value may carry (printable ASCII), at most `max` bytes.
fn header_safe(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(max)
        .collect()
}

/// The 404 for content the cache lacks while the mirror is offline (`offline = true`).
fn offline_unknown(code: ErrorCode, what: impl std::fmt::Display) -> RegistryError {
    RegistryError::new(
        code,
        format!("{what} is not in the cache and the mirror is offline (no upstream is contacted)"),
    )
}

/// Upstream 404s for tags (and Docker Hub's "401 even with a fresh token" for a repository it
/// does not have), remembered for the upstream's `negative_ttl` (in memory only) with the code
/// to answer.
#[derive(Default)]
struct NegativeCache {
    until: Mutex<HashMap<String, (Instant, ErrorCode)>>,
}

impl NegativeCache {
    const MAX_ENTRIES: usize = 10_000;

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, ErrorCode)>> {
        self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The remembered answer's code, while it lasts.
    fn get(&self, key: &str) -> Option<ErrorCode> {
        let mut map = self.map();
        match map.get(key) {
            Some((until, code)) if *until > Instant::now() => Some(*code),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, key: String, ttl: Duration, code: ErrorCode) {
        let now = Instant::now();
        let mut map = self.map();
        if map.len() >= Self::MAX_ENTRIES {
            map.retain(|_, (until, _)| *until > now);
            if map.len() >= Self::MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(key, (now + ttl, code));
    }

    fn remove(&self, key: &str) {
        let mut map = self.map();
        if !map.is_empty() {
            map.remove(key);
        }
    }
}

/// A fill source reading a blob from an upstream repository.
struct UpstreamSource {
    upstream: Arc<Upstream>,
    repo: RepoName,
    digest: Digest,
    /// Counts the bytes fetched for the repository (the console's statistics).
    tally: Tally,
}

impl BlobSource for UpstreamSource {
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<BlobBody, RegistryError>> {
        Box::pin(async move {
            let mut body = self
                .upstream
                .get_blob(&self.repo, &self.digest, offset)
                .await
                .map_err(|e| e.to_registry_error(ErrorCode::BlobUnknown))?;
            let tally = self.tally.clone();
            body.stream = Box::pin(futures_util::StreamExt::inspect(body.stream, move |c| {
                if let Ok(b) = c {
                    tally.fetched(b.len() as u64);
                }
            }));
            Ok(body)
        })
    }

    fn idle_timeout(&self) -> Option<std::time::Duration> {
        Some(self.upstream.config.read_timeout)
    }
}

impl Mirror {
    /// Opens the cache (its budget loads and its files reconcile in the background) and builds
    /// the upstream clients.
    pub fn new(config: Config) -> Result<Mirror, crate::Error> {
        let cache = Cache::open_serving(&config.storage)?.with_fill_policy(FillPolicy {
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
        let fleet = match &config.storage.shared {
            Some(shared) => {
                let store = crate::store::open(shared)
                    .map_err(|e| crate::Error::Startup(format!("storage.backend: {e}")))?;
                let fleet = Fleet::new(store, shared, config.storage.advertise_url.as_deref())
                    .map_err(crate::Error::Startup)?;
                Some(Arc::new(fleet))
            }
            None => None,
        };
        let signatures = signatures::Signatures::load(&config)?;
        Ok(Mirror {
            signatures,
            config,
            cache,
            router: Router::new(upstreams),
            fleet,
            negative: NegativeCache::default(),
            revalidations: Gates::default(),
        })
    }

    /// Routes a client's repository name.
    pub fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Route, RegistryError> {
        self.router.route(name, ns)
    }

    /// A manifest by tag or digest. By digest it is content-addressed (never a tag
    /// revalidation); by tag see `Mirror::manifest_by_tag`.
    pub async fn manifest(
        &self,
        route: &Route,
        reference: &Reference,
        accept: &Accept,
    ) -> Result<ManifestAnswer, RegistryError> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(route, d).await,
            Reference::Tag(t) => self.manifest_by_tag(route, t, accept).await,
        }
    }

    async fn manifest_by_digest(
        &self,
        route: &Route,
        digest: &Digest,
    ) -> Result<ManifestAnswer, RegistryError> {
        let (manifest, fetched) = self.manifest_or_fetch(route, digest).await?;
        Ok(answer(
            manifest,
            if fetched { Outcome::Miss } else { Outcome::Hit },
        ))
    }

    /// The manifest `digest` from the cache, or fetched by digest (verified) and stored. The
    /// flag says whether it was fetched.
    async fn manifest_or_fetch(
        &self,
        route: &Route,
        digest: &Digest,
    ) -> Result<(Arc<StoredManifest>, bool), RegistryError> {
        if let Some(m) = self.cache.manifest(digest)? {
            return Ok((m, false));
        }
        if let Some(m) = self.shared_manifest(route, digest).await? {
            return Ok((m, false));
        }
        if self.config.offline {
            return Err(offline_unknown(
                ErrorCode::ManifestUnknown,
                format_args!("manifest {}@{digest}", route.repo),
            ));
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
        let m = self
            .store_manifest(route, fetched.digest, fetched.media_type, fetched.bytes)
            .await?;
        Ok((m, true))
    }

    /// A manifest by tag:
    /// 1. fresh (checked within `manifest_ttl`, or an `immutable_tags` match) → from the cache,
    ///    no upstream request;
    /// 2. otherwise one `HEAD` with the full Accept; the manifest is fetched (by digest) only if
    ///    the digest is new to us; an unchanged digest only moves the check time (in memory);
    /// 3. upstream failing (connection, timeout, 5xx, 429) → the cached answer with a `Warning`,
    ///    within `max_stale`; a 404 is remembered for `negative_ttl`.
    ///
    /// Whatever the tag resolves to is then matched against the client's Accept: a client that
    /// does not accept the tag's type (a list, for a client wanting one image) is served the
    /// variant stored for its Accept set, fetched once with its own Accept — never the list.
    async fn manifest_by_tag(
        &self,
        route: &Route,
        tag: &Tag,
        accept: &Accept,
    ) -> Result<ManifestAnswer, RegistryError> {
        let cached = self.tag_record(route, tag).await?;
        if self.config.offline {
            return self.offline_tag(route, tag, accept, cached).await;
        }
        if let Some(entry) = cached.as_ref().filter(|e| is_fresh(route, tag, e)) {
            return self.answer_entry(route, tag, accept, entry).await;
        }
        match self.take_turn(route, tag, accept, cached).await? {
            Turn::Answered(answer) => Ok(answer),
            Turn::Mine(turn, cached) => self.revalidate(route, tag, accept, cached, turn).await,
        }
    }

    /// The local tag record; when it is missing or expired, the fleet's if that is newer.
    async fn tag_record(
        &self,
        route: &Route,
        tag: &Tag,
    ) -> Result<Option<TagEntry>, RegistryError> {
        let cached = self.cache.tag(route.host(), &route.repo, tag)?;
        match &self.fleet {
            Some(fleet) if !cached.as_ref().is_some_and(|e| is_fresh(route, tag, e)) => {
                self.adopt_shared_tag(fleet, route, tag, cached).await
            }
            _ => Ok(cached),
        }
    }

    /// Offline: the cached answer whatever its age; nothing else exists.
    async fn offline_tag(
        &self,
        route: &Route,
        tag: &Tag,
        accept: &Accept,
        cached: Option<TagEntry>,
    ) -> Result<ManifestAnswer, RegistryError> {
        let entry = cached.ok_or_else(|| {
            offline_unknown(
                ErrorCode::ManifestUnknown,
                format_args!("{}:{tag}", route.repo),
            )
        })?;
        let d = pick(&entry, accept).ok_or_else(|| {
            offline_unknown(
                ErrorCode::ManifestUnknown,
                format_args!("a variant of {}:{tag} for this Accept header", route.repo),
            )
        })?;
        self.manifest_by_digest(route, &d).await
    }

    /// One upstream check per tag at a time: requests arriving meanwhile wait for it and take
    /// its result (a burst of pulls of an expired tag costs one HEAD, not one each). If that
    /// check fails, the waiters share its failure (stale answer, 404...) rather than each
    /// waiting out a hanging upstream in turn. A waiter whose tag is still not fresh after the
    /// wait (and saw no failure) checks it itself, with the record as it is now.
    async fn take_turn(
        &self,
        route: &Route,
        tag: &Tag,
        accept: &Accept,
        cached: Option<TagEntry>,
    ) -> Result<Turn, RegistryError> {
        let gate = self.revalidations.gate(&negative_key(route, tag));
        if let Ok(turn) = gate.clone().try_lock_owned() {
            return Ok(Turn::Mine(turn, cached));
        }
        let waited_from = Instant::now();
        let turn = gate.lock_owned().await;
        let now = self.cache.tag(route.host(), &route.repo, tag)?;
        if let Some(entry) = now.as_ref().filter(|e| is_fresh(route, tag, e)) {
            return self
                .answer_entry(route, tag, accept, entry)
                .await
                .map(Turn::Answered);
        }
        if let Some((at, err)) = turn.as_ref() {
            if *at >= waited_from {
                return self
                    .upstream_failed(route, tag, accept, now, err.clone())
                    .map(Turn::Answered);
            }
        }
        Ok(Turn::Mine(turn, now))
    }

    /// Asks the upstream about the tag (this request holds the tag's turn): the negative cache
    /// and a 429 back-off first, then a `HEAD`, the manifest if its digest is new, and the tag
    /// record updated. A failure is left in `turn` for the requests waiting on it.
    async fn revalidate(
        &self,
        route: &Route,
        tag: &Tag,
        accept: &Accept,
        cached: Option<TagEntry>,
        mut turn: TurnGuard,
    ) -> Result<ManifestAnswer, RegistryError> {
        if cached.is_none() {
            self.check_negative(route, tag).await?;
        }
        // The upstream said (429 + Retry-After) to come back later: don't ask for cached tags.
        if let (Some(left), Some(_)) = (route.upstream.backing_off(), &cached) {
            let err = UpstreamError::Status {
                host: route.host().to_owned(),
                status: 429,
                code: Some(ErrorCode::TooManyRequests),
                retry_after: Some(left.as_secs().max(1)),
            };
            *turn = Some((Instant::now(), err.clone()));
            return self.upstream_failed(route, tag, accept, cached, err);
        }
        let head = match self.head_tag(route, tag, cached.is_some()).await {
            Ok(h) => h,
            Err(e) => {
                *turn = Some((Instant::now(), e.clone()));
                return self.upstream_failed(route, tag, accept, cached, e);
            }
        };
        let checked = unix_now_ms();
        self.negative.remove(&negative_key(route, tag));
        let (primary, fetched) = match self.tag_manifest(route, tag, &head).await? {
            Ok(got) => got,
            Err(e) => {
                *turn = Some((Instant::now(), e.clone()));
                return self.upstream_failed(route, tag, accept, cached, e);
            }
        };
        let entry = self
            .record_tag(route, tag, cached, &primary, checked)
            .await?;
        let outcome = if fetched {
            Outcome::Miss
        } else {
            Outcome::Revalidated
        };
        self.answer_for_accept(route, tag, accept, entry, primary, outcome)
            .await
    }

    /// An upstream 404 (or equivalent) for this tag remembered within `negative_ttl`, here or
    /// (shared) by another node of the fleet.
    async fn check_negative(&self, route: &Route, tag: &Tag) -> Result<(), RegistryError> {
        let key = negative_key(route, tag);
        let mut remembered = self.negative.get(&key);
        if let (None, Some(fleet)) = (remembered, &self.fleet) {
            if let Some((code, left)) = fleet.negative(route.host(), &route.repo, tag).await {
                self.negative.insert(key, left, code);
                remembered = Some(code);
            }
        }
        match remembered {
            Some(code) => Err(RegistryError::new(
                code,
                format!(
                    "{}:{tag} was not found on upstream {} moments ago (remembered for negative_ttl)",
                    route.repo,
                    route.host()
                ),
            )),
            None => Ok(()),
        }
    }

    /// Revalidates (or resolves for the first time) with a HEAD: free on Docker Hub. When we
    /// have something to fall back on (`have_cached`), don't wait for a hanging upstream for
    /// long.
    async fn head_tag(
        &self,
        route: &Route,
        tag: &Tag,
        have_cached: bool,
    ) -> Result<ManifestHead, UpstreamError> {
        let config = &route.upstream.config;
        let accept_all = media::upstream_manifest_accept();
        let head_call = route
            .upstream
            .head_manifest(&route.repo, tag.as_str(), &accept_all);
        if !have_cached {
            return head_call.await;
        }
        match tokio::time::timeout(config.revalidate_timeout, head_call).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Unreachable {
                host: route.host().to_owned(),
                message: format!(
                    "no answer within revalidate_timeout ({:?})",
                    config.revalidate_timeout
                ),
            }),
        }
    }

    /// The tag's full-Accept manifest: held already, or fetched by digest (or by tag when the
    /// upstream sent no digest) and stored. The flag says whether it was fetched; the inner
    /// error is the upstream's, the outer one the cache's.
    async fn tag_manifest(
        &self,
        route: &Route,
        tag: &Tag,
        head: &ManifestHead,
    ) -> Result<Result<(Arc<StoredManifest>, bool), UpstreamError>, RegistryError> {
        if let Some(d) = &head.digest {
            if let Some(m) = self.cache.manifest(d)? {
                return Ok(Ok((m, false)));
            }
        }
        let reference = head.digest.as_ref().map(Digest::to_string);
        let got = route
            .upstream
            .get_manifest(
                &route.repo,
                reference.as_deref().unwrap_or(tag.as_str()),
                head.digest.as_ref(),
                &media::upstream_manifest_accept(),
            )
            .await;
        match got {
            Ok(f) => {
                let m = self
                    .store_manifest(route, f.digest, f.media_type, f.bytes)
                    .await?;
                Ok(Ok((m, true)))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// Records what the upstream just confirmed: an unchanged digest only moves the check time
    /// (in memory, persisted in batches); a new or moved tag gets a new record (its variants
    /// dropped), written durably. Either is shared with the fleet.
    async fn record_tag(
        &self,
        route: &Route,
        tag: &Tag,
        cached: Option<TagEntry>,
        primary: &StoredManifest,
        checked: u64,
    ) -> Result<TagEntry, RegistryError> {
        let host = route.host();
        let digest = primary.digest.to_string();
        let entry = match cached {
            Some(mut e) if e.digest == digest => {
                self.cache
                    .index()
                    .tag_checked(host, &route.repo, tag, checked)
                    .map_err(crate::cache::CacheError::from)?;
                e.checked = checked;
                e
            }
            previous => {
                let e = TagEntry {
                    digest,
                    media_type: primary.media_type.clone(),
                    checked,
                    variants: Default::default(),
                };
                if let Some(p) = previous {
                    tracing::info!(upstream = %host, repo = %route.repo, %tag, from = %p.digest, to = %e.digest, "tag moved upstream");
                }
                self.cache.put_tag(host, &route.repo, tag, &e)?;
                self.cache.touch_repo(host, &route.repo)?;
                self.cache.index().durable().await;
                e
            }
        };
        if let Some(fleet) = &self.fleet {
            fleet.put_tag(host, &route.repo, tag, &entry);
        }
        Ok(entry)
    }

    /// The manifest of a just-revalidated tag for this client's Accept: the tag's own one, the
    /// variant held for its Accept set, or a variant fetched now.
    async fn answer_for_accept(
        &self,
        route: &Route,
        tag: &Tag,
        accept: &Accept,
        entry: TagEntry,
        primary: Arc<StoredManifest>,
        outcome: Outcome,
    ) -> Result<ManifestAnswer, RegistryError> {
        match pick(&entry, accept) {
            Some(d) if d == primary.digest => Ok(answer(primary, outcome)),
            Some(d) => {
                let (m, fetched) = self.manifest_or_fetch(route, &d).await?;
                Ok(answer(m, if fetched { Outcome::Miss } else { outcome }))
            }
            None => self.fetch_variant(route, tag, accept, entry).await,
        }
    }

    /// Answers a tag from a record trusted as it is (fresh): its manifest for this client's
    /// Accept, or the variant fetched for it.
    async fn answer_entry(
        &self,
        route: &Route,
        tag: &Tag,
        accept: &Accept,
        entry: &TagEntry,
    ) -> Result<ManifestAnswer, RegistryError> {
        match pick(entry, accept) {
            Some(d) => self.manifest_by_digest(route, &d).await,
            None => self.fetch_variant(route, tag, accept, entry.clone()).await,
        }
    }

    /// The client does not accept what the tag resolves to (e.g. a list): ask upstream for the
    /// tag with the client's own Accept, refuse anything it still does not accept, and remember
    /// the answer as the tag's variant for that Accept set (valid until the tag moves).
    async fn fetch_variant(
        &self,
        route: &Route,
        tag: &Tag,
        accept: &Accept,
        mut entry: TagEntry,
    ) -> Result<ManifestAnswer, RegistryError> {
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
        let m = self
            .store_manifest(route, fetched.digest, fetched.media_type, fetched.bytes)
            .await?;
        entry.variants.insert(
            accept.variant_key(),
            TagVariant {
                digest: m.digest.to_string(),
                media_type: m.media_type.clone(),
            },
        );
        self.cache.put_tag(route.host(), &route.repo, tag, &entry)?;
        self.cache.index().durable().await;
        if let Some(fleet) = &self.fleet {
            fleet.put_tag(route.host(), &route.repo, tag, &entry);
        }
        Ok(answer(m, Outcome::Miss))
    }

    /// Revalidating (or resolving) a tag failed. Unavailable upstream (connection, timeout,
    /// 5xx, 429) → the cached answer, marked stale, while within `max_stale`. A 404 is
    /// remembered for `negative_ttl` and drops the tag; so is (without dropping the tag) a 401
    /// even with a fresh token. Anything else is the client's error.
    fn upstream_failed(
        &self,
        route: &Route,
        tag: &Tag,
        accept: &Accept,
        cached: Option<TagEntry>,
        err: UpstreamError,
    ) -> Result<ManifestAnswer, RegistryError> {
        let config = &route.upstream.config;
        let host = route.host();
        let client_error = err.to_registry_error(ErrorCode::ManifestUnknown);
        if err.is_not_found() && !config.negative_ttl.is_zero() {
            // A 404, or Docker Hub's 401-with-a-fresh-token for a repository it does not have:
            // both would cost the same upstream requests (and rate limit) again.
            self.negative.insert(
                negative_key(route, tag),
                config.negative_ttl,
                client_error.code,
            );
            if let Some(fleet) = &self.fleet {
                fleet.put_negative(
                    host,
                    &route.repo,
                    tag,
                    config.negative_ttl,
                    client_error.code,
                );
            }
        }
        if err.status() == Some(404) && cached.is_some() {
            tracing::info!(upstream = %host, repo = %route.repo, %tag, "tag gone upstream; forgetting it");
            self.cache
                .index()
                .remove_tag(host, &route.repo, tag)
                .map_err(crate::cache::CacheError::from)?;
            if let Some(fleet) = &self.fleet {
                fleet.remove_tag(host, &route.repo, tag);
            }
        }
        if !err.is_unavailable() {
            return Err(client_error);
        }
        let Some(entry) = cached else {
            return Err(client_error);
        };
        let age = Duration::from_millis(unix_now_ms().saturating_sub(entry.checked));
        if config.max_stale.is_some_and(|max| age > max) {
            tracing::warn!(upstream = %host, repo = %route.repo, %tag, age_secs = age.as_secs(), error = %err, "upstream unavailable and the cached tag is older than max_stale");
            return Err(client_error);
        }
        let manifest = match pick(&entry, accept) {
            Some(d) => self.cache.manifest(&d)?,
            None => None,
        };
        let Some(m) = manifest else {
            return Err(client_error);
        };
        // The stale-serve event (metrics can count `stowage::stale`).
        tracing::warn!(target: "stowage::stale", upstream = %host, repo = %route.repo, %tag, age_secs = age.as_secs(), error = %err, "upstream unavailable; serving the cached tag");
        crate::metrics::metrics().stale(host);
        let warning = format!(
            "stale: {}:{tag} could not be revalidated ({}); last checked {}s ago",
            route.repo,
            err,
            age.as_secs()
        );
        Ok(ManifestAnswer {
            manifest: m,
            outcome: Outcome::Stale,
            warning: Some(header_safe(&warning, 512)),
        })
    }

    async fn store_manifest(
        &self,
        route: &Route,
        digest: Digest,
        media_type: String,
        bytes: Bytes,
    ) -> Result<Arc<StoredManifest>, RegistryError> {
        self.signatures.admit(route, &digest, &bytes).await?;
        let m = self.cache.put_manifest(StoredManifest {
            digest,
            media_type,
            bytes,
        })?;
        self.cache.touch_repo(route.host(), &route.repo)?;
        self.cache.index().durable().await;
        if let Some(fleet) = &self.fleet {
            fleet.put_manifest(&m);
        }
        Ok(m)
    }

    /// A manifest from the fleet's shared store (verified against its digest), kept locally.
    async fn shared_manifest(
        &self,
        route: &Route,
        digest: &Digest,
    ) -> Result<Option<Arc<StoredManifest>>, RegistryError> {
        let Some(fleet) = &self.fleet else {
            return Ok(None);
        };
        let Some(m) = fleet.manifest(digest).await else {
            return Ok(None);
        };
        let m = self.cache.put_manifest(m)?;
        self.cache.touch_repo(route.host(), &route.repo)?;
        self.cache.index().durable().await;
        Ok(Some(m))
    }

    /// The local tag record is missing or expired: take the fleet's record if it is newer
    /// (another node confirmed the tag upstream more recently). Returns the record to go on
    /// with: the adopted one, or the local one unchanged.
    async fn adopt_shared_tag(
        &self,
        fleet: &Arc<Fleet>,
        route: &Route,
        tag: &Tag,
        local: Option<TagEntry>,
    ) -> Result<Option<TagEntry>, RegistryError> {
        let host = route.host();
        let Some(mut shared) = fleet.tag(host, &route.repo, tag).await else {
            return Ok(local);
        };
        if local.as_ref().is_some_and(|l| l.checked >= shared.checked) {
            return Ok(local);
        }
        // Keep variants this node fetched for the same digest, add the fleet's.
        if let Some(l) = &local {
            if l.digest == shared.digest {
                for (k, v) in &l.variants {
                    shared
                        .variants
                        .entry(k.clone())
                        .or_insert_with(|| v.clone());
                }
            }
        }
        crate::metrics::metrics().object_store_hit("tag");
        self.cache.put_tag(host, &route.repo, tag, &shared)?;
        self.cache.touch_repo(host, &route.repo)?;
        Ok(Some(shared))
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
        let shared_size = match &self.fleet {
            Some(fleet) if head || self.config.offline => fleet.blob_size(digest).await,
            _ => None,
        };
        if head {
            if let Some(size) = shared_size {
                return Ok(BlobAnswer::Head { size: Some(size) });
            }
            // Being filled and its source already said the size: no need to ask upstream.
            if let Some(size) = self
                .cache
                .fill_in_flight(digest)
                .and_then(|fill| fill.state().total)
            {
                return Ok(BlobAnswer::Head { size: Some(size) });
            }
        }
        if self.config.offline && shared_size.is_none() {
            return Err(offline_unknown(
                ErrorCode::BlobUnknown,
                format_args!("blob {digest}"),
            ));
        }
        if head {
            let size = route
                .upstream
                .head_blob(&route.repo, digest)
                .await
                .map_err(|e| e.to_registry_error(ErrorCode::BlobUnknown))?;
            return Ok(BlobAnswer::Head { size });
        }
        let (fill, joined) = self.start_fill(route, digest)?;
        crate::metrics::metrics()
            .fill_joins
            .inc_by(u64::from(joined));
        let total = fill.started().await?;
        Ok(BlobAnswer::Filling {
            fill,
            total,
            joined,
        })
    }

    /// Starts a fill of `digest` or joins the one in flight (the flag says which). Its source is
    /// the upstream; with a fleet, the shared store first (and the upstream only when online),
    /// and the blob is shared with the fleet once committed.
    fn start_fill(
        &self,
        route: &Route,
        digest: &Digest,
    ) -> Result<(Arc<Fill>, bool), RegistryError> {
        let key = (route.host().to_owned(), route.repo.to_string());
        let upstream = || -> Box<dyn BlobSource> {
            self.cache.activity().fill_for(digest.hex(), &key);
            Box::new(UpstreamSource {
                upstream: route.upstream.clone(),
                repo: route.repo.clone(),
                digest: digest.clone(),
                tally: self.cache.activity().tally(&key),
            })
        };
        match &self.fleet {
            None => {
                let (fill, joined) = self.cache.fill(digest, upstream)?;
                if !joined {
                    crate::metrics::metrics().fill_source("upstream");
                }
                Ok((fill, joined))
            }
            Some(fleet) => {
                let mut tiered = None;
                let offline = self.config.offline;
                let (fill, joined) = self.cache.fill(digest, || {
                    let (source, mode) = fleet.source(digest, (!offline).then(upstream));
                    tiered = Some(mode);
                    Box::new(source)
                })?;
                if let Some(mode) = tiered {
                    fleet.share_after_commit(
                        fill.clone(),
                        mode,
                        self.cache.budget().clone(),
                        self.cache.blob_path(digest),
                    );
                }
                Ok((fill, joined))
            }
        }
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
        if self.config.offline {
            return self.cached_tags(route, client_name, page);
        }
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

    /// Offline tag list: the tags the cache holds for the repository.
    fn cached_tags(
        &self,
        route: &Route,
        client_name: &RepoName,
        page: &TagPage,
    ) -> Result<TagList, RegistryError> {
        let repo = route.repo.to_string();
        let mut tags: Vec<String> = self
            .cache
            .index()
            .tags()
            .map_err(crate::cache::CacheError::from)?
            .into_iter()
            .filter(|t| t.upstream == route.host() && t.repo == repo)
            .map(|t| t.tag)
            .collect();
        if tags.is_empty() {
            return Err(offline_unknown(
                ErrorCode::NameUnknown,
                format_args!("repository {}", route.repo),
            ));
        }
        let (tags, truncated) = window_tags(&mut tags, page);
        let next = truncated.then(|| tags.last().cloned()).flatten();
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

/// One page of `tags` (sorted and deduplicated here): those after `last`, at most `n`, and
/// whether more remain. Also the window of `_catalog` and of hosted tag lists.
pub fn window_tags(tags: &mut Vec<String>, page: &TagPage) -> (Vec<String>, bool) {
    tags.sort();
    tags.dedup();
    window(tags, |t| t.as_str(), page)
}

/// One page of `items`, sorted by `key` and each key once: those whose key is after `last`,
/// at most `n`, and whether more remain. The one window of every paged list (tags, the
/// catalog, referrers by digest).
pub fn window<T: Clone>(items: &[T], key: impl Fn(&T) -> &str, page: &TagPage) -> (Vec<T>, bool) {
    let start = match &page.last {
        Some(l) => items.partition_point(|t| key(t) <= l.as_str()),
        None => 0,
    };
    let rest = &items[start..];
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
