//! Blob fills: a cache miss becomes a task owned by the cache, not by the request.
//!
//! The fill writes `tmp/<hex>.<rand>.partial`, hashes as it writes, and publishes how many bytes
//! are in the file through a `watch` channel. Every reader — the client that caused the fill and
//! any that join it later, whole-blob or ranged — follows the published length, taking the last
//! published bytes from memory ([`Tail`]: the buffers just written, no file access) and anything
//! older from the partial file, so all of them stream bytes as they arrive, and a client hanging
//! up does not touch the fill: it always runs to completion (there is no abandon switch;
//! [`FillPolicy`] bounds how many run at once and how long a broken upstream is retried). On
//! success (size and sha256 match) the file is fsynced, renamed into `blobs/` and indexed; on
//! failure it is deleted and every reader's stream ends in an error, which aborts its connection
//! (or, before its first byte, is answered as an error status by the HTTP layer). A reader never
//! receives its last byte before the size and sha256 are verified, so a client never sees a clean
//! end to a wrong or truncated body; the last byte is released as soon as they are (the commit's
//! fsyncs, rename and index write then finish in the fill's task, off the clients' critical path,
//! counted in `stowage_fill_commits_pending`; a graceful stop waits for them, see
//! [`Cache::finish_commits`](super::Cache::finish_commits)). A crash in that window loses only the
//! commit: the blob is fetched again on its next request.
//!
//! The upstream side is a [`BlobSource`] that can be opened at an offset. When the upstream
//! breaks, stalls longer than the source's idle timeout, or answers 5xx midway, the fill opens it
//! again at the number of bytes it holds (`Range: bytes=<written>-`), with bounded retries and
//! exponential backoff; the hash simply continues. If the source ignores the offset and starts
//! from zero (a `200` to a ranged request), the fill re-reads the prefix it already has without
//! writing it, checks that it hashes the same as what readers were given, and carries on: the
//! published length never goes backwards and no reader sees a byte twice.
//!
//! Bytes are written in batches (up to [`FLUSH_AT`], or whatever has arrived when the upstream
//! pauses) by a blocking task that also hashes them, so the runtime threads do neither; while one
//! batch is written and hashed, the next is received.

use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::{watch, Semaphore};

use super::index::{unix_now, BlobMeta, Index};
use super::tail::Tail;
use crate::oci::{Digest, ErrorCode, RegistryError};
use crate::stream::{BlobBody, ByteStream};

/// The error inside a source's `io::Error` that ends the fill at once instead of resuming
/// (e.g. the cache's budget refused the bytes of a blob of unknown size: `507`, not a broken
/// upstream).
#[derive(Debug)]
pub struct FatalSourceError(pub RegistryError);

impl std::fmt::Display for FatalSourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for FatalSourceError {}

/// Where a fill gets its bytes (an upstream registry, in practice).
pub trait BlobSource: Send + Sync + 'static {
    /// Opens the blob at `offset`. A source that cannot honour the offset may answer from 0
    /// (`start == 0`); the fill copes.
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<BlobBody, RegistryError>>;

    /// The longest silence tolerated mid-body before the fill gives up on this connection and
    /// resumes. `None`: rely on the source's own timeouts.
    fn idle_timeout(&self) -> Option<Duration> {
        None
    }
}

/// How fills cope with a flaky upstream, and how many run at once.
#[derive(Clone, Debug)]
pub struct FillPolicy {
    /// Fills running at once; more wait (their clients see no headers yet) for a free slot.
    pub max_concurrent: usize,
    /// Consecutive failed attempts tolerated after the source first answered; an attempt that
    /// delivered bytes resets the count.
    pub retries: u32,
    /// Pause before the first retry; doubles each time, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for FillPolicy {
    fn default() -> FillPolicy {
        FillPolicy {
            max_concurrent: 16,
            retries: 5,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
        }
    }
}

/// How far a fill has got.
#[derive(Clone, Debug)]
pub enum Phase {
    /// Waiting for a fill slot or for the source to answer.
    Starting,
    /// Bytes are arriving; `total` is known if the source said.
    Streaming,
    /// Verified, renamed into place and indexed.
    Committed,
    /// Given up; the partial file is gone.
    Failed(RegistryError),
}

/// The state published to readers.
#[derive(Clone, Debug)]
pub struct FillState {
    pub total: Option<u64>,
    /// Bytes written to the partial file and readable by other file handles. Never decreases.
    pub written: u64,
    /// Size and sha256 verified: readers may take the last byte, while the commit (fsync,
    /// rename, index) completes in the fill's background. Stays true whatever the commit does.
    pub verified: bool,
    pub phase: Phase,
}

/// One in-flight fill, shared by everyone reading it.
pub struct Fill {
    pub digest: Digest,
    tmp_path: PathBuf,
    final_path: PathBuf,
    state: watch::Receiver<FillState>,
    /// The last published bytes, for readers keeping up.
    tail: Arc<Tail>,
}

/// In-flight fills by digest: the single-flight map.
pub type FillMap = Arc<Mutex<HashMap<Digest, Arc<Fill>>>>;

/// The most a reader following a fill takes at once from the tail (longer buffers are cut;
/// shorter ones are not joined beyond the tail's own limit).
const TAIL_CHUNK: usize = 1 << 20;

/// Read size of a reader behind the tail, from the file (at most what has been published).
/// 256 KiB keeps 32 followers within 8 MiB of mapped (resident) windows.
const READ_CHUNK: u64 = 256 * 1024;

/// Bytes gathered before a write to the partial file (earlier if the upstream pauses).
pub const FLUSH_AT: usize = 256 * 1024;

