//! [`ObjectBackend`]: the blob store on an object store through the `object_store` crate — S3
//! and what speaks its API (Ceph RGW, Garage, MinIO) and Azure Blob Storage. (Google Cloud
//! Storage is [`super::gcs::GcsStore`], on GCS's JSON API.)
//!
//! What this layer adds to `object_store`:
//! - **a prefix** (`storage.s3.prefix`), so one bucket can hold several fleets;
//! - **bounded waiting**: `object_store`'s own retries are cut down (2 retries, within the
//!   configured timeout) and every request is bounded by `storage.object_store_timeout` — small
//!   operations in total, streamed reads per chunk (silence, not length), uploads per part with
//!   an allowance for a slow link ([`MIN_RATE`]) — so a dead store costs seconds, not minutes;
//! - **uploads that are whole or absent**: files above [`PART_SIZE`] go up as a multipart upload,
//!   aborted on any error and also when the `put_file` future is dropped; only the final
//!   `CompleteMultipartUpload` (Azure: `Put Block List`) makes the object visible. Garage drops
//!   an upload in progress when another upload of the same key completes, and Azure drops a
//!   blob's uncommitted blocks when another writer commits it; concurrent writers of a key write
//!   the same content, so that counts as success once the other writer's object (of our size)
//!   is there;
//! - **an honest conditional create**: some S3 servers (Garage 2.5) accept `If-None-Match: *` and
//!   overwrite anyway. The first `create` probes that once (two creates of a scratch key); a
//!   store that overwrote answers [`Created::Unsupported`] from then on, without writing;
//! - **errors in three kinds**: not found is `Ok(None)`; connection failures, timeouts and 5xx
//!   are [`StoreError::Unavailable`]; the store saying no (credentials, 4xx) is
//!   [`StoreError::Refused`].

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore,
    ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use super::{
    validate_key, validate_prefix, BlobStore, Created, ObjectInfo, StoreError, StoreFuture,
};
use crate::config::{AzureStoreConfig, S3StoreConfig, SharedStoreConfig, SharedStoreKind};
use crate::stream::ByteStream;

/// Files larger than this go up as multipart uploads, in parts of this size (S3's minimum part
/// is 5 MiB).
pub const PART_SIZE: usize = 8 << 20;

/// Parts of one upload in flight at once (memory per upload: this many × [`PART_SIZE`]).
const PARTS_IN_FLIGHT: usize = 4;

/// The slowest link an upload is allowed before it counts as stalled, in bytes per second: a
/// transfer of `n` bytes may take `timeout + n / MIN_RATE`.
pub const MIN_RATE: u64 = 1 << 20;

/// Where the conditional-create probe writes (below the prefix).
const PROBE_DIR: &str = "_stowage/probe";

/// An `object_store` client built for one backend, and what names it in logs.
struct Client {
    store: Arc<dyn ObjectStore>,
    /// `s3` or `az`: the scheme of the store's description.
    scheme: &'static str,
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
}

/// `object_store`'s retries, cut down: two, within `timeout`.
pub(super) fn retry_config(timeout: Duration) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: timeout,
    }
}

/// HTTP options every backend shares. The overall request timeout stays off: a streamed blob may
/// take longer than any fixed bound. Every await is bounded here instead (see the module docs).
pub(super) fn client_options(timeout: Duration, endpoint: Option<&str>) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(timeout.min(Duration::from_secs(5)))
        .with_timeout_disabled()
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")))
}

pub(super) fn refused(e: object_store::Error) -> StoreError {
    StoreError::Refused(e.to_string())
}

