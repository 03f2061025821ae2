//! # stowage — a pull-through caching mirror for container registries
//!
//! stowage answers the registry pull API (`/v2/...`) from an on-disk, content-addressed blob
//! cache indexed in sled, and fetches what it lacks from upstream registries.
//!
//! ## Layout
//!
//! Data flows one way: HTTP edge → policy ([`mirror`]) → cache / store / upstream. Nothing below
//! the edge knows about axum; nothing in [`oci`] does I/O; operations ([`ops`], [`airgap`])
//! define the events the CLI and the admin socket carry. From the bottom up:
//!
//! - [`oci`] — protocol vocabulary, pure and unit-tested: [`oci::Digest`], [`oci::RepoName`],
//!   [`oci::Reference`], media types and `Accept` negotiation, the OCI error codes and body,
//!   what a manifest references ([`oci::references()`]), Docker schema 2 → OCI conversion of
//!   manifests ([`oci::convert`], for `export`), sigstore signatures and their verification
//!   with a public key ([`oci::sigstore`], RustCrypto ECDSA).
//! - [`stream`] — the byte-stream vocabulary every layer hands blobs around in: a boxed stream
//!   of chunks, an upstream body with its length, a file read as a stream.
//! - [`metrics`] — every Prometheus metric in one struct, registered once and reached through
//!   `metrics::metrics()` (the one allowed global), so any layer counts with a one-line increment.
//!   `dashboards/` holds the Grafana dashboard and example alert rules built on these names.
//! - [`policy`] — repository globs (`*` within a path component, `**` across them) and the
//!   per-upstream `allow` / `deny` lists, checked by the upstream router so a denied name never
//!   reaches the cache or an upstream.
//! - [`config`] — typed configuration: defaults ← `config.toml` ← `STOWAGE_*` env; validated once,
//!   errors name the key. Data only; it also owns the shared store's settings and key rules.
//! - [`upstream`] — one client per configured registry: routing (path prefix, `?ns=`, default,
//!   Docker Hub's `library/`, unknown hosts refused), bearer-token and basic auth, redirects
//!   followed by hand so that credentials never leave the registry's origin, manifest
//!   verification, the latest Docker Hub rate-limit headers.
//! - [`store`] — the blob store a fleet of nodes shares (`storage.backend`): the small
//!   [`store::BlobStore`] trait (head / ranged get / put_file / put_bytes / conditional create /
//!   delete / sorted list) and its backends, a directory ([`store::fs::FsStore`], also on a shared
//!   mount), the `object_store` crate (S3, Ceph RGW, Garage, MinIO, Azure) and GCS's JSON API
//!   ([`store::gcs::GcsStore`]). All pass one suite, `tests/store.rs`; Garage runs as a real
//!   3-node cluster in `tests/support/garage.rs`, Azure's API as Azurite in
//!   `tests/support/azurite.rs`, GCS's as fake-gcs-server in `tests/support/gcs.rs`.
//! - [`cache`] — the local store: blob files under `blobs/sha256/<2>/<64>`, the cache's lock
//!   file (`cache/mod.rs`), the budget's load and crash reconciliation in the background after
//!   open (`cache/startup.rs`), fills in `tmp/` owned by
//!   the cache and shared by every reader (single flight), resumed with `Range` when the upstream
//!   breaks ([`cache::fill`]; readers keeping up take the last written bytes from memory,
//!   [`cache::tail`]), committed blobs served as memory-mapped windows handed to hyper
//!   without a copy ([`cache::serve`]), the sled [`cache::index`] (tag records with their
//!   variants; check times batched in memory), hot manifests in moka, and [`cache::budget`]: the
//!   byte budget, LRU order and eviction (fills reserve their size first; leased, pinned and
//!   filling blobs are skipped), recency flushed to sled in batches.
//! - [`fleet`] — several nodes sharing one [`store`]: local misses of blobs, manifests and
//!   tags look in the shared store before the upstream ([`fleet::TieredSource`] feeds the same
//!   fill engine, so shared bytes are verified like upstream ones); blobs from the upstream are
//!   uploaded once verified; best-effort fill leases (conditional create) that name the filling
//!   node, so that a node waiting on one streams the blob from it (`fleet/peer.rs`: its client,
//!   the lease's token); a failing store is counted, reported by `/readyz` and bypassed.
//! - [`mirror`] — the pull-through policy: tags fresh within `manifest_ttl` (or
//!   `immutable_tags`) without upstream, then revalidated with one `HEAD`; by-digest hits without
//!   upstream; per-Accept tag variants; stale serving (bounded by `max_stale`) when upstream
//!   fails; negative cache of upstream 404s (and of Docker Hub's 401 for a repository that does
//!   not exist); blob hit / join / start fill; `offline` (cache only, 404 naming the offline
//!   mirror, no upstream contact); the OCI 1.1 referrers of mirrored manifests
//!   ([`mirror::referrers`]: the upstream's API or its `sha256-<hex>` tag schema, cached for
//!   `referrers_ttl`, served stale and offline); `require_signatures` (a manifest enters the
//!   cache only once its sigstore signature verifies, `mirror/signatures.rs`).
//! - [`hosted`] — the private registry beside the mirror: names matching `hosted.repositories`
//!   are pushed to and pulled from stowage, never forwarded upstream. Upload sessions as files
//!   hashed while they stream, per-repository links (no cross-repository existence answers),
//!   manifest checks, deletes, a garbage collector that runs beside pushes; its blobs, records
//!   (a sled database of its own) and byte budget are apart from the cache's, so eviction cannot
//!   see them, and a `201` is only sent once the content is fsynced and indexed. With a fleet's
//!   shared store ([`hosted::shared`]) the store is the source of truth: pushes write it before
//!   their `201`, a node reads what it lacks from it, listings come from it, and
//!   [`hosted::shared_gc`] collects it in two runs a grace period apart.
//! - [`ops`] — operations on an open cache: `pin`, `unpin`, `ls`, `verify [--repair]`, `gc`,
//!   Docker-style image reference parsing, and the progress [`ops::Event`]s every operation
//!   reports through.
//! - [`airgap`] — air-gapped sites: `prefetch` through the mirror's fill engine, `export` of
//!   cached and hosted images to an OCI image layout (tar or directory, readable by skopeo:
//!   Docker-typed images get an OCI-typed copy beside them) and `import` of one (every blob
//!   verified first, images made visible whole, hosted ones into hosted storage, idempotent). `offline = true` / `serve --offline` lives in
//!   [`mirror`].
//! - [`console`] — the web console: per-repository statistics, sizes, fills, upstreams and the
//!   eviction preview as JSON under `/api/v1/`, pin / unpin / purge actions (marked with
//!   `X-Requested-With: stowage`, allowed by `[auth]` rules or `[console]`), and the page at
//!   `/ui/` (plain HTML / CSS / JS embedded in the binary) that uses only that API. The edge
//!   mounts its router and hands it the caller.
//! - [`http`] — the axum edge: `/v2/` path parsing into typed endpoints (`http::route`), blob
//!   `Range` parsing (`http::range`, 206/416), the one place errors become responses,
//!   per-request observability (request id, request metrics, cache hit / miss counters, the log
//!   line), `/metrics`, `/healthz`, `/readyz`, `/v1/search`, the fleet's peer endpoint
//!   (`http/peer.rs`: a fill in progress to a node holding its lease's token); htpasswd client auth
//!   (`http::auth`); under the router the connection layer (`http::listener`: hyper-util accept
//!   loop, connection/header/URI limits, slow-loris timeout) with rustls TLS reloadable on SIGHUP
//!   (`http::tls`).
//! - [`admin`] — operator commands against a running `serve`: its Unix socket
//!   `<storage.path>/admin.sock` (0600; HTTP/1.1, a JSON request in, NDJSON events out), the
//!   client the commands use when a server answers there (else they open the cache
//!   themselves), and the rendering of the events (indicatif bars or plain lines).
//! - [`server`] — `serve` once configured: the listeners, the optional `server.metrics_listen`
//!   listener, the admin socket, the cache gauges at startup, the housekeeping task (recency
//!   flush, deferred eviction), reloads of the TLS certificate and the htpasswd file on SIGHUP,
//!   and a clean shutdown of all of them on SIGTERM / SIGINT.
//!
//! `main.rs` is the CLI (clap): `stowage serve [--config PATH] [--log-format text|json]
//! [--offline]` and the operator commands `pin|unpin|ls|verify|gc|prefetch|export|import
//! [--config PATH]`. The benchmark command `stowage-bench` (stowage vs distribution's proxy;
//! results in `BENCHMARKS.md`) is a workspace member of its own.
//!
//! ## Who may import whom
//!
//! The allowed graph, written once: `tests/imports.rs` reads this table and fails when a module
//! names (`crate::...`, outside `#[cfg(test)]`) one its row does not list, or when the files of
//! one module folder import each other in a cycle.
//!
//! | module | may import |
//! |---|---|
//! | `oci` | — |
//! | `stream`, `metrics` | `oci` |
//! | `policy` | `oci` |
//! | `config` | `oci`, `policy` |
//! | `upstream` | `oci`, `stream`, `metrics`, `policy`, `config` |
//! | `store`, `cache` | `oci`, `stream`, `metrics`, `config` |
//! | `fleet` | `oci`, `stream`, `metrics`, `config`, `store`, `cache` |
//! | `mirror` | `oci`, `stream`, `metrics`, `policy`, `config`, `upstream`, `store`, `cache`, `fleet` |
//! | `hosted` | `oci`, `stream`, `metrics`, `policy`, `config`, `store` |
//! | `ops` | `oci`, `stream`, `metrics`, `config`, `cache`, `mirror`, `hosted` |
//! | `airgap` | `oci`, `stream`, `metrics`, `config`, `upstream`, `cache`, `mirror`, `hosted`, `ops` |
//! | `console` | `oci`, `config`, `cache`, `mirror`, `hosted`, `ops` |
//! | `http` | `oci`, `stream`, `metrics`, `policy`, `config`, `upstream`, `store`, `cache`, `fleet`, `mirror`, `hosted`, `console` |
//! | `admin` | `oci`, `metrics`, `config`, `cache`, `mirror`, `hosted`, `ops`, `airgap` |
//! | `server` | `oci`, `stream`, `metrics`, `config`, `cache`, `mirror`, `hosted`, `ops`, `http`, `admin` |
//!
//! Tests: unit tests live beside the code; `tests/support/` is the shared harness (a real
//! `docker-registry` upstream, synthetic images, the stowage binary on an ephemeral port, an
//! in-process fake upstream for faults a real registry cannot produce, a Garage cluster as the
//! fleet's S3 store, nginx as its load balancer). `tests/fuzz.rs` is the proptest suite for every
//! parser that sees client input; `tests/store.rs` the suite every blob-store backend passes;
//! `tests/fleet.rs` runs nodes sharing a store; `tests/imports.rs` holds the table above.

pub mod admin;
pub mod airgap;
pub mod cache;
pub mod config;
pub mod console;
pub mod fleet;
pub mod hosted;
pub mod http;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod ops;
pub mod policy;
pub mod server;
pub mod store;
pub mod stream;
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
