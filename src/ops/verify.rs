//! `verify [--repair]`: re-hashes every indexed blob against its digest and indexed size.
//!
//! A blob evicted (or removed by `gc`) between the listing and its check is not damage: only a
//! blob the index still holds whose file is gone counts as missing.

use std::io::{IsTerminal, Write};

use crate::cache::Cache;
use crate::oci::Digest;

use super::OpsError;

/// What `verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub checked: u64,
    pub corrupt: Vec<Digest>,
    pub missing: Vec<Digest>,
    pub repaired: bool,
}

impl VerifyReport {
    pub fn clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty()
    }
}

/// What checking one blob found.
enum Found {
    Sound,
    Corrupt,
    Missing,
    /// Gone from the index since the listing (evicted or collected): not checked.
    Vanished,
}

/// `stowage verify [--repair]`: re-hashes every indexed blob. With `repair`, corrupt and missing
/// blobs are dropped from the index (and disk) so that the next pull refills them. With
/// `progress`, a bar on stderr when it is a terminal, else a line every 5% (`false` inside
/// `serve`, whose stderr is its log).
pub fn verify(
    cache: &Cache,
    repair: bool,
    progress: bool,
    out: &mut dyn Write,
) -> Result<VerifyReport, OpsError> {
    let mut entries = Vec::new();
    for rec in cache.index().blobs() {
        let (hex, meta) = rec?;
        entries.push((hex, meta.map(|m| m.size).unwrap_or(0)));
    }
    let total_bytes: u64 = entries.iter().map(|(_, s)| s).sum();
    let tty = progress && std::io::stderr().is_terminal();
    let bar = progress_bar(tty, total_bytes);
    let mut report = VerifyReport::default();
    let n = entries.len();
    let step = (n / 20).max(1);
    for (i, (hex, size)) in entries.iter().enumerate() {
        let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
            continue;
        };
        let found = check_blob(cache, &digest, *size, &bar, out)?;
        if !matches!(found, Found::Vanished) {
            report.checked += 1;
        }
        match found {
            Found::Sound | Found::Vanished => {}
            Found::Corrupt => report.corrupt.push(digest),
            Found::Missing => report.missing.push(digest),
        }
        if progress && !tty && ((i + 1) % step == 0 || i + 1 == n) {
            eprintln!("verify: {}/{} blobs checked", i + 1, n);
        }
    }
    bar.finish_and_clear();
    if repair {
        repair_damage(cache, &mut report, out)?;
    }
    summarize(&report, repair, out);
    Ok(report)
}

/// A bar over `total_bytes` on stderr when `tty`, else a hidden one.
fn progress_bar(tty: bool, total_bytes: u64) -> indicatif::ProgressBar {
    if !tty {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total_bytes);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "verify [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

/// Hashes one blob's file (counting its bytes on `bar`) and reports damage to `out`.
fn check_blob(
    cache: &Cache,
    digest: &Digest,
    size: u64,
    bar: &indicatif::ProgressBar,
    out: &mut dyn Write,
) -> Result<Found, OpsError> {
    let path = cache.blob_path(digest);
    let mut say = |line: String| {
        bar.suspend(|| {
            let _ = writeln!(out, "{line}");
        })
    };
    Ok(match crate::cache::hash_file(&path, |c| bar.inc(c)) {
        Ok((actual, got)) if actual == *digest && got == size => Found::Sound,
        Ok((actual, got)) => {
            say(format!(
                "corrupt {digest}: {got} bytes hashing to {actual} (indexed size {size})"
            ));
            Found::Corrupt
        }
        // Evicted (or removed by gc) since the listing: not damage.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && cache.index().blob(digest)?.is_none() =>
        {
            Found::Vanished
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            say(format!("missing {digest}: no file at {}", path.display()));
            Found::Missing
        }
        Err(e) => {
            say(format!(
                "corrupt {digest}: cannot read {}: {e}",
                path.display()
            ));
            Found::Corrupt
        }
    })
}

/// Drops the corrupt and missing blobs from the cache so that the next pull refills them.
fn repair_damage(
    cache: &Cache,
    report: &mut VerifyReport,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    for d in report.corrupt.iter().chain(report.missing.iter()) {
        cache.remove_blob(d)?;
        let _ = writeln!(
            out,
            "repaired {d}: dropped from the cache; it refills on the next pull"
        );
    }
    report.repaired = true;
    cache.flush()?;
    Ok(())
}

/// The last line: counts, and what to do about damage.
fn summarize(report: &VerifyReport, repair: bool, out: &mut dyn Write) {
    let _ = writeln!(
        out,
        "verified {} blob(s): {} corrupt, {} missing{}",
        report.checked,
        report.corrupt.len(),
        report.missing.len(),
        if report.clean() {
            " — cache is clean"
        } else if repair {
            " — repaired"
        } else {
            " — run `stowage verify --repair` to drop them so they refill"
        }
    );
}
