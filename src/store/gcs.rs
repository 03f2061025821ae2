//! [`GcsStore`]: the blob store on Google Cloud Storage through GCS's JSON API
//! (`/storage/v1/b/<bucket>/o/...`, Google's primary API, also what emulators such as
//! fake-gcs-server serve), with `reqwest`.
//!
//! - **Requests**: metadata `GET /storage/v1/b/<bucket>/o/<name>` (`head`),
//!   `GET /download/storage/v1/b/<bucket>/o/<name>?alt=media` with `Range` (`get`),
//!   `POST /upload/storage/v1/b/<bucket>/o?uploadType=media&name=<name>` (`put_bytes`, small
//!   files), `uploadType=multipart` with `ifGenerationMatch=0` (`create`: 412 means the object
//!   exists), `uploadType=resumable` for files above [`PART_SIZE`], `DELETE` (`delete`) and
//!   `GET /storage/v1/b/<bucket>/o?prefix=...&pageToken=...` (`list`, every page). Object names
//!   are one percent-encoded path segment (`/` is `%2F`).
//! - **A prefix** (`storage.gcs.prefix`), so one bucket can hold several fleets.
//! - **Credentials** come from `object_store`'s GCS machinery (service-account file, `GOOGLE_*`
//!   environment, application default credentials, the metadata server), which caches and
//!   refreshes tokens; a service-account file with `"disable_oauth": true` (an emulator) yields
//!   an empty token and no `Authorization` header is sent. Tokens never reach logs or `Debug`.
//! - **Bounded waiting**: every request (with its token) is bounded by
//!   `storage.object_store_timeout`; uploads get an allowance for a slow link ([`MIN_RATE`]);
//!   streamed reads are bounded per chunk (silence, not length). Idempotent requests are retried
//!   twice on connection failures, 408, 429 and 5xx, within the same bound.
//! - **Uploads that are whole or absent**: a file above [`PART_SIZE`] goes up as a resumable
//!   upload in chunks of [`PART_SIZE`] (a multiple of GCS's 256 KiB granularity); only the last
//!   chunk, which names the total size, makes the object visible. An error or the `put_file`
//!   future being dropped cancels the session (`DELETE` of the session URI); an abandoned session
//!   is never visible either. Concurrent writers of a key each have their own session: the last
//!   to finish wins, whole.
//! - **Conditional create** needs no probe: GCS applies `ifGenerationMatch` atomically. It is a
//!   multipart upload (metadata and data in one request), the form whose precondition
//!   fake-gcs-server honours too (it ignores it on media uploads).
//! - **Errors in three kinds**: not found is `Ok(None)`; connection failures, timeouts, 408, 429
//!   and 5xx are [`StoreError::Unavailable`]; other answers are [`StoreError::Refused`].

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use object_store::gcp::GcpCredentialProvider;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{RequestBuilder, Response, StatusCode};
use url::Url;

use super::object::{
    classify, client_options, empty_at, idle_bounded, origin_of, read_part, refused, retry_config,
    MIN_RATE, PART_SIZE,
};
use super::{
    validate_key, validate_prefix, BlobStore, Created, ObjectInfo, StoreError, StoreFuture,
};
use crate::config::GcsStoreConfig;
use crate::stream::ByteStream;

/// Google's endpoint, used when `storage.gcs.endpoint` is not set.
pub const GOOGLE_ENDPOINT: &str = "https://storage.googleapis.com";

/// Retries of an idempotent request after a failure worth retrying.
const RETRIES: u32 = 2;

/// The shared store on Google Cloud Storage. Cheap to share (`Arc`s inside).
pub struct GcsStore {
    http: reqwest::Client,
    credentials: GcpCredentialProvider,
    /// The endpoint: [`GOOGLE_ENDPOINT`] or `storage.gcs.endpoint`.
    base: Url,
    bucket: String,
    /// `""` or `"some/prefix/"`.
    prefix: String,
    describe: String,
    timeout: Duration,
}

impl std::fmt::Debug for GcsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential provider: it holds keys and tokens.
        f.debug_struct("GcsStore")
            .field("describe", &self.describe)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The fields of an object's metadata this store reads (GCS sends `size` as a string).
