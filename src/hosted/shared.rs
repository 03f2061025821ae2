//! Hosted content in the fleet's shared store (`storage.backend`), so that what one node
//! acknowledged every node serves.
//!
//! With a shared store, it is the source of truth for hosted content and each node's
//! `hosted/` directory is a cache of it: a push writes the shared objects before its `201`, and
//! a node that lacks a blob, manifest or tag locally reads the shared one (verified against its
//! digest) and keeps a local copy. Keys, beside the mirror's (`blobs/`, `manifests/`, `tags/`):
//!
//! - `hosted/blobs/sha256/<hex>`: the blob's bytes;
//! - `hosted/manifests/sha256/<hex>`: the manifest's media type and exact bytes (JSON);
//! - `hosted/repos/<repo>/_links/<hex>`: the blob is in `<repo>` (its size, decimal);
//! - `hosted/repos/<repo>/_manifests/<hex>`: the manifest is in `<repo>` (push time, seconds);
//! - `hosted/repos/<repo>/_tags/<tag>`: the tag's digest (`sha256:<hex>`); last writer wins;
//! - `hosted/repos/<repo>/_referrers/<subject hex>/<hex>`: the manifest `<hex>` of `<repo>` names
//!   `<subject>` as its subject (its descriptor in the referrers API, JSON); written before the
//!   manifest's link, removed after it, so a link always has its record (a record without a
//!   link is skipped);
//! - `hosted/_gc/candidates/<key without hosted/>`: the shared collector found that object
//!   unreferenced at this time (seconds); a push naming the object removes the record
//!   (`super::shared_gc`);
//! - `hosted/_gc/removing/<key without hosted/>`: the collector is about to delete that object
//!   (written before its last check of the candidate record, removed once it is done); a push
//!   that removed a candidate record waits for such a record to go before it checks anything.
//!
//! Repository components never start with `_` and tags never start with `.`, so these keys
//! cannot collide and pass the store's key rules. Every call but a blob's transfer is bounded by
//! `storage.object_store_timeout`; a failure is `503 UNAVAILABLE` for a push (nothing is
//! acknowledged that the store does not hold).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::oci::{Digest, ErrorCode, RegistryError, RepoName, Tag};
use crate::store::{BlobStore, ObjectInfo, StoreFuture};

use super::StoredManifest;

/// A shared manifest object: the exact bytes and the media type they are served with.
#[derive(Serialize, Deserialize)]
struct ManifestObject {
    media_type: String,
    /// Base64 of the manifest's bytes (checked against the digest on every read).
    bytes: String,
}

/// The shared store as hosted repositories use it.
pub struct SharedHosted {
    store: Arc<dyn BlobStore>,
    timeout: Duration,
    /// How long an empty listing of [`GC_RECORDS`] is trusted: [`gc_empty_ttl`] of the grace.
    gc_empty_ttl: Duration,
    /// Until when the last empty listing of [`GC_RECORDS`] is trusted (`clear_candidates`).
    gc_empty_until: std::sync::Mutex<Option<std::time::Instant>>,
}

/// The prefix of every record of the shared collector.
const GC_RECORDS: &str = "hosted/_gc/";

/// How long a node trusts an empty listing of the collector's records, for a grace period of
/// `grace`: three seconds, or a tenth of the grace if that is shorter (see `clear_candidates`).
fn gc_empty_ttl(grace: Duration) -> Duration {
    (grace / 10).min(Duration::from_secs(3))
}

fn blob_key(digest: &Digest) -> String {
    format!("hosted/blobs/sha256/{}", digest.hex())
}

fn manifest_key(digest: &Digest) -> String {
    format!("hosted/manifests/sha256/{}", digest.hex())
}

fn link_key(repo: &RepoName, digest: &Digest) -> String {
    format!("hosted/repos/{repo}/_links/{}", digest.hex())
}

fn mlink_key(repo: &RepoName, digest: &Digest) -> String {
    format!("hosted/repos/{repo}/_manifests/{}", digest.hex())
}

fn referrers_prefix(repo: &RepoName, subject: &Digest) -> String {
    format!("hosted/repos/{repo}/_referrers/{}/", subject.hex())
}

/// Where the shared collector records `key` as unreferenced since some time.
pub(super) fn candidate_key(key: &str) -> String {
    format!("{CANDIDATES}{}", key.strip_prefix("hosted/").unwrap_or(key))
}

/// The prefix of the collector's candidate records.
pub(super) const CANDIDATES: &str = "hosted/_gc/candidates/";

/// The prefix of the collector's removal records.
pub(super) const REMOVING: &str = "hosted/_gc/removing/";

/// Where the collector says it is about to delete `key`.
pub(super) fn removing_key(key: &str) -> String {
    format!("{REMOVING}{}", key.strip_prefix("hosted/").unwrap_or(key))
}

