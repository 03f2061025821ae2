//! Prometheus metrics: every handle in one [`Metrics`] struct, registered once in its own
//! registry and reached through [`metrics()`] — the one process-wide global the house allows, so
//! that any layer can count with a one-line increment and no plumbing.
//!
//! The names and labels are a contract (dashboards and alert rules in `dashboards/` use them):
//!
//! | metric | meaning |
//! |---|---|
//! | `stowage_http_requests_total{route,method,status}` | requests answered; `route` is a template |
//! | `stowage_http_request_duration_seconds{route}` | time to the response head (histogram) |
//! | `stowage_http_requests_in_flight` | requests being handled now |
//! | `stowage_cache_hits_total{kind}` | `blob` / `manifest` requests answered from the cache (manifests by tag count when revalidated or served stale) |
//! | `stowage_cache_misses_total{kind}` | requests the cache could not answer from stored content (a blob request that joined a fill is a miss and a join) |
//! | `stowage_fill_joins_total` | blob requests that attached to a fill in flight instead of starting one |
//! | `stowage_fills_in_flight` | fills running now |
//! | `stowage_fill_commits_pending` | fills whose blob is verified (its readers may have every byte) with the commit (fsync, rename, index) still running |
//! | `stowage_fill_resumes_total` | fills resumed with `Range` after a broken upstream connection |
//! | `stowage_fill_failures_total{reason}` | fills given up, by [`FillFailure`] reason |
//! | `stowage_served_bytes_total{source}` | blob body bytes actually sent to clients, from a committed file (`cache`) or tailing a fill (`fill`) |
//! | `stowage_upstream_requests_total{upstream,method,status}` | HTTP requests to upstreams (every redirect hop and token request; `status="error"` when no answer came) |
//! | `stowage_upstream_bytes_total{upstream}` | blob body bytes received from upstreams |
//! | `stowage_upstream_ratelimit_remaining{upstream}` | Docker Hub's `ratelimit-remaining`, last seen |
//! | `stowage_stale_served_total{upstream}` | tags served from the cache because the upstream could not be asked |
//! | `stowage_cache_size_bytes`, `stowage_cache_blobs` | committed blobs, from the index at startup plus commits |
//! | `stowage_cache_budget_bytes` | `storage.max_size` |
//! | `stowage_evictions_total`, `stowage_evicted_bytes_total` | blobs removed to stay in budget |
//! | `stowage_hosted_bytes`, `stowage_hosted_blobs` | pushed content held (blobs, manifests, open uploads) and blob files |
//! | `stowage_uploads_in_progress` | open upload sessions |
//! | `stowage_pushes_total{result}` | finished blob uploads, mounts and manifest PUTs: `ok`, `rejected` (4xx), `full` (507), `error` |
//! | `stowage_signature_checks_total{upstream,result}` | sigstore checks of manifests from upstreams with `require_signatures = "sigstore"`: `verified`, `refused` (403 sent), `error` (the signature could not be fetched) |
//!
//! Label values are bounded: routes are templates, methods and reasons come from fixed lists,
//! `upstream` is a configured host, `status` a number.

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::oci::{ErrorCode, RegistryError};

/// Every metric stowage exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub http_requests_in_flight: IntGauge,
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub fill_joins: IntCounter,
    pub fills_in_flight: IntGauge,
    /// Fills verified and released to their readers, commit still running (`cache::fill`).
    pub fill_commits_pending: IntGauge,
    /// One per resume attempt of a broken upstream transfer (`cache::fill`).
    pub fill_resumes: IntCounter,
    pub fill_failures: IntCounterVec,
    pub served_bytes: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_bytes: IntCounterVec,
    pub upstream_ratelimit_remaining: IntGaugeVec,
    pub stale_served: IntCounterVec,
    pub cache_size_bytes: IntGauge,
    pub cache_budget_bytes: IntGauge,
    pub cache_blobs: IntGauge,
    /// Hosted content (`hosted`): bytes held, blob files, open upload sessions.
    pub hosted_bytes: IntGauge,
    pub hosted_blobs: IntGauge,
    pub uploads_in_progress: IntGauge,
    /// Finished pushes by result (`ok`, `rejected`, `full`, `error`).
    pub pushes: IntCounterVec,
    /// Counted by `cache::budget`'s eviction, through [`Metrics::blob_evicted`].
    pub evictions: IntCounter,
    /// Counted by `cache::budget`'s eviction, through [`Metrics::blob_evicted`].
    pub evicted_bytes: IntCounter,
    /// The fleet's shared store (`fleet`): 1 while its last call succeeded, by store.
    pub object_store_up: IntGaugeVec,
    pub object_store_requests: IntCounterVec,
    pub object_store_bytes: IntCounterVec,
    pub object_store_hits: IntCounterVec,
    pub object_store_fallbacks: IntCounter,
    pub fill_sources: IntCounterVec,
    /// Streams of a blob from the fleet node filling it (`fleet`), by how each ended.
    pub fleet_peer_fetches: IntCounterVec,
    pub signature_checks: IntCounterVec,
}

