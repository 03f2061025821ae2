//! The shared blob store of a fleet (`storage.backend`): one small trait, two implementations —
//! a directory ([`fs::FsStore`], also usable on a shared mount) and any `object_store` backend
//! ([`object::ObjectBackend`]: S3 / Ceph RGW / Garage / MinIO, GCS, Azure).
//!
//! Keys are relative `/`-separated paths (`blobs/sha256/<hex>`, `manifests/sha256/<hex>`,
//! `tags/<upstream>/<repo>/<tag>`, `leases/sha256/<hex>`); the backend adds its configured prefix.

use std::path::Path;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::cache::fill::ByteStream;




pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Network failure, timeout, 5xx: the store is (maybe briefly) unavailable.
    #[error("object store unavailable: {0}")]
    Unavailable(String),
    /// The store answered but refused (credentials, permissions, bad request).
    #[error("object store refused the request: {0}")]
    Refused(String),
    /// Local I/O (reading the file being uploaded, the filesystem backend).
    #[error("object store I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the store's prefix (as passed to `put_*`).
    pub key: String,
    pub size: u64,
}

/// What a conditional create did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The object did not exist; it does now, with our bytes.
    Created,
    /// Somebody else's object is there; nothing was written.
    Exists,
    /// The backend cannot create conditionally (it would overwrite): nothing was written.
    Unsupported,
}

pub trait BlobStore: Send + Sync + 'static {
    /// Where it points, for logs and `/readyz` (`s3://bucket/prefix`, `file:///srv/shared`) —
    /// never credentials.
    fn describe(&self) -> String;

    /// The object's size, or `None` when it does not exist.
    fn head<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<u64>>;

    /// Streams the object from `offset` (`len` bytes, or to the end), with the object's total
    /// size; `None` when it does not exist. `offset` beyond the end is `Refused`.
    fn get<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: Option<u64>,
    ) -> StoreFuture<'a, Option<(u64, ByteStream)>>;

    /// A whole small object (manifests, tag records, leases) in memory.
    fn get_bytes<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>>;

    /// Uploads a local file (multipart above a threshold). The object becomes visible only
    /// complete: a crash or error midway leaves no object (and aborts the multipart upload).
    /// Concurrent writers of the same key with the same content are fine: last one wins.
    fn put_file<'a>(&'a self, key: &'a str, path: &'a Path) -> StoreFuture<'a, ()>;

    /// Writes a small object whole (replacing any).
    fn put_bytes<'a>(&'a self, key: &'a str, bytes: Bytes) -> StoreFuture<'a, ()>;

    /// Writes the object only if none exists (`If-None-Match: *`).
    fn create<'a>(&'a self, key: &'a str, bytes: Bytes) -> StoreFuture<'a, Created>;

    /// Removes the object; absent is fine.
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;

    /// Every object whose key starts with `prefix`, sorted by key.
    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectInfo>>;
}
