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
//!   `Range` parsing (`http::range`, 206/416), the one place errors become responses, per-request observability (request id, request metrics,
//!   cache hit / miss counters, the log line), `/metrics`, `/healthz`, `/readyz`, `/v1/search`,
//!   graceful shutdown; htpasswd client auth (`http::auth`); under the router the connection
//!   layer (`http::listener`: hyper-util accept loop, connection/header/URI limits, slow-loris
//!   timeout) with rustls TLS reloadable on SIGHUP (`http::tls`).
//! - [`metrics`] — every Prometheus metric in one struct, registered once and reached through
//!   `metrics::metrics()` (the one allowed global), so any layer counts with a one-line increment.
//!   `dashboards/` holds the Grafana dashboard and example alert rules built on these names.
//! - [`policy`] — per-upstream `allow` / `deny` repository globs, checked by the upstream router
//!   so a denied name never reaches the cache or an upstream.
//! - [`mirror`] — the policy: tags fresh within `manifest_ttl` (or `immutable_tags`) without
//!   upstream, then revalidated with one `HEAD`; by-digest hits without upstream; per-Accept tag
//!   variants; stale serving (bounded by `max_stale`) when upstream fails; negative cache of
//!   upstream 404s; blob hit / join / start fill; `offline` (cache only, 404 naming the offline
//!   mirror, no upstream contact).
//! - [`upstream`] — one client per configured registry: routing (path prefix, `?ns=`, default,
//!   Docker Hub's `library/`, unknown hosts refused), bearer-token and basic auth, redirects
//!   followed by hand so that credentials never leave the registry's origin, manifest
//!   verification, the latest Docker Hub rate-limit headers.
//! - [`cache`] — the local store: blob files under `blobs/sha256/<2>/<64>`, fills in `tmp/`
//!   owned by the cache and shared by every reader (single flight), resumed with `Range` when the
//!   upstream breaks ([`cache::fill`]), committed blobs served as memory-mapped windows handed
//!   to hyper without a copy ([`cache::serve`]), the sled [`cache::index`] (tag records with
//!   their variants; check times batched in memory), hot manifests in moka, and the lifecycle
//!   in [`cache::budget`]: the byte budget, LRU order and eviction (fills reserve their size
//!   first; leased, pinned and filling blobs are skipped), recency flushed to sled in batches,
//!   crash reconciliation at open, the cache lock file.
//! - [`ops`] — operator commands on a stopped cache: `pin`, `unpin`, `ls`, `verify [--repair]`,
//!   `gc`, and Docker-style image reference parsing.
//! - [`airgap`] — air-gapped sites: `prefetch` through the mirror's fill engine, `export` of
//!   cached images to an OCI image layout (tar or directory, readable by skopeo) and `import` of
//!   one (every blob verified first, images made visible whole, idempotent). `offline = true` /
//!   `serve --offline` lives in [`mirror`].
//!
//! `main.rs` is the CLI (clap): `stowage serve [--config PATH] [--log-format text|json]
//! [--offline]` and the operator commands `pin|unpin|ls|verify|gc|prefetch|export|import
//! [--config PATH]`. `serve` also runs the optional `server.metrics_listen` listener, sets the
//! cache gauges at startup, owns the housekeeping task (recency flush, deferred eviction), and reloads the TLS certificate and the htpasswd file on
//! SIGHUP. `src/bin/stowage-bench.rs` is the benchmark command (stowage vs distribution's proxy;
//! results in `BENCHMARKS.md`).
//!
//! Tests: unit tests live beside the code; `tests/support/` is the shared harness (a real
//! `docker-registry` upstream, synthetic images, the stowage binary on an ephemeral port, and an
//! in-process fake upstream for faults a real registry cannot produce). `tests/fuzz.rs` is the
//! proptest suite for every parser that sees client input.

pub mod airgap;
pub mod cache;
pub mod config;
pub mod http;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod ops;
pub mod policy;
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
