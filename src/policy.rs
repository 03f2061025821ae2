//! Repository policy: which repositories an upstream may be asked for, so the mirror cannot be
//! used as an open relay for arbitrary content.
//!
//! Each `[[upstreams]]` entry may carry `allow = [...]` and `deny = [...]` lists of repository
//! glob patterns. They are checked by the upstream router after routing and normalisation (path
//! prefix stripped, Docker Hub's `library/` added), so `allow = ["library/*"]` means official
//! images whichever way the client spelled them — and before any cache lookup, upstream request
//! or cache write. A denied request is a 403 `DENIED` whose message says which rule refused it.
//!
//! Glob syntax: `*` matches any run of characters within one path component (not `/`), `**`
//! matches anything including `/` (so `myorg/**` is every repository below `myorg/`), every
//! other character matches itself. A `deny` match always wins; with a non-empty `allow` list a
//! repository must match one of its patterns.

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};

use crate::oci::{ErrorCode, RegistryError, RepoName};

/// One validated glob pattern, compiled once.
#[derive(Clone)]
pub struct Pattern {
    text: String,
    matcher: GlobMatcher,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.text == other.text
    }
}

impl Eq for Pattern {}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Pattern {
    /// Parses a pattern: repository-name characters (`a-z 0-9 . _ - /`) and `*`.
    pub fn new(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("a repository pattern must not be empty".into());
        }
        if text.len() > 1024 {
            return Err("a repository pattern is limited to 1024 characters".into());
        }
        if let Some(c) = text
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/*".contains(*c)))
        {
            return Err(format!(
                "{text:?}: {c:?} cannot appear in a repository pattern (use lowercase \
                 names, '/', and '*' or '**' as wildcards)"
            ));
        }
        if text.contains("***") {
            return Err(format!("{text:?}: use '*' or '**', not '***'"));
        }
        let matcher = GlobBuilder::new(&to_globset(text))
            .literal_separator(true)
            .build()
            .map_err(|e| format!("{text:?}: {e}"))?
            .compile_matcher();
        Ok(Pattern {
            text: text.to_owned(),
            matcher,
        })
    }

    /// Whether `name` matches the whole pattern.
    pub fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }
}

/// Writes a validated pattern in globset's syntax. With `literal_separator`, globset's `*`
/// is ours; but its `**` crosses `/` only as a whole component (`a/**/b` there also matches
/// `a/b`, and `a**` is two single stars), while ours matches any run anywhere. So each of our
/// `**` becomes `{*,*/**/*}`: a run without `/`, or one with at least one `/` (the part before
/// the first `/`, then `/` or `/.../`, then the part after the last). Every other character
/// the validation lets through is literal in globset too.
fn to_globset(text: &str) -> String {
    text.replace("**", "{*,*/**/*}")
}

/// The `allow` / `deny` lists of one upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepoPolicy {
    /// If non-empty, a repository must match one of these.
    pub allow: Vec<Pattern>,
    /// A repository matching one of these is refused, whatever `allow` says.
    pub deny: Vec<Pattern>,
}

impl RepoPolicy {
    /// Whether any rule is configured.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Checks a routed repository name (as the upstream `host` knows it) against the rules.
    pub fn check(&self, host: &str, repo: &RepoName) -> Result<(), RegistryError> {
        let name = repo.as_str();
        if let Some(p) = self.deny.iter().find(|p| p.matches(name)) {
            return Err(RegistryError::new(
                ErrorCode::Denied,
                format!(
                    "repository {name} on {host} is refused by this mirror's policy \
                     (deny pattern {p:?})"
                ),
            ));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|p| p.matches(name)) {
            let allowed: Vec<String> = self.allow.iter().map(|p| p.to_string()).collect();
            return Err(RegistryError::new(
                ErrorCode::Denied,
                format!(
                    "repository {name} on {host} is not allowed by this mirror's policy \
                     (allowed: {})",
                    allowed.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        Pattern::new(p).unwrap().matches(n)
    }

    #[test]
    fn single_star_stays_in_one_component() {
        assert!(m("library/*", "library/alpine"));
        assert!(!m("library/*", "library/a/b"));
        assert!(!m("library/*", "library"));
        assert!(!m("library/*", "libraryx/alpine"));
        assert!(
            m("library/*", "library/"),
            "an empty run is a match (never a valid name)"
        );
        assert!(m("*/app", "org/app"));
        assert!(!m("*/app", "a/b/app"));
        assert!(m("org/app-*", "org/app-server"));
        assert!(m("*", "alpine"));
        assert!(!m("*", "library/alpine"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
    }

    #[test]
    fn double_star_crosses_components() {
        assert!(m("myorg/**", "myorg/a"));
        assert!(m("myorg/**", "myorg/a/b/c"));
        assert!(!m("myorg/**", "myorgx/a"));
        assert!(m("**", "anything/at/all"));
        assert!(m("**/app", "x/y/app"));
        assert!(!m("**/app", "x/y/apps"));
        // An earlier `**` must be able to take more when a later `*` cannot.
        assert!(m("**/b/*", "a/b/c/b/d"));
        assert!(!m("**/b/*", "a/b/c/b/d/e"));
    }

    #[test]
    fn double_star_matches_any_run_not_only_whole_components() {
        assert!(!m("**/app", "app"));
        assert!(!m("a/**/b", "a/b"));
        assert!(m("a/**/b", "a/x/y/b"));
        assert!(m("org/app**", "org/app-x/y"));
        assert!(m("org**", "org"));
        assert!(m("a**b", "a/x/b"));
    }

    /// The matcher's meaning written out directly: dynamic programming over (pattern token,
    /// name prefix), `*` not crossing `/`, `**` crossing it.
    fn reference(pat: &[u8], name: &[u8]) -> bool {
        // row[j]: the pattern consumed so far matches name[..j].
        let mut row = vec![false; name.len() + 1];
        row[0] = true;
        let mut p = 0;
        while p < pat.len() {
            let mut next = vec![false; name.len() + 1];
            if pat[p] == b'*' {
                let double = pat.get(p + 1) == Some(&b'*');
                p += if double { 2 } else { 1 };
                next[0] = row[0];
                for j in 1..=name.len() {
                    next[j] = row[j] || (next[j - 1] && (double || name[j - 1] != b'/'));
                }
            } else {
                let c = pat[p];
                p += 1;
                for j in 1..=name.len() {
                    next[j] = row[j - 1] && name[j - 1] == c;
                }
            }
            row = next;
        }
        row[name.len()]
    }

    proptest::proptest! {
        #[test]
        fn globset_matches_the_reference(p in "[ab*/]{1,12}", name in "[ab/]{0,12}") {
            if let Ok(pattern) = Pattern::new(&p) {
                proptest::prop_assert_eq!(
                    pattern.matches(&name),
                    reference(p.as_bytes(), name.as_bytes()),
                    "{:?} {:?}", p, name
                );
            }
        }
    }

    #[test]
    fn literal_patterns_match_exactly() {
        assert!(m("library/alpine", "library/alpine"));
        assert!(!m("library/alpine", "library/alpine2"));
        assert!(!m("library/alpine", "library/alpin"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "Library/*", "a b", "a/***", "a?b", "a/[bc]", "ä"] {
            assert!(Pattern::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let policy = RepoPolicy {
            allow: vec![
                Pattern::new("library/*").unwrap(),
                Pattern::new("myorg/**").unwrap(),
            ],
            deny: vec![Pattern::new("myorg/secret*").unwrap()],
        };
        let name = |s: &str| s.parse::<RepoName>().unwrap();
        assert!(policy.check("docker.io", &name("library/alpine")).is_ok());
        assert!(policy.check("docker.io", &name("myorg/team/app")).is_ok());
        let e = policy
            .check("docker.io", &name("myorg/secrets"))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Denied);
        assert!(e.message.contains("myorg/secret*"), "{}", e.message);
        let e = policy.check("docker.io", &name("evil/miner")).unwrap_err();
        assert_eq!((e.code, e.status()), (ErrorCode::Denied, 403));
        assert!(e.message.contains("not allowed"), "{}", e.message);
        assert!(RepoPolicy::default().check("x", &name("any/thing")).is_ok());
    }
}
