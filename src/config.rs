//! Typed configuration: built-in defaults ← `config.toml` ← `STOWAGE_*` environment ← flags.
//!
//! The file is read into a raw, all-optional shape first (unknown keys rejected), then validated
//! once into [`Config`]; every error names the key it is about, so `stowage serve` can tell the
//! operator exactly what to fix (and exit with code 2).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    /// Upstream registries; the first is the default for un-prefixed names.
    pub upstreams: Vec<UpstreamConfig>,
    /// Client authentication (`[auth]`); off unless `htpasswd` is set.
    pub auth: AuthConfig,
    /// Air-gapped operation (top-level `offline = true`, or `serve --offline`): no upstream is
    /// ever contacted; tags are served from the cache regardless of TTL and anything the cache
    /// lacks is a 404 saying the mirror is offline. `[[upstreams]]` may then be absent (the
    /// built-in `docker.io` entry only names the default host for routing).
    pub offline: bool,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// A second listener serving only `/metrics` and health (e.g. on an internal interface).
    /// `/metrics` stays available on `listen` too.
    pub metrics_listen: Option<SocketAddr>,
    /// `tls_cert` + `tls_key`: serve HTTPS (HTTP/1.1 and HTTP/2) instead of plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Connections served at once; further ones are closed on accept.
    pub max_connections: usize,
    /// Time a client gets to send a complete request head (and the TLS handshake) — the
    /// slow-loris bound.
    pub header_read_timeout: Duration,
    /// Largest request head (request line + headers) accepted, in bytes.
    pub max_header_size: usize,
    /// Longest request target (path + query) accepted, in bytes.
    pub max_uri_length: usize,
}

/// PEM files for the HTTPS listener; re-read on SIGHUP.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[auth]`: htpasswd Basic authentication of clients.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// bcrypt htpasswd file (`htpasswd -B`); `None` = open mirror.
    pub htpasswd: Option<PathBuf>,
    /// Paths answered without credentials even when auth is on (a subset of `/healthz`,
    /// `/readyz`, `/metrics`).
    pub open_paths: Vec<String>,
    /// Failed logins one client IP may make within `failed_login_window` before it gets 429.
    pub failed_login_limit: u32,
    pub failed_login_window: Duration,
}

#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Cache directory: blobs, temp files and the sled index live below it.
    pub path: PathBuf,
    /// Byte budget for cached content (blob + manifest bytes), never exceeded by fills.
    pub max_size: u64,
    /// Fraction of `max_size` at which eviction starts (`0 < low_watermark <= high_watermark <= 1`).
    pub high_watermark: f64,
    /// Fraction of `max_size` eviction frees down to.
    pub low_watermark: f64,
    /// How often recency (last use of blobs, manifests, tags) is written to the index in a batch.
    pub access_flush_interval: Duration,
    /// `stowage gc` removes tags and manifests not used for this long, and blobs no manifest
    /// references that were not used for this long.
    pub gc_max_age: Duration,
    /// Blob fills (upstream downloads) running at once; further misses wait for a slot.
    pub max_concurrent_fills: usize,
    /// Consecutive failed resume attempts tolerated per fill before its clients are aborted.
    pub fill_retries: u32,
    /// The store shared by a fleet of nodes (`storage.backend`, `storage.shared_path`); `None`
    /// for a single node on its local disk only (`backend = "filesystem"`, the default).
    pub shared: Option<SharedStoreConfig>,
}

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

#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The registry host clients name (`docker.io`, `ghcr.io`, `registry.local:5000`).
    pub host: String,
    /// Base URL of its API (`https://registry-1.docker.io`), without `/v2`.
    pub url: url::Url,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Connect timeout for upstream requests.
    pub connect_timeout: Duration,
    /// Longest silence tolerated while reading an upstream response.
    pub read_timeout: Duration,
    /// How long a tag answer is trusted without asking upstream (`manifest_ttl`, default 5m;
    /// zero = revalidate on every request).
    pub manifest_ttl: Duration,
    /// Tags matching any of these patterns never change once cached (`immutable_tags`).
    pub immutable_tags: Vec<regex::Regex>,
    /// How long past its last successful check a tag may still be served when the upstream
    /// fails (`max_stale`; `None` = without limit).
    pub max_stale: Option<Duration>,
    /// How long an upstream "no such tag" is remembered (`negative_ttl`, default 30s; zero = not).
    pub negative_ttl: Duration,
    /// Upper bound on a tag revalidation (`HEAD`) before the cached answer is served stale
    /// (`revalidate_timeout`, default 10s).
    pub revalidate_timeout: Duration,
    /// `allow` / `deny` repository patterns (see [`crate::policy`]).
    pub policy: crate::policy::RepoPolicy,
}

/// A registry host name as routing compares it: trimmed, lowercase, and every name of Docker
/// Hub (`index.docker.io`, `registry-1.docker.io`, `registry.hub.docker.com`) as `docker.io`.
/// The one definition of "this is Docker Hub", for routing and for `library/`.
pub fn canonical_host(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB.into(),
        _ => h,
    }
}

const DOCKER_HUB: &str = "docker.io";

impl UpstreamConfig {
    /// Docker Hub keeps official images under `library/`.
    pub fn is_docker_hub(&self) -> bool {
        canonical_host(&self.host) == DOCKER_HUB
    }

    /// Whether `tag` matches one of the `immutable_tags` patterns.
    pub fn is_immutable(&self, tag: &str) -> bool {
        self.immutable_tags.iter().any(|r| r.is_match(tag))
    }
}