/// `backend = "s3"`: AWS S3, Ceph RGW, Garage, MinIO.
fn s3_client(
    s3: &S3StoreConfig,
    retry: RetryConfig,
    timeout: Duration,
) -> Result<Client, StoreError> {
    let mut b = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_virtual_hosted_style_request(!s3.path_style)
        .with_retry(retry)
        .with_client_options(client_options(timeout, s3.endpoint.as_deref()));
    if let Some(endpoint) = &s3.endpoint {
        b = b
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(region) = &s3.region {
        b = b.with_region(region);
    }
    if let Some(id) = &s3.access_key_id {
        b = b.with_access_key_id(id);
    }
    if let Some(secret) = &s3.secret_access_key {
        b = b.with_secret_access_key(secret.expose());
    }
    Ok(Client {
        store: Arc::new(b.build().map_err(refused)?),
        scheme: "s3",
        bucket: s3.bucket.clone(),
        prefix: s3.prefix.clone(),
        endpoint: s3.endpoint.clone(),
    })
}

/// `backend = "azure"`: Azure Blob Storage (or Azurite).
fn azure_client(
    az: &AzureStoreConfig,
    retry: RetryConfig,
    timeout: Duration,
) -> Result<Client, StoreError> {
    let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
        .with_account(&az.account)
        .with_container_name(&az.container)
        .with_retry(retry)
        .with_client_options(client_options(timeout, az.endpoint.as_deref()));
    if let Some(key) = &az.access_key {
        b = b.with_access_key(key.expose());
    }
    if let Some(endpoint) = &az.endpoint {
        // The account URL (Azurite: `http://127.0.0.1:10000/devstoreaccount1`); `object_store`
        // appends `/<container>/<key>` to it as path segments, so a trailing `/` would make an
        // empty segment (`…/devstoreaccount1//c`).
        let endpoint = endpoint.trim_end_matches('/');
        b = b
            .with_endpoint(endpoint.to_owned())
            .with_allow_http(endpoint.starts_with("http://"));
    }
    Ok(Client {
        store: Arc::new(b.build().map_err(refused)?),
        scheme: "az",
        bucket: format!("{}/{}", az.account, az.container),
        prefix: az.prefix.clone(),
        endpoint: az.endpoint.clone(),
    })
}

/// The shared store on S3 / Azure. Cheap to share (`Arc` inside).
pub struct ObjectBackend {
    store: Arc<dyn ObjectStore>,
    /// `""` or `"some/prefix/"`.
    prefix: String,
    describe: String,
    timeout: Duration,
    /// Whether `PutMode::Create` really refuses to overwrite; probed on first `create`.
    conditional: tokio::sync::OnceCell<bool>,
}

impl std::fmt::Debug for ObjectBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the inner store: its configuration holds the credentials.
        f.debug_struct("ObjectBackend")
            .field("describe", &self.describe)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ObjectBackend {
    /// Builds the client `cfg` describes (`s3` or `azure`). Does not contact the store.
    pub fn new(cfg: &SharedStoreConfig) -> Result<ObjectBackend, StoreError> {
        let timeout = cfg.timeout;
        let retry = retry_config(timeout);
        let client = match &cfg.kind {
            SharedStoreKind::S3(s3) => s3_client(s3, retry, timeout)?,
            SharedStoreKind::Gcs(gcs) => {
                return Err(StoreError::Refused(format!(
                    "gs://{}: GCS is served by the JSON API client (store::gcs::GcsStore)",
                    gcs.bucket
                )))
            }
            SharedStoreKind::Azure(az) => azure_client(az, retry, timeout)?,
            SharedStoreKind::Dir(dir) => {
                return Err(StoreError::Refused(format!(
                    "{} is a directory, not an object store",
                    dir.display()
                )))
            }
        };
        let mut describe = format!("{}://{}/{}", client.scheme, client.bucket, client.prefix);
        if let Some(origin) = client.endpoint.as_deref().and_then(origin_of) {
            describe.push_str(&format!(" at {origin}"));
        }
        ObjectBackend::from_store(client.store, &client.prefix, timeout, describe)
    }

    /// Wraps an already built `object_store` (tests use `InMemory`). `prefix` is empty or a
    /// relative path; a trailing `/` is added when missing.
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        timeout: Duration,
        describe: String,
    ) -> Result<ObjectBackend, StoreError> {
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            validate_key(prefix)?;
            format!("{prefix}/")
        };
        Ok(ObjectBackend {
            store,
            prefix,
            describe,
            timeout,
            conditional: tokio::sync::OnceCell::new(),
        })
    }

    /// Whether conditional create is known to work (`None`: not probed yet).
    pub fn conditional_create(&self) -> Option<bool> {
        self.conditional.get().copied()
    }

    fn location(&self, key: &str) -> Result<ObjectPath, StoreError> {
        validate_key(key)?;
        ObjectPath::parse(format!("{}{key}", self.prefix))
            .map_err(|e| StoreError::Refused(format!("invalid key {key:?}: {e}")))
    }

    /// Runs one request bounded by `limit`; elapsed is `Unavailable`.
    async fn bounded<T>(
        &self,
        limit: Duration,
        what: &str,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>, StoreError> {
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| StoreError::Unavailable(format!("{what}: no answer within {limit:?}")))
    }

    /// The time allowed to move `bytes` bytes.
    fn transfer_bound(&self, bytes: usize) -> Duration {
        self.timeout + Duration::from_secs_f64(bytes as f64 / MIN_RATE as f64)
    }

    async fn put_whole(&self, key: &str, loc: &ObjectPath, bytes: Bytes) -> Result<(), StoreError> {
        let limit = self.transfer_bound(bytes.len());
        let put = self
            .store
            .put_opts(loc, PutPayload::from_bytes(bytes), PutOptions::default());
        self.bounded(limit, key, put).await?.map_err(classify)?;
        Ok(())
    }

    /// Probes once whether `PutMode::Create` refuses to overwrite.
    async fn probe_conditional(&self) -> Result<bool, StoreError> {
        let key = format!("{PROBE_DIR}/{:016x}", rand::random::<u64>());
        let loc = self.location(&key)?;
        let create = || {
            let opts = PutOptions::from(PutMode::Create);
            self.bounded(
                self.timeout,
                "conditional-create probe",
                self.store
                    .put_opts(&loc, PutPayload::from_static(b"probe"), opts),
            )
        };
        let supported = match create().await? {
            Err(object_store::Error::NotImplemented { .. })
            | Err(object_store::Error::NotSupported { .. }) => false,
            Err(e) => return Err(classify(e)),
            Ok(_) => match create().await? {
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => true,
                Ok(_) => false,
                Err(e) => {
                    let _ = self
                        .bounded(self.timeout, &key, self.store.delete(&loc))
                        .await;
                    return Err(classify(e));
                }
            },
        };
        let _ = self
            .bounded(self.timeout, &key, self.store.delete(&loc))
            .await;
        if supported {
            tracing::info!(store = %self.describe, "object store honours conditional create");
        } else {
            tracing::warn!(
                store = %self.describe,
                "object store ignores conditional create (If-None-Match: *) and would overwrite; \
                 fill leases are disabled for this store"
            );
        }
        Ok(supported)
    }
}

