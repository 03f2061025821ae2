//! Content digests (`sha256:<64 hex>`), parsed once at the edge.
//!
//! The grammar follows the OCI image spec (`algorithm ":" encoded`). Only `sha256` is accepted:
//! a mirror must verify what it caches, and sha256 is the algorithm every registry uses. Other
//! grammatical algorithms are rejected with `DIGEST_INVALID` rather than cached unverified.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A validated `sha256:` digest. The hex is always 64 lowercase characters, so it is safe to use
/// in file paths and index keys.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

/// Why a string is not a digest we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form algorithm:hex")]
    Malformed(String),
    #[error("digest algorithm {0:?} is not supported (only sha256)")]
    UnsupportedAlgorithm(String),
    #[error("sha256 digest must be 64 lowercase hex characters, got {0:?}")]
    BadHex(String),
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(Sha256::digest(bytes)),
        }
    }

    /// Builds a digest from a finished hasher.
    pub fn from_hasher(hasher: Sha256) -> Digest {
        Digest {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 lowercase hex characters.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The algorithm name (always `sha256` today).
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }
}

fn is_algorithm_component(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, encoded) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Malformed(truncate(s)))?;
        let alg_ok = !alg.is_empty() && alg.split(['+', '.', '_', '-']).all(is_algorithm_component);
        let enc_ok = !encoded.is_empty()
            && encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b));
        if !alg_ok || !enc_ok {
            return Err(DigestError::Malformed(truncate(s)));
        }
        if alg != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(truncate(alg)));
        }
        if encoded.len() != 64
            || !encoded
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::BadHex(truncate(encoded)));
        }
        Ok(Digest {
            hex: encoded.to_owned(),
        })
    }
}

/// Keeps error messages bounded when a client sends something huge.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays_sha256() {
        let d: Digest = GOOD.parse().unwrap();
        assert_eq!(d.to_string(), GOOD);
        assert_eq!(d, Digest::of(b""));
    }

    #[test]
    fn rejects_bad_hex_length_and_case() {
        assert!(matches!(
            "sha256:xyz".parse::<Digest>(),
            Err(DigestError::BadHex(_))
        ));
        assert!(matches!(
            "sha256:abc".parse::<Digest>(),
            Err(DigestError::BadHex(_))
        ));
        let upper = GOOD.to_uppercase().replacen("SHA256", "sha256", 1);
        assert!(matches!(
            upper.parse::<Digest>(),
            Err(DigestError::BadHex(_))
        ));
    }

    #[test]
    fn rejects_malformed_and_unknown_algorithms() {
        for bad in [
            "",
            "sha256",
            ":abc",
            "sha256:",
            "SHA256:abc",
            "sha256:a/b",
            "../../etc",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} should be rejected");
        }
        assert!(matches!(
            "sha512:abcd".parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
        assert!(matches!(
            "blake3:abcd".parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn error_messages_are_bounded() {
        let huge = format!("sha256:{}", "a".repeat(10_000));
        let msg = huge.parse::<Digest>().unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
    }
}
