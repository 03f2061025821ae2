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
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Cache directory: blobs, temp files and the sled index live below it.
    pub path: PathBuf,
    /// Byte budget for cached content.
    pub max_size: u64,
    /// Blob fills (upstream downloads) running at once; further misses wait for a slot.
    pub max_concurrent_fills: usize,
    /// Consecutive failed resume attempts tolerated per fill before its clients are aborted.
    pub fill_retries: u32,
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
}

impl UpstreamConfig {
    /// Docker Hub keeps official images under `library/`.
    pub fn is_docker_hub(&self) -> bool {
        matches!(
            self.host.as_str(),
            "docker.io" | "index.docker.io" | "registry-1.docker.io"
        )
    }
}

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<String>,
    max_size: Option<String>,
    max_concurrent_fills: Option<i64>,
    fill_retries: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    host: String,
    url: String,
    username: Option<String>,
    password: Option<String>,
    connect_timeout: Option<String>,
    read_timeout: Option<String>,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
pub const DEFAULT_STORAGE_PATH: &str = "data";
pub const DEFAULT_MAX_SIZE: &str = "20GiB";
pub const DEFAULT_MAX_CONCURRENT_FILLS: usize = 16;
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

        let raw_upstreams = raw.upstreams.unwrap_or_else(|| {
            vec![RawUpstream {
                host: "docker.io".into(),
                url: "https://registry-1.docker.io".into(),
                username: None,
                password: None,
                connect_timeout: None,
                read_timeout: None,
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
            if u.password.is_some() && u.username.is_none() {
                return Err(invalid(key("password"), "a password needs a username"));
            }
            let connect_timeout = parse_duration(u.connect_timeout.as_deref().unwrap_or("10s"))
                .map_err(|m| invalid(key("connect_timeout"), m))?;
            let read_timeout = parse_duration(u.read_timeout.as_deref().unwrap_or("60s"))
                .map_err(|m| invalid(key("read_timeout"), m))?;
            upstreams.push(UpstreamConfig {
                host,
                url,
                username: u.username,
                password: u.password,
                connect_timeout,
                read_timeout,
            });
        }

        Ok(Config {
            server: ServerConfig { listen },
            storage: StorageConfig {
                path,
                max_size,
                max_concurrent_fills,
                fill_retries,
            },
            upstreams,
        })
    }
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
    fn defaults_are_a_docker_hub_mirror_on_port_5000() {
        let c = Config::load(Some(Path::new("/nonexistent/x.toml")), |_| None);
        assert!(c.is_err(), "an explicit missing file is an error");
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.storage.path, PathBuf::from("data"));
        assert_eq!(c.storage.max_size, 20 << 30);
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
        assert!(err("[storage]\nmax_concurrent_fills = 0").contains("storage.max_concurrent_fills"));
        assert!(err("[storage]\nfill_retries = -1").contains("storage.fill_retries"));
        let dup = "[[upstreams]]\nhost=\"a.io\"\nurl=\"http://x\"\n[[upstreams]]\nhost=\"a.io\"\nurl=\"http://y\"";
        assert!(err(dup).contains("upstreams[1].host"));
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