impl BlobStore for ObjectBackend {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn head<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<u64>> {
        async move {
            let loc = self.location(key)?;
            match self
                .bounded(self.timeout, key, self.store.head(&loc))
                .await?
            {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(classify(e)),
            }
        }
        .boxed()
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: Option<u64>,
    ) -> StoreFuture<'a, Option<(u64, ByteStream)>> {
        async move {
            let loc = self.location(key)?;
            let range = match len {
                // A zero-length range is not a valid HTTP range: answer it from the size.
                Some(0) => return empty_at(self, key, offset).await,
                Some(n) => Some(GetRange::Bounded(offset..offset.saturating_add(n))),
                None if offset == 0 => None,
                None => Some(GetRange::Offset(offset)),
            };
            let options = GetOptions {
                range,
                ..GetOptions::default()
            };
            match self
                .bounded(self.timeout, key, self.store.get_opts(&loc, options))
                .await?
            {
                Ok(result) => {
                    let size = result.meta.size;
                    Ok(Some((
                        size,
                        idle_bounded(result.into_stream(), self.timeout),
                    )))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                // An offset at or past the end is a 416; the size tells which of the two it was
                // (or that the failure had another cause).
                Err(e) if offset > 0 => match self.head(key).await {
                    Ok(None) => Ok(None),
                    Ok(Some(size)) if offset == size => Ok(Some((size, empty_stream()))),
                    Ok(Some(size)) if offset > size => Err(beyond_end(key, offset, size)),
                    _ => Err(classify(e)),
                },
                Err(e) => Err(classify(e)),
            }
        }
        .boxed()
    }