pub const DEFAULT_MANIFEST_TTL: &str = "5m";
pub const DEFAULT_NEGATIVE_TTL: &str = "30s";
pub const DEFAULT_REVALIDATE_TIMEOUT: &str = "10s";

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    storage: RawStorage,
    upstreams: Option<Vec<RawUpstream>>,
    #[serde(default)]
    auth: RawAuth,
    offline: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    metrics_listen: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    max_connections: Option<usize>,
    header_read_timeout: Option<String>,
    max_header_size: Option<String>,
    max_uri_length: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    htpasswd: Option<String>,
    open_paths: Option<Vec<String>>,
    failed_login_limit: Option<u32>,
    failed_login_window: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<String>,
    max_size: Option<String>,
    high_watermark: Option<f64>,
    low_watermark: Option<f64>,
    access_flush_interval: Option<String>,
    gc_max_age: Option<String>,
    max_concurrent_fills: Option<i64>,
    fill_retries: Option<i64>,
    backend: Option<String>,
    shared_path: Option<String>,
    object_store_timeout: Option<String>,
    fill_lease_ttl: Option<String>,
    s3: Option<RawS3>,
    gcs: Option<RawGcs>,
    azure: Option<RawAzure>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    bucket: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    prefix: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    secret_access_key_env: Option<String>,
    path_style: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGcs {
    bucket: Option<String>,
    prefix: Option<String>,
    service_account_path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAzure {
    account: Option<String>,
    container: Option<String>,
    prefix: Option<String>,
    access_key: Option<String>,
    access_key_env: Option<String>,
    endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    host: String,
    url: String,
    username: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    connect_timeout: Option<String>,
    read_timeout: Option<String>,
    manifest_ttl: Option<String>,
    immutable_tags: Option<Vec<String>>,
    max_stale: Option<String>,
    negative_ttl: Option<String>,
    revalidate_timeout: Option<String>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
pub const DEFAULT_STORAGE_PATH: &str = "data";
pub const DEFAULT_MAX_SIZE: &str = "20GiB";
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "10s";
pub const DEFAULT_MAX_HEADER_SIZE: &str = "64KiB";
pub const DEFAULT_MAX_URI_LENGTH: &str = "8KiB";
/// The endpoints that may be left open when auth is on.
pub const OPERATIONAL_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];
pub const DEFAULT_MAX_CONCURRENT_FILLS: usize = 16;
pub const DEFAULT_OBJECT_STORE_TIMEOUT: &str = "10s";
pub const DEFAULT_FILL_LEASE_TTL: &str = "2m";
pub const DEFAULT_FILL_RETRIES: u32 = 5;

impl Config {
    /// Loads the configuration the way `stowage serve` does: `path` if given, else `./config.toml`
    /// if it exists, else built-in defaults; then `STOWAGE_*` overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw = match path {
            Some(p) => read_raw(p)?,
            None => {
                let default = Path::new("config.toml");
                if default.exists() {
                    read_raw(default)?
                } else {
                    RawConfig::default()
                }
            }
        };
        Config::from_raw(raw, env)
    }

    /// Parses a TOML document (no environment overrides).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_raw(parse_raw(text, Path::new("<inline>"))?, |_| None)
    }

    fn from_raw(
        mut raw: RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        if let Some(v) = env("STOWAGE_LISTEN") {
            raw.server.listen = Some(v);
        }
        if let Some(v) = env("STOWAGE_METRICS_LISTEN") {
            raw.server.metrics_listen = Some(v);
        }
        if let Some(v) = env("STOWAGE_STORAGE_PATH") {
            raw.storage.path = Some(v);
        }
        if let Some(v) = env("STOWAGE_STORAGE_MAX_SIZE") {
            raw.storage.max_size = Some(v);
        }

        let listen_text = raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "server.listen",
                format!("{listen_text:?} is not an address like \"0.0.0.0:5000\""),
            )
        })?;
        let metrics_listen = match raw.server.metrics_listen.as_deref() {
            None | Some("") => None,
            Some(t) => Some(t.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "server.metrics_listen",
                    format!("{t:?} is not an address like \"127.0.0.1:9090\""),
                )
            })?),
        };
        if metrics_listen == Some(listen) {
            return Err(invalid(
                "server.metrics_listen",
                "must differ from server.listen (/metrics is served there anyway)",
            ));
        }

        let path = PathBuf::from(raw.storage.path.as_deref().unwrap_or(DEFAULT_STORAGE_PATH));
        if path.as_os_str().is_empty() {
            return Err(invalid("storage.path", "must not be empty"));
        }
        let size_text = raw.storage.max_size.as_deref().unwrap_or(DEFAULT_MAX_SIZE);
        let max_size = parse_byte_size(size_text).map_err(|m| invalid("storage.max_size", m))?;
        let max_concurrent_fills = match raw.storage.max_concurrent_fills {
            None => DEFAULT_MAX_CONCURRENT_FILLS,
            Some(n) if (1..=4096).contains(&n) => n as usize,
            Some(n) => {
                return Err(invalid(
                    "storage.max_concurrent_fills",
                    format!("{n} is not between 1 and 4096"),
                ))
            }
        };
        let fill_retries = match raw.storage.fill_retries {
            None => DEFAULT_FILL_RETRIES,
            Some(n) if (0..=100).contains(&n) => n as u32,
            Some(n) => {
                return Err(invalid(
                    "storage.fill_retries",
                    format!("{n} is not between 0 and 100"),
                ))
            }
        };

        let high_watermark = raw.storage.high_watermark.unwrap_or(0.95);
        let low_watermark = raw.storage.low_watermark.unwrap_or(0.85);
        if !(high_watermark > 0.0 && high_watermark <= 1.0) {
            return Err(invalid(
                "storage.high_watermark",
                format!("{high_watermark} must be a fraction in (0, 1]"),
            ));
        }
        if !(low_watermark > 0.0 && low_watermark <= high_watermark) {
            return Err(invalid(
                "storage.low_watermark",
                format!(
                    "{low_watermark} must be a fraction above 0 and at most high_watermark ({high_watermark})"
                ),
            ));
        }
        let access_flush_interval = parse_duration(
            raw.storage
                .access_flush_interval
                .as_deref()
                .unwrap_or("10s"),
        )
        .map_err(|m| invalid("storage.access_flush_interval", m))?;
        if access_flush_interval.is_zero() {
            return Err(invalid("storage.access_flush_interval", "must be above 0"));
        }
        let gc_max_age = parse_duration(raw.storage.gc_max_age.as_deref().unwrap_or("30d"))
            .map_err(|m| invalid("storage.gc_max_age", m))?;
        let shared = shared_store_config(&mut raw.storage, &path, &env)?;

        let raw_upstreams = raw.upstreams.unwrap_or_else(|| {
            vec![RawUpstream {
                host: "docker.io".into(),
                url: "https://registry-1.docker.io".into(),
                username: None,
                password: None,
                password_env: None,
                connect_timeout: None,
                read_timeout: None,
                manifest_ttl: None,
                immutable_tags: None,
                max_stale: None,
                negative_ttl: None,
                revalidate_timeout: None,
                allow: None,
                deny: None,
            }]
        });
        if raw_upstreams.is_empty() {
            return Err(invalid(
                "upstreams",
                "at least one [[upstreams]] entry is needed",
            ));
        }
        let mut seen = HashSet::new();
        let mut upstreams = Vec::with_capacity(raw_upstreams.len());
        for (i, u) in raw_upstreams.into_iter().enumerate() {
            let key = |k: &str| format!("upstreams[{i}].{k}");
            let host = u.host.trim().to_ascii_lowercase();
            if host.is_empty()
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:_".contains(&b))
            {
                return Err(invalid(
                    key("host"),
                    format!("{:?} is not a registry host like \"docker.io\"", u.host),
                ));
            }
            if !seen.insert(host.clone()) {
                return Err(invalid(
                    key("host"),
                    format!("{host:?} is configured twice"),
                ));
            }
            let url = url::Url::parse(&u.url)
                .map_err(|e| invalid(key("url"), format!("{:?}: {e}", u.url)))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(invalid(
                    key("url"),
                    format!("{:?} must be an http:// or https:// URL", u.url),
                ));
            }
            let password_key = if u.password_env.is_some() {
                "password_env"
            } else {
                "password"
            };
            let password = match (u.password, u.password_env) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        key("password_env"),
                        "set either password or password_env, not both",
                    ))
                }
                (Some(p), None) => Some(p),
                (None, Some(var)) => match env(&var) {
                    Some(p) if !p.is_empty() => Some(p),
                    _ => {
                        return Err(invalid(
                            key("password_env"),
                            format!("environment variable {var:?} is not set or empty"),
                        ))
                    }
                },
                (None, None) => None,
            };
            if password.is_some() && u.username.is_none() {
                return Err(invalid(key(password_key), "a password needs a username"));
            }
            let connect_timeout = parse_duration(u.connect_timeout.as_deref().unwrap_or("10s"))
                .map_err(|m| invalid(key("connect_timeout"), m))?;
            let read_timeout = parse_duration(u.read_timeout.as_deref().unwrap_or("60s"))
                .map_err(|m| invalid(key("read_timeout"), m))?;
            let manifest_ttl =
                parse_duration(u.manifest_ttl.as_deref().unwrap_or(DEFAULT_MANIFEST_TTL))
                    .map_err(|m| invalid(key("manifest_ttl"), m))?;
            let negative_ttl =
                parse_duration(u.negative_ttl.as_deref().unwrap_or(DEFAULT_NEGATIVE_TTL))
                    .map_err(|m| invalid(key("negative_ttl"), m))?;
            let revalidate_timeout = parse_duration(
                u.revalidate_timeout
                    .as_deref()
                    .unwrap_or(DEFAULT_REVALIDATE_TIMEOUT),
            )
            .map_err(|m| invalid(key("revalidate_timeout"), m))?;
            if revalidate_timeout.is_zero() {
                return Err(invalid(key("revalidate_timeout"), "must be more than zero"));
            }
            let max_stale =
                match u.max_stale.as_deref().map(str::trim) {
                    None | Some("unlimited") => None,
                    Some(t) => Some(parse_duration(t).map_err(|m| {
                        invalid(key("max_stale"), format!("{m} (or \"unlimited\")"))
                    })?),
                };
            let mut immutable_tags = Vec::new();
            for (j, pattern) in u.immutable_tags.unwrap_or_default().iter().enumerate() {
                let re = regex::Regex::new(pattern).map_err(|e| {
                    invalid(
                        format!("upstreams[{i}].immutable_tags[{j}]"),
                        format!("{pattern:?} is not a regular expression: {e}"),
                    )
                })?;
                immutable_tags.push(re);
            }
            let patterns = |list: Option<Vec<String>>, k: &str| {
                list.unwrap_or_default()
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        crate::policy::Pattern::new(p)
                            .map_err(|m| invalid(key(&format!("{k}[{j}]")), m))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let policy = crate::policy::RepoPolicy {
                allow: patterns(u.allow, "allow")?,
                deny: patterns(u.deny, "deny")?,
            };
            upstreams.push(UpstreamConfig {
                host,
                url,
                username: u.username,
                password,
                connect_timeout,
                read_timeout,
                manifest_ttl,
                immutable_tags,
                max_stale,
                negative_ttl,
                revalidate_timeout,
                policy,
            });
        }

        Ok(Config {
            server: server_config(listen, metrics_listen, raw.server)?,
            storage: StorageConfig {
                path,
                max_size,
                high_watermark,
                low_watermark,
                access_flush_interval,
                gc_max_age,
                max_concurrent_fills,
                fill_retries,
                shared,
            },
            upstreams,
            auth: auth_config(raw.auth)?,
            offline: raw.offline.unwrap_or(false),
        })
    }
}

