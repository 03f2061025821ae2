//! Byte-stream vocabulary shared by every layer that moves blob bodies: the boxed chunk stream
//! ([`ByteStream`]), a body as a source delivers it ([`BlobBody`]), and a stream over a file
//! ([`file_stream`]). It is a leaf (it imports nothing from the crate) so that `cache`, `store`,
//! `upstream` and `fleet` can all speak it without importing each other.

use std::io::SeekFrom;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

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

/// Read size when streaming a committed blob file: each `tokio::fs` read is a hop to the blocking
/// pool, so fewer, larger reads; 256 KiB per reader keeps 32 readers within a few MiB.
const COMMITTED_READ_CHUNK: usize = 256 * 1024;

/// Streams a committed blob file from `offset`, `len` bytes. A file that ends before `len` bytes
/// is an error, never a clean end: the caller promised its reader exactly `len` bytes.
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
            let want = remaining.min(COMMITTED_READ_CHUNK as u64) as usize;
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
