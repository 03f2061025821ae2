//! Air-gapped sites: `prefetch` into the cache, `export` of cached images to an OCI image
//! layout and `import` of one. (`offline = true` / `serve --offline` is in [`crate::mirror`].)
//!
//! - [`prefetch()`] drives images through a [`crate::mirror::Mirror`]'s fill engine,
//!   reporting progress as [`Event`](crate::ops::Event)s.
//! - [`export()`] writes cached and hosted images as an OCI image layout (tar or directory)
//!   that skopeo reads.
//! - [`import()`] verifies every blob of such a layout, then makes its images visible whole:
//!   hosted images (marked [`HOSTED`]) into hosted storage, the others into the cache.
//!
//! Like the other operator commands these run inside a `serve` holding the cache (sent through
//! its admin socket), or take the cache lock themselves.

use std::path::Path;

use crate::hosted::Hosted;
use crate::oci::{Reference, RepoName, Tag};
use crate::ops::OpsError;

mod export;
mod import;
mod prefetch;
pub mod referrers;

pub use export::export;
pub use import::import;
pub use prefetch::{prefetch, Emit, Platforms, PrefetchRequest};

/// The annotation naming an image in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Marks an `index.json` entry `export` added as an OCI-typed copy of a Docker-typed image
/// (its value: the original's digest); `import` skips such entries.
pub const CONVERTED_FROM: &str = "io.stowage.converted-from";

/// Marks an `index.json` entry as a hosted image (value `"true"`): its
/// [`REF_NAME`] is then the name clients push and pull it by (`team/app:1`), not a fully
/// qualified upstream reference.
pub const HOSTED: &str = "io.stowage.hosted";

/// The image layout version written and read.
const LAYOUT_VERSION: &str = "1.0.0";

fn usage(m: impl Into<String>) -> OpsError {
    OpsError::Usage(m.into())
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> OpsError {
    move |e| usage(format!("{what}: {e}"))
}

/// References from the command line followed by those in `file` (one a line; blank lines and
/// `#` comments ignored).
pub fn gather_refs(args: &[String], file: Option<&Path>) -> Result<Vec<String>, OpsError> {
    let mut refs = args.to_vec();
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(io_err(f.display()))?;
        refs.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    if refs.is_empty() {
        return Err(usage("no image references given (arguments or --file)"));
    }
    Ok(refs)
}

/// `text` (`team/app:1`, `team/app@sha256:...`, `team/app` for `:latest`) as a hosted
/// repository and reference, when `hosted` holds that name.
pub(crate) fn hosted_ref(text: &str, hosted: &Hosted) -> Option<(RepoName, Reference)> {
    let (name, reference) = split_ref(text)?;
    let repo: RepoName = name.parse().ok()?;
    hosted.holds_name(&repo).then_some((repo, reference))
}

/// Splits `name[:tag|@digest]` (no reference: `latest`).
pub(crate) fn split_ref(text: &str) -> Option<(&str, Reference)> {
    if let Some((n, d)) = text.split_once('@') {
        return Some((n, Reference::Digest(d.parse().ok()?)));
    }
    let slash = text.rfind('/').map(|i| i + 1).unwrap_or(0);
    match text.get(slash..)?.rfind(':') {
        Some(i) => {
            let tag: Tag = text.get(slash + i + 1..)?.parse().ok()?;
            Some((text.get(..slash + i)?, Reference::Tag(tag)))
        }
        None => Some((text, Reference::Tag("latest".parse().ok()?))),
    }
}

/// The name a hosted image goes by in a bundle.
pub(crate) fn hosted_name(repo: &RepoName, reference: &Reference) -> String {
    match reference {
        Reference::Tag(t) => format!("{repo}:{t}"),
        Reference::Digest(d) => format!("{repo}@{d}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosted_names_split_into_repository_and_reference_and_print_back() {
        let d = format!("sha256:{}", "a".repeat(64));
        for (text, name, printed) in [
            ("team/app:1", "team/app", "team/app:1".to_owned()),
            ("team/app", "team/app", "team/app:latest".to_owned()),
            (
                &*format!("team/app@{d}"),
                "team/app",
                format!("team/app@{d}"),
            ),
        ] {
            let (n, r) = split_ref(text).unwrap();
            assert_eq!(n, name);
            assert_eq!(hosted_name(&n.parse().unwrap(), &r), printed);
        }
        assert!(split_ref("team/app:Bad Tag").is_none());
        assert!(split_ref("team/app@sha256:short").is_none());
    }
}