/// `storage.backend` and its table: the fleet's shared store, if any.
fn shared_store_config(
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
    // Each table belongs to one backend; a table for another one is a mistake worth naming.
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
    let timeout = parse_duration(
        raw.object_store_timeout
            .as_deref()
            .unwrap_or(DEFAULT_OBJECT_STORE_TIMEOUT),
    )
    .map_err(|m| invalid("storage.object_store_timeout", m))?;
    if timeout.is_zero() {
        return Err(invalid("storage.object_store_timeout", "must be above 0"));
    }
    let fill_lease_ttl = parse_duration(
        raw.fill_lease_ttl
            .as_deref()
            .unwrap_or(DEFAULT_FILL_LEASE_TTL),
    )
    .map_err(|m| invalid("storage.fill_lease_ttl", m))?;
    if fill_lease_ttl.is_zero() {
        return Err(invalid("storage.fill_lease_ttl", "must be above 0"));
    }
    let needs_table = |table: &str| {
        invalid(
            format!("storage.{table}"),
            format!("backend = \"{table}\" needs a [storage.{table}] table"),
        )
    };
    let kind = match backend.as_str() {
        "filesystem" => match raw.shared_path.take() {
            None => return Ok(None),
            Some(p) if p.trim().is_empty() => {
                return Err(invalid("storage.shared_path", "must not be empty"))
            }
            Some(p) => {
                let p = PathBuf::from(p);
                if p == cache_path {
                    return Err(invalid(
                        "storage.shared_path",
                        "must differ from storage.path (the node's own cache)",
                    ));
                }
                SharedStoreKind::Dir(p)
            }
        },
        "s3" => {
            let s3 = raw.s3.take().ok_or_else(|| needs_table("s3"))?;
            let key = |k: &str| format!("storage.s3.{k}");
            let endpoint = match s3.endpoint {
                None => None,
                Some(e) => Some(endpoint_url(&e).map_err(|m| invalid(key("endpoint"), m))?),
            };
            let secret_access_key = secret(
                s3.secret_access_key,
                s3.secret_access_key_env,
                &key("secret_access_key"),
                env,
            )?;
            SharedStoreKind::S3(S3StoreConfig {
                bucket: bucket_name(s3.bucket, &key("bucket"))?,
                path_style: s3.path_style.unwrap_or(endpoint.is_some()),
                endpoint,
                region: nonempty_opt(s3.region, &key("region"))?,
                prefix: store_prefix(s3.prefix, &key("prefix"))?,
                access_key_id: nonempty_opt(s3.access_key_id, &key("access_key_id"))?,
                secret_access_key,
            })
        }
        "gcs" => {
            let gcs = raw.gcs.take().ok_or_else(|| needs_table("gcs"))?;
            let key = |k: &str| format!("storage.gcs.{k}");
            SharedStoreKind::Gcs(GcsStoreConfig {
                bucket: bucket_name(gcs.bucket, &key("bucket"))?,
                prefix: store_prefix(gcs.prefix, &key("prefix"))?,
                service_account_path: nonempty_opt(
                    gcs.service_account_path,
                    &key("service_account_path"),
                )?
                .map(PathBuf::from),
            })
        }
        "azure" => {
            let az = raw.azure.take().ok_or_else(|| needs_table("azure"))?;
            let key = |k: &str| format!("storage.azure.{k}");
            let required = |v: Option<String>, k: &str| match nonempty_opt(v, &key(k))? {
                Some(v) => Ok(v),
                None => Err(invalid(key(k), "is required")),
            };
            SharedStoreKind::Azure(AzureStoreConfig {
                account: required(az.account, "account")?,
                container: required(az.container, "container")?,
                prefix: store_prefix(az.prefix, &key("prefix"))?,
                access_key: secret(az.access_key, az.access_key_env, &key("access_key"), env)?,
                endpoint: match az.endpoint {
                    None => None,
                    Some(e) => Some(endpoint_url(&e).map_err(|m| invalid(key("endpoint"), m))?),
                },
            })
        }
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
    crate::store::validate_key(trimmed).map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not a relative path like \"mirror/\""),
        )
    })?;
    Ok(format!("{trimmed}/"))
}