/// What a fill needs besides its source: where it writes and what it updates.
pub(super) struct FillContext {
    pub tmp_path: PathBuf,
    pub final_path: PathBuf,
    pub file: std::fs::File,
    pub index: Index,
    pub fills: FillMap,
    pub policy: FillPolicy,
    pub slots: Arc<Semaphore>,
    /// Set when the fill fails: the bytes its partial file occupies on disk. The file is already
    /// unlinked but still held open by the fill (readers may hold it a little longer) while the
    /// source is dropped, so the source can count them as about to be free.
    pub failed_partial: Arc<AtomicU64>,
}

impl Fill {
    /// Starts a fill of `digest` from `source`, as a task of its own.
    pub(super) fn start(digest: Digest, source: Box<dyn BlobSource>, cx: FillContext) -> Arc<Fill> {
        let (tx, rx) = watch::channel(FillState {
            total: None,
            written: 0,
            verified: false,
            phase: Phase::Starting,
        });
        let tail = Arc::new(Tail::default());
        let fill = Arc::new(Fill {
            digest: digest.clone(),
            tmp_path: cx.tmp_path.clone(),
            final_path: cx.final_path.clone(),
            state: rx,
            tail: tail.clone(),
        });
        crate::metrics::metrics().fills_in_flight.inc();
        tokio::spawn(async move {
            let tmp_path = cx.tmp_path.clone();
            let fills = cx.fills.clone();
            let failed_partial = cx.failed_partial.clone();
            let mut partial = None;
            // Set once the blob verifies; dropped last, after the end is published, so that
            // `stowage_fill_commits_pending` reaching 0 means the fill is completely over.
            let mut pending = None;
            let outcome = run(&digest, source.as_ref(), cx, &tx, &mut pending, tail).await;
            // Leave the single-flight map before publishing the end, so that a request arriving
            // after a failure starts afresh and one arriving after success finds the file.
            {
                let mut map = fills.lock().unwrap_or_else(|p| p.into_inner());
                map.remove(&digest);
            }
            crate::metrics::metrics().fills_in_flight.dec();
            match outcome {
                Ok(()) => tx.send_modify(|s| s.phase = Phase::Committed),
                Err(e) => {
                    // Keep the partial open until the source is dropped: its space comes back
                    // only when the last handle goes (ours, and readers' that are still ending),
                    // so the source is told how much will come back (see `BudgetedSource`).
                    partial = tokio::fs::File::open(&tmp_path).await.ok();
                    if let Some(f) = &partial {
                        if let Ok(m) = f.metadata().await {
                            use std::os::unix::fs::MetadataExt as _;
                            failed_partial.store(m.blocks().saturating_mul(512), Ordering::SeqCst);
                        }
                    }
                    if let Err(rm) = tokio::fs::remove_file(&tmp_path).await {
                        if rm.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(%digest, error = %rm, "could not remove partial file");
                        }
                    }
                    tracing::warn!(%digest, error = %e, "blob fill failed; readers aborted");
                    crate::metrics::metrics().fill_failed(&e);
                    tx.send_modify(|s| s.phase = Phase::Failed(e));
                }
            }
            // The source first: dropping it settles the budget (and the cache gauges), so
            // `stowage_fill_commits_pending` reaching 0 means they are up to date.
            drop(source);
            drop(pending);
            drop(partial);
        });
        fill
    }

    /// A snapshot of the fill's state.
    pub fn state(&self) -> FillState {
        self.state.borrow().clone()
    }

    /// Waits until the source has answered: the blob's total size if known, or the failure.
    pub async fn started(&self) -> Result<Option<u64>, RegistryError> {
        let mut rx = self.state.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                match &s.phase {
                    Phase::Starting => {}
                    Phase::Streaming => return Ok(s.total),
                    Phase::Committed => return Ok(Some(s.written)),
                    Phase::Failed(e) => return Err(e.clone()),
                }
            }
            if rx.changed().await.is_err() {
                return Err(fill_vanished(&self.digest));
            }
        }
    }

    /// Waits until the fill is over: committed (`Ok`) or failed. Readers may have finished
    /// earlier, as soon as the blob was verified.
    pub async fn settled(&self) -> Result<(), RegistryError> {
        let mut rx = self.state.clone();
        loop {
            match &rx.borrow_and_update().phase {
                Phase::Committed => return Ok(()),
                Phase::Failed(e) => return Err(e.clone()),
                Phase::Starting | Phase::Streaming => {}
            }
            if rx.changed().await.is_err() {
                return Err(fill_vanished(&self.digest));
            }
        }
    }

    /// Streams the whole blob as it arrives. The stream ends with an error if the fill fails.
    pub fn reader(self: &Arc<Fill>) -> ByteStream {
        self.reader_range(0, None)
    }

    /// Streams bytes `start..end` (`end` exclusive; `None`: to the end of the blob) as they
    /// arrive. The last byte is held back until the blob is verified.
    pub fn reader_range(self: &Arc<Fill>, start: u64, end: Option<u64>) -> ByteStream {
        let file = std::fs::File::open(&self.tmp_path)
            .or_else(|_| std::fs::File::open(&self.final_path))
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(start))?;
                Ok(f)
            });
        let state = ReaderState {
            fill: self.clone(),
            rx: self.state.clone(),
            file: file.map(Arc::new),
            pos: start,
            end,
            done: false,
        };
        Box::pin(futures_util::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let item = st.next_chunk().await;
            match item {
                Ok(Some(b)) => Some((Ok(b), st)),
                Ok(None) => None,
                Err(e) => {
                    st.done = true;
                    Some((Err(e), st))
                }
            }
        }))
    }
}

