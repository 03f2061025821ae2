//! Serving committed blobs: the warm path, where stowage competes with `sendfile`.
//!
//! A committed blob is sent as read-only memory mappings of its file, one window
//! ([`MMAP_WINDOW`]) at a time, each handed to hyper as a `Bytes` that owns its mapping
//! (`Bytes::from_owner`): no user-space copy, no zeroed buffer, the kernel copies straight from
//! the page cache into the socket. Each window is mapped with `MAP_POPULATE` on the blocking pool
//! (so a blob not in the page cache is read there, not on a runtime thread, and the later
//! `write` takes no page faults), and the next window is mapped while the current one is being
//! sent. A window is unmapped when hyper drops its last `Bytes`, i.e. once its bytes are written;
//! mapping windows rather than the whole file keeps the file pages counted in the server's RSS
//! to a few MiB per reader instead of the whole blob.
//!
//! Why a mapping of a blob file stays valid while it is being sent:
//! - committed blob files are immutable: they are created only by `rename` from `tmp/` (fills,
//!   import) and never opened for writing again;
//! - eviction, `gc`, `verify --repair` and the index self-repair in `open_blob` only *unlink*
//!   them (a new copy of the same digest arrives by another rename, i.e. a new inode). An
//!   unlinked file's pages stay valid for as long as a mapping holds the inode, so a client
//!   still gets the bytes it was promised; the disk space is freed when the last window is
//!   unmapped. (`verify --repair` also runs only on a stopped cache.)
//! - the one hazard of a mapping is a file *truncated in place* (or a media error) under a
//!   mapping: touching the lost pages raises `SIGBUS` in user space. stowage never truncates a
//!   blob; on plain HTTP only the kernel reads the mapped pages (hyper hands them to `writev`),
//!   where a fault becomes `EFAULT` on that connection rather than a signal. Files shrunk behind
//!   stowage's back are caught before mapping (the length is checked against `fstat`).
//!
//! Each window also holds the blob's read lease, so the blob is not evicted until its last
//! bytes have been written to the connection, not merely until hyper has polled the stream.
//! Tiny blobs and windows whose mapping fails are read with `pread` instead. Readers following
//! a fill map the published part of the partial file the same way (`read_window`): published
//! bytes are never rewritten, and a failed fill only unlinks its file.
//!
//! Measured alternatives (`BENCHMARKS.md`): 1 MiB `spawn_blocking` reads into unzeroed buffers
//! were clearly slower with 8 clients and doubled RSS; mappings without `MAP_POPULATE` (with or
//! without `MADV_WILLNEED`) were within the noise of this one, which keeps page faults (and any
//! disk read) off the runtime threads.

use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use bytes::Bytes;

use super::budget::BlobLease;
use crate::stream::ByteStream;

/// Bytes per mapping. Larger windows mean fewer `mmap`/`munmap` round trips; smaller ones keep
/// RSS (which counts the mapped file pages) low with many concurrent readers.
pub const MMAP_WINDOW: u64 = 1 << 20;

/// Blobs (or ranges) smaller than this are read with one `pread`.
const MMAP_MIN: u64 = 64 * 1024;

/// One window of a blob: a mapping (or, on fallback, a buffer) and the blob's lease.
struct Window<T> {
    bytes: T,
    _lease: Option<Arc<BlobLease>>,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Window<T> {
    fn as_ref(&self) -> &[u8] {
        self.bytes.as_ref()
    }
}

/// Maps (or reads) `len` bytes of `file` at `offset`. Blocking: runs on the blocking pool.
///
/// The one place the crate allows `unsafe` (`unsafe_code` is denied in `Cargo.toml`): mapping a
/// file is unsafe because another process could change it under the mapping; committed blobs
/// are never written again, which is what makes it sound.
#[allow(unsafe_code)]
fn window(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    lease: Option<Arc<BlobLease>>,
) -> std::io::Result<Bytes> {
    let size = file.metadata()?.len();
    if offset.saturating_add(len) > size {
        return Err(std::io::Error::other("blob file is shorter than expected"));
    }
    let n = usize::try_from(len).map_err(std::io::Error::other)?;
    if len >= MMAP_MIN {
        // SAFETY: the file is a committed blob (cached or hosted), which nobody writes or
        // truncates (see the module docs); unlinking it while mapped leaves the mapping valid.
        let mapped = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(n)
                .populate()
                .map(file)
        };
        match mapped {
            Ok(m) => {
                return Ok(Bytes::from_owner(Window {
                    bytes: m,
                    _lease: lease,
                }))
            }
            Err(e) => tracing::debug!(error = %e, "mmap of a blob window failed; reading it"),
        }
    }
    let mut buf = vec![0u8; n];
    file.read_exact_at(&mut buf, offset)?;
    Ok(Bytes::from_owner(Window {
        bytes: buf,
        _lease: lease,
    }))
}

