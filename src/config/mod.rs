//! Typed configuration: built-in defaults ← `config.toml` ← `STOWAGE_*` environment ← flags.
//!
//! The file is read into a raw, all-optional shape first (`raw`, unknown keys rejected), then
//! validated once into [`Config`]; every error names the key it is about, so `stowage serve` can
//! tell the operator exactly what to fix (and exit with code 2). The commented `config.toml` at
//! the repository root is the one reference for keys; a test holds it to the raw structs.
//!
//! Config is data: it imports only [`crate::policy`] (for `allow` / `deny` patterns). The
//! shared store's settings and the rules for store keys live here (`config::store`); the store
//! layer reads them.

mod env;
mod error;
mod hosted;
mod raw;
mod schema;
mod show;
mod store;
mod units;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use error::invalid;
pub use error::ConfigError;
pub use hosted::{AccessRule, Action, HostedConfig};
use raw::{parse_raw, RawAuth, RawConfig, RawServer, RawStorage};
pub use show::mask_url;
pub use store::{
    check_store_key, AzureStoreConfig, GcsStoreConfig, S3StoreConfig, Secret, SharedStoreConfig,
    SharedStoreKind, DEFAULT_FILL_LEASE_TTL, DEFAULT_OBJECT_STORE_TIMEOUT, MAX_KEY_LEN,
    STORE_TMP_DIR,
};
pub use units::{parse_byte_size, parse_duration};
pub use upstream::{
    canonical_host, proxy_name, ProxySetting, ProxyUrl, SignaturePolicy, UpstreamConfig,
    DEFAULT_MANIFEST_TTL, DEFAULT_NEGATIVE_TTL, DEFAULT_REVALIDATE_TIMEOUT,
};

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
    /// Hosted repositories (`[hosted]`); `None`: every name is mirrored and pushes get 405.
    pub hosted: Option<HostedConfig>,
    /// `[console]`: who may act through the console's API and page.
    pub console: ConsoleConfig,
}

/// `[console]`: the web console at `/ui/` and its API under `/api/v1/`.
#[derive(Clone, Debug, Default)]
pub struct ConsoleConfig {
    /// htpasswd users who may pin, unpin and purge, beside those `[[auth.access]]` grants
    /// `delete`.
    pub admins: Vec<String>,
    /// Without `[auth]`: whether anyone may pin, unpin and purge (default: nobody may).
    pub allow_actions_without_auth: bool,
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
    /// `[[auth.access]]` rules; none: every authenticated user may do everything.
    pub access: Vec<AccessRule>,
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
    /// This node's base URL as the other nodes of its fleet reach it (`storage.advertise_url`):
    /// named in its fill leases, so that a node waiting on one streams the blob from it. `None`:
    /// waiting nodes wait for the shared copy. Only with a shared store.
    pub advertise_url: Option<String>,
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
pub const DEFAULT_FILL_RETRIES: u32 = 5;

impl Config {
    /// Loads the configuration the way `stowage serve` does: `path` if given, else `./config.toml`
    /// if it exists, else built-in defaults; then the `STOWAGE_*` variables `env` answers for.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let layers = Layers::read(path, &env, None)?;
        layers.validate(&env)
    }

    /// [`load`](Self::load) with the whole environment at hand (`vars`), which also refuses a
    /// `STOWAGE_*` variable that looks like a key but names none.
    pub fn load_vars(
        path: Option<&Path>,
        vars: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let env = |k: &str| vars.get(k).cloned();
        let layers = Layers::read(path, &env, Some(vars))?;
        layers.validate(&env)
    }

    /// `stowage config`: the configuration [`load_vars`](Self::load_vars) would give, as a
    /// TOML document naming where each value came from, secrets masked.
    pub fn describe(
        path: Option<&Path>,
        vars: &BTreeMap<String, String>,
    ) -> Result<String, ConfigError> {
        let env = |k: &str| vars.get(k).cloned();
        let layers = Layers::read(path, &env, Some(vars))?;
        layers.validate(&env)?;
        let check = |t: &toml::Table| {
            let raw = toml::Value::Table(t.clone()).try_into::<RawConfig>().ok()?;
            Config::from_raw(raw, env).ok().map(|c| format!("{c:?}"))
        };
        let view = show::View {
            file: &layers.file,
            file_name: layers.file_name.as_ref().map(|p| p.display().to_string()),
            effective: &layers.effective,
            from_env: &layers.from_env,
            check: &check,
        };
        Ok(show::render(&layers.schema, &view))
    }