/// What kind of content a cache hit or miss was about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Manifest => "manifest",
        }
    }
}

/// Where served blob bytes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A committed blob file.
    Cache,
    /// A fill in progress, tailed while the upstream sends.
    Fill,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Fill => "fill",
        }
    }
}

/// Why a fill was given up (the `reason` label of `stowage_fill_failures_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillFailure {
    /// The upstream does not have the blob (404 / not visible).
    NotFound,
    /// The upstream refused for rate limiting (429).
    RateLimited,
    /// The bytes did not hash to the digest.
    DigestMismatch,
    /// The upstream sent more or fewer bytes than it announced.
    SizeMismatch,
    /// The upstream could not be reached, answered 5xx, or the connection broke.
    Upstream,
    /// Local trouble: disk full, cache full (the budget refused the fill), the index.
    Internal,
}

impl FillFailure {
    pub const ALL: [FillFailure; 6] = [
        FillFailure::NotFound,
        FillFailure::RateLimited,
        FillFailure::DigestMismatch,
        FillFailure::SizeMismatch,
        FillFailure::Upstream,
        FillFailure::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FillFailure::NotFound => "not_found",
            FillFailure::RateLimited => "rate_limited",
            FillFailure::DigestMismatch => "digest_mismatch",
            FillFailure::SizeMismatch => "size_mismatch",
            FillFailure::Upstream => "upstream",
            FillFailure::Internal => "internal",
        }
    }

    /// Classifies the error a fill ended with.
    pub fn of(e: &RegistryError) -> FillFailure {
        let m = e.message.as_str();
        match e.code {
            ErrorCode::BlobUnknown | ErrorCode::NameUnknown | ErrorCode::ManifestUnknown => {
                FillFailure::NotFound
            }
            ErrorCode::TooManyRequests => FillFailure::RateLimited,
            _ if m.contains(" hash to ") => FillFailure::DigestMismatch,
            _ if m.contains("sent more than") || m.contains(" ended ") => FillFailure::SizeMismatch,
            _ if m.starts_with("writing")
                || m.starts_with("syncing")
                || m.starts_with("committing") =>
            {
                FillFailure::Internal
            }
            ErrorCode::Unknown if e.status() == 500 => FillFailure::Internal,
            // The budget or the free-space check refused the fill (507): local, not upstream.
            _ if e.status() == 507 => FillFailure::Internal,
            _ => FillFailure::Upstream,
        }
    }
}

