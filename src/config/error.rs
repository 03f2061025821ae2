//! [`ConfigError`]: what is wrong with the configuration, naming the key, so `stowage serve` can
//! tell the operator exactly what to fix (and exit with code 2).

use std::path::PathBuf;

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
    /// A `STOWAGE_*` variable's value is wrong, or the variable names no key (`key` is empty).
    #[error("invalid config: environment variable {var}{}: {message}", key_of(.key))]
    Env {
        var: String,
        key: String,
        message: String,
    },
}

fn key_of(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!(" ({key})")
    }
}

/// The error for a value that parsed but is not acceptable: `key` is its dotted path
/// (`storage.s3.bucket`, `upstreams[1].host`).
pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}