/// An `http://` or `https://` origin (a path is kept: Azurite puts the account there).
fn endpoint_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text.trim()).map_err(|e| format!("{text:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{text:?} must be an http:// or https:// URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials; use access_key_id / secret_access_key".into());
    }
    Ok(text.trim().trim_end_matches('/').to_owned())
}

fn server_config(
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    raw: RawServer,
) -> Result<ServerConfig, ConfigError> {
    let nonempty = |v: Option<String>, key: &str| match v {
        Some(p) if p.trim().is_empty() => Err(invalid(key, "must not be empty")),
        other => Ok(other.map(PathBuf::from)),
    };
    let tls = match (
        nonempty(raw.tls_cert, "server.tls_cert")?,
        nonempty(raw.tls_key, "server.tls_key")?,
    ) {
        (Some(cert), Some(key)) => Some(TlsConfig { cert, key }),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("server.tls_key", "tls_cert needs tls_key")),
        (None, Some(_)) => return Err(invalid("server.tls_cert", "tls_key needs tls_cert")),
    };
    let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    let header_read_timeout = parse_duration(
        raw.header_read_timeout
            .as_deref()
            .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT),
    )
    .map_err(|m| invalid("server.header_read_timeout", m))?;
    if header_read_timeout.is_zero() {
        return Err(invalid("server.header_read_timeout", "must be positive"));
    }
    let size = |v: Option<String>, default: &str, key: &str, min: u64, max: u64| {
        let bytes =
            parse_byte_size(v.as_deref().unwrap_or(default)).map_err(|m| invalid(key, m))?;
        if !(min..=max).contains(&bytes) {
            return Err(invalid(
                key,
                format!("must be between {min} and {max} bytes"),
            ));
        }
        Ok(bytes as usize)
    };
    // hyper needs a read buffer of at least 8 KiB; more than 1 MiB of headers is never a pull.
    let max_header_size = size(
        raw.max_header_size,
        DEFAULT_MAX_HEADER_SIZE,
        "server.max_header_size",
        8192,
        1 << 20,
    )?;
    let max_uri_length = size(
        raw.max_uri_length,
        DEFAULT_MAX_URI_LENGTH,
        "server.max_uri_length",
        1024,
        1 << 20,
    )?;
    Ok(ServerConfig {
        listen,
        metrics_listen,
        tls,
        max_connections,
        header_read_timeout,
        max_header_size,
        max_uri_length,
    })
}

