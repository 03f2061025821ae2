//! The fleet tier: several stowage nodes sharing one [`BlobStore`] (an S3 / GCS / Azure bucket
//! or a shared directory, `storage.backend`), so that each blob crosses the internet once for
//! the whole fleet.
//!
//! Each node keeps its local cache as a bounded hot tier in front of the shared store:
//!
//! - **blobs**: local hit → serve. Local miss → one fill (single flight, as always) whose source
//!   is a [`TieredSource`]: the shared object if it exists, else the upstream. Every fill is
//!   hashed and verified locally whatever its source, so a damaged shared object never reaches a
//!   client as good bytes. A blob that came from the upstream is uploaded to the shared store
//!   once it is committed (verified) locally: only verified content is ever shared, and an
//!   interrupted upload leaves no object (see [`BlobStore::put_file`]).
//! - **fill leases**: before going upstream, a node claims `leases/sha256/<hex>` with a
//!   conditional create. A node that finds another's live claim does not go upstream: when the
//!   claim names its node (`storage.advertise_url` and a per-lease token, [`peer`]) it streams
//!   the blob from that node's fill in progress, through its own fill (so verified here too);
//!   otherwise, or when that node fails it, it waits (up to the claim's expiry,
//!   `storage.fill_lease_ttl`, or until the claim is released) for the object to appear and
//!   reads it from the store, resuming at the bytes it holds. The lease is best effort: stores
//!   without conditional create (Garage) make it a no-op, and the load balancer's consistent
//!   hashing (`docs/fleet.md`) is the first line of cross-node dedup.
//! - **manifests** are shared by digest (`manifests/sha256/<hex>`, checked against the digest on
//!   the way back in) and **tags** as their records (`tags/<upstream>/<repo>/<tag>`: digest, type,
//!   the time upstream last confirmed them, Accept variants). A tag confirmed by node A within
//!   `manifest_ttl` is a hit on node B without an upstream request.
//! - **negative answers**: an upstream's "no such tag" (404, or Docker Hub's 401 for a missing
//!   repository) is shared as `negative/<upstream>/<repo>/<tag>` with its expiry (`negative_ttl`
//!   from when the node was told): a node that misses the tag locally reads it before asking the
//!   upstream, and answers the same until it expires.
//! - **losing the store**: every store call is bounded (`storage.object_store_timeout`); a
//!   failure marks the store down (`stowage_object_store_up`, `/readyz`), counts it, and the node
//!   carries on with its local tier and the upstream. Shared writes (manifests, tags, uploads)
//!   happen in the background and never delay or fail a client's request.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::task::TaskTracker;

use crate::cache::budget::Budget;
use crate::cache::index::unix_now_ms;
use crate::cache::{BlobSource, Fill, StoredManifest, TagEntry};
use crate::config::SharedStoreConfig;
use crate::metrics::metrics;
use crate::oci::{Digest, ErrorCode, RegistryError, RepoName, Tag};
use crate::store::{BlobStore, Created, StoreError};
use crate::stream::BlobBody;

pub mod peer;

pub use peer::PEER_PATH;
use peer::{PeerClient, PeerLease};

/// How often a node waiting on another node's fill lease looks for the finished object.
const LEASE_POLL: Duration = Duration::from_millis(500);

/// After a failed call, blob fills skip the store (straight to the upstream) for this long, so
/// that a store that hangs costs one timeout now and then, not one per fill.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A shared manifest object: the exact bytes and the media type they were served with.
#[derive(Serialize, Deserialize)]
struct SharedManifest {
    media_type: String,
    /// Base64 of the manifest's bytes (byte-exact: its digest is checked on read).
    bytes: String,
}

/// A node's claim to fill one blob from the upstream.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Lease {
    node: String,
    /// Unix milliseconds after which the claim no longer holds anyone off.
    expires: u64,
    /// Where the filler streams the blob to waiting nodes, with this lease's token (only when
    /// the filler has `storage.advertise_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer: Option<PeerLease>,
}