    /// Parses a TOML document (no environment overrides).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_raw(parse_raw(text, Path::new("<inline>"))?, |_| None)
    }

    /// Validates `raw` section by section (`env` answers `*_env` keys); the first problem found
    /// is the error.
    fn from_raw(
        raw: RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (listen, metrics_listen) = listeners(&raw.server)?;
        let storage = storage_config(raw.storage, &env)?;
        let upstreams = upstream::upstreams_config(raw.upstreams, &env)?;
        let hosted = hosted::hosted_config(raw.hosted, &upstreams)?;
        Ok(Config {
            server: server_config(listen, metrics_listen, raw.server)?,
            storage,
            upstreams,
            auth: auth_config(raw.auth)?,
            offline: raw.offline.unwrap_or(false),
            hosted,
            console: ConsoleConfig {
                admins: raw.console.admins.unwrap_or_default(),
                allow_actions_without_auth: raw.console.allow_actions_without_auth.unwrap_or(false),
            },
        })
    }
}

/// The configuration before validation: the file's table, and the environment laid over it.
struct Layers {
    schema: Vec<schema::Field>,
    file_name: Option<PathBuf>,
    file: toml::Table,
    effective: toml::Table,
    /// Key path (`upstreams[0].url`) → the variable that set it.
    from_env: BTreeMap<String, String>,
}

impl Layers {
    /// Reads `path` (or `./config.toml` if it exists) and applies `env`; with `all`, the whole
    /// environment, a `STOWAGE_*` variable naming no key is an error.
    fn read(
        path: Option<&Path>,
        env: &impl Fn(&str) -> Option<String>,
        all: Option<&BTreeMap<String, String>>,
    ) -> Result<Layers, ConfigError> {
        let default = Path::new("config.toml");
        let file_name = path.or(default.exists().then_some(default));
        let text = match file_name {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?,
            ),
            None => None,
        };
        Layers::from_text(text.as_deref().zip(file_name), env, all)
    }

    fn from_text(
        text: Option<(&str, &Path)>,
        env: &impl Fn(&str) -> Option<String>,
        all: Option<&BTreeMap<String, String>>,
    ) -> Result<Layers, ConfigError> {
        let schema = schema::schema().map_err(|m| invalid("(schema)", m))?;
        let file = match text {
            // The raw structs first: their errors carry line numbers and name unknown keys.
            Some((text, path)) => parse_raw(text, path).and_then(|_| {
                toml::from_str::<toml::Table>(text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })
            })?,
            None => toml::Table::new(),
        };
        if let Some(all) = all {
            let names = all.keys().map(String::as_str);
            if let Some(var) = env::unknown(&schema, &file, names).into_iter().next() {
                return Err(ConfigError::Env {
                    var,
                    key: String::new(),
                    message: "names no configuration key (STOWAGE_<TABLE>_<KEY>, see config.toml)"
                        .into(),
                });
            }
        }
        let mut effective = file.clone();
        let from_env = env::overlay(&schema, &mut effective, env)?;
        Ok(Layers {
            schema,
            file_name: file_name_of(text),
            file,
            effective,
            from_env,
        })
    }

    /// The validated configuration; an error about a key a variable set names the variable.
    fn validate(&self, env: &impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let raw = toml::Value::Table(self.effective.clone())
            .try_into::<RawConfig>()
            .map_err(|e| ConfigError::Env {
                var: self
                    .from_env
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                key: String::new(),
                message: e.message().to_string(),
            })?;
        Config::from_raw(raw, env).map_err(|e| match e {
            ConfigError::Invalid { key, message } => match self.blamed(&key) {
                Some(var) => ConfigError::Env { var, key, message },
                None => ConfigError::Invalid { key, message },
            },
            other => other,
        })
    }

    /// The variable that set `key`, a table above it or a key below it; else the variables
    /// that set a key beside it (an error about a combination: `a` needs `b`).
    fn blamed(&self, key: &str) -> Option<String> {
        let under = |a: &str, b: &str| {
            a.strip_prefix(b)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        };
        let direct = self
            .from_env
            .iter()
            .find(|(set, _)| *set == key || under(key, set) || under(set, key));
        if let Some((_, var)) = direct {
            return Some(var.clone());
        }
        let table = key.rsplit_once('.').map(|(t, _)| t)?;
        let beside: Vec<&str> = self
            .from_env
            .iter()
            .filter(|(set, _)| set.rsplit_once('.').is_some_and(|(t, _)| t == table))
            .map(|(_, var)| var.as_str())
            .collect();
        (!beside.is_empty()).then(|| beside.join(", "))
    }
}

fn file_name_of(text: Option<(&str, &Path)>) -> Option<PathBuf> {
    text.map(|(_, p)| p.to_owned())
}