/// The longest a collector may take from writing a removal record to sending its delete; past
/// it, the collector gives up on that object and a waiting push stops waiting.
pub(super) const REMOVAL_WINDOW: Duration = Duration::from_secs(20);

/// The keys a push of a blob into `repo` makes referenced.
pub(super) fn blob_keys(repo: &RepoName, digest: &Digest) -> [String; 2] {
    [blob_key(digest), link_key(repo, digest)]
}

/// The keys a push of a manifest into `repo` makes referenced.
pub(super) fn manifest_keys(repo: &RepoName, digest: &Digest) -> [String; 2] {
    [manifest_key(digest), mlink_key(repo, digest)]
}

fn tags_prefix(repo: &RepoName) -> String {
    format!("hosted/repos/{repo}/_tags/")
}

fn tag_key(repo: &RepoName, tag: &str) -> String {
    format!("{}{tag}", tags_prefix(repo))
}

/// A store failure as the client sees it.
fn unavailable(what: &str, e: impl std::fmt::Display) -> RegistryError {
    tracing::warn!(error = %e, "hosted: shared store: {what}");
    RegistryError::new(
        ErrorCode::Unavailable,
        format!("shared store unavailable ({what}): {e}"),
    )
}

impl SharedHosted {
    /// `timeout` bounds every small call; `grace` is the collector's grace period
    /// (`hosted.upload_timeout`).
    pub fn new(store: Arc<dyn BlobStore>, timeout: Duration, grace: Duration) -> SharedHosted {
        SharedHosted {
            store,
            timeout,
            gc_empty_ttl: gc_empty_ttl(grace),
            gc_empty_until: std::sync::Mutex::new(None),
        }
    }