/// What a claim attempt found.
enum Claim {
    /// Ours: go upstream, then release.
    Ours,
    /// Another node is filling.
    Theirs(Lease),
    /// No lease possible (store without conditional create, or store trouble): go upstream.
    None,
}

/// The shared store with its health, as one node sees it.
pub struct Fleet {
    store: Arc<dyn BlobStore>,
    describe: String,
    node: String,
    lease_ttl: Duration,
    timeout: Duration,
    up: AtomicBool,
    /// Unix ms of the last failed call.
    failed_at: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Background writes (uploads, manifests, tags, lease releases), awaited by [`Fleet::settle`].
    tasks: TaskTracker,
    /// Blobs being uploaded by this node (so two commits never upload the same blob twice).
    uploading: Mutex<HashSet<String>>,
    /// `storage.advertise_url` (`None`: this node's leases name no URL).
    advertise: Option<String>,
    /// Reads the nodes that do advertise theirs.
    peers: PeerClient,
    /// The tokens of the fill leases this node holds, by blob hex: what its peer endpoint
    /// accepts. An entry lives from the claim to the lease's release.
    held: Mutex<HashMap<String, String>>,
}

fn blob_key(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

fn manifest_key(digest: &Digest) -> String {
    format!("manifests/sha256/{}", digest.hex())
}

fn lease_key(digest: &Digest) -> String {
    format!("leases/sha256/{}", digest.hex())
}

/// `tags/<upstream>/<repo>/<tag>`: repository names and tags are validated at the edge
/// (lowercase path components, `[A-Za-z0-9_.-]` tags); an upstream host may carry a port.
fn tag_key(upstream: &str, repo: &RepoName, tag: &Tag) -> String {
    format!("tags/{}/{repo}/{tag}", upstream.replace(':', "_"))
}

/// `negative/<upstream>/<repo>/<tag>`: an upstream's "no such tag", shared with its expiry.
fn negative_key(upstream: &str, repo: &RepoName, tag: &Tag) -> String {
    format!("negative/{}/{repo}/{tag}", upstream.replace(':', "_"))
}

/// A shared negative answer: the code to answer with, until when.
#[derive(Serialize, Deserialize)]
struct SharedNegative {
    /// Unix milliseconds after which the upstream is asked again.
    expires: u64,
    /// The OCI error code the node answered with (`MANIFEST_UNKNOWN`, `NAME_UNKNOWN`,
    /// `UNAUTHORIZED`).
    code: String,
}

/// The codes a negative answer may carry; anything else reads as `MANIFEST_UNKNOWN`.
fn negative_code(code: &str) -> ErrorCode {
    [ErrorCode::NameUnknown, ErrorCode::Unauthorized]
        .into_iter()
        .find(|c| c.as_str() == code)
        .unwrap_or(ErrorCode::ManifestUnknown)
}

impl Fleet {
    /// The fleet tier over `store`; with `advertise_url`, this node streams the blobs it fills
    /// to the nodes waiting on its leases, and reads from the nodes that advertise theirs.
    pub fn new(
        store: Arc<dyn BlobStore>,
        shared: &SharedStoreConfig,
        advertise_url: Option<&str>,
    ) -> Result<Fleet, String> {
        let (lease_ttl, timeout) = (shared.fill_lease_ttl, shared.timeout);
        let peers = PeerClient::new(timeout)?;
        let describe = store.describe();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "node".to_owned());
        metrics()
            .object_store_up
            .with_label_values(&[describe.as_str()])
            .set(1);
        for kind in ["blob", "manifest", "tag", "negative"] {
            metrics().object_store_hits.with_label_values(&[kind]);
        }
        Ok(Fleet {
            store,
            describe,
            node: format!(
                "{host}-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ),
            lease_ttl,
            timeout,
            up: AtomicBool::new(true),
            failed_at: AtomicU64::new(0),
            last_error: Mutex::new(None),
            tasks: TaskTracker::new(),
            uploading: Mutex::new(HashSet::new()),
            advertise: advertise_url.map(str::to_owned),
            peers,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `authorization` (the request's header) carries the token of this node's live
    /// lease on `digest`: `401` without a bearer token, `403` with a wrong one or when this
    /// node holds no lease on the blob.
    pub fn authorize_peer(
        &self,
        digest: &Digest,
        authorization: Option<&str>,
    ) -> Result<(), RegistryError> {
        let offered = authorization
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                RegistryError::new(
                    ErrorCode::Unauthorized,
                    "a fleet peer request needs the fill lease's token",
                )
            })?;
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.get(digest.hex()) {
            Some(token) if constant_time_eq(token.as_bytes(), offered.as_bytes()) => Ok(()),
            _ => Err(RegistryError::new(
                ErrorCode::Denied,
                format!("this node holds no fill lease on {digest} with that token"),
            )),
        }
    }

    /// Where the shared store is (no credentials).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The shared store itself, for the hosted repositories that keep their content in it.
    pub fn store(&self) -> Arc<dyn BlobStore> {
        self.store.clone()
    }

    /// The bound on one small store call (`storage.object_store_timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// This node's name in fill leases.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the last store call succeeded, and the last error seen.
    pub fn status(&self) -> (bool, Option<String>) {
        let err = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (self.up.load(Ordering::Relaxed), err)
    }

    /// Records the outcome of one store call: health, the up gauge, the request counter.
    fn record<T>(&self, op: &'static str, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => {
                metrics().object_store_request(op, "ok");
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(store = %self.describe, "object store reachable again");
                    metrics()
                        .object_store_up
                        .with_label_values(&[self.describe.as_str()])
                        .set(1);
                }
            }
            Err(e) => {
                metrics().object_store_request(op, "error");
                self.failed_at.store(unix_now_ms(), Ordering::Relaxed);
                // A refusal (credentials, permissions) means the store is there but unusable
                // for us: as much a fault for the fleet as an outage.
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(store = %self.describe, op, error = %e, "object store failing; serving from the local tier and the upstream");
                    metrics()
                        .object_store_up
                        .with_label_values(&[self.describe.as_str()])
                        .set(0);
                }
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
        r
    }

    /// Whether fills should try the store: it answered last time, or the last failure is
    /// `RETRY_AFTER` old (then one call finds out).
    fn worth_trying(&self) -> bool {
        self.up.load(Ordering::Relaxed)
            || unix_now_ms().saturating_sub(self.failed_at.load(Ordering::Relaxed))
                >= RETRY_AFTER.as_millis() as u64
    }

    /// Waits (up to `limit`) for background writes to the store — uploads of freshly filled
    /// blobs, shared manifests and tags — to finish: at shutdown, and before `prefetch` exits.
    pub async fn settle(&self, limit: Duration) {
        self.tasks.close();
        if tokio::time::timeout(limit, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pending = self.tasks.len(),
                "gave up waiting for uploads to the shared store"
            );
        }
    }

    /// A live probe for `/readyz`: one bounded `HEAD`.
    pub async fn probe(&self) -> Result<(), String> {
        let r = match tokio::time::timeout(self.timeout, self.store.head("health/probe")).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within object_store_timeout ({:?})",
                self.timeout
            ))),
        };
        self.record("head", r).map_err(|e| e.to_string())
    }

    /// The size of the shared copy of a blob, if there is one (store trouble: `None`).
    pub async fn blob_size(&self, digest: &Digest) -> Option<u64> {
        if !self.worth_trying() {
            return None;
        }
        let r = self.store.head(&blob_key(digest)).await;
        self.record("head", r).ok().flatten()
    }

    /// A fill source for `digest`: the shared object if present, else `upstream` (claiming
    /// the fill first; `None` when offline: the shared object or nothing). After the fill
    /// commits, [`Fleet::share_after_commit`] uploads what came from the upstream.
    pub fn source(
        self: &Arc<Self>,
        digest: &Digest,
        upstream: Option<Box<dyn BlobSource>>,
    ) -> (TieredSource, Arc<Mutex<Mode>>) {
        let mode = Arc::new(Mutex::new(Mode::Undecided));
        (
            TieredSource {
                fleet: self.clone(),
                digest: digest.clone(),
                upstream,
                mode: mode.clone(),
                peer: Mutex::new(None),
            },
            mode,
        )
    }

    /// Waits for `fill` to end; if it committed bytes from the upstream, uploads the verified
    /// blob file to the shared store (holding a lease on it so eviction leaves it alone), then
    /// releases this node's fill lease. Runs in the background.
    pub fn share_after_commit(
        self: &Arc<Self>,
        fill: Arc<Fill>,
        mode: Arc<Mutex<Mode>>,
        budget: Arc<Budget>,
        path: PathBuf,
    ) {
        let fleet = self.clone();
        self.tasks.spawn(async move {
            let digest = fill.digest.clone();
            let outcome = fill.settled().await;
            drop(fill);
            let mode = *mode.lock().unwrap_or_else(|p| p.into_inner());
            if let (Err(e), Mode::Shared) = (&outcome, mode) {
                // The shared copy hashed wrong (or was the wrong size): remove it, so that the
                // next request fills from the upstream and shares a verified copy.
                if matches!(
                    crate::metrics::FillFailure::of(e),
                    crate::metrics::FillFailure::DigestMismatch
                        | crate::metrics::FillFailure::SizeMismatch
                ) {
                    tracing::warn!(%digest, error = %e, "shared blob object is damaged; removing it");
                    let r = fleet.store.delete(&blob_key(&digest)).await;
                    let _ = fleet.record("delete", r);
                }
            }
            let (from_upstream, leased) = match mode {
                Mode::Upstream { leased } => (true, leased),
                _ => (false, false),
            };
            if outcome.is_ok() && from_upstream {
                fleet.upload(&digest, &budget, &path).await;
            }
            if leased {
                let r = fleet.store.delete(&lease_key(&digest)).await;
                let _ = fleet.record("delete", r);
                fleet
                    .held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(digest.hex());
            }
        });
    }

    async fn upload(&self, digest: &Digest, budget: &Arc<Budget>, path: &std::path::Path) {
        let hex = digest.hex().to_owned();
        if !self
            .uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hex.clone())
        {
            return;
        }
        let _lease = budget.lease(&hex);
        // Evicted between the commit and the lease: nothing to share.
        if let Ok(meta) = tokio::fs::metadata(path).await {
            let started = std::time::Instant::now();
            let r = self.store.put_file(&blob_key(digest), path).await;
            match self.record("put", r) {
                Ok(()) => {
                    metrics()
                        .object_store_bytes
                        .with_label_values(&["write"])
                        .inc_by(meta.len());
                    tracing::info!(%digest, store = %self.describe, secs = started.elapsed().as_secs_f64(), "blob shared with the fleet");
                }
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "could not share the blob with the fleet")
                }
            }
        }
        self.uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hex);
    }

    /// Tries to claim the upstream fill of `digest` for this node.
    async fn claim(&self, digest: &Digest) -> Claim {
        let lease = Lease {
            node: self.node.clone(),
            expires: unix_now_ms() + self.lease_ttl.as_millis() as u64,
            peer: self.advertise.as_deref().map(PeerLease::fresh),
        };
        let Ok(body) = serde_json::to_vec(&lease) else {
            return Claim::None;
        };
        let key = lease_key(digest);
        // The token is accepted from before the lease is visible, so no follower is refused.
        self.hold(digest, &lease);
        let r = self.store.create(&key, Bytes::from(body.clone())).await;
        let claim = match self.record("create", r) {
            Ok(Created::Created) => Claim::Ours,
            Ok(Created::Unsupported) | Err(_) => Claim::None,
            Ok(Created::Exists) => match self.current_lease(digest).await {
                Some(l) if l.expires > unix_now_ms() && l.node != self.node => Claim::Theirs(l),
                // Expired (its holder died or is slow) or unreadable: take it over.
                _ => {
                    let r = self.store.put_bytes(&key, Bytes::from(body)).await;
                    match self.record("put", r) {
                        Ok(()) => Claim::Ours,
                        Err(_) => Claim::None,
                    }
                }
            },
        };
        if !matches!(claim, Claim::Ours) {
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(digest.hex());
        }
        claim
    }

    /// Remembers the token of a lease this node is about to hold.
    fn hold(&self, digest: &Digest, lease: &Lease) {
        if let Some(p) = &lease.peer {
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(digest.hex().to_owned(), p.token.clone());
        }
    }

    /// The lease on `digest` as the store holds it now (none, unreadable or store trouble:
    /// `None`).
    async fn current_lease(&self, digest: &Digest) -> Option<Lease> {
        let r = self.store.get_bytes(&lease_key(digest)).await;
        self.record("get", r)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
    }

    /// A shared manifest by digest, verified against it (store trouble or a bad object: `None`).
    pub async fn manifest(&self, digest: &Digest) -> Option<StoredManifest> {
        if !self.worth_trying() {
            return None;
        }
        let r = self.store.get_bytes(&manifest_key(digest)).await;
        let bytes = self.record("get", r).ok().flatten()?;
        let shared: SharedManifest = serde_json::from_slice(&bytes).ok()?;
        let body = base64::engine::general_purpose::STANDARD
            .decode(shared.bytes)
            .ok()?;
        if Digest::of(&body) != *digest {
            tracing::warn!(%digest, "shared manifest object does not match its digest; ignored");
            return None;
        }
        metrics().object_store_hit("manifest");
        Some(StoredManifest {
            digest: digest.clone(),
            media_type: shared.media_type,
            bytes: Bytes::from(body),
        })
    }

    /// Shares a manifest (in the background).
    pub fn put_manifest(self: &Arc<Self>, m: &StoredManifest) {
        let shared = SharedManifest {
            media_type: m.media_type.clone(),
            bytes: base64::engine::general_purpose::STANDARD.encode(&m.bytes),
        };
        let Ok(body) = serde_json::to_vec(&shared) else {
            return;
        };
        let key = manifest_key(&m.digest);
        let fleet = self.clone();
        self.tasks.spawn(async move {
            let r = fleet.store.put_bytes(&key, Bytes::from(body)).await;
            let _ = fleet.record("put", r);
        });
    }

    /// A tag record another node (or this one) shared.
    pub async fn tag(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
        if !self.worth_trying() {
            return None;
        }
        let r = self.store.get_bytes(&tag_key(upstream, repo, tag)).await;
        let bytes = self.record("get", r).ok().flatten()?;
        let entry: TagEntry = serde_json::from_slice(&bytes).ok()?;
        entry.digest.parse::<Digest>().ok()?;
        Some(entry)
    }

    /// Shares a tag record (in the background).
    pub fn put_tag(self: &Arc<Self>, upstream: &str, repo: &RepoName, tag: &Tag, entry: &TagEntry) {
        let Ok(body) = serde_json::to_vec(entry) else {
            return;
        };
        let key = tag_key(upstream, repo, tag);
        let fleet = self.clone();
        self.tasks.spawn(async move {
            let r = fleet.store.put_bytes(&key, Bytes::from(body)).await;
            let _ = fleet.record("put", r);
        });
    }

    /// An upstream's "no such tag" another node (or this one) shared, while it lasts: the code
    /// to answer and how long it still holds. Store trouble: `None` (ask the upstream).
    pub async fn negative(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> Option<(ErrorCode, Duration)> {
        if !self.worth_trying() {
            return None;
        }
        let r = self
            .store
            .get_bytes(&negative_key(upstream, repo, tag))
            .await;
        let bytes = self.record("get", r).ok().flatten()?;
        let shared: SharedNegative = serde_json::from_slice(&bytes).ok()?;
        let left = shared
            .expires
            .checked_sub(unix_now_ms())
            .filter(|&ms| ms > 0)?;
        metrics().object_store_hit("negative");
        Some((negative_code(&shared.code), Duration::from_millis(left)))
    }

    /// Shares an upstream's "no such tag" until `ttl` from now (in the background).
    pub fn put_negative(
        self: &Arc<Self>,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        ttl: Duration,
        code: ErrorCode,
    ) {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let shared = SharedNegative {
            expires: unix_now_ms().saturating_add(ttl_ms),
            code: code.as_str().to_owned(),
        };
        let Ok(body) = serde_json::to_vec(&shared) else {
            return;
        };
        let key = negative_key(upstream, repo, tag);
        let fleet = self.clone();
        self.tasks.spawn(async move {
            let r = fleet.store.put_bytes(&key, Bytes::from(body)).await;
            let _ = fleet.record("put", r);
        });
    }

    /// Forgets a shared tag (gone upstream).
    pub fn remove_tag(self: &Arc<Self>, upstream: &str, repo: &RepoName, tag: &Tag) {
        let key = tag_key(upstream, repo, tag);
        let fleet = self.clone();
        self.tasks.spawn(async move {
            let r = fleet.store.delete(&key).await;
            let _ = fleet.record("delete", r);
        });
    }
}