fn fill_vanished(digest: &Digest) -> RegistryError {
    RegistryError::new(
        ErrorCode::Unavailable,
        format!("fill of {digest} ended unexpectedly"),
    )
}

struct ReaderState {
    fill: Arc<Fill>,
    rx: watch::Receiver<FillState>,
    file: std::io::Result<Arc<std::fs::File>>,
    pos: u64,
    /// Exclusive end of the range, if the reader wants less than the whole blob.
    end: Option<u64>,
    done: bool,
}

impl ReaderState {
    /// How far this reader may read now. Until the blob is verified, hold back the reader's last
    /// byte (the range's, or the blob's; if the size is unknown, the last byte written): a client
    /// must never receive a complete body that could still turn out wrong. If the fill fails, the
    /// response ends short and the connection is aborted.
    fn readable(end: Option<u64>, s: &FillState) -> u64 {
        let verified = s.verified || matches!(s.phase, Phase::Committed);
        let limit = end.or(s.total);
        match (verified, limit) {
            (true, Some(l)) => s.written.min(l),
            (true, None) => s.written,
            (false, Some(l)) => s.written.min(l.saturating_sub(1)),
            (false, None) => s.written.saturating_sub(1),
        }
    }

    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            let (readable, finished) = {
                let s = self.rx.borrow_and_update();
                // Once verified, every byte is good whatever the commit does: a failed commit
                // (fsync, rename, index) unlinks the partial file, but this reader's handle still
                // reads it, so the body ends cleanly.
                if let Phase::Failed(e) = &s.phase {
                    if !s.verified {
                        return Err(std::io::Error::other(e.to_string()));
                    }
                }
                (
                    Self::readable(self.end, &s),
                    s.verified || matches!(s.phase, Phase::Committed),
                )
            };
            if self.pos < readable {
                if let Some(b) = self.fill.tail.get(self.pos, readable, TAIL_CHUNK) {
                    self.pos += b.len() as u64;
                    return Ok(Some(b));
                }
                let file = self
                    .file
                    .as_ref()
                    .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
                let want = (readable - self.pos).min(READ_CHUNK);
                // Published bytes are in the file and never change (a failed fill unlinks the
                // file, it never truncates it), so they can be mapped like a committed blob.
                let buf = super::serve::read_window(file, self.pos, want, None)
                    .await
                    .map_err(std::io::Error::other)??;
                self.pos += buf.len() as u64;
                return Ok(Some(buf));
            }
            if finished {
                return Ok(None);
            }
            if self.rx.changed().await.is_err() {
                // The fill task ended; its last state is final.
                let s = self.rx.borrow().clone();
                let done = s.verified || matches!(s.phase, Phase::Committed);
                match s.phase {
                    _ if done && self.pos >= Self::readable(self.end, &s) => return Ok(None),
                    _ if done => continue,
                    _ => {
                        return Err(std::io::Error::other(
                            fill_vanished(&self.fill.digest).to_string(),
                        ))
                    }
                }
            }
        }
    }
}

/// A batch on the blocking pool: its length, the job writing it (which hands the file back) and,
/// on another thread at the same time, the job hashing it (which hands the hasher back). Each
/// handle is `None` once its job has been collected.
struct Batch {
    len: u64,
    /// The batch's buffers, for the tail once they are in the file.
    bufs: Vec<Bytes>,
    write: Option<tokio::task::JoinHandle<(std::fs::File, std::io::Result<()>)>>,
    hash: Option<tokio::task::JoinHandle<Sha256>>,
}

/// The partial file and its hash, written in batches off the runtime threads. One batch is in
/// flight while the next one is received, so the upstream connection keeps flowing while the
/// previous batch is written; the batch is hashed on a second thread while it is written, and
/// published as soon as it is in the file (the hash is needed only to verify the end).
struct Sink {
    file: Option<std::fs::File>,
    hasher: Option<Sha256>,
    /// Chunks received and not yet written, as the source delivered them (not copied).
    pending: Vec<Bytes>,
    pending_len: usize,
    /// Bytes in the file, as published (the hasher holds them too once nothing is in flight).
    written: u64,
    inflight: Option<Batch>,
    /// Every batch goes here once written, before its length is published.
    tail: Arc<Tail>,
}

impl Sink {
    /// The hash of the bytes written so far (call when nothing is in flight).
    fn hasher(&self) -> Sha256 {
        self.hasher.clone().unwrap_or_default()
    }

    /// Bytes received from the source: written, being written, and pending. (A batch whose
    /// write is collected is in `written` already, even while its hash is still running.)
    fn received(&self) -> u64 {
        let writing = self.inflight.as_ref().filter(|b| b.write.is_some());
        self.written + writing.map_or(0, |b| b.len) + self.pending_len as u64
    }

    /// Waits for the batch in flight: publishes the new length once it is written, then takes
    /// the hasher back. Cancel-safe: a job's handle is dropped only once its result is kept, so
    /// an interrupted call is simply resumed by the next one.
    async fn settle(&mut self, tx: &watch::Sender<FillState>) -> std::io::Result<()> {
        let Some(batch) = self.inflight.as_mut() else {
            return Ok(());
        };
        if let Some(job) = batch.write.as_mut() {
            let (file, result) = job.await.map_err(std::io::Error::other)?;
            batch.write = None;
            self.file = Some(file);
            result?;
            self.tail.push(self.written, &batch.bufs);
            self.written += batch.len;
            let written = self.written;
            tx.send_modify(|s| s.written = written);
        }
        if let Some(job) = batch.hash.as_mut() {
            let hasher = job.await.map_err(std::io::Error::other)?;
            batch.hash = None;
            self.hasher = Some(hasher);
        }
        self.inflight = None;
        Ok(())
    }

