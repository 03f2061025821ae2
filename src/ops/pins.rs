//! `pin` and `unpin`: the pins of the index, which keep images out of eviction's reach.
//!
//! A pin is recorded per (manifest digest, reference as typed); what a pin holds is the closure
//! of its manifest (children and blobs). Both commands end by applying the index's pins to the
//! running budget, whatever happened to the references, so that eviction never ignores a pin the
//! index records.
//!
//! Pinning an image pins the referrers the cache holds of it too (signatures, SBOMs,
//! attestations, cosign's `sha256-<hex>.sig` tags; recursively), recorded under the image's
//! reference: a signature check of a pinned image keeps passing after eviction ran.

use std::io::Write;

use crate::cache::index::unix_now;
use crate::cache::{Cache, Pin};
use crate::config::Config;
use crate::mirror::referrers::cached_referrers;
use crate::oci::{Digest, Reference};

use super::{closure, parse_image_ref, resolve, ImageRef, OpsError};

/// What one command does to one reference as typed.
type PerRef = fn(&Cache, &Config, &str, &mut dyn Write) -> Result<(), OpsError>;

/// `stowage pin REF...`: one pin per (digest, reference). The pins written apply to the
/// running budget even when a later reference fails.
pub fn pin(
    cache: &Cache,
    config: &Config,
    refs: &[String],
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    each_then_apply(cache, config, refs, out, pin_one)
}

/// `stowage unpin REF...`: a tag reference removes the pins recorded for that reference, whatever
/// digest they hold now (the tag may have moved since); a digest reference removes every pin of
/// that digest.
pub fn unpin(
    cache: &Cache,
    config: &Config,
    refs: &[String],
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    each_then_apply(cache, config, refs, out, unpin_one)
}

/// Runs `each` on the references in order, stopping at the first failure; then applies the pins
/// in the index to the running budget and flushes, whatever the outcome (pins written before a
/// failure must not be recorded yet ignored by eviction); then the outcome.
fn each_then_apply(
    cache: &Cache,
    config: &Config,
    refs: &[String],
    out: &mut dyn Write,
    each: PerRef,
) -> Result<(), OpsError> {
    let result = refs
        .iter()
        .try_for_each(|text| each(cache, config, text, out));
    let refreshed = cache.refresh_pins();
    let flushed = cache.index().flush();
    result?;
    refreshed?;
    flushed?;
    Ok(())
}

/// Pins the manifest `text` names in the cache and reports what the pin holds.
fn pin_one(
    cache: &Cache,
    config: &Config,
    text: &str,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let r = parse_image_ref(text, config)?;
    let digest = resolve(cache, &r)?;
    cache.index().put_pin(
        &digest,
        &Pin {
            reference: r.to_string(),
            pinned: unix_now(),
        },
    )?;
    let (manifests, blobs) = closure(cache, &digest)?;
    let held = blobs
        .iter()
        .filter(|(b, _)| cache.budget().contains(b.hex()))
        .count();
    let _ = writeln!(
        out,
        "pinned {r} ({digest}): {} manifest(s), {} blob(s), {held} of them cached now",
        manifests.len(),
        blobs.len()
    );
    pin_referrers(cache, &r, &manifests.into_iter().collect::<Vec<_>>(), out)
}

/// Pins the referrers the cache holds of an image (whose manifests are `roots`), recursively:
/// under the image's own reference, so that unpinning the image unpins them too.
fn pin_referrers(
    cache: &Cache,
    r: &ImageRef,
    roots: &[Digest],
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let referrers = cached_referrers(cache, &r.host, &r.repo, roots)?;
    for c in &referrers {
        cache.index().put_pin(
            &c.digest,
            &Pin {
                reference: r.to_string(),
                pinned: unix_now(),
            },
        )?;
        let named = c
            .tag
            .as_ref()
            .map(|t| format!(" ({t})"))
            .unwrap_or_default();
        let _ = writeln!(out, "  pinned its referrer {}{named}", c.digest);
    }
    Ok(())
}

/// Removes the pins `text` names and reports them, or why there were none.
fn unpin_one(
    cache: &Cache,
    config: &Config,
    text: &str,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let r = parse_image_ref(text, config)?;
    let removed = remove_pins(cache, config, &r)?;
    for (digest, reference) in &removed {
        let _ = writeln!(out, "unpinned {reference} ({digest})");
    }
    if removed.is_empty() {
        report_not_pinned(cache, &r, out)?;
    }
    Ok(())
}

/// Removes the pins of `r`: every pin of a digest reference's digest, or the pins recorded
/// under a tag reference. Returns them as (digest, reference recorded).
fn remove_pins(
    cache: &Cache,
    config: &Config,
    r: &ImageRef,
) -> Result<Vec<(Digest, String)>, OpsError> {
    if let Reference::Digest(d) = &r.reference {
        return Ok(cache
            .index()
            .remove_pins_of_digest(d)?
            .into_iter()
            .map(|p| (d.clone(), p.reference))
            .collect());
    }
    // Recorded references are compared as parsed, so that another spelling of the same image
    // (say from a bundle's `import --pin`) matches too.
    let mut removed = Vec::new();
    for (d, p) in cache.index().pins()? {
        let same = p.reference == r.to_string()
            || parse_image_ref(&p.reference, config).is_ok_and(|q| q == *r);
        if same && cache.index().remove_pin(&d, &p.reference)? {
            removed.push((d, p.reference));
        }
    }
    Ok(removed)
}

/// Says that `r` was not pinned, naming the other references that pin its tag's digest.
fn report_not_pinned(cache: &Cache, r: &ImageRef, out: &mut dyn Write) -> Result<(), OpsError> {
    let current = match &r.reference {
        Reference::Tag(t) => cache.index().tag(&r.host, &r.repo, t)?,
        Reference::Digest(_) => None,
    };
    let others: Vec<String> = match &current {
        Some(e) => cache
            .index()
            .pins()?
            .into_iter()
            .filter(|(d, _)| d.to_string() == e.digest)
            .map(|(_, p)| p.reference)
            .collect(),
        None => Vec::new(),
    };
    match current {
        Some(e) if !others.is_empty() => {
            let _ = writeln!(
                out,
                "{r} was not pinned; its digest {} is pinned as {} (unpin that, or the digest)",
                e.digest,
                others.join(", ")
            );
        }
        _ => {
            let _ = writeln!(out, "{r} was not pinned");
        }
    }
    Ok(())
}
