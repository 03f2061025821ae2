//! `Range` request headers on blobs (RFC 9110 §14), parsed without I/O.
//!
//! Only the `bytes` unit is understood. A single range (`a-b`, `a-`, `-n`) is answered with a
//! 206; several ranges get the whole blob as a 200, because a single-part 206 to a multi-range
//! request breaks podman's partial pulls; a malformed `bytes=` value and a range past the end
//! get a 416, like distribution (Go's `http.ServeContent`). Other units are ignored, as the RFC
//! requires.

/// One byte range as the client wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `a-b`: bytes a through b, inclusive.
    FromTo(u64, u64),
    /// `a-`: from a to the end.
    From(u64),
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// What a `Range` header asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No header, or one to ignore (another unit): the whole blob.
    Whole,
    /// Exactly one byte range.
    Single(ByteRange),
    /// Several ranges: answered with the whole blob (200).
    Multiple,
    /// A `bytes=` value that does not parse: 416.
    Invalid,
}

/// The bytes to send for a satisfiable single range: `start..=end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    /// Inclusive.
    pub end: u64,
}

impl Span {
    /// Bytes in the span (never zero).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// `bytes <start>-<end>/<size>`
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{size}", self.start, self.end)
    }
}

/// `Content-Range` of a 416: `bytes */<size>`.
pub fn unsatisfied_content_range(size: u64) -> String {
    format!("bytes */{size}")
}

impl RangeRequest {
    /// Parses the value of a `Range` header (`None`: no header).
    pub fn parse(value: Option<&str>) -> RangeRequest {
        let Some(value) = value else {
            return RangeRequest::Whole;
        };
        let value = value.trim();
        let Some((unit, set)) = value.split_once('=') else {
            return RangeRequest::Invalid;
        };
        if !unit.trim().eq_ignore_ascii_case("bytes") {
            return RangeRequest::Whole;
        }
        let specs: Vec<&str> = set
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let mut parsed = Vec::with_capacity(specs.len());
        for spec in &specs {
            match parse_one(spec) {
                Some(r) => parsed.push(r),
                None => return RangeRequest::Invalid,
            }
        }
        match parsed.as_slice() {
            [] => RangeRequest::Invalid,
            [one] => RangeRequest::Single(*one),
            _ => RangeRequest::Multiple,
        }
    }
}

impl RangeRequest {
    /// Whether the answer depends on the blob's size: a 206 (its `Content-Range` names the
    /// size) or a 416 (`bytes */<size>`).
    pub fn needs_size(&self) -> bool {
        matches!(self, RangeRequest::Single(_) | RangeRequest::Invalid)
    }
}

fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_one(spec: &str) -> Option<ByteRange> {
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, true) => None,
        (true, false) => Some(ByteRange::Suffix(number(b)?)),
        (false, true) => Some(ByteRange::From(number(a)?)),
        (false, false) => {
            let (a, b) = (number(a)?, number(b)?);
            (b >= a).then_some(ByteRange::FromTo(a, b))
        }
    }
}

impl ByteRange {
    /// The bytes this range selects from a blob of `size` bytes, or `None` if it selects none
    /// (416 Range Not Satisfiable).
    pub fn resolve(self, size: u64) -> Option<Span> {
        if size == 0 {
            return None;
        }
        let last = size - 1;
        match self {
            ByteRange::FromTo(a, b) if a <= last => Some(Span {
                start: a,
                end: b.min(last),
            }),
            ByteRange::From(a) if a <= last => Some(Span {
                start: a,
                end: last,
            }),
            ByteRange::Suffix(n) if n > 0 => Some(Span {
                start: size - n.min(size),
                end: last,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &str) -> RangeRequest {
        RangeRequest::parse(Some(v))
    }

    #[test]
    fn single_ranges() {
        assert_eq!(
            p("bytes=0-9"),
            RangeRequest::Single(ByteRange::FromTo(0, 9))
        );
        assert_eq!(p("bytes=100-"), RangeRequest::Single(ByteRange::From(100)));
        assert_eq!(p("bytes=-50"), RangeRequest::Single(ByteRange::Suffix(50)));
        assert_eq!(
            p(" bytes = 5 - 7 "),
            RangeRequest::Single(ByteRange::FromTo(5, 7))
        );
        assert_eq!(p("Bytes=1-"), RangeRequest::Single(ByteRange::From(1)));
        assert_eq!(RangeRequest::parse(None), RangeRequest::Whole);
    }

    #[test]
    fn several_ranges_are_multiple() {
        assert_eq!(p("bytes=0-1,5-6"), RangeRequest::Multiple);
        assert_eq!(p("bytes=0-1, -3"), RangeRequest::Multiple);
        // A trailing empty element is tolerated (RFC list syntax), leaving one range.
        assert_eq!(
            p("bytes=0-1,"),
            RangeRequest::Single(ByteRange::FromTo(0, 1))
        );
    }

    #[test]
    fn invalid_and_foreign() {
        for bad in [
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes",
            "bytes=0-1,x",
            "bytes=1.5-",
        ] {
            assert_eq!(p(bad), RangeRequest::Invalid, "{bad:?}");
        }
        assert_eq!(p("items=0-1"), RangeRequest::Whole);
    }

    #[test]
    fn resolution_against_a_size() {
        let s = |a, b| Some(Span { start: a, end: b });
        assert_eq!(ByteRange::FromTo(0, 9).resolve(100), s(0, 9));
        assert_eq!(ByteRange::FromTo(90, 200).resolve(100), s(90, 99));
        assert_eq!(ByteRange::FromTo(100, 200).resolve(100), None);
        assert_eq!(ByteRange::From(99).resolve(100), s(99, 99));
        assert_eq!(ByteRange::From(100).resolve(100), None);
        assert_eq!(ByteRange::Suffix(10).resolve(100), s(90, 99));
        assert_eq!(ByteRange::Suffix(1000).resolve(100), s(0, 99));
        assert_eq!(ByteRange::Suffix(0).resolve(100), None);
        assert_eq!(ByteRange::From(0).resolve(0), None);
        assert_eq!(ByteRange::Suffix(5).resolve(0), None);
        let span = Span { start: 5, end: 9 };
        assert_eq!(
            (span.len(), span.content_range(10)),
            (5, "bytes 5-9/10".into())
        );
        assert_eq!(unsatisfied_content_range(10), "bytes */10");
    }
}