    /// Starts writing and hashing what is pending, once the previous batch is done.
    async fn start(&mut self, tx: &watch::Sender<FillState>) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.settle(tx).await?;
        let bufs = std::mem::take(&mut self.pending);
        let len = std::mem::take(&mut self.pending_len) as u64;
        let (Some(mut file), Some(mut hasher)) = (self.file.take(), self.hasher.take()) else {
            return Err(std::io::Error::other(
                "partial file lost after an earlier error",
            ));
        };
        let to_hash = bufs.clone();
        let kept = bufs.clone();
        let hash = tokio::task::spawn_blocking(move || {
            for buf in &to_hash {
                hasher.update(buf);
            }
            hasher
        });
        let write = tokio::task::spawn_blocking(move || {
            let r = bufs.iter().try_for_each(|buf| file.write_all(buf));
            (file, r)
        });
        self.inflight = Some(Batch {
            len,
            bufs: kept,
            write: Some(write),
            hash: Some(hash),
        });
        Ok(())
    }

    /// Writes and hashes everything received, then publishes the new length.
    async fn flush(&mut self, tx: &watch::Sender<FillState>) -> std::io::Result<()> {
        self.start(tx).await?;
        self.settle(tx).await
    }
}

/// While a source that ignored a Range re-sends the prefix the fill already holds: the prefix is
/// hashed again (not written) and must hash like the bytes already in the file.
struct Replay {
    /// The prefix length (the file's length when the source restarted).
    upto: u64,
    /// Hasher state over the file's prefix, restored if this attempt breaks.
    held: Sha256,
    fresh: Sha256,
    /// Bytes of the prefix re-read so far.
    seen: u64,
}

impl Replay {
    /// Hashes the part of `chunk` that re-sends the prefix and returns the rest (new bytes).
    /// Once the whole prefix is re-read, it must hash like the bytes already in the file.
    fn consume(&mut self, chunk: Bytes, digest: &Digest) -> Result<Bytes, AttemptEnd> {
        let take = (self.upto - self.seen).min(chunk.len() as u64) as usize;
        self.fresh.update(&chunk[..take]);
        self.seen += take as u64;
        if self.seen == self.upto && self.fresh.clone().finalize() != self.held.clone().finalize() {
            return Err(AttemptEnd::Fatal(unavailable(format!(
                "upstream re-sent the first {} bytes of {digest} differently",
                self.upto
            ))));
        }
        Ok(chunk.slice(take..))
    }
}

/// Why one attempt at reading the source ended.
enum AttemptEnd {
    /// The source ended its body.
    Eof,
    /// The connection broke or went quiet: resume.
    Broken(String),
    /// Give up (disk error, too many bytes, a different prefix).
    Fatal(RegistryError),
}

fn unavailable(msg: String) -> RegistryError {
    RegistryError::new(ErrorCode::Unavailable, msg)
}

/// Whether a failed `open` is worth retrying (connection trouble, 5xx, 429).
fn retryable(e: &RegistryError) -> bool {
    let s = e.status();
    s >= 500 || s == 429
}

async fn run(
    digest: &Digest,
    source: &dyn BlobSource,
    cx: FillContext,
    tx: &watch::Sender<FillState>,
    pending: &mut Option<PendingCommit>,
    tail: Arc<Tail>,
) -> Result<(), RegistryError> {
    let _slot = cx
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| unavailable("fills are shutting down".into()))?;
    let mut sink = Sink {
        file: Some(cx.file),
        hasher: Some(Sha256::new()),
        pending: Vec::new(),
        pending_len: 0,
        written: 0,
        inflight: None,
        tail,
    };
    let mut transfer = Transfer {
        digest,
        source,
        idle: source.idle_timeout(),
        tx,
        total: None,
        answered: false,
    };
    transfer.resume_until_done(&mut sink, &cx.policy).await?;
    let written = verify(digest, &sink, transfer.total)?;
    // Size and digest verified: release the last byte now. The commit below (fsync, rename,
    // index) runs in this fill's task while readers finish; the single-flight entry stays until
    // it is done, so late joiners still join this fill rather than start another, and the index
    // names the blob only after its file is in place.
    tx.send_modify(|s| {
        s.total = Some(written);
        s.verified = true;
    });
    *pending = Some(PendingCommit::new());
    let file = sink
        .file
        .take()
        .ok_or_else(|| unavailable(format!("partial file of {digest} lost")))?;
    persist(
        digest,
        file,
        written,
        &cx.tmp_path,
        &cx.final_path,
        &cx.index,
    )
    .await
}

/// The fill's reading of its source, across attempts (the first open and every resume).
struct Transfer<'a> {
    digest: &'a Digest,
    source: &'a dyn BlobSource,
    idle: Option<Duration>,
    tx: &'a watch::Sender<FillState>,
    /// The blob's size, from the first answer that gave it; later answers must agree.
    total: Option<u64>,
    /// Whether the source has answered once: only then are refusals retried (a first refusal,
    /// such as a 404, is the client's answer).
    answered: bool,
}

/// How one attempt ended, once the sink holds (and has published) what it delivered.
enum Attempt {
    /// The source delivered the whole blob.
    Complete,
    /// Resume, after a pause (at least `retry_after` seconds, if the source asked for one).
    Failed {
        msg: String,
        retry_after: Option<u64>,
        /// Whether this attempt delivered any byte: progress resets the failure count.
        progressed: bool,
    },
}