/// `server.listen` and `server.metrics_listen` (distinct; an empty `metrics_listen` is none).
fn listeners(raw: &RawServer) -> Result<(SocketAddr, Option<SocketAddr>), ConfigError> {
    let listen_text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = listen_text.parse::<SocketAddr>().map_err(|_| {
        invalid(
            "server.listen",
            format!("{listen_text:?} is not an address like \"0.0.0.0:5000\""),
        )
    })?;
    let metrics_listen = match raw.metrics_listen.as_deref() {
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
    Ok((listen, metrics_listen))
}

/// `[storage]`: the node's cache (path, budget, eviction, fills) and the shared store, if any.
fn storage_config(
    mut raw: RawStorage,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<StorageConfig, ConfigError> {
    let path = PathBuf::from(raw.path.as_deref().unwrap_or(DEFAULT_STORAGE_PATH));
    if path.as_os_str().is_empty() {
        return Err(invalid("storage.path", "must not be empty"));
    }
    let size_text = raw.max_size.as_deref().unwrap_or(DEFAULT_MAX_SIZE);
    let max_size = parse_byte_size(size_text).map_err(|m| invalid("storage.max_size", m))?;
    let (max_concurrent_fills, fill_retries) = fill_limits(&raw)?;
    let (high_watermark, low_watermark) = watermarks(&raw)?;
    let access_flush_interval =
        parse_duration(raw.access_flush_interval.as_deref().unwrap_or("10s"))
            .map_err(|m| invalid("storage.access_flush_interval", m))?;
    if access_flush_interval.is_zero() {
        return Err(invalid("storage.access_flush_interval", "must be above 0"));
    }
    let gc_max_age = parse_duration(raw.gc_max_age.as_deref().unwrap_or("30d"))
        .map_err(|m| invalid("storage.gc_max_age", m))?;
    let shared = store::shared_store_config(&mut raw, &path, env)?;
    let advertise_url = store::advertise_url(raw.advertise_url.take(), shared.is_some())?;
    Ok(StorageConfig {
        path,
        max_size,
        high_watermark,
        low_watermark,
        access_flush_interval,
        gc_max_age,
        max_concurrent_fills,
        fill_retries,
        shared,
        advertise_url,
    })
}

/// `storage.max_concurrent_fills` (1 to 4096) and `storage.fill_retries` (0 to 100).
fn fill_limits(raw: &RawStorage) -> Result<(usize, u32), ConfigError> {
    let max_concurrent_fills = match raw.max_concurrent_fills {
        None => DEFAULT_MAX_CONCURRENT_FILLS,
        Some(n) if (1..=4096).contains(&n) => n as usize,
        Some(n) => {
            return Err(invalid(
                "storage.max_concurrent_fills",
                format!("{n} is not between 1 and 4096"),
            ))
        }
    };
    let fill_retries = match raw.fill_retries {
        None => DEFAULT_FILL_RETRIES,
        Some(n) if (0..=100).contains(&n) => n as u32,
        Some(n) => {
            return Err(invalid(
                "storage.fill_retries",
                format!("{n} is not between 0 and 100"),
            ))
        }
    };
    Ok((max_concurrent_fills, fill_retries))
}

/// `storage.high_watermark` and `storage.low_watermark`: `0 < low <= high <= 1`.
fn watermarks(raw: &RawStorage) -> Result<(f64, f64), ConfigError> {
    let high_watermark = raw.high_watermark.unwrap_or(0.95);
    let low_watermark = raw.low_watermark.unwrap_or(0.85);
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
    Ok((high_watermark, low_watermark))
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
        access: hosted::access_rules(raw.access)?,
    })
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
        let text = include_str!("../../config.toml");
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
        assert_eq!(
            u.referrers_ttl,
            Duration::ZERO,
            "referrers_ttl follows manifest_ttl"
        );
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
        let c = Config::from_toml(
            "[[upstreams]]\nhost = \"a.io\"\nurl = \"http://x\"\nreferrers_ttl = \"1h\"",
        )
        .unwrap();
        assert_eq!(c.upstreams[0].referrers_ttl, Duration::from_secs(3600));
        assert_eq!(c.upstreams[0].manifest_ttl, Duration::from_secs(300));
    }

    #[test]
    fn freshness_key_errors_name_the_key() {
        let up =
            |extra: &str| format!("[[upstreams]]\nhost = \"a.io\"\nurl = \"http://x\"\n{extra}");
        assert!(err(&up("manifest_ttl = \"soon\"")).contains("upstreams[0].manifest_ttl"));
        assert!(err(&up("referrers_ttl = \"soon\"")).contains("upstreams[0].referrers_ttl"));
        assert!(err(&up("max_stale = \"-1s\"")).contains("upstreams[0].max_stale"));
        assert!(err(&up("negative_ttl = \"x\"")).contains("upstreams[0].negative_ttl"));
        assert!(err(&up("revalidate_timeout = \"0\"")).contains("upstreams[0].revalidate_timeout"));
        let e = err(&up("immutable_tags = [\"^v\", \"(\"]"));
        assert!(e.contains("upstreams[0].immutable_tags[1]"), "{e}");
    }

    #[test]
    fn require_signatures_needs_a_key_and_a_key_needs_it() {
        let up =
            |extra: &str| format!("[[upstreams]]\nhost = \"a.io\"\nurl = \"http://x\"\n{extra}");
        let c = Config::from_toml(&up("")).unwrap();
        assert_eq!(c.upstreams[0].signatures, SignaturePolicy::None);
        let c = Config::from_toml(&up(
            "require_signatures = \"sigstore\"\nsignature_public_key = \"/k.pub\"",
        ))
        .unwrap();
        assert_eq!(
            c.upstreams[0].signatures,
            SignaturePolicy::Sigstore {
                public_key: "/k.pub".into()
            }
        );
        let e = err(&up("require_signatures = \"sigstore\""));
        assert!(e.contains("upstreams[0].signature_public_key"), "{e}");
        let e = err(&up("signature_public_key = \"/k.pub\""));
        assert!(e.contains("upstreams[0].signature_public_key"), "{e}");
        let e = err(&up("require_signatures = \"gpg\""));
        assert!(e.contains("upstreams[0].require_signatures"), "{e}");
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

    /// `text` as the file, `vars` as the whole environment.
    fn with_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = |k: &str| vars.get(k).cloned();
        Layers::from_text(Some((text, Path::new("x"))), &env, Some(&vars))?.validate(&env)
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = with_env(
            "[server]\nlisten = \"0.0.0.0:1\"",
            &[
                ("STOWAGE_LISTEN", "127.0.0.1:7"),
                ("STOWAGE_STORAGE_PATH", "/tmp/s"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:7");
        assert_eq!(c.storage.path, PathBuf::from("/tmp/s"));
        let e = with_env("", &[("STOWAGE_LISTEN", "bad")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.listen") && e.contains("STOWAGE_LISTEN"),
            "{e}"
        );
        let both = [
            ("STOWAGE_LISTEN", "127.0.0.1:7"),
            ("STOWAGE_SERVER_LISTEN", "127.0.0.1:8"),
        ];
        let c = with_env("", &both).unwrap();
        assert_eq!(
            c.server.listen.to_string(),
            "127.0.0.1:8",
            "the full name wins"
        );
    }

    #[test]
    fn every_kind_of_key_is_set_by_its_variable() {
        let c = with_env(
            "",
            &[
                ("STOWAGE_SERVER_MAX_CONNECTIONS", "7"),
                ("STOWAGE_STORAGE_HIGH_WATERMARK", "0.9"),
                ("STOWAGE_OFFLINE", "true"),
                ("STOWAGE_AUTH_OPEN_PATHS", "/healthz, /metrics"),
                ("STOWAGE_UPSTREAM_URL", "http://127.0.0.1:9"),
                ("STOWAGE_UPSTREAM_USERNAME", "u"),
                ("STOWAGE_UPSTREAM_PASSWORD", "p"),
                (
                    "STOWAGE_UPSTREAM_IMMUTABLE_TAGS",
                    r#"['^v\d{1,3}$', "^sha-"]"#,
                ),
                ("STOWAGE_UPSTREAMS_1_HOST", "ghcr.io"),
                ("STOWAGE_UPSTREAMS_1_URL", "https://ghcr.io"),
                ("STOWAGE_HOSTED_REPOSITORIES", "team/**"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.max_connections, 7);
        assert_eq!(c.storage.high_watermark, 0.9);
        assert!(c.offline);
        assert_eq!(c.auth.open_paths, ["/healthz", "/metrics"]);
        assert_eq!(c.upstreams.len(), 2);
        let hub = &c.upstreams[0];
        assert_eq!(
            hub.host, "docker.io",
            "the built-in entry, its url replaced"
        );
        assert_eq!(hub.url.as_str(), "http://127.0.0.1:9/");
        assert_eq!(
            (hub.username.as_deref(), hub.password.as_deref()),
            (Some("u"), Some("p"))
        );
        assert!(hub.is_immutable("v12") && !hub.is_immutable("v1234"));
        assert_eq!(c.upstreams[1].host, "ghcr.io");
        assert!(c.hosted.is_some());
        let c = with_env(
            "[[upstreams]]\nhost = \"quay.io\"\nurl = \"https://quay.io\"",
            &[("STOWAGE_UPSTREAM_URL", "http://127.0.0.1:9")],
        )
        .unwrap();
        assert_eq!(c.upstreams[0].host, "quay.io", "the file's first entry");
        let c = with_env(
            "[server]\nmax_connections = 5",
            &[("STOWAGE_SERVER_MAX_CONNECTIONS", "")],
        );
        assert_eq!(
            c.unwrap().server.max_connections,
            DEFAULT_MAX_CONNECTIONS,
            "empty resets"
        );
    }

    #[test]
    fn a_wrong_variable_is_named() {
        let e = |vars: &[(&str, &str)]| with_env("", vars).unwrap_err().to_string();
        let m = e(&[("STOWAGE_SERVER_MAX_CONNECTIONS", "many")]);
        assert!(
            m.contains("STOWAGE_SERVER_MAX_CONNECTIONS") && m.contains("integer"),
            "{m}"
        );
        let m = e(&[("STOWAGE_STORAGE_MAX_SIZE", "12 parsecs")]);
        assert!(
            m.contains("STOWAGE_STORAGE_MAX_SIZE") && m.contains("storage.max_size"),
            "{m}"
        );
        let m = e(&[("STOWAGE_OFFLINE", "perhaps")]);
        assert!(m.contains("STOWAGE_OFFLINE"), "{m}");
        let m = e(&[("STOWAGE_UPSTREAMS_0_URL", "ftp://x")]);
        assert!(
            m.contains("STOWAGE_UPSTREAMS_0_URL") && m.contains("upstreams[0].url"),
            "{m}"
        );
        let m = e(&[("STOWAGE_STORAGE_S3_BUCKET", "b")]);
        assert!(m.contains("STOWAGE_STORAGE_S3_BUCKET"), "{m}");
        let m = e(&[("STOWAGE_SERVER_TLS_CERT", "/c.pem")]);
        assert!(
            m.contains("server.tls_key") && m.contains("STOWAGE_SERVER_TLS_CERT"),
            "{m}"
        );
        let m = e(&[("STOWAGE_SERVER_LISTN", "127.0.0.1:1")]);
        assert!(
            m.contains("STOWAGE_SERVER_LISTN") && m.contains("names no"),
            "{m}"
        );
        let m = e(&[("STOWAGE_UPSTREAMS_5_URL", "http://x")]);
        assert!(m.contains("STOWAGE_UPSTREAMS_5_URL"), "{m}");
        assert!(with_env("", &[("STOWAGE_TEST_TOKEN", "x"), ("STOWAGE_CONFIG", "/x")]).is_ok());
        let referenced = "[[upstreams]]\nhost = \"a.io\"\nurl = \"http://a\"\nusername = \"u\"\npassword_env = \"STOWAGE_UPSTREAM_TOKEN\"";
        assert!(with_env(referenced, &[("STOWAGE_UPSTREAM_TOKEN", "t")]).is_ok());
    }

    #[test]
    fn variable_names_are_unique() {
        let schema = schema::schema().unwrap();
        let vars = env::variables(&schema, &toml::Table::new());
        let mut names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len(), "two keys share a variable");
        assert!(names.contains(&"STOWAGE_STORAGE_S3_BUCKET"));
        assert!(names.contains(&"STOWAGE_UPSTREAM_PASSWORD"));
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
        assert_eq!(c.storage.advertise_url, None);
        let c = Config::from_toml(
            "[storage]\nshared_path = \"/s\"\nadvertise_url = \"http://10.0.0.11:5000/\"",
        )
        .unwrap();
        assert_eq!(
            c.storage.advertise_url.as_deref(),
            Some("http://10.0.0.11:5000")
        );
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
            ("advertise_url = \"http://10.0.0.1:5000\"", "storage.advertise_url"),
            ("shared_path = \"/s\"\nadvertise_url = \"ftp://x\"", "storage.advertise_url"),
            ("shared_path = \"/s\"\nadvertise_url = \"http://u:p@x\"", "storage.advertise_url"),
            ("shared_path = \"/s\"\nadvertise_url = \"http://x/?a=b\"", "storage.advertise_url"),
        ];
        for (storage, key) in cases {
            let e = err(&format!("[storage]\n{storage}"));
            assert!(e.contains(key), "{storage:?}: {e}");
        }
    }
}
