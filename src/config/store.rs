//! `[storage]`'s shared store: which backend a fleet shares (`storage.backend` and its
//! `[storage.s3]` / `[storage.gcs]` / `[storage.azure]` table, or `storage.shared_path`), and
//! the rules every store key obeys.
//!
//! Config owns both, so the store layer ([`crate::store`]) depends on config and never the other
//! way round: the store re-checks every key it is handed with [`check_store_key`], and a
//! configured `prefix` has passed the same check here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{invalid, ConfigError};
use super::raw::{RawAzure, RawGcs, RawS3, RawStorage};
use super::units::parse_duration;

pub const DEFAULT_OBJECT_STORE_TIMEOUT: &str = "10s";
pub const DEFAULT_FILL_LEASE_TTL: &str = "2m";

/// The fleet's shared blob store (see [`crate::store`]).
#[derive(Clone, Debug)]
pub struct SharedStoreConfig {
    pub kind: SharedStoreKind,
    /// Bound on one object-store request: connect, small operations, silence mid-stream
    /// (`storage.object_store_timeout`).
    pub timeout: Duration,
    /// How long a node's claim to fill a blob holds other nodes off (`storage.fill_lease_ttl`).
    pub fill_lease_ttl: Duration,
}

/// Which store, and where.
#[derive(Clone, Debug)]
pub enum SharedStoreKind {
    /// A directory every node mounts (`backend = "filesystem"` with `shared_path`).
    Dir(PathBuf),
    /// `backend = "s3"`: AWS S3, Ceph RGW, Garage, MinIO.
    S3(S3StoreConfig),
    /// `backend = "gcs"`: Google Cloud Storage.
    Gcs(GcsStoreConfig),
    /// `backend = "azure"`: Azure Blob Storage (or Azurite).
    Azure(AzureStoreConfig),
}

/// `[storage.s3]`.
#[derive(Clone, Debug)]
pub struct S3StoreConfig {
    pub bucket: String,
    /// `http(s)://host:port` of a non-AWS server; `None` for AWS.
    pub endpoint: Option<String>,
    /// `None`: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Prepended to every key; empty or ending in `/`.
    pub prefix: String,
    /// `None`: `AWS_ACCESS_KEY_ID` (or the instance's role).
    pub access_key_id: Option<String>,
    /// `None`: `AWS_SECRET_ACCESS_KEY` (or the instance's role).
    pub secret_access_key: Option<Secret>,
    /// Path-style URLs (`endpoint/bucket/key`) rather than virtual-hosted (`bucket.endpoint/key`).
    pub path_style: bool,
}

/// `[storage.gcs]`.
#[derive(Clone, Debug)]
pub struct GcsStoreConfig {
    pub bucket: String,
    pub prefix: String,
    /// A service-account JSON key file; `None`: `GOOGLE_*` environment / ambient credentials.
    pub service_account_path: Option<PathBuf>,
    /// A non-Google endpoint (an emulator: `http://127.0.0.1:4443`).
    pub endpoint: Option<String>,
}

/// `[storage.azure]`.
#[derive(Clone, Debug)]
pub struct AzureStoreConfig {
    pub account: String,
    pub container: String,
    pub prefix: String,
    /// `None`: `AZURE_STORAGE_ACCESS_KEY` / ambient credentials.
    pub access_key: Option<Secret>,
    /// A non-Azure endpoint (Azurite: `http://127.0.0.1:10000/devstoreaccount1`).
    pub endpoint: Option<String>,
}

/// A credential: usable through [`Secret::expose`], printed by `Debug` as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for handing to the client library — never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The longest store key accepted (S3's limit is 1024 bytes, including the configured prefix).
pub const MAX_KEY_LEN: usize = 900;

/// The filesystem backend's staging directory below its root. Reserved in every backend, so a
/// key means the same thing whichever store holds it.
pub const STORE_TMP_DIR: &str = ".tmp";

/// Checks a store key: non-empty relative `/`-separated path, no empty, `.` or `..` components,
/// no control characters or backslashes, not under [`STORE_TMP_DIR`]. `Err` says why in a few
/// words. Nothing else can reach outside a store's root or prefix.
pub fn check_store_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("too long");
    }
    if key.starts_with('/') {
        return Err("absolute");
    }
    if key.chars().any(|c| c.is_control() || c == '\\') {
        return Err("control character or backslash");
    }
    for component in key.split('/') {
        match component {
            "" => return Err("empty path component"),
            "." | ".." => return Err("relative path component"),
            _ => {}
        }
    }
    let reserved = key
        .strip_prefix(STORE_TMP_DIR)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if reserved {
        return Err("reserved");
    }
    Ok(())
}