fn auth_config(raw: RawAuth) -> Result<AuthConfig, ConfigError> {
    let htpasswd = match raw.htpasswd {
        Some(p) if p.trim().is_empty() => {
            return Err(invalid("auth.htpasswd", "must not be empty"))
        }
        other => other.map(PathBuf::from),
    };
    let open_paths = raw
        .open_paths
        .unwrap_or_else(|| vec!["/healthz".into(), "/readyz".into()]);
    for (i, p) in open_paths.iter().enumerate() {
        if !OPERATIONAL_PATHS.contains(&p.as_str()) {
            return Err(invalid(
                format!("auth.open_paths[{i}]"),
                format!(
                    "{p:?} cannot be left open; only {} can",
                    OPERATIONAL_PATHS.join(", ")
                ),
            ));
        }
    }
    let failed_login_limit = raw.failed_login_limit.unwrap_or(10);
    if failed_login_limit == 0 {
        return Err(invalid("auth.failed_login_limit", "must be at least 1"));
    }
    let failed_login_window = parse_duration(raw.failed_login_window.as_deref().unwrap_or("1m"))
        .map_err(|m| invalid("auth.failed_login_window", m))?;
    Ok(AuthConfig {
        htpasswd,
        open_paths,
        failed_login_limit,
        failed_login_window,
    })
}

fn read_raw(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_raw(&text, path)
}

fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Parses `"20GiB"`, `"512 MB"`, `"1048576"` into bytes (binary and decimal units).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"20GiB\""))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} must be a positive size"));
    }
    Ok(bytes as u64)
}

