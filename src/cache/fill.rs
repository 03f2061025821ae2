//! Blob fills: a cache miss becomes a task owned by the cache, not by the request.
//!
//! The fill writes `tmp/<hex>.<rand>.partial`, hashes as it writes, and publishes how many bytes
//! are durably in the file through a `watch` channel. Every reader — the client that caused the
//! fill and any that join it later — tails the partial file up to the published length, so all of
//! them stream bytes as they arrive, and a client hanging up does not touch the fill. On success
//! (size and sha256 match) the file is fsynced, renamed into `blobs/` and indexed; on failure it is
//! deleted and every reader's stream ends in an error, which aborts its connection — a client
//! never sees a clean end to a wrong or truncated body.
//!
//! The upstream side is a [`BlobSource`] that can be opened at an offset.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use super::index::{unix_now, BlobMeta, Index};
use crate::oci::{Digest, ErrorCode, RegistryError};

/// A boxed stream of body chunks.
pub type ByteStream = std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A blob body as a source delivers it.
pub struct BlobBody {
    /// Offset of the first byte in the stream.
    pub start: u64,
    /// The blob's total size, when the source knows it.
    pub total: Option<u64>,
    pub stream: ByteStream,
}

/// Where a fill gets its bytes (an upstream registry, in practice).
pub trait BlobSource: Send + Sync + 'static {
    /// Opens the blob at `offset`.
    fn open(&self, offset: u64) -> BoxFuture<'_, Result<BlobBody, RegistryError>>;
}

/// How far a fill has got.
#[derive(Clone, Debug)]
pub enum Phase {
    /// Waiting for the source to answer.
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
    /// Bytes written to the partial file and readable by other file handles.
    pub written: u64,
    pub phase: Phase,
}

/// One in-flight fill, shared by everyone reading it.
pub struct Fill {
    pub digest: Digest,
    tmp_path: PathBuf,
    final_path: PathBuf,
    state: watch::Receiver<FillState>,
}

/// In-flight fills by digest: the single-flight map.
pub type FillMap = Arc<Mutex<HashMap<Digest, Arc<Fill>>>>;

const READ_CHUNK: usize = 64 * 1024;

impl Fill {
    /// Starts a fill of `digest` from `source`, as a task of its own.
    pub(super) fn start(
        digest: Digest,
        tmp_path: PathBuf,
        final_path: PathBuf,
        file: std::fs::File,
        source: Box<dyn BlobSource>,
        index: Index,
        fills: FillMap,
    ) -> Arc<Fill> {
        let (tx, rx) = watch::channel(FillState {
            total: None,
            written: 0,
            phase: Phase::Starting,
        });
        let fill = Arc::new(Fill {
            digest: digest.clone(),
            tmp_path: tmp_path.clone(),
            final_path: final_path.clone(),
            state: rx,
        });
        crate::metrics::metrics().fills_in_flight.inc();
        tokio::spawn(async move {
            let file = tokio::fs::File::from_std(file);
            let outcome = run(
                &digest,
                file,
                &tmp_path,
                &final_path,
                source.as_ref(),
                &index,
                &tx,
            )
            .await;
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
                    if let Err(rm) = tokio::fs::remove_file(&tmp_path).await {
                        if rm.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(%digest, error = %rm, "could not remove partial file");
                        }
                    }
                    tracing::warn!(%digest, error = %e, "blob fill failed");
                    crate::metrics::metrics().fill_failed(&e);
                    tx.send_modify(|s| s.phase = Phase::Failed(e));
                }
            }
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