/// `storage.backend` and its table: the fleet's shared store, if any.
pub(super) fn shared_store_config(
    raw: &mut RawStorage,
    cache_path: &Path,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<SharedStoreConfig>, ConfigError> {
    let backend = raw
        .backend
        .as_deref()
        .unwrap_or("filesystem")
        .trim()
        .to_ascii_lowercase();
    check_tables_match_backend(raw, &backend)?;
    let (timeout, fill_lease_ttl) = store_timeouts(raw)?;
    let kind = match backend.as_str() {
        "filesystem" => match shared_dir(raw.shared_path.take(), cache_path)? {
            None => return Ok(None),
            Some(dir) => SharedStoreKind::Dir(dir),
        },
        "s3" => SharedStoreKind::S3(s3_store(raw.s3.take(), env)?),
        "gcs" => SharedStoreKind::Gcs(gcs_store(raw.gcs.take())?),
        "azure" => SharedStoreKind::Azure(azure_store(raw.azure.take(), env)?),
        other => {
            return Err(invalid(
                "storage.backend",
                format!("{other:?} is not one of \"filesystem\", \"s3\", \"gcs\", \"azure\""),
            ))
        }
    };
    Ok(Some(SharedStoreConfig {
        kind,
        timeout,
        fill_lease_ttl,
    }))
}

/// Each table belongs to one backend, and `shared_path` to `"filesystem"`; a setting for
/// another backend is a mistake worth naming.
fn check_tables_match_backend(raw: &RawStorage, backend: &str) -> Result<(), ConfigError> {
    for (table, present) in [
        ("s3", raw.s3.is_some()),
        ("gcs", raw.gcs.is_some()),
        ("azure", raw.azure.is_some()),
    ] {
        if present && backend != table {
            return Err(invalid(
                format!("storage.{table}"),
                format!("only used with backend = \"{table}\" (backend is \"{backend}\")"),
            ));
        }
    }
    if raw.shared_path.is_some() && backend != "filesystem" {
        return Err(invalid(
            "storage.shared_path",
            format!("only used with backend = \"filesystem\" (backend is \"{backend}\")"),
        ));
    }
    Ok(())
}

/// `storage.object_store_timeout` and `storage.fill_lease_ttl`: both above zero.
fn store_timeouts(raw: &RawStorage) -> Result<(Duration, Duration), ConfigError> {
    let positive = |value: Option<&str>, default: &str, key: &str| {
        let d = parse_duration(value.unwrap_or(default)).map_err(|m| invalid(key, m))?;
        if d.is_zero() {
            return Err(invalid(key, "must be above 0"));
        }
        Ok(d)
    };
    let timeout = positive(
        raw.object_store_timeout.as_deref(),
        DEFAULT_OBJECT_STORE_TIMEOUT,
        "storage.object_store_timeout",
    )?;
    let fill_lease_ttl = positive(
        raw.fill_lease_ttl.as_deref(),
        DEFAULT_FILL_LEASE_TTL,
        "storage.fill_lease_ttl",
    )?;
    Ok((timeout, fill_lease_ttl))
}

/// `storage.shared_path` with the filesystem backend: `None` means no shared store at all.
fn shared_dir(
    shared_path: Option<String>,
    cache_path: &Path,
) -> Result<Option<PathBuf>, ConfigError> {
    match shared_path {
        None => Ok(None),
        Some(p) if p.trim().is_empty() => Err(invalid("storage.shared_path", "must not be empty")),
        Some(p) => {
            let p = PathBuf::from(p);
            if p == cache_path {
                return Err(invalid(
                    "storage.shared_path",
                    "must differ from storage.path (the node's own cache)",
                ));
            }
            Ok(Some(p))
        }
    }
}

fn needs_table(table: &str) -> ConfigError {
    invalid(
        format!("storage.{table}"),
        format!("backend = \"{table}\" needs a [storage.{table}] table"),
    )
}

/// `[storage.s3]`; `path_style` defaults to true exactly when an `endpoint` is set.
fn s3_store(
    raw: Option<RawS3>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<S3StoreConfig, ConfigError> {
    let s3 = raw.ok_or_else(|| needs_table("s3"))?;
    let key = |k: &str| format!("storage.s3.{k}");
    let endpoint = endpoint_url(s3.endpoint, &key("endpoint"))?;
    let secret_access_key = secret(
        s3.secret_access_key,
        s3.secret_access_key_env,
        &key("secret_access_key"),
        env,
    )?;
    Ok(S3StoreConfig {
        bucket: bucket_name(s3.bucket, &key("bucket"))?,
        path_style: s3.path_style.unwrap_or(endpoint.is_some()),
        endpoint,
        region: nonempty_opt(s3.region, &key("region"))?,
        prefix: store_prefix(s3.prefix, &key("prefix"))?,
        access_key_id: nonempty_opt(s3.access_key_id, &key("access_key_id"))?,
        secret_access_key,
    })
}

/// `[storage.gcs]`.
fn gcs_store(raw: Option<RawGcs>) -> Result<GcsStoreConfig, ConfigError> {
    let gcs = raw.ok_or_else(|| needs_table("gcs"))?;
    let key = |k: &str| format!("storage.gcs.{k}");
    Ok(GcsStoreConfig {
        bucket: bucket_name(gcs.bucket, &key("bucket"))?,
        prefix: store_prefix(gcs.prefix, &key("prefix"))?,
        service_account_path: nonempty_opt(gcs.service_account_path, &key("service_account_path"))?
            .map(PathBuf::from),
        endpoint: endpoint_url(gcs.endpoint, &key("endpoint"))?,
    })
}

/// `[storage.azure]`: `account` and `container` are required.
fn azure_store(
    raw: Option<RawAzure>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<AzureStoreConfig, ConfigError> {
    let az = raw.ok_or_else(|| needs_table("azure"))?;
    let key = |k: &str| format!("storage.azure.{k}");
    let required = |v: Option<String>, k: &str| match nonempty_opt(v, &key(k))? {
        Some(v) => Ok(v),
        None => Err(invalid(key(k), "is required")),
    };
    Ok(AzureStoreConfig {
        account: required(az.account, "account")?,
        container: required(az.container, "container")?,
        prefix: store_prefix(az.prefix, &key("prefix"))?,
        access_key: secret(az.access_key, az.access_key_env, &key("access_key"), env)?,
        endpoint: endpoint_url(az.endpoint, &key("endpoint"))?,
    })
}

/// A secret given inline (`key`) or by naming an environment variable (`key_env`).
fn secret(
    inline: Option<String>,
    from_env: Option<String>,
    key: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, from_env) {
        (Some(_), Some(_)) => Err(invalid(
            format!("{key}_env"),
            format!("set either {key} or {key}_env, not both"),
        )),
        (Some(v), None) if v.is_empty() => Err(invalid(key, "must not be empty")),
        (Some(v), None) => Ok(Some(Secret::new(v))),
        (None, Some(var)) => match env(&var) {
            Some(v) if !v.is_empty() => Ok(Some(Secret::new(v))),
            _ => Err(invalid(
                format!("{key}_env"),
                format!("environment variable {var:?} is not set or empty"),
            )),
        },
        (None, None) => Ok(None),
    }
}

fn nonempty_opt(value: Option<String>, key: &str) -> Result<Option<String>, ConfigError> {
    match value {
        Some(v) if v.trim().is_empty() => Err(invalid(key, "must not be empty")),
        other => Ok(other.map(|v| v.trim().to_owned())),
    }
}

/// A bucket (or container) name: required, no `/`, no whitespace.
fn bucket_name(value: Option<String>, key: &str) -> Result<String, ConfigError> {
    let name = nonempty_opt(value, key)?.ok_or_else(|| invalid(key, "is required"))?;
    if name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(invalid(
            key,
            format!("{name:?} is not a bucket name (no \"/\" or spaces)"),
        ));
    }
    Ok(name)
}

/// `""` or `"a/b/"`: leading and trailing `/` dropped, then one `/` appended.
fn store_prefix(value: Option<String>, key: &str) -> Result<String, ConfigError> {
    let text = value.unwrap_or_default();
    let trimmed = text.trim().trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    check_store_key(trimmed).map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not a relative path like \"mirror/\""),
        )
    })?;
    Ok(format!("{trimmed}/"))
}

