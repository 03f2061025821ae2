//! Air-gapped sites: `prefetch` into the cache, `export` of cached images to an OCI image
//! layout and `import` of one. (`offline = true` / `serve --offline` is in [`crate::mirror`].)
//!
//! - [`prefetch()`] drives images through a [`crate::mirror::Mirror`]'s fill engine,
//!   reporting progress as [`Event`](crate::ops::Event)s.
//! - [`export()`] writes cached images as an OCI image layout (tar or directory) that skopeo
//!   reads.
//! - [`import()`] verifies every blob of such a layout, then makes its images visible whole.
//!
//! Like the other operator commands these run inside a `serve` holding the cache (sent through
//! its admin socket), or take the cache lock themselves.

use std::path::Path;

use crate::ops::OpsError;

mod export;
mod import;
mod prefetch;

pub use export::export;
pub use import::import;
pub use prefetch::{prefetch, Emit, Platforms, PrefetchRequest};

/// The annotation naming an image in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Marks an `index.json` entry `export` added as an OCI-typed copy of a Docker-typed image
/// (its value: the original's digest); `import` skips such entries.
pub const CONVERTED_FROM: &str = "io.stowage.converted-from";

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