impl Transfer<'_> {
    /// Opens the source again at the bytes held after each failed attempt, with bounded retries
    /// and exponential backoff, until it has delivered the whole blob.
    async fn resume_until_done(
        &mut self,
        sink: &mut Sink,
        policy: &FillPolicy,
    ) -> Result<(), RegistryError> {
        let digest = self.digest;
        let mut failures: u32 = 0;
        loop {
            let (msg, retry_after) = match self.attempt(sink).await? {
                Attempt::Complete => return Ok(()),
                Attempt::Failed {
                    msg,
                    retry_after,
                    progressed,
                } => {
                    if progressed {
                        failures = 0;
                    }
                    (msg, retry_after)
                }
            };
            failures += 1;
            if failures > policy.retries {
                return Err(unavailable(format!(
                    "giving up on {digest} after {} failed attempts at offset {}: {msg}",
                    failures, sink.written
                )));
            }
            let pause = policy
                .backoff
                .saturating_mul(1 << (failures - 1).min(16))
                .min(policy.max_backoff)
                .max(Duration::from_secs(retry_after.unwrap_or(0).min(30)));
            tracing::warn!(%digest, offset = sink.written, attempt = failures, error = %msg, pause_ms = pause.as_millis() as u64, "upstream transfer broke; resuming");
            crate::metrics::metrics().fill_resumes.inc();
            tokio::time::sleep(pause).await;
        }
    }

    /// Opens the source at the bytes held and copies its body into the sink.
    async fn attempt(&mut self, sink: &mut Sink) -> Result<Attempt, RegistryError> {
        let (digest, tx) = (self.digest, self.tx);
        let offset = sink.written;
        let body = match self.source.open(offset).await {
            Err(e) if !self.answered || !retryable(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(%digest, offset, error = %e, "upstream refused the resume");
                return Ok(Attempt::Failed {
                    msg: e.to_string(),
                    retry_after: e.retry_after,
                    progressed: false,
                });
            }
            Ok(body) => body,
        };
        self.answered_with(&body, offset)?;
        let mut replay = self.replay_for(&body, offset, sink)?;
        let before = sink.written;
        let mut end = pump(
            body.stream,
            sink,
            &mut replay,
            self.total,
            self.idle,
            digest,
            tx,
        )
        .await;
        if !matches!(end, AttemptEnd::Fatal(_)) {
            if let Err(e) = sink.flush(tx).await {
                end = AttemptEnd::Fatal(unavailable(format!(
                    "writing the partial file of {digest}: {e}"
                )));
            }
        }
        let progressed = sink.written > before || replay.as_ref().is_some_and(|r| r.seen > 0);
        if let Some(r) = replay.take() {
            // Broke while re-reading the prefix: the file and its hash are as before.
            sink.hasher = Some(r.held);
        }
        let msg = match end {
            AttemptEnd::Fatal(e) => return Err(e),
            AttemptEnd::Eof if self.total.is_none_or(|t| sink.written >= t) => {
                return Ok(Attempt::Complete)
            }
            AttemptEnd::Eof => format!(
                "upstream ended {digest} after {} of {} bytes",
                sink.written,
                self.total.unwrap_or(0)
            ),
            AttemptEnd::Broken(msg) => msg,
        };
        Ok(Attempt::Failed {
            msg,
            retry_after: None,
            progressed,
        })
    }

    /// Records an answer: its size must agree with earlier ones; the first one starts streaming.
    fn answered_with(&mut self, body: &BlobBody, offset: u64) -> Result<(), RegistryError> {
        let digest = self.digest;
        if let (Some(t), Some(b)) = (self.total, body.total) {
            if t != b {
                return Err(unavailable(format!(
                    "upstream changed the size of {digest} from {t} to {b} bytes"
                )));
            }
        }
        self.total = self.total.or(body.total);
        if !self.answered {
            self.answered = true;
            let total = self.total;
            tracing::info!(%digest, size = ?total, "fill started");
            self.tx.send_modify(|s| {
                s.total = total;
                s.phase = Phase::Streaming;
            });
        } else {
            tracing::info!(%digest, offset, from = body.start, "fill resumed");
        }
        Ok(())
    }

    /// Whether the body starts where asked (`None`), or from 0 because the source ignored the
    /// range (a [`Replay`] of the prefix held). Any other start is refused.
    fn replay_for(
        &self,
        body: &BlobBody,
        offset: u64,
        sink: &Sink,
    ) -> Result<Option<Replay>, RegistryError> {
        let digest = self.digest;
        if body.start == offset {
            // The normal case, and every resume the source honoured.
            Ok(None)
        } else if body.start == 0 {
            tracing::warn!(%digest, offset, "upstream ignored the range; re-reading from 0");
            Ok(Some(Replay {
                upto: offset,
                held: sink.hasher(),
                fresh: Sha256::new(),
                seen: 0,
            }))
        } else {
            Err(unavailable(format!(
                "upstream answered {digest} from offset {} when asked for {offset}",
                body.start
            )))
        }
    }
}

/// Checks the bytes the source delivered: exactly its announced size, hashing to `digest`.
/// Returns the size.
fn verify(digest: &Digest, sink: &Sink, total: Option<u64>) -> Result<u64, RegistryError> {
    let written = sink.written;
    if let Some(t) = total {
        if written != t {
            return Err(unavailable(format!(
                "upstream ended {digest} after {written} of {t} bytes"
            )));
        }
    }
    let actual = Digest::from_hasher(sink.hasher());
    if actual != *digest {
        tracing::error!(expected = %digest, actual = %actual, bytes = written, "upstream sent wrong bytes for blob; discarded");
        return Err(unavailable(format!(
            "upstream bytes for {digest} hash to {actual}; discarded"
        )));
    }
    Ok(written)
}

