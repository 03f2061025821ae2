//! The progress events of the operator commands: what an operation reports, in order.
//!
//! The operations define what they report here: the text reports of `pin`, `ls`, `gc`, `export`
//! and the others travel as [`Event::Out`], `prefetch` adds per-image progress, and every run
//! ends with [`Event::End`]. Whoever runs an operation only carries these events (the admin
//! socket sends them as NDJSON) and renders them (the command line): an operation knows no
//! socket and no terminal.

/// What a command reports, in order. Every stream ends with [`Event::End`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Text for stdout, printed as is.
    Out { text: String },
    /// A line for stderr.
    Err { line: String },
    /// Prefetch: image `id` (its position among the references) has its manifests; `bytes` is
    /// what its blobs not yet cached weigh (descriptor sizes).
    Start {
        id: usize,
        image: String,
        blobs: usize,
        cached: usize,
        bytes: u64,
    },
    /// Prefetch: bytes of image `id` fetched so far.
    Progress { id: usize, bytes: u64 },
    /// Prefetch: image `id` is in the cache.
    Done {
        id: usize,
        image: String,
        manifests: usize,
        blobs: usize,
        cached: usize,
        bytes: u64,
        secs: f64,
    },
    /// Prefetch: image `id` failed (the others go on).
    Failed {
        id: usize,
        image: String,
        error: String,
    },
    /// Prefetch: totals; blobs counted once however many images share them.
    Summary {
        ok: usize,
        failed: usize,
        fetched: usize,
        cached: usize,
        bytes: u64,
        secs: f64,
    },
    /// The end: `ok` decides the exit code (0 or 1); `error` is what stopped the command.
    End { ok: bool, error: Option<String> },
}