    fn get_bytes<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        async move {
            let loc = self.location(key)?;
            let fetch = async { self.store.get(&loc).await?.bytes().await };
            match self.bounded(self.timeout, key, fetch).await? {
                Ok(bytes) => Ok(Some(bytes)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(classify(e)),
            }
        }
        .boxed()
    }

    fn put_file<'a>(&'a self, key: &'a str, path: &'a std::path::Path) -> StoreFuture<'a, ()> {
        async move {
            let loc = self.location(key)?;
            let mut file = tokio::fs::File::open(path).await?;
            let file_size = file.metadata().await?.len();
            // Read ahead one part (and one more) to choose between a plain put and multipart; this
            // works for sources whose size is not known up front, too.
            let first = read_part(&mut file).await?;
            if first.len() < PART_SIZE {
                return self.put_whole(key, &loc, first).await;
            }
            let second = read_part(&mut file).await?;
            if second.is_empty() {
                return self.put_whole(key, &loc, first).await;
            }

            let upload = self
                .bounded(self.timeout, key, self.store.put_multipart(&loc))
                .await?
                .map_err(classify)?;
            let mut upload = Multipart {
                upload: Some(upload),
                parts: JoinSet::new(),
                key: key.to_owned(),
                timeout: self.timeout,
                superseded: false,
            };
            // One part may take this long once the queue is full (they share the link).
            let part_bound = self.transfer_bound(PART_SIZE * PARTS_IN_FLIGHT);
            let result = async {
                upload.send(first, PARTS_IN_FLIGHT, part_bound).await?;
                let mut next = second;
                while !next.is_empty() {
                    upload.send(next, PARTS_IN_FLIGHT, part_bound).await?;
                    next = read_part(&mut file).await?;
                }
                upload.drain(part_bound).await?;
                upload.complete(self.transfer_bound(0)).await
            }
            .await;
            let Err(e) = result else {
                return Ok(());
            };
            if upload.superseded {
                // Garage drops an upload in progress when a newer version of its key completes (and
                // Azure the uncommitted blocks when the blob is committed): a concurrent writer of
                // this key finished first. Concurrent writers of a key write
                // the same content (the `put_file` contract; blob keys are content addresses), so
                // an object of our size there now is our object.
                upload.upload = None;
                if file_size > 0 && self.head(key).await.ok().flatten() == Some(file_size) {
                    tracing::debug!(
                        key,
                        "upload superseded by a concurrent writer of the same key"
                    );
                    return Ok(());
                }
            }
            upload.abort().await;
            Err(e)
        }
        .boxed()
    }

    fn put_bytes<'a>(&'a self, key: &'a str, bytes: Bytes) -> StoreFuture<'a, ()> {
        async move {
            let loc = self.location(key)?;
            self.put_whole(key, &loc, bytes).await
        }
        .boxed()
    }

    fn create<'a>(&'a self, key: &'a str, bytes: Bytes) -> StoreFuture<'a, Created> {
        async move {
            let loc = self.location(key)?;
            let supported = *self
                .conditional
                .get_or_try_init(|| self.probe_conditional())
                .await?;
            if !supported {
                return Ok(Created::Unsupported);
            }
            let opts = PutOptions::from(PutMode::Create);
            let put = self
                .store
                .put_opts(&loc, PutPayload::from_bytes(bytes), opts);
            match self.bounded(self.timeout, key, put).await? {
                Ok(_) => Ok(Created::Created),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => Ok(Created::Exists),
                Err(object_store::Error::NotImplemented { .. })
                | Err(object_store::Error::NotSupported { .. }) => Ok(Created::Unsupported),
                Err(e) => Err(classify(e)),
            }
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        async move {
            let loc = self.location(key)?;
            match self
                .bounded(self.timeout, key, self.store.delete(&loc))
                .await?
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(classify(e)),
            }
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectInfo>> {
        async move {
            validate_prefix(prefix)?;
            // `object_store` lists whole path segments: list the directory the prefix names for
            // sure, then filter by the string prefix.
            let dir = match prefix.rfind('/') {
                Some(i) => &prefix[..i],
                None => "",
            };
            let full = format!("{}{dir}", self.prefix);
            let full = full.trim_end_matches('/');
            let loc =
                if full.is_empty() {
                    None
                } else {
                    Some(ObjectPath::parse(full).map_err(|e| {
                        StoreError::Refused(format!("invalid prefix {prefix:?}: {e}"))
                    })?)
                };
            let mut stream = self.store.list(loc.as_ref());
            let mut out = Vec::new();
            loop {
                let item = tokio::time::timeout(self.timeout, stream.next())
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(format!(
                            "list {prefix:?}: no answer within {:?}",
                            self.timeout
                        ))
                    })?;
                let meta = match item {
                    None => break,
                    Some(Ok(meta)) => meta,
                    Some(Err(e)) => return Err(classify(e)),
                };
                let Some(key) = meta.location.as_ref().strip_prefix(self.prefix.as_str()) else {
                    continue;
                };
                if key.starts_with(prefix) && !key.starts_with(PROBE_DIR) {
                    out.push(ObjectInfo {
                        key: key.to_owned(),
                        size: meta.size,
                    });
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        }
        .boxed()
    }
}

/// A multipart upload in progress: its parts upload in tasks of their own (so they progress
/// while the next part is read), at most a few at a time. Whatever ends it early — an error, or
/// the owning future being dropped — aborts it; only [`complete`](Self::complete) makes the
/// object visible.
struct Multipart {
    upload: Option<Box<dyn MultipartUpload>>,
    parts: JoinSet<object_store::Result<()>>,
    key: String,
    timeout: Duration,
    /// The store dropped the upload (see [`upload_error`](Self::upload_error)).
    superseded: bool,
}

impl Multipart {
    fn upload(&mut self) -> Result<&mut Box<dyn MultipartUpload>, StoreError> {
        self.upload
            .as_mut()
            .ok_or_else(|| StoreError::Refused("multipart upload already ended".into()))
    }

    /// Starts uploading `part` once fewer than `in_flight` parts are under way.
    async fn send(
        &mut self,
        part: Bytes,
        in_flight: usize,
        bound: Duration,
    ) -> Result<(), StoreError> {
        while self.parts.len() >= in_flight {
            self.join_one(bound).await?;
        }
        let upload = self.upload()?.put_part(PutPayload::from_bytes(part));
        self.parts.spawn(upload);
        Ok(())
    }

    /// Waits for every part under way.
    async fn drain(&mut self, bound: Duration) -> Result<(), StoreError> {
        while !self.parts.is_empty() {
            self.join_one(bound).await?;
        }
        Ok(())
    }

    async fn join_one(&mut self, bound: Duration) -> Result<(), StoreError> {
        let joined = tokio::time::timeout(bound, self.parts.join_next())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "{}: no part of the upload finished within {bound:?}",
                    self.key
                ))
            })?;
        match joined {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(self.upload_error(e)),
            Some(Err(e)) => Err(StoreError::Unavailable(format!(
                "{}: part upload task failed: {e}",
                self.key
            ))),
        }
    }

    /// Completes the upload: the object appears, whole.
    async fn complete(&mut self, bound: Duration) -> Result<(), StoreError> {
        let key = self.key.clone();
        let done = tokio::time::timeout(bound, self.upload()?.complete())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!("{key}: completing the upload timed out"))
            })?;
        done.map_err(|e| self.upload_error(e))?;
        self.upload = None;
        Ok(())
    }

    /// Notes whether the error says the upload was dropped by the store: `NoSuchUpload` (404)
    /// for a part or the completion, or `InvalidPart` for a completion whose parts the store
    /// already discarded — what Garage answers when a concurrent upload of the key finished
    /// (or, racing that, `InvalidRequest` "No data was uploaded": the upload is still known but
    /// its parts are gone). Azure's counterpart is `InvalidBlockList` (400) for `Put Block List`:
    /// committing a blob discards all of its uncommitted blocks, the other writers' too.
    fn upload_error(&mut self, e: object_store::Error) -> StoreError {
        let gone = matches!(e, object_store::Error::NotFound { .. }) || {
            let message = e.to_string();
            message.contains("NoSuchUpload")
                || message.contains("InvalidPart")
                || message.contains("No data was uploaded")
                || message.contains("InvalidBlockList")
        };
        self.superseded |= gone;
        classify(e)
    }

    /// Aborts now (bounded): stops the part tasks and discards the uploaded parts.
    async fn abort(&mut self) {
        self.parts.abort_all();
        if let Some(upload) = self.upload.take() {
            abort_upload(upload, std::mem::take(&mut self.key), self.timeout).await;
        }
    }
}