/// Makes a verified blob durable and visible: fsync the file, rename it into `blobs/`, then
/// index it (so the index names the blob only once its file is in place).
async fn persist(
    digest: &Digest,
    file: std::fs::File,
    size: u64,
    tmp_path: &std::path::Path,
    final_path: &std::path::Path,
    index: &Index,
) -> Result<(), RegistryError> {
    let io_err = |what: &str, e: std::io::Error| unavailable(format!("{what} {digest}: {e}"));
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(|e| io_err("syncing", std::io::Error::other(e)))?
        .map_err(|e| io_err("syncing", e))?;
    commit(tmp_path, final_path)
        .await
        .map_err(|e| io_err("committing", e))?;
    index
        .put_blob(
            digest,
            &BlobMeta {
                size,
                added: unix_now(),
            },
        )
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    index.durable().await;
    tracing::info!(%digest, bytes = size, "blob committed");
    Ok(())
}

/// Counts a verified fill in `stowage_fill_commits_pending` until its commit ends, either way.
struct PendingCommit;

impl PendingCommit {
    fn new() -> PendingCommit {
        crate::metrics::metrics().fill_commits_pending.inc();
        PendingCommit
    }
}

impl Drop for PendingCommit {
    fn drop(&mut self) {
        crate::metrics::metrics().fill_commits_pending.dec();
    }
}

/// Copies one source body into the sink until it ends, breaks or goes quiet.
async fn pump(
    mut stream: ByteStream,
    sink: &mut Sink,
    replay: &mut Option<Replay>,
    total: Option<u64>,
    idle: Option<Duration>,
    digest: &Digest,
    tx: &watch::Sender<FillState>,
) -> AttemptEnd {
    let disk = |e: std::io::Error| {
        AttemptEnd::Fatal(unavailable(format!(
            "writing the partial file of {digest}: {e}"
        )))
    };
    loop {
        let next = match next_item(&mut stream, sink, idle, tx).await {
            Ok(item) => item,
            Err(e) => return disk(e),
        };
        let Some(next) = next else {
            return AttemptEnd::Broken(format!(
                "no bytes from upstream for {:?}",
                idle.unwrap_or_default()
            ));
        };
        let mut chunk = match next {
            None => {
                if let Err(e) = sink.flush(tx).await {
                    return disk(e);
                }
                return if replay.is_some() {
                    AttemptEnd::Broken("upstream ended while re-sending the prefix".into())
                } else {
                    AttemptEnd::Eof
                };
            }
            Some(Err(e)) => {
                if let Some(f) = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<FatalSourceError>())
                {
                    return AttemptEnd::Fatal(f.0.clone());
                }
                if let Err(e) = sink.flush(tx).await {
                    return disk(e);
                }
                return AttemptEnd::Broken(e.to_string());
            }
            Some(Ok(c)) => c,
        };
        if let Some(r) = replay.as_mut() {
            chunk = match r.consume(chunk, digest) {
                Ok(rest) => rest,
                Err(end) => return end,
            };
            if r.seen == r.upto {
                sink.hasher = Some(r.fresh.clone());
                *replay = None;
            }
        }
        if chunk.is_empty() {
            continue;
        }
        let have = sink.received();
        if let Some(t) = total {
            if have + chunk.len() as u64 > t {
                return AttemptEnd::Fatal(unavailable(format!(
                    "upstream sent more than the {t} bytes of {digest}"
                )));
            }
        }
        sink.pending_len += chunk.len();
        sink.pending.push(chunk);
        if sink.pending_len >= FLUSH_AT {
            if let Err(e) = sink.start(tx).await {
                return disk(e);
            }
        }
    }
}

