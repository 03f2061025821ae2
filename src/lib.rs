//! # stowage — a pull-through caching mirror for container registries
//!
//! stowage answers the registry pull API (`/v2/...`) from an on-disk, content-addressed blob
//! cache indexed in sled, and fetches what it lacks from upstream registries.
//!
//! ## Layout
//!
//! Data flows one way: HTTP edge → mirror policy → cache / upstream. Nothing below the edge knows
//! about axum; nothing in `oci` does I/O.
//!
//! - [`config`] — typed configuration: defaults ← `config.toml` ← `STOWAGE_*` env; validated once,
//!   errors name the key.
//! - [`oci`] — protocol vocabulary, pure and unit-tested: [`oci::Digest`], [`oci::RepoName`],
//!   [`oci::Reference`], media types and `Accept` negotiation, the OCI error codes and body.
//! - [`http`] — the axum edge: `/v2/` path parsing into typed endpoints (`http::route`), blob
//!   `Range` parsing (`http::range`, 206/416), the one place errors become responses, the request
//!   log line, `/v1/search`, graceful shutdown.
//! - [`mirror`] — the policy: tag revalidation with `HEAD`, by-digest hits without upstream,
//!   Accept-variant fetches, stale serving when upstream is down, blob hit / join / start fill.
//! - [`upstream`] — one client per configured registry: routing (`?ns=`, path prefix, default,
//!   Docker Hub's `library/`), bearer-token and basic auth, redirects followed by hand so that
//!   credentials never leave the registry's origin, manifest verification.
//! - [`cache`] — the local store: blob files under `blobs/sha256/<2>/<64>`, fills in `tmp/`
//!   owned by the cache and shared by every reader (single flight), resumed with `Range` when the
//!   upstream breaks ([`cache::fill`]), the sled [`cache::index`], hot manifests in moka.
//!
//! `main.rs` is the CLI (clap): `stowage serve [--config PATH]`. `src/bin/stowage-bench.rs` is
//! the benchmark command (stowage vs distribution's proxy; results in `BENCHMARKS.md`).
//!
//! Tests: unit tests live beside the code; `tests/support/` is the shared harness (a real
//! `docker-registry` upstream, synthetic images, the stowage binary on an ephemeral port, and an
//! in-process fake upstream for faults a real registry cannot produce).

pub mod cache;
pub mod config;
pub mod http;
pub mod mirror;
pub mod oci;
pub mod upstream;

/// Startup and top-level failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    #[error("{0}")]
    Startup(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
