//! Repository names and references (tag or digest), validated by the distribution grammar
//! before any path, key or URL is built from them.

use std::fmt;
use std::str::FromStr;

use super::digest::{truncate, Digest, DigestError};

/// Longest repository name accepted (distribution/reference's `RepositoryNameTotalLengthMax`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted by the distribution spec.
pub const MAX_TAG_LEN: usize = 128;

/// A repository name such as `library/alpine` or `org/team/app`: lowercase path components
/// separated by `/`, each `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

/// Why a string is not a repository name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("repository name {0:?} is invalid: components are lowercase letters and digits separated by '.', '_', '__' or '-', joined by '/'")]
    Invalid(String),
}

fn is_valid_component(c: &str) -> bool {
    // [a-z0-9]+ ( (\.|_|__|-+) [a-z0-9]+ )*
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // one alphanumeric run
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // a separator
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == b.len() {
            return false;
        }
    }
}

impl RepoName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Number of `/`-separated components.
    pub fn depth(&self) -> usize {
        self.0.split('/').count()
    }

    /// Docker Hub keeps official images under `library/`: `alpine` → `library/alpine`.
    pub fn with_library_prefix(&self) -> RepoName {
        if self.depth() == 1 {
            RepoName(format!("library/{}", self.0))
        } else {
            self.clone()
        }
    }

    /// Drops the first `n` components (used to strip a routing prefix). `None` if nothing is left.
    pub fn strip_components(&self, n: usize) -> Option<RepoName> {
        let rest: Vec<&str> = self.0.split('/').skip(n).collect();
        if rest.is_empty() {
            None
        } else {
            Some(RepoName(rest.join("/")))
        }
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if s.split('/').all(is_valid_component) {
            Ok(RepoName(s.to_owned()))
        } else {
            Err(NameError::Invalid(truncate(s)))
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

/// Why a string is not a tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tag {0:?} is invalid: 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'")]
pub struct TagError(String);

impl Tag {
    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = TagError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(TagError(truncate(s)))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// What a manifest URL names: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

/// Why a string is neither a tag nor a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A tag can never contain ':', so a colon means "this is meant to be a digest".
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_from_the_grammar() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c/d/e",
            "my-org/my__app",
            "foo.bar/baz_qux",
            "a--b",
            "docker.io/library/alpine",
            "0/1",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn rejects_names_outside_the_grammar() {
        for bad in [
            "",
            "Alpine",
            "a..b",
            "a-",
            "-a",
            "a___b",
            "a/",
            "/a",
            "a//b",
            "..",
            "../etc",
            "a/../b",
            "a b",
            "a\0b",
            "ghcr.io:443/x",
            "é",
        ] {
            assert!(
                bad.parse::<RepoName>().is_err(),
                "{bad:?} should be invalid"
            );
        }
        assert_eq!("a".repeat(256).parse::<RepoName>(), Err(NameError::TooLong));
        assert!("a".repeat(255).parse::<RepoName>().is_ok());
    }

    #[test]
    fn library_prefix_only_for_single_component_names() {
        let n: RepoName = "alpine".parse().unwrap();
        assert_eq!(n.with_library_prefix().as_str(), "library/alpine");
        let n: RepoName = "org/app".parse().unwrap();
        assert_eq!(n.with_library_prefix().as_str(), "org/app");
    }

    #[test]
    fn strip_components_drops_a_routing_prefix() {
        let n: RepoName = "ghcr.io/org/app".parse().unwrap();
        assert_eq!(n.strip_components(1).unwrap().as_str(), "org/app");
        assert!(n.strip_components(3).is_none());
    }

    #[test]
    fn tags_follow_the_grammar() {
        for ok in ["latest", "3.19", "_x", "v1.2.3-rc.1", &"a".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok:?}");
        }
        for bad in ["", "-bad", ".bad", "a/b", "a:b", "a b", &"a".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reference_is_a_digest_iff_it_has_a_colon() {
        assert!(matches!(
            "latest".parse::<Reference>(),
            Ok(Reference::Tag(_))
        ));
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!(matches!(
            "sha256:zz".parse::<Reference>(),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            "-x".parse::<Reference>(),
            Err(ReferenceError::Tag(_))
        ));
    }
}