/// The source's next item. Takes what is ready without waiting; when the upstream pauses, starts
/// writing what the sink has so readers get it promptly, and waits for the upstream while that
/// batch is written (publishing it as soon as it is): the connection is read meanwhile, not
/// left until the disk is done. The wait is bounded by the idle timeout (`None` when it
/// passes). An error is the sink's (the disk's).
async fn next_item(
    stream: &mut ByteStream,
    sink: &mut Sink,
    idle: Option<Duration>,
    tx: &watch::Sender<FillState>,
) -> std::io::Result<Option<Option<std::io::Result<Bytes>>>> {
    if let Some(item) = stream.next().now_or_never() {
        return Ok(Some(item));
    }
    sink.start(tx).await?;
    let quiet = async {
        match idle {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(quiet);
    let next = stream.next();
    tokio::pin!(next);
    loop {
        if sink.inflight.is_none() {
            return Ok(tokio::select! {
                item = &mut next => Some(item),
                () = &mut quiet => None,
            });
        }
        // `settle` is cancel-safe: an item arriving first leaves the batch in flight.
        tokio::select! {
            biased;
            item = &mut next => return Ok(Some(item)),
            r = sink.settle(tx) => r?,
            () = &mut quiet => return Ok(None),
        }
    }
}

/// Atomically moves a verified temp file into the content store and makes the rename durable.
async fn commit(tmp: &std::path::Path, dest: &std::path::Path) -> std::io::Result<()> {
    let tmp = tmp.to_owned();
    let dest = dest.to_owned();
    tokio::task::spawn_blocking(move || {
        let parent = dest
            .parent()
            .ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
        std::fs::create_dir_all(parent)?;
        std::fs::rename(&tmp, &dest)?;
        std::fs::File::open(parent)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::cache::Cache;

    /// What one `open` of the scripted source does.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// Serve from the offset asked for, breaking off at this absolute offset.
        CutAt(u64),
        /// Answer from 0 whatever was asked (a 200 to a Range).
        IgnoreOffset,
        /// Answer from 0 whatever was asked, breaking off at this offset.
        IgnoreOffsetCutAt(u64),
        /// Refuse with this HTTP status.
        Status(u16),
    }

    struct Script {
        data: Bytes,
        plan: Mutex<VecDeque<Step>>,
        opens: Arc<Mutex<Vec<u64>>>,
    }

    impl BlobSource for Script {
        fn open(&self, offset: u64) -> BoxFuture<'_, Result<BlobBody, RegistryError>> {
            Box::pin(async move {
                self.opens.lock().unwrap().push(offset);
                let step = self.plan.lock().unwrap().pop_front();
                let len = self.data.len() as u64;
                let (start, stop, broken) = match step {
                    None => (offset, len, false),
                    Some(Step::CutAt(n)) => (offset, n, true),
                    Some(Step::IgnoreOffset) => (0, len, false),
                    Some(Step::IgnoreOffsetCutAt(n)) => (0, n, true),
                    Some(Step::Status(s)) => {
                        return Err(
                            RegistryError::new(ErrorCode::Unavailable, "scripted").with_status(s)
                        )
                    }
                };
                let body = self.data.slice(start as usize..stop as usize);
                let chunks: Vec<std::io::Result<Bytes>> = body
                    .chunks(1000)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .chain(broken.then(|| Err(std::io::Error::other("scripted cut"))))
                    .collect();
                Ok(BlobBody {
                    start,
                    total: Some(len),
                    stream: Box::pin(futures_util::stream::iter(chunks)),
                })
            })
        }
    }

    fn data(n: usize) -> Bytes {
        (0..n)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    fn cache(dir: &std::path::Path) -> Cache {
        let mut storage = crate::config::Config::from_toml("").unwrap().storage;
        storage.path = dir.to_owned();
        Cache::open(&storage).unwrap().with_fill_policy(FillPolicy {
            max_concurrent: 2,
            retries: 2,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
        })
    }

    /// Fills `bytes` (whose digest is `digest`) through the script; returns what a reader got
    /// (or its error) and the offsets the source was opened at.
    async fn fill_with(
        bytes: &Bytes,
        digest: &Digest,
        plan: &[Step],
    ) -> (Result<Vec<u8>, String>, Vec<u64>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let opens = Arc::new(Mutex::new(Vec::new()));
        let script = Script {
            data: bytes.clone(),
            plan: Mutex::new(plan.iter().copied().collect()),
            opens: opens.clone(),
        };
        let (fill, joined) = cache.fill(digest, || Box::new(script)).unwrap();
        assert!(!joined);
        let mut reader = fill.reader();
        let mut got = Vec::new();
        let mut result = Ok(());
        while let Some(chunk) = reader.next().await {
            match chunk {
                Ok(c) => got.extend_from_slice(&c),
                Err(e) => {
                    result = Err(e.to_string());
                    break;
                }
            }
        }
        // Readers finish once the blob is verified; the commit may still be running.
        let _ = fill.settled().await;
        let opens = opens.lock().unwrap().clone();
        (result.map(|()| got), opens, dir)
    }

    #[tokio::test]
    async fn breaks_are_resumed_at_the_written_offset() {
        let bytes = data(1_000_000);
        let digest = Digest::of(&bytes);
        let plan = [
            Step::CutAt(300_000),
            Step::CutAt(900_000),
            Step::Status(503),
        ];
        let (got, opens, dir) = fill_with(&bytes, &digest, &plan).await;
        assert_eq!(got.unwrap(), bytes.to_vec());
        assert_eq!(opens, vec![0, 300_000, 900_000, 900_000]);
        let cache = cache(dir.path());
        assert_eq!(cache.open_blob(&digest).unwrap().unwrap().size, 1_000_000);
    }

    #[tokio::test]
    async fn a_source_ignoring_the_offset_is_re_read_without_duplicates() {
        let bytes = data(500_000);
        let digest = Digest::of(&bytes);
        let plan = [Step::CutAt(200_000), Step::IgnoreOffset];
        let (got, opens, _dir) = fill_with(&bytes, &digest, &plan).await;
        assert_eq!(got.unwrap(), bytes.to_vec());
        assert_eq!(opens, vec![0, 200_000]);
        // The restart breaks while re-sending the prefix: resume again from the file's length.
        let plan = [Step::CutAt(300_000), Step::IgnoreOffsetCutAt(100_000)];
        let (got, opens, _dir) = fill_with(&bytes, &digest, &plan).await;
        assert_eq!(got.unwrap(), bytes.to_vec());
        assert_eq!(opens, vec![0, 300_000, 300_000]);
        // ... or after it: resume from where the restart got to.
        let plan = [Step::CutAt(300_000), Step::IgnoreOffsetCutAt(400_000)];
        let (got, opens, _dir) = fill_with(&bytes, &digest, &plan).await;
        assert_eq!(got.unwrap(), bytes.to_vec());
        assert_eq!(opens, vec![0, 300_000, 400_000]);
    }

    #[tokio::test]
    async fn retries_are_bounded_and_nothing_is_committed() {
        let bytes = data(100_000);
        let digest = Digest::of(&bytes);
        let plan = [
            Step::CutAt(10_000),
            Step::Status(503),
            Step::Status(502),
            Step::Status(503),
        ];
        let (got, opens, dir) = fill_with(&bytes, &digest, &plan).await;
        assert!(
            got.is_err(),
            "a fill that ran out of retries must abort readers"
        );
        // The break, then two retries (policy.retries = 2); the last step is never reached.
        assert_eq!(opens, vec![0, 10_000, 10_000]);
        let cache = cache(dir.path());
        assert!(cache.open_blob(&digest).unwrap().is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn a_first_refusal_is_not_retried() {
        let bytes = data(1000);
        let digest = Digest::of(&bytes);
        let (got, opens, _dir) = fill_with(&bytes, &digest, &[Step::Status(503)]).await;
        assert!(got.is_err());
        assert_eq!(opens, vec![0]);
    }

    #[tokio::test]
    async fn wrong_bytes_are_never_delivered_whole() {
        let bytes = data(100_000);
        let wrong = Digest::of(b"something else");
        let (got, _opens, dir) = fill_with(&bytes, &wrong, &[]).await;
        let err = got.unwrap_err();
        assert!(err.contains("hash to"), "{err}");
        let cache = cache(dir.path());
        assert!(cache.open_blob(&wrong).unwrap().is_none());
    }

    #[tokio::test]
    async fn ranged_readers_get_exactly_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let bytes = data(300_000);
        let digest = Digest::of(&bytes);
        let script = Script {
            data: bytes.clone(),
            plan: Mutex::new([Step::CutAt(150_000)].into_iter().collect()),
            opens: Arc::default(),
        };
        let (fill, _) = cache.fill(&digest, || Box::new(script)).unwrap();
        for (start, end) in [(0, Some(10)), (149_990, Some(150_010)), (299_999, None)] {
            let got: Vec<u8> = fill
                .reader_range(start, end)
                .map(|c| c.unwrap().to_vec())
                .concat()
                .await;
            let end = end.unwrap_or(300_000) as usize;
            assert_eq!(got, bytes[start as usize..end].to_vec(), "{start}..{end}");
        }
        fill.settled().await.unwrap();
        assert!(matches!(fill.state().phase, Phase::Committed));
    }

    /// A source whose bytes the test releases chunk by chunk.
    struct Gated {
        total: u64,
        chunks: Mutex<Option<tokio::sync::mpsc::Receiver<Bytes>>>,
    }

    impl BlobSource for Gated {
        fn open(&self, _offset: u64) -> BoxFuture<'_, Result<BlobBody, RegistryError>> {
            let rx = self.chunks.lock().unwrap().take().expect("opened once");
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                Some((Ok(rx.recv().await?), rx))
            });
            Box::pin(async move {
                Ok(BlobBody {
                    start: 0,
                    total: Some(self.total),
                    stream: Box::pin(stream),
                })
            })
        }
    }

    /// Readers keeping up take bytes from the fill's tail, readers joining late from the file and
    /// then the tail: all of them get exactly the blob, whole or ranged.
    #[tokio::test]
    async fn readers_in_the_tail_and_behind_it_get_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let bytes = data(5 << 20);
        let digest = Digest::of(&bytes);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let source = Gated {
            total: bytes.len() as u64,
            chunks: Mutex::new(Some(rx)),
        };
        let (fill, _) = cache.fill(&digest, || Box::new(source)).unwrap();
        let collect = |s: ByteStream| tokio::spawn(s.map(|c| c.unwrap().to_vec()).concat());
        let early = collect(fill.reader());
        let mut late = Vec::new();
        // Uneven chunks, so tail buffers and reads straddle each other.
        let mut sent = 0;
        for (i, n) in [70_001usize, 300_000, 1000, 524_287]
            .iter()
            .cycle()
            .enumerate()
        {
            if sent >= bytes.len() {
                break;
            }
            let end = (sent + n).min(bytes.len());
            tx.send(bytes.slice(sent..end)).await.unwrap();
            sent = end;
            if i % 5 == 4 {
                // Let the fill publish, then join: from 0 (the file), and a range across the
                // published end.
                while fill.state().written < sent as u64 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                late.push((0, None, collect(fill.reader())));
                let (a, b) = (sent as u64 - 100_000, sent as u64 + 100_000);
                late.push((a, Some(b), collect(fill.reader_range(a, Some(b)))));
            }
        }
        drop(tx);
        assert_eq!(early.await.unwrap(), bytes.to_vec());
        assert!(late.len() >= 4);
        for (start, end, got) in late {
            let end = end.unwrap_or(bytes.len() as u64) as usize;
            let got = got.await.unwrap();
            assert_eq!(got, bytes[start as usize..end].to_vec(), "{start}..{end}");
        }
        fill.settled().await.unwrap();
    }

    /// A batch is counted once: in flight until its write is collected, then in `written`
    /// while its hash may still run (a settle interrupted there must not count it twice).
    #[tokio::test]
    async fn a_written_batch_still_hashing_is_received_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("partial")).unwrap();
        let (tx, _rx) = watch::channel(FillState {
            total: None,
            written: 0,
            verified: false,
            phase: Phase::Streaming,
        });
        let mut sink = Sink {
            file: Some(file),
            hasher: Some(Sha256::new()),
            pending: vec![Bytes::from_static(b"0123456789")],
            pending_len: 10,
            written: 0,
            inflight: None,
            tail: Arc::default(),
        };
        sink.start(&tx).await.unwrap();
        assert_eq!(sink.received(), 10);
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let batch = sink.inflight.as_mut().unwrap();
        // Hold the hash back: the write is collected first, the hash later.
        let hash = batch.hash.take().unwrap();
        let rt = tokio::runtime::Handle::current();
        batch.hash = Some(tokio::task::spawn_blocking(move || {
            gate_rx.recv().unwrap();
            rt.block_on(hash).unwrap()
        }));
        let write = batch.write.as_mut().unwrap();
        let (f, r) = write.await.unwrap();
        r.unwrap();
        batch.write = None;
        sink.file = Some(f);
        sink.written += 10;
        assert_eq!(sink.received(), 10);
        gate_tx.send(()).unwrap();
        sink.settle(&tx).await.unwrap();
        assert_eq!(sink.received(), 10);
        assert!(sink.inflight.is_none());
    }
}