/// An `http://` or `https://` origin, if given (a path is kept: Azurite puts the account there).
fn endpoint_url(value: Option<String>, key: &str) -> Result<Option<String>, ConfigError> {
    let Some(text) = value else {
        return Ok(None);
    };
    let url = url::Url::parse(text.trim()).map_err(|e| invalid(key, format!("{text:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            key,
            format!("{text:?} must be an http:// or https:// URL"),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            key,
            "must not contain credentials; use access_key_id / secret_access_key",
        ));
    }
    Ok(Some(text.trim().trim_end_matches('/').to_owned()))
}

/// `storage.advertise_url`: an `http(s)://host[:port][/path]` base URL without credentials,
/// query or fragment, kept without its trailing `/`; only meaningful beside a shared store.
pub(super) fn advertise_url(
    value: Option<String>,
    shared: bool,
) -> Result<Option<String>, ConfigError> {
    const KEY: &str = "storage.advertise_url";
    let Some(text) = value.filter(|t| !t.trim().is_empty()) else {
        return Ok(None);
    };
    if !shared {
        return Err(invalid(
            KEY,
            "only used with a shared store (storage.backend or storage.shared_path)",
        ));
    }
    let url = url::Url::parse(text.trim()).map_err(|e| invalid(KEY, format!("{text:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            KEY,
            format!("{text:?} must be an http:// or https:// URL"),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(KEY, "must not contain credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(KEY, "must not have a query or fragment"));
    }
    Ok(Some(url.as_str().trim_end_matches('/').to_owned()))
}
