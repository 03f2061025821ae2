//! The shape `config.toml` is read into before validation: every key optional, unknown keys
//! rejected (`deny_unknown_fields`, so a typo is an error naming it, not a silent default), and
//! the `STOWAGE_*` environment overrides applied on top.
//!
//! These structs are the one list of keys the configuration accepts; a test checks that the
//! commented `config.toml` mentions every one of them.

use std::path::Path;

use serde::Deserialize;

use super::error::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) storage: RawStorage,
    pub(super) upstreams: Option<Vec<RawUpstream>>,
    #[serde(default)]
    pub(super) auth: RawAuth,
    pub(super) offline: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) metrics_listen: Option<String>,
    pub(super) tls_cert: Option<String>,
    pub(super) tls_key: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) max_header_size: Option<String>,
    pub(super) max_uri_length: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) htpasswd: Option<String>,
    pub(super) open_paths: Option<Vec<String>>,
    pub(super) failed_login_limit: Option<u32>,
    pub(super) failed_login_window: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    pub(super) path: Option<String>,
    pub(super) max_size: Option<String>,
    pub(super) high_watermark: Option<f64>,
    pub(super) low_watermark: Option<f64>,
    pub(super) access_flush_interval: Option<String>,
    pub(super) gc_max_age: Option<String>,
    pub(super) max_concurrent_fills: Option<i64>,
    pub(super) fill_retries: Option<i64>,
    pub(super) backend: Option<String>,
    pub(super) shared_path: Option<String>,
    pub(super) object_store_timeout: Option<String>,
    pub(super) fill_lease_ttl: Option<String>,
    pub(super) s3: Option<RawS3>,
    pub(super) gcs: Option<RawGcs>,
    pub(super) azure: Option<RawAzure>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawS3 {
    pub(super) bucket: Option<String>,
    pub(super) endpoint: Option<String>,
    pub(super) region: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) access_key_id: Option<String>,
    pub(super) secret_access_key: Option<String>,
    pub(super) secret_access_key_env: Option<String>,
    pub(super) path_style: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGcs {
    pub(super) bucket: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) service_account_path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAzure {
    pub(super) account: Option<String>,
    pub(super) container: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) access_key: Option<String>,
    pub(super) access_key_env: Option<String>,
    pub(super) endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) host: String,
    pub(super) url: String,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) read_timeout: Option<String>,
    pub(super) manifest_ttl: Option<String>,
    pub(super) immutable_tags: Option<Vec<String>>,
    pub(super) max_stale: Option<String>,
    pub(super) negative_ttl: Option<String>,
    pub(super) revalidate_timeout: Option<String>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) deny: Option<Vec<String>>,
}

impl RawUpstream {
    /// The upstream used when the file has no `[[upstreams]]`: Docker Hub.
    pub(super) fn docker_hub() -> RawUpstream {
        RawUpstream {
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
        }
    }
}

impl RawConfig {
    /// Applies the `STOWAGE_*` environment overrides (listed in `config.toml`'s header): each
    /// replaces the key it names, whatever the file said.
    pub(super) fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) {
        let overrides = [
            ("STOWAGE_LISTEN", &mut self.server.listen),
            ("STOWAGE_METRICS_LISTEN", &mut self.server.metrics_listen),
            ("STOWAGE_STORAGE_PATH", &mut self.storage.path),
            ("STOWAGE_STORAGE_MAX_SIZE", &mut self.storage.max_size),
        ];
        for (var, slot) in overrides {
            if let Some(v) = env(var) {
                *slot = Some(v);
            }
        }
    }
}

pub(super) fn read_raw(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_raw(&text, path)
}

pub(super) fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