/// Where a tiered fill is reading from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Not opened yet.
    Undecided,
    /// The shared store's object.
    Shared,
    /// The upstream; `leased` if this node holds the fill lease.
    Upstream { leased: bool },
    /// The node holding the fill lease, streaming its fill in progress.
    Peer,
}

/// A fill source that reads the shared object when the fleet has it and the upstream
/// otherwise. A shared read that breaks resumes from the upstream at the same offset.
pub struct TieredSource {
    fleet: Arc<Fleet>,
    digest: Digest,
    upstream: Option<Box<dyn BlobSource>>,
    mode: Arc<Mutex<Mode>>,
    /// The filler read from in [`Mode::Peer`].
    peer: Mutex<Option<(PeerLease, u64)>>,
}

impl TieredSource {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = m;
    }

    /// First open: the shared object, else a claim on the upstream fill; another node's live
    /// claim is streamed from that node when it advertises itself (unless it is `failed`, a
    /// peer that just failed us), else waited out while polling for its result.
    async fn decide(&self, failed: Option<&str>) -> Mode {
        let fleet = &self.fleet;
        if self.upstream.is_none() {
            return Mode::Shared;
        }
        if !fleet.worth_trying() {
            metrics().object_store_fallbacks.inc();
            return Mode::Upstream { leased: false };
        }
        loop {
            if fleet.blob_size(&self.digest).await.is_some() {
                return Mode::Shared;
            }
            if !fleet.up.load(Ordering::Relaxed) {
                metrics().object_store_fallbacks.inc();
                return Mode::Upstream { leased: false };
            }
            let lease = match fleet.claim(&self.digest).await {
                Claim::Ours => return Mode::Upstream { leased: true },
                Claim::None => return Mode::Upstream { leased: false },
                Claim::Theirs(lease) => lease,
            };
            match &lease.peer {
                Some(p) if failed != Some(p.url.as_str()) => {
                    tracing::info!(digest = %self.digest, node = %lease.node, peer = %p.url, "another node is filling this blob; streaming it from that node");
                    *self.peer.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((p.clone(), lease.expires));
                    return Mode::Peer;
                }
                _ => {}
            }
            tracing::info!(digest = %self.digest, node = %lease.node, "another node is filling this blob; waiting for it to share it");
            if let Some(mode) = self.wait_out(&lease).await {
                return mode;
            }
        }
    }

    /// Waits while `lease` holds, polling for the shared object: `Shared` once it appears, the
    /// upstream when the lease expires or the store fails, `None` when the lease was released
    /// or replaced (decide again).
    async fn wait_out(&self, lease: &Lease) -> Option<Mode> {
        let fleet = &self.fleet;
        while unix_now_ms() < lease.expires {
            tokio::time::sleep(LEASE_POLL).await;
            if fleet.blob_size(&self.digest).await.is_some() {
                return Some(Mode::Shared);
            }
            if !fleet.up.load(Ordering::Relaxed) {
                metrics().object_store_fallbacks.inc();
                return Some(Mode::Upstream { leased: false });
            }
            if fleet.current_lease(&self.digest).await.as_ref() != Some(lease) {
                return None;
            }
        }
        tracing::info!(digest = %self.digest, node = %lease.node, "the other node's fill did not appear in time; fetching upstream");
        Some(Mode::Upstream { leased: false })
    }

    /// Streams from the filler chosen by [`Self::decide`]; when it cannot be opened, decides
    /// again without it (the shared copy, our own claim, or waiting) and returns `None`.
    async fn open_peer(&self, offset: u64) -> Option<BlobBody> {
        let fleet = &self.fleet;
        let (peer, expires) = self
            .peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let wait = Duration::from_millis(expires.saturating_sub(unix_now_ms())).max(fleet.timeout);
        match fleet.peers.open(&peer, &self.digest, offset, wait).await {
            Ok(body) => Some(body),
            Err(e) => {
                tracing::warn!(digest = %self.digest, offset, peer = %peer.url, error = %e, "cannot stream from the filling node; falling back");
                let next = self.decide(Some(&peer.url)).await;
                self.set_mode(next);
                None
            }
        }
    }

    async fn open_shared(&self, offset: u64) -> Option<BlobBody> {
        let fleet = &self.fleet;
        let r = fleet.store.get(&blob_key(&self.digest), offset, None).await;
        let (total, stream) = fleet.record("get", r).ok().flatten()?;
        let fleet_for_stream = fleet.clone();
        // Resolved once per transfer, not per chunk.
        let read_bytes = metrics().object_store_bytes.with_label_values(&["read"]);
        let stream = stream.map(move |chunk| {
            match &chunk {
                Ok(b) => read_bytes.inc_by(b.len() as u64),
                Err(e) => {
                    let _ = fleet_for_stream.record::<()>(
                        "get",
                        Err(StoreError::Unavailable(format!("read broke off: {e}"))),
                    );
                }
            }
            chunk
        });
        Some(BlobBody {
            start: offset,
            total: Some(total),
            stream: Box::pin(stream),
        })
    }
}