/// The process-wide metrics, registered on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Latency buckets: registry requests range from sub-millisecond hits to minutes-long layers.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        // Registration only fails on duplicate or malformed names: a programming error caught by
        // the unit tests below, never a runtime condition.
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            if let Err(e) = r.register(Box::new(c.clone())) {
                panic!("metric registration: {e}");
            }
            c
        }
        fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
            reg(
                r,
                IntCounter::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        }
        fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
            reg(
                r,
                IntGauge::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        }
        fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels)
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        }
        let r = &registry;
        let m = Metrics {
            http_requests: counter_vec(
                r,
                "stowage_http_requests_total",
                "HTTP requests answered, by route template, method and status.",
                &["route", "method", "status"],
            ),
            http_request_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "stowage_http_request_duration_seconds",
                        "Time from request to response head, by route template.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["route"],
                )
                .unwrap_or_else(|e| panic!("stowage_http_request_duration_seconds: {e}")),
            ),
            http_requests_in_flight: gauge(
                r,
                "stowage_http_requests_in_flight",
                "HTTP requests being handled now.",
            ),
            cache_hits: counter_vec(
                r,
                "stowage_cache_hits_total",
                "Requests answered from the cache, by kind (blob, manifest).",
                &["kind"],
            ),
            cache_misses: counter_vec(
                r,
                "stowage_cache_misses_total",
                "Requests the cache could not answer from stored content, by kind (blob, manifest).",
                &["kind"],
            ),
            fill_joins: counter(
                r,
                "stowage_fill_joins_total",
                "Blob requests that attached to an in-flight fill instead of starting one.",
            ),
            fills_in_flight: gauge(r, "stowage_fills_in_flight", "Blob fills running now."),
            fill_commits_pending: gauge(
                r,
                "stowage_fill_commits_pending",
                "Blob fills verified and released to their readers whose commit is still running.",
            ),
            fill_resumes: counter(
                r,
                "stowage_fill_resumes_total",
                "Fills resumed with a Range request after the upstream connection broke.",
            ),
            fill_failures: counter_vec(
                r,
                "stowage_fill_failures_total",
                "Blob fills given up, by reason.",
                &["reason"],
            ),
            served_bytes: counter_vec(
                r,
                "stowage_served_bytes_total",
                "Blob bytes sent to clients, by source (cache, fill).",
                &["source"],
            ),
            upstream_requests: counter_vec(
                r,
                "stowage_upstream_requests_total",
                "HTTP requests sent to upstream registries, by upstream, method and status.",
                &["upstream", "method", "status"],
            ),
            upstream_bytes: counter_vec(
                r,
                "stowage_upstream_bytes_total",
                "Blob bytes received from upstream registries.",
                &["upstream"],
            ),
            upstream_ratelimit_remaining: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "stowage_upstream_ratelimit_remaining",
                        "Pulls left in the upstream's rate-limit window (Docker Hub's ratelimit-remaining header), last seen.",
                    ),
                    &["upstream"],
                )
                .unwrap_or_else(|e| panic!("stowage_upstream_ratelimit_remaining: {e}")),
            ),
            stale_served: counter_vec(
                r,
                "stowage_stale_served_total",
                "Tags served from the cache because the upstream could not be asked.",
                &["upstream"],
            ),
            cache_size_bytes: gauge(r, "stowage_cache_size_bytes", "Bytes of committed blobs."),
            cache_budget_bytes: gauge(
                r,
                "stowage_cache_budget_bytes",
                "The cache's byte budget (storage.max_size).",
            ),
            cache_blobs: gauge(r, "stowage_cache_blobs", "Committed blobs in the cache."),
            hosted_bytes: gauge(
                r,
                "stowage_hosted_bytes",
                "Bytes of hosted content: blobs, manifests and open uploads (hosted.max_size).",
            ),
            hosted_blobs: gauge(r, "stowage_hosted_blobs", "Blob files of hosted repositories."),
            uploads_in_progress: gauge(
                r,
                "stowage_uploads_in_progress",
                "Open blob upload sessions.",
            ),
            pushes: counter_vec(
                r,
                "stowage_pushes_total",
                "Finished blob uploads, mounts and manifest PUTs, by result.",
                &["result"],
            ),
            evictions: counter(
                r,
                "stowage_evictions_total",
                "Blobs evicted to stay within the budget.",
            ),
            evicted_bytes: counter(
                r,
                "stowage_evicted_bytes_total",
                "Bytes of blobs evicted to stay within the budget.",
            ),
            object_store_up: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "stowage_object_store_up",
                        "1 while the fleet's shared object store answers, 0 after a failed call (by store).",
                    ),
                    &["store"],
                )
                .unwrap_or_else(|e| panic!("stowage_object_store_up: {e}")),
            ),
            object_store_requests: counter_vec(
                r,
                "stowage_object_store_requests_total",
                "Calls to the shared object store, by operation and result (ok, error).",
                &["op", "result"],
            ),
            object_store_bytes: counter_vec(
                r,
                "stowage_object_store_bytes_total",
                "Blob bytes read from / written to the shared object store, by direction.",
                &["direction"],
            ),
            object_store_hits: counter_vec(
                r,
                "stowage_object_store_hits_total",
                "Local misses answered from the shared object store instead of the upstream, by kind (blob, manifest, tag).",
                &["kind"],
            ),
            object_store_fallbacks: counter(
                r,
                "stowage_object_store_fallbacks_total",
                "Fills that went to the upstream because the shared object store failed.",
            ),
            fill_sources: counter_vec(
                r,
                "stowage_fill_sources_total",
                "Blob fills by where their bytes came from (upstream, object_store, peer).",
                &["source"],
            ),
            fleet_peer_fetches: counter_vec(
                r,
                "stowage_fleet_peer_fetches_total",
                "Streams of a blob from the fleet node filling it, by result (complete, broken, refused, unreachable).",
                &["result"],
            ),
            signature_checks: counter_vec(
                r,
                "stowage_signature_checks_total",
                "Sigstore signature checks of upstream manifests, by upstream and result (verified, refused, error).",
                &["upstream", "result"],
            ),
            registry,
        };
        // Series with known label values exist from the start, so that rates and ratios have
        // data (zeros) before the first event.
        for kind in [Kind::Blob, Kind::Manifest] {
            m.cache_hits.with_label_values(&[kind.as_str()]);
            m.cache_misses.with_label_values(&[kind.as_str()]);
        }
        for source in [Source::Cache, Source::Fill] {
            m.served_bytes.with_label_values(&[source.as_str()]);
        }
        for reason in FillFailure::ALL {
            m.fill_failures.with_label_values(&[reason.as_str()]);
        }
        for source in ["upstream", "object_store", "peer"] {
            m.fill_sources.with_label_values(&[source]);
        }
        for result in ["complete", "broken", "refused", "unreachable"] {
            m.fleet_peer_fetches.with_label_values(&[result]);
        }
        m
    }

    /// Creates the per-upstream series (at zero) for each configured upstream host.
    pub fn init_upstreams<'a>(&self, hosts: impl IntoIterator<Item = &'a str>) {
        for h in hosts {
            self.upstream_bytes.with_label_values(&[h]);
            self.stale_served.with_label_values(&[h]);
        }
    }

    /// The text exposition format (`text/plain; version=0.0.4`).
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }

    /// One call to the fleet's shared store.
    pub fn object_store_request(&self, op: &str, result: &str) {
        self.object_store_requests
            .with_label_values(&[op, result])
            .inc();
    }

    /// A local miss answered by the shared store (`blob`, `manifest`, `tag`).
    pub fn object_store_hit(&self, kind: &str) {
        self.object_store_hits.with_label_values(&[kind]).inc();
    }

    /// A fill started, reading from `source` (`upstream`, `object_store`).
    pub fn fill_source(&self, source: &str) {
        self.fill_sources.with_label_values(&[source]).inc();
    }

    pub fn hit(&self, kind: Kind) {
        self.cache_hits.with_label_values(&[kind.as_str()]).inc();
    }

    pub fn miss(&self, kind: Kind) {
        self.cache_misses.with_label_values(&[kind.as_str()]).inc();
    }

    pub fn served(&self, source: Source, bytes: u64) {
        self.served_bytes
            .with_label_values(&[source.as_str()])
            .inc_by(bytes);
    }

    /// A fill ended in failure.
    pub fn fill_failed(&self, e: &RegistryError) {
        self.fill_failures
            .with_label_values(&[FillFailure::of(e).as_str()])
            .inc();
    }

    /// Sets the cache gauges to the budget's totals of committed blobs (`cache::budget` calls
    /// this wherever they change: commits, evictions, removals, startup), so they cannot drift.
    pub fn cache_totals(&self, blobs: u64, bytes: u64) {
        self.cache_blobs
            .set(i64::try_from(blobs).unwrap_or(i64::MAX));
        self.cache_size_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A committed blob was evicted (by `cache::budget`, which then sets the cache gauges).
    pub fn blob_evicted(&self, size: u64) {
        self.evictions.inc();
        self.evicted_bytes.inc_by(size);
    }

    /// A response status (or `None`: no response) from upstream `host` to a `method` request.
    /// (The rate-limit gauge is set from `upstream::RateLimit`, the one parser of those headers.)
    pub fn upstream_response(
        &self,
        host: &str,
        method: &http::Method,
        status: Option<http::StatusCode>,
    ) {
        let status = status.map(|s| s.as_u16());
        let status_label = match status {
            Some(s) => s.to_string(),
            None => "error".to_owned(),
        };
        self.upstream_requests
            .with_label_values(&[host, method_label(method), &status_label])
            .inc();
    }

    /// Docker Hub's `ratelimit-remaining`, as parsed by [`crate::upstream::RateLimit`].
    pub fn ratelimit_remaining(&self, host: &str, remaining: u64) {
        self.upstream_ratelimit_remaining
            .with_label_values(&[host])
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    pub fn upstream_bytes(&self, host: &str, bytes: u64) {
        self.upstream_bytes.with_label_values(&[host]).inc_by(bytes);
    }

    pub fn stale(&self, host: &str) {
        self.stale_served.with_label_values(&[host]).inc();
    }

    /// Creates the signature-check series (at zero) of an upstream that requires signatures.
    pub fn init_signature_checks(&self, host: &str) {
        for result in SIGNATURE_RESULTS {
            self.signature_checks.with_label_values(&[host, result]);
        }
    }

    /// One signature check of a manifest from `host`: `verified`, `refused` or `error`.
    pub fn signature_check(&self, host: &str, result: &'static str) {
        self.signature_checks
            .with_label_values(&[host, result])
            .inc();
    }
}

/// The `result` values of `stowage_signature_checks_total`.
pub const SIGNATURE_RESULTS: [&str; 3] = ["verified", "refused", "error"];

/// A bounded method label.
pub fn method_label(m: &http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exported_from_the_start() {
        let m = metrics();
        m.init_upstreams(["docker.io"]);
        let text = String::from_utf8(m.render().unwrap()).unwrap();
        for name in [
            "stowage_cache_hits_total{kind=\"blob\"}",
            "stowage_cache_misses_total{kind=\"manifest\"}",
            "stowage_fill_joins_total",
            "stowage_fills_in_flight",
            "stowage_fill_commits_pending",
            "stowage_fill_resumes_total",
            "stowage_fill_failures_total{reason=\"digest_mismatch\"}",
            "stowage_served_bytes_total{source=\"cache\"}",
            "stowage_served_bytes_total{source=\"fill\"}",
            "stowage_upstream_bytes_total{upstream=\"docker.io\"}",
            "stowage_stale_served_total{upstream=\"docker.io\"}",
            "stowage_cache_size_bytes",
            "stowage_cache_budget_bytes",
            "stowage_cache_blobs",
            "stowage_evictions_total",
            "stowage_evicted_bytes_total",
            "stowage_http_requests_in_flight",
            "stowage_hosted_bytes",
            "stowage_hosted_blobs",
            "stowage_uploads_in_progress",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn cache_totals_set_the_gauges_and_evictions_count() {
        // A registry of its own: the global one is shared by the tests of this process.
        let m = Metrics::new();
        m.cache_totals(2, 150);
        m.blob_evicted(100);
        m.cache_totals(1, 50);
        assert_eq!(m.cache_blobs.get(), 1);
        assert_eq!(m.cache_size_bytes.get(), 50);
        assert_eq!(m.evictions.get(), 1);
        assert_eq!(m.evicted_bytes.get(), 100);
    }

    #[test]
    fn fill_failures_are_classified_from_the_fill_errors() {
        let e = |code, msg: &str| RegistryError::new(code, msg.to_owned());
        let u = ErrorCode::Unavailable;
        assert_eq!(
            FillFailure::of(&e(
                u,
                "upstream bytes for sha256:ab hash to sha256:cd; discarded"
            )),
            FillFailure::DigestMismatch
        );
        assert_eq!(
            FillFailure::of(&e(u, "upstream ended sha256:ab after 3 of 9 bytes")),
            FillFailure::SizeMismatch
        );
        assert_eq!(
            FillFailure::of(&e(u, "upstream sent more than the 9 bytes of sha256:ab")),
            FillFailure::SizeMismatch
        );
        assert_eq!(
            FillFailure::of(&e(u, "writing sha256:ab: disk full")),
            FillFailure::Internal
        );
        assert_eq!(
            FillFailure::of(&e(u, "stowage cache is full: 9 bytes do not fit").with_status(507)),
            FillFailure::Internal,
            "a fill the budget refused is local trouble, not the upstream's"
        );
        assert_eq!(
            FillFailure::of(&e(ErrorCode::BlobUnknown, "upstream h answered 404")),
            FillFailure::NotFound
        );
        assert_eq!(
            FillFailure::of(&e(ErrorCode::TooManyRequests, "429")),
            FillFailure::RateLimited
        );
        assert_eq!(
            FillFailure::of(&e(u, "upstream h unreachable: refused")),
            FillFailure::Upstream
        );
    }

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(method_label(&http::Method::GET), "GET");
        assert_eq!(
            method_label(&http::Method::from_bytes(b"BREW").unwrap()),
            "other"
        );
    }
}