/// The next window, mapped on the blocking pool.
type Pending = tokio::task::JoinHandle<std::io::Result<Bytes>>;

/// Maps (or reads) `len` bytes of `file` at `offset` on the blocking pool. Also used by readers
/// following a fill: the published part of a partial file is as immutable as a committed blob.
pub(super) fn read_window(
    file: &Arc<std::fs::File>,
    offset: u64,
    len: u64,
    lease: Option<Arc<BlobLease>>,
) -> Pending {
    let file = file.clone();
    tokio::task::spawn_blocking(move || window(&file, offset, len, lease))
}

struct State {
    file: Arc<std::fs::File>,
    lease: Option<Arc<BlobLease>>,
    /// Start of the next window not yet requested.
    pos: u64,
    end: u64,
    pending: Option<Pending>,
}

impl State {
    fn request(&mut self) -> Option<Pending> {
        if self.pos >= self.end {
            return None;
        }
        let len = (self.end - self.pos).min(MMAP_WINDOW);
        let p = read_window(&self.file, self.pos, len, self.lease.clone());
        self.pos += len;
        Some(p)
    }
}

/// Streams `len` bytes of a committed blob from `offset` as mapped windows, the next one mapped
/// while the current one is sent. The lease is held by the stream and by every window.
pub fn blob_stream(file: std::fs::File, offset: u64, len: u64, lease: BlobLease) -> ByteStream {
    windows(file, offset, len, Some(Arc::new(lease)))
}

/// [`blob_stream`] for a file that no cache budget holds: a hosted blob, which is as immutable
/// as a committed cached one (written once, then only renamed or unlinked) and never evicted.
pub fn immutable_file_stream(file: std::fs::File, offset: u64, len: u64) -> ByteStream {
    windows(file, offset, len, None)
}

fn windows(
    file: std::fs::File,
    offset: u64,
    len: u64,
    lease: Option<Arc<BlobLease>>,
) -> ByteStream {
    let mut state = State {
        file: Arc::new(file),
        lease,
        pos: offset,
        end: offset.saturating_add(len),
        pending: None,
    };
    state.pending = state.request();
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        let current = st.pending.take()?;
        let item = match current.await {
            Ok(Ok(bytes)) => {
                st.pending = st.request();
                Ok(bytes)
            }
            Ok(Err(e)) => Err(e),
            Err(join) => Err(std::io::Error::other(join)),
        };
        if item.is_err() {
            // End the stream after the error.
            st.pos = st.end;
        }
        Some((item, st))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::budget::{Budget, Limits};
    use futures_util::StreamExt;

    fn lease() -> BlobLease {
        Arc::new(Budget::new(Limits::new(1 << 30, 0.9, 0.8))).lease("ab")
    }

    async fn collect(s: ByteStream) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn windows_cover_every_range_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..(3 * MMAP_WINDOW as usize + 12_345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let size = data.len() as u64;
        for (start, len) in [
            (0, size),
            (1, size - 1),
            (4095, MMAP_WINDOW + 2),
            (size - 10, 10),
            (MMAP_WINDOW, MMAP_MIN),
            (7, 0),
        ] {
            let f = std::fs::File::open(&path).unwrap();
            let got = collect(blob_stream(f, start, len, lease())).await.unwrap();
            assert_eq!(
                got,
                data[start as usize..(start + len) as usize].to_vec(),
                "{start}+{len}"
            );
        }
    }

    #[tokio::test]
    async fn a_file_shorter_than_indexed_is_an_error_not_a_signal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![7u8; 200_000]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let got = collect(blob_stream(f, 0, 300_000, lease())).await;
        assert!(got.is_err());
    }
}