impl Drop for Multipart {
    fn drop(&mut self) {
        // The part tasks are aborted by the JoinSet's own drop.
        let Some(upload) = self.upload.take() else {
            return;
        };
        let key = std::mem::take(&mut self.key);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(abort_upload(upload, key, self.timeout));
            }
            Err(_) => tracing::warn!(
                key,
                "multipart upload dropped outside a runtime; left incomplete (never visible)"
            ),
        }
    }
}

async fn abort_upload(mut upload: Box<dyn MultipartUpload>, key: String, timeout: Duration) {
    match tokio::time::timeout(timeout, upload.abort()).await {
        Ok(Ok(())) => tracing::debug!(key, "multipart upload aborted"),
        Ok(Err(e)) => tracing::warn!(
            key,
            error = %e,
            "aborting a multipart upload failed; it stays incomplete (never visible)"
        ),
        Err(_) => tracing::warn!(
            key,
            "aborting a multipart upload timed out; it stays incomplete (never visible)"
        ),
    }
}

/// Reads up to [`PART_SIZE`] bytes (fewer only at the end of the file).
pub(super) async fn read_part(file: &mut tokio::fs::File) -> Result<Bytes, StoreError> {
    let mut buf = BytesMut::with_capacity(PART_SIZE);
    let mut limited = file.take(PART_SIZE as u64);
    while limited.read_buf(&mut buf).await? > 0 {}
    Ok(buf.freeze())
}

