//! The shared blob store of a fleet (`storage.backend`): one small trait, three implementations
//! — a directory ([`fs::FsStore`], also usable on a shared mount), `object_store` backends
//! ([`object::ObjectBackend`]: S3 / Ceph RGW / Garage / MinIO, Azure) and Google Cloud Storage
//! on its JSON API ([`gcs::GcsStore`]).
//!
//! Keys are relative `/`-separated paths (`blobs/sha256/<hex>`, `manifests/sha256/<hex>`,
//! `tags/<upstream>/<repo>/<tag>`, `leases/sha256/<hex>`); the backend adds its configured prefix.
//!
//! Every backend is held to the one suite in `tests/store.rs`: whole and ranged reads, `head`,
//! `delete`, sorted `list`, conditional `create`, concurrent writers of one key, and "an upload
//! that does not finish leaves no visible object".

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::config::{check_store_key, SharedStoreConfig, SharedStoreKind};
use crate::stream::ByteStream;

pub mod fs;
pub mod gcs;
pub mod object;

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

/// A flat key → bytes store shared by the nodes of a fleet. Object-safe: held as
/// `Arc<dyn BlobStore>` (see [`open`]).
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

/// Builds the store `[storage]` configures: a directory ([`fs::FsStore`]), GCS
/// ([`gcs::GcsStore`]) or another object store ([`object::ObjectBackend`]). Does not contact the store; a bad endpoint or missing
/// credentials are reported here when the client library can tell, otherwise on first use.
pub fn open(cfg: &SharedStoreConfig) -> Result<Arc<dyn BlobStore>, StoreError> {
    match &cfg.kind {
        SharedStoreKind::Dir(root) => Ok(Arc::new(fs::FsStore::new(root.clone()))),
        SharedStoreKind::Gcs(gcs) => Ok(Arc::new(gcs::GcsStore::new(gcs, cfg.timeout)?)),
        _ => Ok(Arc::new(object::ObjectBackend::new(cfg)?)),
    }
}

/// Checks a key against [`check_store_key`] (non-empty relative path, no `.`/`..`/empty
/// components, no control characters or backslashes, not under `.tmp/`). Anything else is
/// `Refused`, so a key can never reach outside the store's root or prefix.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    check_store_key(key).map_err(|why| StoreError::Refused(format!("invalid key {key:?}: {why}")))
}

/// Checks a `list` prefix: empty, or what [`validate_key`] accepts (a trailing `/` allowed).
pub fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key(prefix.strip_suffix('/').unwrap_or(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_KEY_LEN;

    #[test]
    fn keys_that_could_escape_the_root_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "a//b",
            "a/",
            "../x",
            "a/../b",
            "a/./b",
            ".",
            "a\\b",
            "a\nb",
            "a\0b",
            ".tmp",
            ".tmp/x",
        ] {
            assert!(
                matches!(validate_key(bad), Err(StoreError::Refused(_))),
                "{bad:?} accepted"
            );
        }
        let long = "a".repeat(MAX_KEY_LEN + 1);
        assert!(validate_key(&long).is_err());
        for good in [
            "blobs/sha256/ab",
            "tags/registry.local:5000/library/alpine/3.20",
            "x",
            ".tmpx/y",
            "a/.b",
        ] {
            assert!(validate_key(good).is_ok(), "{good:?} refused");
        }
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("blobs/").is_ok());
        assert!(validate_prefix("blobs/sha256/a").is_ok());
        assert!(validate_prefix("../").is_err());
        assert!(validate_prefix("/").is_err());
    }
}