    /// One small store call, bounded by the store timeout.
    async fn bounded<'a, T>(
        &self,
        what: &str,
        call: StoreFuture<'a, T>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(what, e)),
            Err(_) => Err(unavailable(
                what,
                format!("no answer within {:?}", self.timeout),
            )),
        }
    }

    /// Writes a small text object. A collector record written here (this node collecting)
    /// ends the trust in an empty listing of them at once.
    pub(super) async fn put_text(&self, key: &str, text: String) -> Result<(), RegistryError> {
        if key.starts_with(GC_RECORDS) {
            self.set_gc_empty_until(None);
        }
        self.bounded("put", self.store.put_bytes(key, Bytes::from(text)))
            .await
    }

    pub(super) async fn get_text(&self, key: &str) -> Result<Option<String>, RegistryError> {
        let bytes = self.bounded("get", self.store.get_bytes(key)).await?;
        Ok(bytes.map(|b| String::from_utf8_lossy(&b).trim().to_string()))
    }

    // ---- blobs ----------------------------------------------------------------------------

    /// Uploads a verified local blob file unless the store already holds `size` bytes for it.
    pub async fn put_blob(
        &self,
        digest: &Digest,
        path: &Path,
        size: u64,
    ) -> Result<(), RegistryError> {
        let key = blob_key(digest);
        if self.bounded("head", self.store.head(&key)).await? == Some(size) {
            return Ok(());
        }
        self.store
            .put_file(&key, path)
            .await
            .map_err(|e| unavailable("put blob", e))
    }

    /// Shares a verified local blob file as blob `digest` of `repo`: the collector's records of
    /// both objects removed first (this push references them), then the bytes (unless held),
    /// then the link.
    pub async fn share_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        path: &Path,
        size: u64,
    ) -> Result<(), RegistryError> {
        self.clear_candidates(&blob_keys(repo, digest)).await?;
        self.put_blob(digest, path, size).await?;
        self.put_link(repo, digest, size).await
    }

    /// The size of the shared blob object, if it exists.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let key = blob_key(digest);
        self.bounded("head", self.store.head(&key)).await
    }

    /// Copies the shared blob into `tmp` (fsynced), hashing it on the way: its size, or `None`
    /// when the store has no such object. Bytes that do not hash to `digest` are an error and
    /// leave no file.
    pub async fn fetch_blob(
        &self,
        digest: &Digest,
        tmp: &Path,
    ) -> Result<Option<u64>, RegistryError> {
        let key = blob_key(digest);
        let Some((_, mut stream)) = self.bounded("get", self.store.get(&key, 0, None)).await?
        else {
            return Ok(None);
        };
        let written = async {
            let mut file = tokio::fs::File::create(tmp).await?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(std::io::Error::other)?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).await?;
            }
            file.sync_all().await?;
            Ok::<_, std::io::Error>((hex::encode(hasher.finalize()), size))
        }
        .await;
        let verified = match written {
            Ok((hex, size)) if hex == digest.hex() => Ok(Some(size)),
            Ok((hex, _)) => Err(unavailable(
                "read blob",
                format!("{key} hashes to sha256:{hex}, not {digest}"),
            )),
            Err(e) => Err(unavailable("read blob", e)),
        };
        if verified.is_err() {
            let _ = tokio::fs::remove_file(tmp).await;
        }
        verified
    }

    /// The size recorded when `digest` was linked into `repo`, if it was.
    pub async fn link(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let text = self.get_text(&link_key(repo, digest)).await?;
        Ok(text.map(|t| t.parse().unwrap_or(0)))
    }

    pub async fn put_link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), RegistryError> {
        self.put_text(&link_key(repo, digest), size.to_string())
            .await
    }

    pub async fn remove_link(&self, repo: &RepoName, digest: &Digest) -> Result<(), RegistryError> {
        let key = link_key(repo, digest);
        self.bounded("delete", self.store.delete(&key)).await
    }

    // ---- manifests and tags ---------------------------------------------------------------

    /// Stores the manifest object unless it is there already.
    pub async fn put_manifest(&self, m: &StoredManifest) -> Result<(), RegistryError> {
        let key = manifest_key(&m.digest);
        if self.bounded("head", self.store.head(&key)).await?.is_some() {
            return Ok(());
        }
        let object = ManifestObject {
            media_type: m.media_type.clone(),
            bytes: base64::engine::general_purpose::STANDARD.encode(&m.bytes),
        };
        let body = serde_json::to_string(&object).map_err(|e| unavailable("encode", e))?;
        self.put_text(&key, body).await
    }

    /// A shared manifest, verified against its digest (a damaged object is an error).
    pub async fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, RegistryError> {
        let key = manifest_key(digest);
        let Some(raw) = self.bounded("get", self.store.get_bytes(&key)).await? else {
            return Ok(None);
        };
        let object: ManifestObject =
            serde_json::from_slice(&raw).map_err(|e| unavailable("read manifest", e))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(object.bytes)
            .map_err(|e| unavailable("read manifest", e))?;
        if Digest::of(&bytes) != *digest {
            return Err(unavailable(
                "read manifest",
                format!("{key} does not hash to {digest}"),
            ));
        }
        Ok(Some(StoredManifest {
            digest: digest.clone(),
            media_type: object.media_type,
            bytes: Bytes::from(bytes),
        }))
    }

    pub async fn has_mlink(&self, repo: &RepoName, digest: &Digest) -> Result<bool, RegistryError> {
        let key = mlink_key(repo, digest);
        Ok(self.bounded("head", self.store.head(&key)).await?.is_some())
    }

    pub async fn put_mlink(
        &self,
        repo: &RepoName,
        digest: &Digest,
        at: u64,
    ) -> Result<(), RegistryError> {
        self.put_text(&mlink_key(repo, digest), at.to_string())
            .await
    }

    pub async fn remove_mlink(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), RegistryError> {
        let key = mlink_key(repo, digest);
        self.bounded("delete", self.store.delete(&key)).await
    }

    /// Whether `repo` holds any manifest in the shared store.
    pub async fn has_repository(&self, repo: &RepoName) -> Result<bool, RegistryError> {
        let prefix = format!("hosted/repos/{repo}/_manifests/");
        Ok(!self
            .bounded("list", self.store.list(&prefix))
            .await?
            .is_empty())
    }

    /// What `tag` of `repo` points to.
    pub async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>, RegistryError> {
        let text = self.get_text(&tag_key(repo, tag.as_str())).await?;
        Ok(text.and_then(|t| t.parse().ok()))
    }

    /// Points `tag` of `repo` at `digest` (replacing whatever it pointed to).
    pub async fn put_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<(), RegistryError> {
        self.put_text(&tag_key(repo, tag.as_str()), digest.to_string())
            .await
    }

    pub async fn remove_tag(&self, repo: &RepoName, tag: &str) -> Result<(), RegistryError> {
        let key = tag_key(repo, tag);
        self.bounded("delete", self.store.delete(&key)).await
    }

    /// Every tag of `repo` with its digest, sorted by tag.
    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<(String, Digest)>, RegistryError> {
        let prefix = tags_prefix(repo);
        let listed = self.bounded("list", self.store.list(&prefix)).await?;
        let mut out = Vec::with_capacity(listed.len());
        for info in listed {
            let Some(tag) = info.key.strip_prefix(&prefix) else {
                continue;
            };
            if let Some(d) = self.get_text(&info.key).await?.and_then(|t| t.parse().ok()) {
                out.push((tag.to_string(), d));
            }
        }
        Ok(out)
    }

    // ---- listings, referrers, the collector's records -------------------------------------

    /// Every object under `prefix`, sorted by key.
    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, RegistryError> {
        self.bounded("list", self.store.list(prefix)).await
    }

    /// Removes one object (absent is fine).
    pub(super) async fn delete(&self, key: &str) -> Result<(), RegistryError> {
        self.bounded("delete", self.store.delete(key)).await
    }

    /// The repositories holding at least one manifest link, sorted.
    pub async fn repositories(&self) -> Result<Vec<String>, RegistryError> {
        let mut out: Vec<String> = self
            .list("hosted/repos/")
            .await?
            .iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix("hosted/repos/")?;
                let (repo, _) = rest.split_once("/_manifests/")?;
                Some(repo.to_string())
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Records that manifest `digest` of `repo` refers to `subject`, with its descriptor.
    pub async fn put_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        digest: &Digest,
        descriptor: &serde_json::Value,
    ) -> Result<(), RegistryError> {
        let key = format!("{}{}", referrers_prefix(repo, subject), digest.hex());
        self.put_text(&key, descriptor.to_string()).await
    }

    pub async fn remove_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        digest: &Digest,
    ) -> Result<(), RegistryError> {
        let key = format!("{}{}", referrers_prefix(repo, subject), digest.hex());
        self.delete(&key).await
    }

    /// The descriptors of the manifests of `repo` whose subject is `subject` and that are
    /// linked (a record whose link is gone is skipped), in key order.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<serde_json::Value>, RegistryError> {
        let prefix = referrers_prefix(repo, subject);
        let mut out = Vec::new();
        for o in self.list(&prefix).await? {
            let Some(d) = o
                .key
                .strip_prefix(&prefix)
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
            else {
                continue;
            };
            if !self.has_mlink(repo, &d).await? {
                continue;
            }
            if let Some(v) = self
                .get_text(&o.key)
                .await?
                .and_then(|t| serde_json::from_str(&t).ok())
            {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Takes `keys` back from the collector before a push references them: removes their
    /// candidate records, then waits out any removal of them in progress, so that the push's own
    /// checks see whether the objects survived. Against the collector's order (removal record,
    /// candidate check, delete), this order (candidate removal, removal check) means that of the
    /// two, at least one sees the other: the collector keeps the object, or the push sees it
    /// gone and is refused. One listing when the collector has nothing of these keys.
    ///
    /// An empty listing is trusted for `gc_empty_ttl` (at most a tenth of the grace period)
    /// from when it was asked for, so that pushes and blob `HEAD`s do not list the records each
    /// time. The guarantee holds: a candidate record missing from that listing was written after
    /// it, and a collector writes a removal record (then deletes) only for a candidate recorded
    /// by a run that started at least a grace period before. So a removal record can appear
    /// within the trusted moment only behind a collector run that lasted most of a grace period,
    /// and a push acting on the trusted answer has the grace period, less at most a tenth, to
    /// land its references: as after one listing call that took that long, which the store
    /// timeout allows anyway. Listed records are never trusted away: a non-empty listing is not
    /// remembered, and this node's own collector ends the trust when it writes a record.
    pub async fn clear_candidates(&self, keys: &[String]) -> Result<(), RegistryError> {
        let now = std::time::Instant::now();
        if self.gc_empty_until().is_some_and(|until| now < until) {
            return Ok(());
        }
        let listed = self.list(GC_RECORDS).await?;
        if listed.is_empty() {
            self.set_gc_empty_until(Some(now + self.gc_empty_ttl));
            return Ok(());
        }
        let candidates: std::collections::HashSet<String> =
            keys.iter().map(|k| candidate_key(k)).collect();
        let removals: std::collections::HashSet<String> =
            keys.iter().map(|k| removing_key(k)).collect();
        let ours = |o: &&ObjectInfo| candidates.contains(&o.key) || removals.contains(&o.key);
        if !listed.iter().any(|o| ours(&o)) {
            return Ok(());
        }
        for o in listed.iter().filter(|o| candidates.contains(&o.key)) {
            self.delete(&o.key).await?;
        }
        self.await_removals(&removals).await
    }

    fn gc_empty_until(&self) -> Option<std::time::Instant> {
        self.gc_empty_until.lock().ok().and_then(|g| *g)
    }

    fn set_gc_empty_until(&self, until: Option<std::time::Instant>) {
        if let Ok(mut g) = self.gc_empty_until.lock() {
            *g = until;
        }
    }

    /// Waits until no removal record of `removals` is left. A collector past its window has
    /// given up (or stopped): its record is dropped.
    async fn await_removals(
        &self,
        removals: &std::collections::HashSet<String>,
    ) -> Result<(), RegistryError> {
        let deadline = tokio::time::Instant::now() + REMOVAL_WINDOW + 2 * self.timeout;
        loop {
            let pending: Vec<ObjectInfo> = self
                .list(REMOVING)
                .await?
                .into_iter()
                .filter(|o| removals.contains(&o.key))
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                for o in &pending {
                    self.delete(&o.key).await?;
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