/// A read at `offset` of an object the store answered with no bytes: the object's size and an
/// empty stream when `offset` is at its end, `None` when it is gone, an error past its end.
pub(super) async fn empty_at(
    store: &(impl BlobStore + ?Sized),
    key: &str,
    offset: u64,
) -> Result<Option<(u64, ByteStream)>, StoreError> {
    let Some(size) = store.head(key).await? else {
        return Ok(None);
    };
    if offset > size {
        return Err(beyond_end(key, offset, size));
    }
    Ok(Some((size, empty_stream())))
}

pub(super) fn empty_stream() -> ByteStream {
    Box::pin(futures_util::stream::empty())
}

pub(super) fn beyond_end(key: &str, offset: u64, size: u64) -> StoreError {
    StoreError::Refused(format!(
        "{key}: offset {offset} is beyond the end ({size} bytes)"
    ))
}

/// A response body whose every chunk must arrive within `idle`.
pub(super) fn idle_bounded<E>(
    stream: futures_util::stream::BoxStream<'static, Result<Bytes, E>>,
    idle: Duration,
) -> ByteStream
where
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    Box::pin(futures_util::stream::unfold(
        Some(stream),
        move |state| async move {
            let mut stream = state?;
            match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(stream))),
                Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
                Ok(None) => None,
                Err(_) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("object store sent nothing for {idle:?}"),
                    )),
                    None,
                )),
            }
        },
    ))
}