impl BlobSource for TieredSource {
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<BlobBody, RegistryError>> {
        Box::pin(async move {
            if self.mode() == Mode::Undecided {
                let decided = self.decide(None).await;
                metrics().fill_source(match decided {
                    Mode::Shared => "object_store",
                    Mode::Peer => "peer",
                    _ => "upstream",
                });
                self.set_mode(decided);
            }
            // A new filler may be found when one fails; each is tried once per open.
            for _ in 0..3 {
                if self.mode() != Mode::Peer {
                    break;
                }
                if let Some(body) = self.open_peer(offset).await {
                    return Ok(body);
                }
            }
            if self.mode() == Mode::Peer {
                // Fillers kept failing us: the upstream, unleased.
                self.set_mode(Mode::Upstream { leased: false });
            }
            if self.mode() == Mode::Shared {
                if offset == 0 {
                    metrics().object_store_hit("blob");
                }
                match self.open_shared(offset).await {
                    Some(body) => return Ok(body),
                    None if self.upstream.is_none() => {
                        return Err(RegistryError::new(
                            ErrorCode::BlobUnknown,
                            format!(
                                "blob {} could not be read from the shared store and the mirror is offline",
                                self.digest
                            ),
                        ));
                    }
                    None => {
                        // The shared copy vanished or the store failed: the upstream resumes.
                        tracing::warn!(digest = %self.digest, offset, "shared blob unreadable; continuing from the upstream");
                        metrics().object_store_fallbacks.inc();
                        self.set_mode(Mode::Upstream { leased: false });
                    }
                }
            }
            match &self.upstream {
                Some(upstream) => upstream.open(offset).await,
                None => Err(RegistryError::new(
                    ErrorCode::BlobUnknown,
                    format!(
                        "blob {} is not in the shared store and the mirror is offline",
                        self.digest
                    ),
                )),
            }
        })
    }

    fn idle_timeout(&self) -> Option<Duration> {
        match self.upstream.as_ref().and_then(|u| u.idle_timeout()) {
            Some(t) => Some(t.max(self.fleet.timeout)),
            None => Some(self.fleet.timeout),
        }
    }
}

/// Compares two secrets in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