#[derive(serde::Deserialize)]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    size: String,
}

/// One page of a listing.
#[derive(serde::Deserialize)]
struct ListPage {
    #[serde(default)]
    items: Vec<ObjectMeta>,
    #[serde(rename = "nextPageToken")]
    next_page_token: Option<String>,
}

impl ObjectMeta {
    fn size(&self) -> Result<u64, StoreError> {
        self.size
            .parse()
            .map_err(|_| StoreError::Refused(format!("{}: object size {:?}", self.name, self.size)))
    }
}

impl GcsStore {
    /// Builds the client `gcs` describes. Does not contact the store (a service-account file
    /// is read here; a bad one is `Refused`).
    pub fn new(gcs: &GcsStoreConfig, timeout: Duration) -> Result<GcsStore, StoreError> {
        let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(&gcs.bucket)
            .with_retry(retry_config(timeout))
            .with_client_options(client_options(timeout, gcs.endpoint.as_deref()));
        if let Some(path) = &gcs.service_account_path {
            b = b.with_service_account_path(path.to_string_lossy());
        }
        if let Some(endpoint) = &gcs.endpoint {
            b = b.with_base_url(endpoint.trim_end_matches('/'));
        }
        let credentials = b.build().map_err(refused)?.credentials().clone();
        let endpoint = gcs.endpoint.as_deref().unwrap_or(GOOGLE_ENDPOINT);
        let base = Url::parse(endpoint)
            .ok()
            .filter(|u| !u.cannot_be_a_base() && matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                StoreError::Refused("storage.gcs.endpoint is not an http(s) URL".into())
            })?;
        // No redirects: a resumable upload's "308 Resume Incomplete" is an answer, not a move.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Refused(format!("GCS HTTP client: {e}")))?;
        let prefix = gcs.prefix.trim_matches('/');
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            validate_key(prefix)?;
            format!("{prefix}/")
        };
        let mut describe = format!("gs://{}/{prefix}", gcs.bucket);
        if let Some(origin) = gcs.endpoint.as_deref().and_then(origin_of) {
            describe.push_str(&format!(" at {origin}"));
        }
        Ok(GcsStore {
            http,
            credentials,
            base,
            bucket: gcs.bucket.clone(),
            prefix,
            describe,
            timeout,
        })
    }

    /// The object name of `key`: the prefix and the key.
    fn name(&self, key: &str) -> Result<String, StoreError> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// The endpoint with `segments` appended, each percent-encoded as one path segment.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // `new` checked that the base can have path segments.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// The object's metadata resource.
    fn object_url(&self, name: &str) -> Url {
        self.url(&["storage", "v1", "b", &self.bucket, "o", name])
    }

    /// The object's content.
    fn media_url(&self, name: &str) -> Url {
        let mut url = self.url(&["download", "storage", "v1", "b", &self.bucket, "o", name]);
        url.query_pairs_mut().append_pair("alt", "media");
        url
    }

    /// The bucket's upload endpoint for `uploadType`.
    fn upload_url(&self, upload_type: &str) -> Url {
        let mut url = self.url(&["upload", "storage", "v1", "b", &self.bucket, "o"]);
        url.query_pairs_mut().append_pair("uploadType", upload_type);
        url
    }

    /// The time allowed to move `bytes` bytes.
    fn transfer_bound(&self, bytes: usize) -> Duration {
        self.timeout + Duration::from_secs_f64(bytes as f64 / MIN_RATE as f64)
    }

    /// `req` with the bearer token, if the credentials have one (an emulator's have none).
    async fn authorize(&self, req: RequestBuilder) -> Result<RequestBuilder, StoreError> {
        let credential = self.credentials.get_credential().await.map_err(classify)?;
        Ok(if credential.bearer.is_empty() {
            req
        } else {
            req.bearer_auth(&credential.bearer)
        })
    }

    /// Sends the request `build` makes (afresh for every attempt) and returns the answer, of
    /// whatever status. Idempotent requests are retried after a connection failure, 408, 429 or
    /// 5xx while `deadline` allows. Everything, the token included, ends by `deadline`.
    async fn send(
        &self,
        what: &str,
        deadline: Instant,
        idempotent: bool,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, StoreError> {
        let attempts = async {
            let mut backoff = Duration::from_millis(100);
            let mut attempt = 0;
            loop {
                let sent = self.authorize(build()).await?.send().await;
                let retryable = match &sent {
                    Ok(resp) => transient(resp.status()),
                    Err(e) => !e.is_builder(),
                };
                let room = deadline.saturating_duration_since(Instant::now());
                if !idempotent || !retryable || attempt >= RETRIES || room <= backoff {
                    return sent.map_err(|e| transport(what, e));
                }
                tracing::debug!(what, attempt, "GCS request failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                attempt += 1;
            }
        };
        within(deadline, what, attempts).await?
    }

    /// An object's metadata; `None` when it does not exist.
    async fn metadata(&self, key: &str, name: &str) -> Result<Option<ObjectMeta>, StoreError> {
        self.get_found(key, self.object_url(name), |r| r.json())
            .await
    }

    /// GETs `url` (retried, within the store's timeout): `None` on 404, else the answer as
    /// `read` takes it.
    async fn get_found<T, Fut>(
        &self,
        key: &str,
        url: Url,
        read: impl FnOnce(Response) -> Fut,
    ) -> Result<Option<T>, StoreError>
    where
        Fut: std::future::Future<Output = reqwest::Result<T>>,
    {
        let deadline = Instant::now() + self.timeout;
        let fetch = async {
            let resp = self
                .send(key, deadline, true, || self.http.get(url.clone()))
                .await?;
            match resp.status() {
                StatusCode::NOT_FOUND => Ok(None),
                s if s.is_success() => Ok(Some(read(resp).await.map_err(|e| transport(key, e))?)),
                _ => Err(failure(key, resp).await),
            }
        };
        within(deadline, key, fetch).await?
    }

    /// Writes `bytes` as the object `name` in one request (replacing any).
    async fn upload_media(&self, key: &str, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.transfer_bound(bytes.len());
        let mut url = self.upload_url("media");
        url.query_pairs_mut().append_pair("name", name);
        let upload = async {
            let resp = self
                .send(key, deadline, true, || {
                    self.http
                        .post(url.clone())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .body(bytes.clone())
                })
                .await?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(failure(key, resp).await)
            }
        };
        within(deadline, key, upload).await?
    }

    /// Starts a resumable upload of `name`: the session's URI.
    async fn start_session(&self, key: &str, name: &str) -> Result<Session, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let mut url = self.upload_url("resumable");
        url.query_pairs_mut().append_pair("name", name);
        let metadata = serde_json::json!({ "name": name }).to_string();
        let start = async {
            // A second session, should a retry start one, is never visible and expires.
            let resp = self
                .send(key, deadline, true, || {
                    self.http
                        .post(url.clone())
                        .header(CONTENT_TYPE, "application/json; charset=UTF-8")
                        .header("X-Upload-Content-Type", "application/octet-stream")
                        .body(metadata.clone())
                })
                .await?;
            if !resp.status().is_success() {
                return Err(failure(key, resp).await);
            }
            let location = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok());
            location
                .and_then(|l| self.base.join(l).ok())
                .ok_or_else(|| {
                    StoreError::Refused(format!("{key}: resumable upload without a session URI"))
                })
        };
        let uri = within(deadline, key, start).await??;
        Ok(Session {
            http: self.http.clone(),
            uri: Some(uri),
            key: key.to_owned(),
            timeout: self.timeout,
        })
    }

    /// Uploads `first`, `second` and the rest of `file` through a resumable session, reading
    /// the next chunk while one is sent. Cancels the session on error (and on drop).
    async fn put_resumable(
        &self,
        key: &str,
        name: &str,
        file: &mut tokio::fs::File,
        first: Bytes,
        second: Bytes,
    ) -> Result<(), StoreError> {
        let mut session = self.start_session(key, name).await?;
        let result = async {
            let (mut chunk, mut next, mut offset) = (first, second, 0u64);
            loop {
                let bound = self.transfer_bound(chunk.len());
                if next.is_empty() {
                    let total = offset + chunk.len() as u64;
                    return session.put_chunk(offset, chunk, Some(total), bound).await;
                }
                let send = session.put_chunk(offset, chunk.clone(), None, bound);
                let (sent, read) = tokio::join!(send, read_part(file));
                sent?;
                offset += chunk.len() as u64;
                chunk = std::mem::replace(&mut next, read?);
            }
        }
        .await;
        match result {
            Ok(()) => session.uri = None,
            Err(_) => session.cancel().await,
        }
        result
    }

    /// One page of the listing of names starting with `full`.
    async fn list_page(
        &self,
        full: &str,
        token: Option<&str>,
        what: &str,
    ) -> Result<ListPage, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let mut url = self.url(&["storage", "v1", "b", &self.bucket, "o"]);
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("fields", "items(name,size),nextPageToken");
            if !full.is_empty() {
                query.append_pair("prefix", full);
            }
            if let Some(token) = token {
                query.append_pair("pageToken", token);
            }
        }
        let fetch = async {
            let resp = self
                .send(what, deadline, true, || self.http.get(url.clone()))
                .await?;
            if !resp.status().is_success() {
                return Err(failure(what, resp).await);
            }
            resp.json::<ListPage>()
                .await
                .map_err(|e| transport(what, e))
        };
        within(deadline, what, fetch).await?
    }

    /// The object's size from a download's headers: `Content-Range` of a 206, else the stored
    /// length; `None` if the answer does not say.
    fn total_size(resp: &Response) -> Option<u64> {
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            return header(CONTENT_RANGE.as_str())?
                .rsplit('/')
                .next()?
                .parse()
                .ok();
        }
        header("x-goog-stored-content-length")
            .or_else(|| header(CONTENT_LENGTH.as_str()))?
            .parse()
            .ok()
    }
}