/// Sorts an `object_store` error into the three kinds callers act on.
pub(super) fn classify(e: object_store::Error) -> StoreError {
    use object_store::Error as E;
    let message = e.to_string();
    match e {
        E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::InvalidPath { .. }
        | E::NotFound { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::UnknownConfigurationKey { .. } => StoreError::Refused(message),
        _ => match http_status(&message) {
            Some(status) if (400..500).contains(&status) && status != 408 && status != 429 => {
                StoreError::Refused(message)
            }
            _ => StoreError::Unavailable(message),
        },
    }
}

/// The HTTP status in an `object_store` error message ("… status code: 403 Forbidden …"): its
/// retry error type, which carries the status, is not public.
fn http_status(message: &str) -> Option<u16> {
    let at = message.find("status code: ")? + "status code: ".len();
    message.get(at..at + 3)?.parse().ok()
}

/// `scheme://host[:port]` of an endpoint URL — never its user info or path.
pub(super) fn origin_of(endpoint: &str) -> Option<String> {
    let url = url::Url::parse(endpoint).ok()?;
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use futures_util::TryStreamExt;
    use object_store::memory::InMemory;

    use super::*;
    use crate::config::{S3StoreConfig, Secret};

    fn memory(prefix: &str) -> (Arc<InMemory>, ObjectBackend) {
        let inner = Arc::new(InMemory::new());
        let backend = ObjectBackend::from_store(
            inner.clone(),
            prefix,
            Duration::from_secs(10),
            "memory://".into(),
        )
        .unwrap();
        (inner, backend)
    }

    #[tokio::test]
    async fn keys_live_under_the_prefix_and_list_strips_it() {
        let (inner, store) = memory("/fleet/a/");
        store
            .put_bytes("blobs/sha256/ab", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        store
            .put_bytes("blobs/sha256/b", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let raw = inner
            .head(&ObjectPath::from("fleet/a/blobs/sha256/ab"))
            .await
            .unwrap();
        assert_eq!(raw.size, 5);
        let listed = store.list("blobs/sha256/a").await.unwrap();
        assert_eq!(
            listed,
            [ObjectInfo {
                key: "blobs/sha256/ab".into(),
                size: 5
            }]
        );
        assert_eq!(store.list("").await.unwrap().len(), 2);
        assert_eq!(store.list("blobs/").await.unwrap().len(), 2);
        assert!(store.list("tags/").await.unwrap().is_empty());
        let (size, stream) = store
            .get("blobs/sha256/ab", 1, Some(3))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(size, 5);
        let got: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(got.concat(), b"ell");
        assert!(matches!(
            store.get("blobs/sha256/ab", 6, None).await,
            Err(StoreError::Refused(_))
        ));
        assert!(matches!(
            store.put_bytes("../x", Bytes::new()).await,
            Err(StoreError::Refused(_))
        ));
    }

    #[tokio::test]
    async fn conditional_create_is_probed_once_and_the_probe_is_cleaned_up() {
        let (inner, store) = memory("");
        assert_eq!(store.conditional_create(), None);
        assert_eq!(
            store
                .create("leases/a", Bytes::from_static(b"1"))
                .await
                .unwrap(),
            Created::Created
        );
        assert_eq!(store.conditional_create(), Some(true));
        assert_eq!(
            store
                .create("leases/a", Bytes::from_static(b"2"))
                .await
                .unwrap(),
            Created::Exists
        );
        let all: Vec<_> = inner.list(None).try_collect().await.unwrap();
        assert_eq!(all.len(), 1, "probe left behind: {all:?}");
    }

    #[test]
    fn errors_are_sorted_into_unavailable_and_refused() {
        let generic = |msg: &str| object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        };
        assert!(matches!(
            classify(generic(
                "Server returned non-2xx status code: 503 Service Unavailable"
            )),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            classify(generic(
                "Server returned non-2xx status code: 400 Bad Request: x"
            )),
            StoreError::Refused(_)
        ));
        assert!(matches!(
            classify(generic("HTTP error: error sending request")),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            classify(object_store::Error::PermissionDenied {
                path: "x".into(),
                source: "403".into()
            }),
            StoreError::Refused(_)
        ));
    }

    #[test]
    fn describe_and_debug_never_show_credentials() {
        let cfg = SharedStoreConfig {
            kind: SharedStoreKind::S3(S3StoreConfig {
                bucket: "b".into(),
                endpoint: Some("http://user:pw@127.0.0.1:3900/".into()),
                region: Some("garage".into()),
                prefix: "mirror/".into(),
                access_key_id: Some("GKaccess".into()),
                secret_access_key: Some(Secret::new("topsecret")),
                path_style: true,
            }),
            timeout: Duration::from_secs(3),
            fill_lease_ttl: Duration::from_secs(60),
        };
        let store = ObjectBackend::new(&cfg).unwrap();
        assert_eq!(store.describe(), "s3://b/mirror/ at http://127.0.0.1:3900");
        for text in [format!("{store:?}"), format!("{cfg:?}")] {
            assert!(!text.contains("topsecret"), "{text}");
        }
        let dir = SharedStoreConfig {
            kind: SharedStoreKind::Dir(PathBuf::from("/x")),
            ..cfg
        };
        assert!(ObjectBackend::new(&dir).is_err());
    }

    /// A backend for an S3 endpoint on a local port.
    fn local_s3(port: u16, timeout: Duration) -> ObjectBackend {
        let cfg = SharedStoreConfig {
            kind: SharedStoreKind::S3(S3StoreConfig {
                bucket: "b".into(),
                endpoint: Some(format!("http://127.0.0.1:{port}")),
                region: Some("r".into()),
                prefix: String::new(),
                access_key_id: Some("k".into()),
                secret_access_key: Some(Secret::new("s")),
                path_style: true,
            }),
            timeout,
            fill_lease_ttl: Duration::from_secs(60),
        };
        ObjectBackend::new(&cfg).unwrap()
    }

    /// An S3 endpoint that hangs: `HEAD` is never answered; `GET` answers 10 of 100 bytes and
    /// then goes silent, holding the connection open.
    async fn hanging_s3() -> u16 {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    if head.starts_with(b"GET ") {
                        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"e\"\r\n\
                                      Last-Modified: Mon, 23 Nov 2026 10:00:00 GMT\r\n\r\n0123456789";
                        let _ = conn.write_all(answer.as_bytes()).await;
                    }
                    tokio::time::sleep(Duration::from_secs(600)).await;
                    drop(conn);
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn a_hanging_store_is_bounded_per_request_and_per_chunk() {
        let port = hanging_s3().await;
        let store = local_s3(port, Duration::from_secs(1));
        let err = store.head("k").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");

        let (size, mut stream) = store.get("k", 0, None).await.unwrap().unwrap();
        assert_eq!(size, 100);
        let mut got = Vec::new();
        let stalled = loop {
            match stream.next().await {
                Some(Ok(chunk)) => got.extend_from_slice(&chunk),
                Some(Err(e)) => break e,
                None => panic!("the stream ended without an error after {got:?}"),
            }
        };
        assert_eq!(got, b"0123456789");
        assert_eq!(stalled.kind(), std::io::ErrorKind::TimedOut, "{stalled}");
        assert!(
            stream.next().await.is_none(),
            "the stream ends after the error"
        );
    }

    #[tokio::test]
    async fn a_dead_endpoint_fails_fast_as_unavailable() {
        // A port nobody listens on: connection refused, retried twice, then Unavailable.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = local_s3(port, Duration::from_secs(2));
        let started = std::time::Instant::now();
        let err = store.head("x").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
    }
}
