//! The in-memory tail of a fill: the most recently published bytes, as the buffers the upstream
//! delivered them in, so that a reader keeping up with the fill takes them without touching the
//! file (no mapping, no trip through the blocking pool). A reader further behind reads the file.
//!
//! Invariant: the tail holds exactly the bytes at `start..start + len` of the partial file, and
//! only bytes already written to it (the fill pushes a batch after its write, before publishing
//! the new length), so serving from the tail or from the file gives the same bytes.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

/// Bytes kept: a reader within this distance of the published end is served from memory (one
/// at the head is usually within the last batch). Per fill; the buffers held keep their whole
/// allocation (the upstream client's read buffer), measured at ~12 MiB of RSS over 16 fills.
pub const TAIL_BYTES: u64 = 512 * 1024;

/// Pieces shorter than this are joined with the ones after them (up to [`JOIN_UPTO`] bytes) into
/// one buffer, so an upstream delivering small chunks does not mean a reader wake-up per chunk.
const JOIN_BELOW: usize = 64 * 1024;

/// The most bytes a joined buffer holds (copied).
const JOIN_UPTO: usize = 256 * 1024;

#[derive(Default)]
struct Inner {
    /// Offset of the first byte held.
    start: u64,
    len: u64,
    bufs: VecDeque<Bytes>,
}

/// See the module docs.
#[derive(Default)]
pub struct Tail {
    inner: Mutex<Inner>,
}

impl Tail {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `bufs`, just written to the file at offset `at`. If they do not follow what is
    /// held (the fill never leaves gaps, but be safe), the tail restarts at `at`. Then the
    /// oldest buffers are dropped while the rest still hold [`TAIL_BYTES`].
    pub fn push(&self, at: u64, bufs: &[Bytes]) {
        let mut t = self.lock();
        if t.start + t.len != at {
            *t = Inner {
                start: at,
                ..Inner::default()
            };
        }
        for b in bufs.iter().filter(|b| !b.is_empty()) {
            t.len += b.len() as u64;
            t.bufs.push_back(b.clone());
        }
        while let Some(front) = t.bufs.front() {
            let n = front.len() as u64;
            if t.len - n < TAIL_BYTES {
                break;
            }
            t.len -= n;
            t.start += n;
            t.bufs.pop_front();
        }
    }

    /// Bytes from `pos`, ending before `end` and at most `max` long, if the tail holds `pos`:
    /// the rest of the buffer holding `pos` (no copy), or several short buffers joined.
    pub fn get(&self, pos: u64, end: u64, max: usize) -> Option<Bytes> {
        let t = self.lock();
        if pos < t.start || pos >= t.start + t.len || pos >= end {
            return None;
        }
        let want = (end - pos).min(max as u64) as usize;
        let mut at = t.start;
        let mut pieces = t.bufs.iter();
        let first = loop {
            let b = pieces.next()?;
            if at + b.len() as u64 > pos {
                break b.slice((pos - at) as usize..);
            }
            at += b.len() as u64;
        };
        if first.len() >= want {
            return Some(first.slice(..want));
        }
        if first.len() >= JOIN_BELOW {
            return Some(first);
        }
        let want = want.min(JOIN_UPTO);
        let mut joined = BytesMut::with_capacity(want);
        joined.extend_from_slice(&first);
        for b in pieces {
            let room = want - joined.len();
            if room == 0 {
                break;
            }
            joined.extend_from_slice(&b[..b.len().min(room)]);
        }
        Some(joined.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(from: u8, n: usize) -> Bytes {
        (0..n).map(|i| from.wrapping_add(i as u8)).collect()
    }

    /// The file the tail mirrors, for comparison.
    fn file_of(bufs: &[Bytes]) -> Vec<u8> {
        bufs.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn gives_exactly_the_file_bytes_it_holds() {
        let tail = Tail::default();
        let bufs = vec![bytes(0, 10), bytes(50, 3), bytes(100, 7)];
        tail.push(0, &bufs[..2]);
        tail.push(13, &bufs[2..]);
        let file = file_of(&bufs);
        for pos in 0..20u64 {
            for end in pos + 1..=20 {
                let got = tail.get(pos, end, 1 << 20).unwrap();
                assert!(!got.is_empty());
                let n = got.len();
                assert!(pos + n as u64 <= end);
                assert_eq!(
                    &got[..],
                    &file[pos as usize..pos as usize + n],
                    "{pos}..{end}"
                );
            }
        }
        assert!(tail.get(20, 30, 100).is_none(), "nothing past the end");
        assert!(tail.get(5, 5, 100).is_none(), "empty range");
        assert_eq!(tail.get(2, 20, 4).unwrap().len(), 4, "at most max");
    }

    #[test]
    fn short_pieces_are_joined_long_ones_are_not_copied() {
        let tail = Tail::default();
        let small: Vec<Bytes> = (0..8).map(|i| bytes(i, 1000)).collect();
        tail.push(0, &small);
        assert_eq!(tail.get(500, 8000, 1 << 20).unwrap().len(), 7500);
        let big = bytes(9, JOIN_BELOW * 2);
        tail.push(8000, std::slice::from_ref(&big));
        tail.push(8000 + big.len() as u64, &[bytes(1, 10)]);
        let got = tail.get(8000, u64::MAX, 1 << 20).unwrap();
        assert_eq!(got.len(), big.len(), "the long buffer alone");
        assert_eq!(got.as_ptr(), big.as_ptr(), "and not copied");
    }

    #[test]
    fn keeps_about_tail_bytes_and_forgets_older_ones() {
        let tail = Tail::default();
        let chunk = 256 * 1024;
        let mut at = 0u64;
        for i in 0..20u8 {
            tail.push(at, &[bytes(i, chunk)]);
            at += chunk as u64;
        }
        assert!(tail.get(0, at, chunk).is_none(), "the start is gone");
        assert!(tail.get(at - TAIL_BYTES, at, chunk).is_some());
        let held = tail.lock().len;
        assert!(
            (TAIL_BYTES..TAIL_BYTES + chunk as u64).contains(&held),
            "{held}"
        );
    }

    #[test]
    fn a_gap_restarts_the_tail() {
        let tail = Tail::default();
        tail.push(0, &[bytes(0, 10)]);
        tail.push(100, &[bytes(7, 10)]);
        assert!(tail.get(5, 200, 100).is_none());
        assert_eq!(&tail.get(100, 200, 100).unwrap()[..], &bytes(7, 10)[..]);
    }
}