    /// Streams the blob's bytes as they arrive. The stream ends with an error if the fill fails.
    pub fn reader(self: &Arc<Fill>) -> ByteStream {
        let file =
            std::fs::File::open(&self.tmp_path).or_else(|_| std::fs::File::open(&self.final_path));
        let state = ReaderState {
            fill: self.clone(),
            rx: self.state.clone(),
            file: file.map(tokio::fs::File::from_std),
            pos: 0,
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
    file: std::io::Result<tokio::fs::File>,
    pos: u64,
    done: bool,
}

impl ReaderState {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            let (written, total, phase) = {
                let s = self.rx.borrow_and_update();
                (s.written, s.total, s.phase.clone())
            };
            if let Phase::Failed(e) = phase {
                return Err(std::io::Error::other(e.to_string()));
            }
            // Until the blob is verified, hold back its last byte: a client must never receive a
            // complete body that could still turn out wrong. If the fill fails, the response
            // ends short and the connection is aborted.
            let readable = match (&phase, total) {
                (Phase::Committed, _) => written,
                (_, Some(t)) => written.min(t.saturating_sub(1)),
                (_, None) => written,
            };
            if self.pos < readable {
                let file = self
                    .file
                    .as_mut()
                    .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
                let want = (readable - self.pos).min(READ_CHUNK as u64) as usize;
                let mut buf = BytesMut::zeroed(want);
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Err(std::io::Error::other(format!(
                        "partial file of {} shorter than published",
                        self.fill.digest
                    )));
                }
                buf.truncate(n);
                self.pos += n as u64;
                return Ok(Some(buf.freeze()));
            }
            if matches!(phase, Phase::Committed) {
                return Ok(None);
            }
            if self.rx.changed().await.is_err() {
                // The fill task ended; its last state is final.
                let s = self.rx.borrow().clone();
                match s.phase {
                    Phase::Committed if self.pos >= s.written => return Ok(None),
                    Phase::Committed => continue,
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

async fn run(
    digest: &Digest,
    mut file: tokio::fs::File,
    tmp_path: &std::path::Path,
    final_path: &std::path::Path,
    source: &dyn BlobSource,
    index: &Index,
    tx: &watch::Sender<FillState>,
) -> Result<(), RegistryError> {
    let body = source.open(0).await?;
    if body.start != 0 {
        return Err(RegistryError::new(
            ErrorCode::Unavailable,
            format!(
                "source answered from offset {} when asked for 0",
                body.start
            ),
        ));
    }
    let total = body.total;
    tx.send_modify(|s| {
        s.total = total;
        s.phase = Phase::Streaming;
    });
    let mut stream = body.stream;
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let io_err = |what: &str, e: std::io::Error| {
        RegistryError::new(ErrorCode::Unavailable, format!("{what} {digest}: {e}"))
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| io_err("reading", e))?;
        if let Some(t) = total {
            if written + chunk.len() as u64 > t {
                return Err(RegistryError::new(
                    ErrorCode::Unavailable,
                    format!("upstream sent more than the {t} bytes of {digest}"),
                ));
            }
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| io_err("writing", e))?;
        // Flush so the bytes are in the file (readable through other handles) before publishing.
        file.flush().await.map_err(|e| io_err("writing", e))?;
        hasher.update(&chunk);
        written += chunk.len() as u64;
        tx.send_modify(|s| s.written = written);
    }
    if let Some(t) = total {
        if written != t {
            return Err(RegistryError::new(
                ErrorCode::Unavailable,
                format!("upstream ended {digest} after {written} of {t} bytes"),
            ));
        }
    }
    let actual = Digest::from_hasher(hasher);
    if actual != *digest {
        tracing::error!(expected = %digest, actual = %actual, bytes = written, "upstream sent wrong bytes for blob; discarded");
        return Err(RegistryError::new(
            ErrorCode::Unavailable,
            format!("upstream bytes for {digest} hash to {actual}; discarded"),
        ));
    }
    file.sync_all().await.map_err(|e| io_err("syncing", e))?;
    drop(file);
    commit(tmp_path, final_path)
        .await
        .map_err(|e| io_err("committing", e))?;
    index
        .put_blob(
            digest,
            &BlobMeta {
                size: written,
                added: unix_now(),
            },
        )
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    crate::metrics::metrics().blob_committed(written);
    index.durable().await;
    tx.send_modify(|s| s.total = Some(written));
    tracing::debug!(%digest, bytes = written, "blob committed");
    Ok(())
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

/// Streams a committed blob file from `offset`, `len` bytes.
pub fn file_stream(file: std::fs::File, offset: u64, len: u64) -> ByteStream {
    let state = (tokio::fs::File::from_std(file), offset, len, false);
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut file, offset, remaining, seeked)| async move {
            if remaining == 0 {
                return None;
            }
            if !seeked && offset > 0 {
                if let Err(e) = file.seek(SeekFrom::Start(offset)).await {
                    return Some((Err(e), (file, offset, 0, true)));
                }
            }
            let want = remaining.min(READ_CHUNK as u64) as usize;
            let mut buf = BytesMut::zeroed(want);
            match file.read(&mut buf).await {
                Ok(0) => Some((
                    Err(std::io::Error::other("cached blob is shorter than indexed")),
                    (file, offset, 0, true),
                )),
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf.freeze()), (file, offset, remaining - n as u64, true)))
                }
                Err(e) => Some((Err(e), (file, offset, 0, true))),
            }
        },
    ))
}