/// Parses `"500ms"`, `"10s"`, `"5m"`, `"1h"` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like \"30s\""))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use ms, s, m, h, d)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{text:?} must not be negative"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn offline_is_a_top_level_key_and_needs_no_upstreams() {
        assert!(!Config::from_toml("").unwrap().offline);
        let c = Config::from_toml("offline = true\n[storage]\npath = \"d\"\n").unwrap();
        assert!(c.offline);
        assert_eq!(c.upstreams.len(), 1, "the default host still routes names");
        assert!(
            err("offline = 1").contains("offline"),
            "{}",
            err("offline = 1")
        );
    }

    #[test]
    fn defaults_are_a_docker_hub_mirror_on_port_5000() {
        let c = Config::load(Some(Path::new("/nonexistent/x.toml")), |_| None);
        assert!(c.is_err(), "an explicit missing file is an error");
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.storage.path, PathBuf::from("data"));
        assert_eq!(c.storage.max_size, 20 << 30);
        assert_eq!(c.storage.high_watermark, 0.95);
        assert_eq!(c.storage.low_watermark, 0.85);
        assert_eq!(c.storage.gc_max_age, Duration::from_secs(30 * 86400));
        assert_eq!(c.storage.max_concurrent_fills, 16);
        assert_eq!(c.storage.fill_retries, 5);
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].host, "docker.io");
        assert_eq!(c.upstreams[0].url.as_str(), "https://registry-1.docker.io/");
    }

    #[test]
    fn shipped_config_parses() {
        let text = include_str!("../config.toml");
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.upstreams[0].host, "docker.io");
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:5000");
    }

    #[test]
    fn full_contract_parses() {
        let c = Config::from_toml(
            r#"
            [server]
            listen = "127.0.0.1:5001"
            [storage]
            path = "/var/cache/stowage"
            max_size = "40MiB"
            max_concurrent_fills = 4
            fill_retries = 2
            [[upstreams]]
            host = "docker.io"
            url = "http://127.0.0.1:9000"
            username = "u"
            password = "p"
            [[upstreams]]
            host = "ghcr.io"
            url = "https://ghcr.io"
            "#,
        )
        .unwrap();
        assert_eq!(c.storage.max_size, 40 << 20);
        assert_eq!(c.server.metrics_listen, None);
        assert_eq!(
            (c.storage.max_concurrent_fills, c.storage.fill_retries),
            (4, 2)
        );
        assert_eq!(c.upstreams[1].host, "ghcr.io");
        assert_eq!(c.upstreams[0].username.as_deref(), Some("u"));
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("[server]\nlisten = \"nope\"").contains("server.listen"));
        assert!(err("[storage]\nmax_size = \"12 parsecs\"").contains("storage.max_size"));
        assert!(err("[[upstreams]]\nhost = \"x\"\nurl = \"ftp://x\"").contains("upstreams[0].url"));
        assert!(
            err("[[upstreams]]\nhost = \"a b\"\nurl = \"http://x\"").contains("upstreams[0].host")
        );
        let e = err("[server]\nlisten = \"0.0.0.0:1\"\nlisen = 3");
        assert!(e.contains("lisen"), "{e}");
        let e = err("[storage]\npath = 5");
        assert!(e.contains("path"), "{e}");
        assert!(err("upstreams = []").contains("upstreams"));
        assert!(err("[server]\nmetrics_listen = \"x\"").contains("server.metrics_listen"));
        let same = "[server]\nlisten = \"127.0.0.1:1\"\nmetrics_listen = \"127.0.0.1:1\"";
        assert!(err(same).contains("server.metrics_listen"));
        let c = Config::from_toml("[server]\nmetrics_listen = \"127.0.0.1:9464\"").unwrap();
        assert_eq!(
            c.server.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert!(err("[storage]\nhigh_watermark = 1.5").contains("storage.high_watermark"));
        assert!(err("[storage]\nlow_watermark = 0.99").contains("storage.low_watermark"));
        assert!(err("[storage]\ngc_max_age = \"soon\"").contains("storage.gc_max_age"));
        assert!(err("[storage]\naccess_flush_interval = \"0s\"")
            .contains("storage.access_flush_interval"));
        assert!(err("[storage]\nmax_concurrent_fills = 0").contains("storage.max_concurrent_fills"));
        assert!(err("[storage]\nfill_retries = -1").contains("storage.fill_retries"));
        let dup = "[[upstreams]]\nhost=\"a.io\"\nurl=\"http://x\"\n[[upstreams]]\nhost=\"a.io\"\nurl=\"http://y\"";
        assert!(err(dup).contains("upstreams[1].host"));
    }

    #[test]
    fn freshness_keys_have_defaults_and_parse() {
        let c = Config::from_toml("").unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.manifest_ttl, Duration::from_secs(300));
        assert_eq!(u.negative_ttl, Duration::from_secs(30));
        assert_eq!(u.revalidate_timeout, Duration::from_secs(10));
        assert_eq!(u.max_stale, None);
        assert!(u.immutable_tags.is_empty());
        let c = Config::from_toml(
            r#"
            [[upstreams]]
            host = "docker.io"
            url = "http://127.0.0.1:9000"
            manifest_ttl = "0"
            immutable_tags = ['^v?\d+\.\d+\.\d+$', "^sha-"]
            max_stale = "1d"
            negative_ttl = "5s"
            revalidate_timeout = "2s"
            "#,
        )
        .unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.manifest_ttl, Duration::ZERO);
        assert_eq!(u.max_stale, Some(Duration::from_secs(86400)));
        assert_eq!(u.negative_ttl, Duration::from_secs(5));
        assert!(u.is_immutable("v1.2.3") && u.is_immutable("1.2.3"));
        assert!(u.is_immutable("sha-abc"));
        assert!(!u.is_immutable("latest") && !u.is_immutable("1.2"));
        let c = Config::from_toml(
            "[[upstreams]]\nhost = \"a.io\"\nurl = \"http://x\"\nmax_stale = \"unlimited\"",
        )
        .unwrap();
        assert_eq!(c.upstreams[0].max_stale, None);
    }

    #[test]
    fn freshness_key_errors_name_the_key() {
        let up =
            |extra: &str| format!("[[upstreams]]\nhost = \"a.io\"\nurl = \"http://x\"\n{extra}");
        assert!(err(&up("manifest_ttl = \"soon\"")).contains("upstreams[0].manifest_ttl"));
        assert!(err(&up("max_stale = \"-1s\"")).contains("upstreams[0].max_stale"));
        assert!(err(&up("negative_ttl = \"x\"")).contains("upstreams[0].negative_ttl"));
        assert!(err(&up("revalidate_timeout = \"0\"")).contains("upstreams[0].revalidate_timeout"));
        let e = err(&up("immutable_tags = [\"^v\", \"(\"]"));
        assert!(e.contains("upstreams[0].immutable_tags[1]"), "{e}");
    }

    #[test]
    fn password_env_reads_the_environment() {
        let text = "[[upstreams]]\nhost = \"a.io\"\nurl = \"http://x\"\nusername = \"u\"\npassword_env = \"HUB_TOKEN\"";
        let raw = || parse_raw(text, Path::new("x")).unwrap();
        let c =
            Config::from_raw(raw(), |k| (k == "HUB_TOKEN").then(|| "s3cret".to_string())).unwrap();
        assert_eq!(c.upstreams[0].password.as_deref(), Some("s3cret"));
        let e = Config::from_raw(raw(), |_| None).unwrap_err().to_string();
        assert!(
            e.contains("upstreams[0].password_env") && e.contains("HUB_TOKEN"),
            "{e}"
        );
        let both = format!("{text}\npassword = \"p\"");
        assert!(err(&both).contains("upstreams[0].password_env"));
        let no_user = "[[upstreams]]\nhost = \"a.io\"\nurl = \"http://x\"\npassword_env = \"H\"";
        let e = Config::from_raw(parse_raw(no_user, Path::new("x")).unwrap(), |k| {
            (k == "H").then(|| "p".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("upstreams[0].password_env"), "{e}");
    }

    #[test]
    fn security_keys_parse() {
        let c = Config::from_toml(
            r#"
            [server]
            tls_cert = "/etc/stowage/cert.pem"
            tls_key = "/etc/stowage/key.pem"
            max_connections = 50
            header_read_timeout = "5s"
            max_header_size = "32KiB"
            max_uri_length = "4KiB"
            [auth]
            htpasswd = "/etc/stowage/htpasswd"
            open_paths = ["/healthz", "/metrics"]
            failed_login_limit = 3
            failed_login_window = "30s"
            [[upstreams]]
            host = "docker.io"
            url = "https://registry-1.docker.io"
            allow = ["library/*", "myorg/**"]
            deny = ["myorg/secret"]
            "#,
        )
        .unwrap();
        let tls = c.server.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/stowage/cert.pem"));
        assert_eq!(tls.key, PathBuf::from("/etc/stowage/key.pem"));
        assert_eq!(c.server.max_connections, 50);
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(5));
        assert_eq!(
            (c.server.max_header_size, c.server.max_uri_length),
            (32768, 4096)
        );
        assert_eq!(
            c.auth.htpasswd,
            Some(PathBuf::from("/etc/stowage/htpasswd"))
        );
        assert_eq!(c.auth.open_paths, ["/healthz", "/metrics"]);
        assert_eq!(c.auth.failed_login_limit, 3);
        assert_eq!(c.auth.failed_login_window, Duration::from_secs(30));
        assert_eq!(c.upstreams[0].policy.allow.len(), 2);
        assert_eq!(c.upstreams[0].policy.deny.len(), 1);

        let d = Config::from_toml("").unwrap();
        assert!(d.server.tls.is_none() && d.auth.htpasswd.is_none());
        assert!(d.upstreams[0].policy.is_open());
        assert_eq!(d.auth.open_paths, ["/healthz", "/readyz"]);
    }

    #[test]
    fn security_errors_name_the_key() {
        assert!(err("[server]\ntls_cert = \"c.pem\"").contains("server.tls_key"));
        assert!(err("[server]\ntls_key = \"k.pem\"").contains("server.tls_cert"));
        assert!(err("[server]\nmax_connections = 0").contains("server.max_connections"));
        assert!(
            err("[server]\nheader_read_timeout = \"0s\"").contains("server.header_read_timeout")
        );
        assert!(err("[server]\nmax_header_size = \"1KiB\"").contains("server.max_header_size"));
        assert!(err("[server]\nmax_uri_length = \"1TiB\"").contains("server.max_uri_length"));
        assert!(err("[auth]\nhtpasswd = \"\"").contains("auth.htpasswd"));
        assert!(err("[auth]\nopen_paths = [\"/v2/\"]").contains("auth.open_paths[0]"));
        assert!(err("[auth]\nfailed_login_limit = 0").contains("auth.failed_login_limit"));
        let e =
            err("[[upstreams]]\nhost = \"a.io\"\nurl = \"http://x\"\nallow = [\"ok/*\", \"Bad\"]");
        assert!(e.contains("upstreams[0].allow[1]"), "{e}");
        let e = err("[[upstreams]]\nhost = \"a.io\"\nurl = \"http://x\"\ndeny = [\"\"]");
        assert!(e.contains("upstreams[0].deny[0]"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = Config::from_raw(
            parse_raw("[server]\nlisten = \"0.0.0.0:1\"", Path::new("x")).unwrap(),
            |k| match k {
                "STOWAGE_LISTEN" => Some("127.0.0.1:7".into()),
                "STOWAGE_STORAGE_PATH" => Some("/tmp/s".into()),
                _ => None,
            },
        )
        .unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:7");
        assert_eq!(c.storage.path, PathBuf::from("/tmp/s"));
        let e = Config::from_raw(RawConfig::default(), |k| {
            (k == "STOWAGE_LISTEN").then(|| "bad".to_string())
        })
        .unwrap_err();
        assert!(e.to_string().contains("server.listen"));
    }

    #[test]
    fn storage_backend_defaults_to_the_local_disk_only() {
        let c = Config::from_toml("").unwrap();
        assert!(c.storage.shared.is_none());
        let c = Config::from_toml("[storage]\nbackend = \"filesystem\"").unwrap();
        assert!(c.storage.shared.is_none());
        let c = Config::from_toml(
            "[storage]\nshared_path = \"/mnt/shared/stowage\"\nfill_lease_ttl = \"30s\"",
        )
        .unwrap();
        let shared = c.storage.shared.unwrap();
        assert!(
            matches!(&shared.kind, SharedStoreKind::Dir(p) if p == Path::new("/mnt/shared/stowage"))
        );
        assert_eq!(shared.timeout, Duration::from_secs(10));
        assert_eq!(shared.fill_lease_ttl, Duration::from_secs(30));
    }

    #[test]
    fn s3_backend_parses_with_defaults_and_env_secrets() {
        let text = r#"
            [storage]
            backend = "s3"
            object_store_timeout = "3s"
            [storage.s3]
            bucket = "stowage"
            endpoint = "http://127.0.0.1:3900/"
            region = "garage"
            prefix = "/mirror"
            access_key_id = "GK1"
            secret_access_key_env = "S3_SECRET"
        "#;
        let c = Config::from_raw(parse_raw(text, Path::new("x")).unwrap(), |k| {
            (k == "S3_SECRET").then(|| "hush".to_string())
        })
        .unwrap();
        let shared = c.storage.shared.unwrap();
        assert_eq!(shared.timeout, Duration::from_secs(3));
        assert_eq!(shared.fill_lease_ttl, Duration::from_secs(120));
        let SharedStoreKind::S3(s3) = &shared.kind else {
            panic!("{shared:?}")
        };
        assert_eq!(s3.bucket, "stowage");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(s3.region.as_deref(), Some("garage"));
        assert_eq!(s3.prefix, "mirror/");
        assert_eq!(s3.access_key_id.as_deref(), Some("GK1"));
        assert_eq!(
            s3.secret_access_key.as_ref().map(Secret::expose),
            Some("hush")
        );
        assert!(s3.path_style, "an endpoint implies path-style by default");
        assert!(
            !format!("{shared:?}").contains("hush"),
            "Debug shows the secret"
        );

        let aws =
            Config::from_toml("[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"").unwrap();
        let Some(SharedStoreConfig {
            kind: SharedStoreKind::S3(s3),
            ..
        }) = aws.storage.shared
        else {
            panic!("not s3")
        };
        assert!(!s3.path_style && s3.endpoint.is_none() && s3.prefix.is_empty());
        assert!(s3.secret_access_key.is_none() && s3.access_key_id.is_none());
    }

    #[test]
    fn gcs_and_azure_backends_parse() {
        let c = Config::from_toml(
            "[storage]\nbackend = \"gcs\"\n[storage.gcs]\nbucket = \"b\"\nservice_account_path = \"/k.json\"",
        )
        .unwrap();
        assert!(matches!(
            c.storage.shared.unwrap().kind,
            SharedStoreKind::Gcs(GcsStoreConfig { ref bucket, service_account_path: Some(_), .. }) if bucket == "b"
        ));
        let c = Config::from_toml(
            r#"
            [storage]
            backend = "azure"
            [storage.azure]
            account = "devstoreaccount1"
            container = "stowage"
            access_key = "k"
            endpoint = "http://127.0.0.1:10000/devstoreaccount1"
            prefix = "a/b/"
            "#,
        )
        .unwrap();
        let SharedStoreKind::Azure(az) = c.storage.shared.unwrap().kind else {
            panic!("not azure")
        };
        assert_eq!(
            (
                az.account.as_str(),
                az.container.as_str(),
                az.prefix.as_str()
            ),
            ("devstoreaccount1", "stowage", "a/b/")
        );
        assert_eq!(
            az.endpoint.as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1")
        );
    }

    #[test]
    fn storage_backend_mismatches_name_the_key() {
        let cases = [
            ("backend = \"s3\"", "storage.s3"),
            ("backend = \"gcs\"", "storage.gcs"),
            ("backend = \"azure\"", "storage.azure"),
            ("backend = \"swift\"", "storage.backend"),
            ("[storage.s3]\nbucket = \"b\"", "storage.s3"),
            ("backend = \"s3\"\n[storage.gcs]\nbucket = \"b\"", "storage.gcs"),
            ("backend = \"s3\"\nshared_path = \"/x\"\n[storage.s3]\nbucket = \"b\"", "storage.shared_path"),
            ("backend = \"s3\"\n[storage.s3]\nbucket = \"\"", "storage.s3.bucket"),
            ("backend = \"s3\"\n[storage.s3]\nregion = \"r\"", "storage.s3.bucket"),
            ("backend = \"s3\"\n[storage.s3]\nbucket = \"a/b\"", "storage.s3.bucket"),
            ("backend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"ftp://x\"", "storage.s3.endpoint"),
            ("backend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://u:p@x\"", "storage.s3.endpoint"),
            ("backend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nprefix = \"a/../b\"", "storage.s3.prefix"),
            ("backend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nsecret_access_key = \"s\"\nsecret_access_key_env = \"V\"", "storage.s3.secret_access_key_env"),
            ("backend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nsecret_access_key_env = \"UNSET_VAR\"", "storage.s3.secret_access_key_env"),
            ("backend = \"s3\"\n[storage.s3]\nbucket = \"b\"\npath_styl = true", "path_styl"),
            ("backend = \"azure\"\n[storage.azure]\naccount = \"a\"", "storage.azure.container"),
            ("shared_path = \"\"", "storage.shared_path"),
            ("path = \"/d\"\nshared_path = \"/d\"", "storage.shared_path"),
            ("shared_path = \"/s\"\nobject_store_timeout = \"0s\"", "storage.object_store_timeout"),
            ("shared_path = \"/s\"\nfill_lease_ttl = \"soon\"", "storage.fill_lease_ttl"),
        ];
        for (storage, key) in cases {
            let e = err(&format!("[storage]\n{storage}"));
            assert!(e.contains(key), "{storage:?}: {e}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_byte_size("512 MB").unwrap(), 512_000_000);
        assert_eq!(parse_byte_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_byte_size("4096").unwrap(), 4096);
        for bad in ["", "GiB", "-1GiB", "0", "1XB", "1.2.3G"] {
            assert!(parse_byte_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("5 fortnights").is_err());
    }
}