impl BlobStore for GcsStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn head<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<u64>> {
        async move {
            let name = self.name(key)?;
            match self.metadata(key, &name).await? {
                Some(meta) => Ok(Some(meta.size()?)),
                None => Ok(None),
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
            let name = self.name(key)?;
            let range = match len {
                // A zero-length range is not a valid HTTP range: answer it from the size.
                Some(0) => return empty_at(self, key, offset).await,
                Some(n) => Some(format!("bytes={offset}-{}", offset.saturating_add(n - 1))),
                None if offset == 0 => None,
                None => Some(format!("bytes={offset}-")),
            };
            let url = self.media_url(&name);
            let deadline = Instant::now() + self.timeout;
            let resp = self
                .send(key, deadline, true, || {
                    let req = self.http.get(url.clone());
                    match &range {
                        Some(range) => req.header(RANGE, range),
                        None => req,
                    }
                })
                .await?;
            let status = resp.status();
            match status {
                StatusCode::NOT_FOUND => return Ok(None),
                // At or past the end: the size tells which.
                StatusCode::RANGE_NOT_SATISFIABLE => return empty_at(self, key, offset).await,
                s if !s.is_success() => return Err(failure(key, resp).await),
                _ => {}
            }
            let total = match Self::total_size(&resp) {
                Some(total) => total,
                None => self.head(key).await?.unwrap_or(0),
            };
            let whole = offset == 0 && len.is_none_or(|n| n >= total);
            if status != StatusCode::PARTIAL_CONTENT && !whole {
                return Err(StoreError::Refused(format!(
                    "{key}: the store answered {status} to a range request"
                )));
            }
            let body = resp.bytes_stream().map(|r| r.map_err(|e| e.without_url()));
            Ok(Some((total, idle_bounded(body.boxed(), self.timeout))))
        }
        .boxed()
    }

    fn get_bytes<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        async move {
            let name = self.name(key)?;
            self.get_found(key, self.media_url(&name), |r| r.bytes())
                .await
        }
        .boxed()
    }

    fn put_file<'a>(&'a self, key: &'a str, path: &'a std::path::Path) -> StoreFuture<'a, ()> {
        async move {
            let name = self.name(key)?;
            let mut file = tokio::fs::File::open(path).await?;
            // Read ahead one chunk (and one more) to choose between one request and a resumable
            // upload; this works for sources whose size is not known up front, too.
            let first = read_part(&mut file).await?;
            if first.len() < PART_SIZE {
                return self.upload_media(key, &name, first).await;
            }
            let second = read_part(&mut file).await?;
            if second.is_empty() {
                return self.upload_media(key, &name, first).await;
            }
            self.put_resumable(key, &name, &mut file, first, second)
                .await
        }
        .boxed()
    }

    fn put_bytes<'a>(&'a self, key: &'a str, bytes: Bytes) -> StoreFuture<'a, ()> {
        async move {
            let name = self.name(key)?;
            self.upload_media(key, &name, bytes).await
        }
        .boxed()
    }

    fn create<'a>(&'a self, key: &'a str, bytes: Bytes) -> StoreFuture<'a, Created> {
        async move {
            let name = self.name(key)?;
            let deadline = Instant::now() + self.transfer_bound(bytes.len());
            let mut url = self.upload_url("multipart");
            url.query_pairs_mut().append_pair("ifGenerationMatch", "0");
            let (content_type, body) = multipart_related(&name, &bytes);
            // Not retried: a retry after a lost answer would find our own object and say Exists.
            let resp = self
                .send(key, deadline, false, || {
                    self.http
                        .post(url.clone())
                        .header(CONTENT_TYPE, content_type.clone())
                        .body(body.clone())
                })
                .await?;
            match resp.status() {
                StatusCode::PRECONDITION_FAILED => Ok(Created::Exists),
                s if s.is_success() => Ok(Created::Created),
                _ => Err(failure(key, resp).await),
            }
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        async move {
            let name = self.name(key)?;
            let url = self.object_url(&name);
            let deadline = Instant::now() + self.timeout;
            let resp = self
                .send(key, deadline, true, || self.http.delete(url.clone()))
                .await?;
            match resp.status() {
                StatusCode::NOT_FOUND => Ok(()),
                s if s.is_success() => Ok(()),
                _ => Err(failure(key, resp).await),
            }
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectInfo>> {
        async move {
            validate_prefix(prefix)?;
            let full = format!("{}{prefix}", self.prefix);
            let what = format!("list {prefix:?}");
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = self.list_page(&full, token.as_deref(), &what).await?;
                for meta in &page.items {
                    if let Some(key) = meta.name.strip_prefix(self.prefix.as_str()) {
                        if key.starts_with(prefix) {
                            out.push(ObjectInfo {
                                key: key.to_owned(),
                                size: meta.size()?,
                            });
                        }
                    }
                }
                match page.next_page_token {
                    Some(next) if !next.is_empty() => token = Some(next),
                    _ => break,
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        }
        .boxed()
    }
}

/// A resumable upload session. Its URI is a credential for the upload (never logged). Whatever
/// ends it early — an error, or the owner being dropped — cancels it; only the last chunk makes
/// the object visible.
struct Session {
    http: reqwest::Client,
    /// `None` once the upload finished or was cancelled.
    uri: Option<Url>,
    key: String,
    timeout: Duration,
}

impl Session {
    /// Sends the chunk at `offset` (`total`: the object's size, for the last chunk) and, if the
    /// store kept only part of it, the rest. Chunks other than the last are multiples of 256 KiB.
    async fn put_chunk(
        &self,
        offset: u64,
        chunk: Bytes,
        total: Option<u64>,
        bound: Duration,
    ) -> Result<(), StoreError> {
        let uri = self.uri.as_ref().ok_or_else(|| {
            StoreError::Refused(format!("{}: the upload session has ended", self.key))
        })?;
        let key = self.key.as_str();
        let end = offset + chunk.len() as u64;
        let mut from = offset;
        loop {
            let part = chunk.slice((from - offset) as usize..);
            let size = total.map_or_else(|| "*".to_owned(), |t| t.to_string());
            let range = format!("bytes {from}-{}/{size}", end - 1);
            let put = self
                .http
                .put(uri.clone())
                .header(CONTENT_RANGE, range)
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(part)
                .send();
            let resp = within(Instant::now() + bound, key, put)
                .await?
                .map_err(|e| transport(key, e))?;
            match resp.status().as_u16() {
                200 | 201 if total.is_some() => return Ok(()),
                308 => {}
                _ => return Err(failure(key, resp).await),
            }
            // `Range: bytes=0-<last byte kept>`, absent when nothing was kept.
            let kept = resp
                .headers()
                .get(RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|r| r.rsplit('-').next()?.parse::<u64>().ok())
                .map_or(0, |last| last + 1);
            if kept >= end && total.is_none() {
                return Ok(());
            }
            if kept <= from || kept >= end {
                return Err(StoreError::Unavailable(format!(
                    "{key}: the store kept {kept} bytes of an upload sent up to {end}{}",
                    if total.is_some() {
                        " and did not finish it"
                    } else {
                        ""
                    }
                )));
            }
            from = kept;
        }
    }

    /// Cancels the session now (bounded).
    async fn cancel(&mut self) {
        if let Some(uri) = self.uri.take() {
            cancel_session(
                self.http.clone(),
                uri,
                std::mem::take(&mut self.key),
                self.timeout,
            )
            .await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(uri) = self.uri.take() else {
            return;
        };
        let key = std::mem::take(&mut self.key);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(cancel_session(self.http.clone(), uri, key, self.timeout));
            }
            Err(_) => tracing::warn!(
                key,
                "resumable upload dropped outside a runtime; left incomplete (never visible)"
            ),
        }
    }
}

/// `DELETE` of the session URI; GCS answers 499 for a cancelled session.
async fn cancel_session(http: reqwest::Client, uri: Url, key: String, timeout: Duration) {
    match tokio::time::timeout(timeout, http.delete(uri).send()).await {
        Ok(Ok(resp)) if matches!(resp.status().as_u16(), 499 | 200 | 204 | 404 | 410) => {
            tracing::debug!(key, "resumable upload cancelled")
        }
        Ok(Ok(resp)) => tracing::warn!(
            key,
            status = %resp.status(),
            "cancelling a resumable upload failed; it stays incomplete (never visible)"
        ),
        Ok(Err(e)) => tracing::warn!(
            key,
            error = %e.without_url(),
            "cancelling a resumable upload failed; it stays incomplete (never visible)"
        ),
        Err(_) => tracing::warn!(
            key,
            "cancelling a resumable upload timed out; it stays incomplete (never visible)"
        ),
    }
}

/// A `multipart/related` body: the object's metadata (its name), then its bytes. The boundary
/// is random and chosen not to occur in the data.
fn multipart_related(name: &str, data: &[u8]) -> (String, Bytes) {
    let boundary = loop {
        let candidate = format!("stowage-{:032x}", rand::random::<u128>());
        if !data
            .windows(candidate.len())
            .any(|w| w == candidate.as_bytes())
        {
            break candidate;
        }
    };
    let metadata = serde_json::json!({ "name": name }).to_string();
    let mut body = Vec::with_capacity(data.len() + metadata.len() + 256);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n\
             --{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/related; boundary={boundary}"),
        Bytes::from(body),
    )
}

/// Worth retrying: the store is busy or briefly broken.
fn transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// `fut`, or `Unavailable` once `deadline` has passed.
async fn within<T>(
    deadline: Instant,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, StoreError> {
    tokio::time::timeout_at(deadline.into(), fut)
        .await
        .map_err(|_| StoreError::Unavailable(format!("{what}: no answer in time")))
}

/// A request that got no (whole) answer: the store is unavailable. The URL is left out (a
/// session URI is a credential).
fn transport(what: &str, e: reqwest::Error) -> StoreError {
    let e = e.without_url();
    if e.is_builder() {
        StoreError::Refused(format!("{what}: {e}"))
    } else {
        StoreError::Unavailable(format!("{what}: {e}"))
    }
}

/// An answer other than success: 408, 429 and 5xx are `Unavailable`, the rest `Refused`, with
/// the store's message (GCS: `{"error": {"message": ...}}`), read within a short bound.
async fn failure(what: &str, resp: Response) -> StoreError {
    let status = resp.status();
    let text = tokio::time::timeout(Duration::from_secs(2), resp.text())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or(text);
    let message: String = message.trim().chars().take(300).collect();
    let message = format!("{what}: GCS answered {status}: {message}");
    if transient(status) {
        StoreError::Unavailable(message)
    } else {
        StoreError::Refused(message)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A store on `endpoint` whose service-account file turns OAuth off (kept in `dir`).
    fn store(dir: &std::path::Path, endpoint: &str, timeout: Duration) -> GcsStore {
        let key = dir.join("sa.json");
        let json = r#"{"private_key": "secretkey", "private_key_id": "kid",
                       "client_email": "x@localhost", "disable_oauth": true}"#;
        std::fs::write(&key, json).unwrap();
        let cfg = GcsStoreConfig {
            bucket: "bkt".into(),
            prefix: "/fleet/a/".into(),
            service_account_path: Some(key),
            endpoint: Some(endpoint.into()),
        };
        GcsStore::new(&cfg, timeout).unwrap()
    }

    #[test]
    fn names_are_one_percent_encoded_segment_below_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(
            dir.path(),
            "http://u:pw@127.0.0.1:9/base/",
            Duration::from_secs(1),
        );
        let name = store.name("tags/h:5000/a b/v+1%").unwrap();
        assert_eq!(name, "fleet/a/tags/h:5000/a b/v+1%");
        assert_eq!(
            store.object_url(&name).as_str(),
            "http://u:pw@127.0.0.1:9/base/storage/v1/b/bkt/o/fleet%2Fa%2Ftags%2Fh:5000%2Fa%20b%2Fv+1%25"
        );
        assert!(store
            .media_url(&name)
            .as_str()
            .ends_with("/base/download/storage/v1/b/bkt/o/fleet%2Fa%2Ftags%2Fh:5000%2Fa%20b%2Fv+1%25?alt=media"));
        assert!(matches!(store.name("../x"), Err(StoreError::Refused(_))));
        assert_eq!(store.describe(), "gs://bkt/fleet/a/ at http://127.0.0.1:9");
        let debug = format!("{store:?}");
        assert!(
            !debug.contains("pw") && !debug.contains("secretkey"),
            "{debug}"
        );
    }

    #[test]
    fn multipart_bodies_frame_the_data_with_an_absent_boundary() {
        let (content_type, body) = multipart_related("a/b", b"--x\r\ndata");
        let boundary = content_type
            .strip_prefix("multipart/related; boundary=")
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.starts_with(&format!("--{boundary}\r\n")));
        assert!(body.contains("\r\n\r\n{\"name\":\"a/b\"}\r\n"));
        assert!(body.ends_with(&format!("\r\n\r\n--x\r\ndata\r\n--{boundary}--\r\n")));
        assert_eq!(body.matches(boundary).count(), 3);
    }

    #[tokio::test]
    async fn a_dead_endpoint_fails_fast_as_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let store = store(
            dir.path(),
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(2),
        );
        let started = std::time::Instant::now();
        let err = store.head("x").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        let err = store
            .put_bytes("x", Bytes::from_static(b"1"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        let err = store
            .create("x", Bytes::from_static(b"1"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
    }

    /// A server answering every request with `status` and a GCS error body; counts requests.
    async fn answering(status: u16) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = r#"{"error":{"code":0,"message":"told no"}}"#;
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        (port, count)
    }

    #[tokio::test]
    async fn busy_answers_are_retried_and_refusals_are_not() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (port, count) = answering(503).await;
        let busy = store(
            dir.path(),
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(10),
        );
        let err = busy.head("x").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("told no"), "{err}");
        assert_eq!(count.load(SeqCst), 1 + RETRIES as usize);
        // A conditional create is sent once: a retry could find its own object.
        let err = busy
            .create("x", Bytes::from_static(b"1"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert_eq!(count.load(SeqCst), 2 + RETRIES as usize);

        let (port, count) = answering(403).await;
        let refusing = store(
            dir.path(),
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(10),
        );
        let err = refusing.get("x", 0, None).await.err().unwrap();
        assert!(matches!(err, StoreError::Refused(_)), "{err}");
        let err = refusing.list("").await.unwrap_err();
        assert!(matches!(err, StoreError::Refused(_)), "{err}");
        assert_eq!(count.load(SeqCst), 2);
    }
}
