//! `stowage import bundle.tar|dir/ [--pin]`: the images of an OCI image layout into the cache.
//!
//! First **every** blob of the bundle is verified against its digest (a tar is staged in a
//! directory under `storage.path` while hashing), so a truncated or tampered bundle fails naming
//! the bad blob before anything is written. Then, image by image, blobs go into the cache through
//! the fill engine (budget and index as for any fill), then the manifests, and last the tag: an
//! image is visible only once all of it is in. Content already cached is skipped, so importing
//! the same bundle twice changes nothing.
//!
//! An imported manifest with a `subject` (a signature, an SBOM: see `export --with-referrers`)
//! is added to the cached referrers answer of its subject, so that the referrers API answers
//! for it offline as it did where the bundle was made.
//!
//! An entry marked [`HOSTED`] goes into hosted storage instead, when this stowage hosts its
//! name (else the import is refused before anything is written): its blobs committed as a push
//! commits them, then its child manifests, then its top manifest with its tag, each durable
//! before the next. The hosted images of a bundle must fit in `hosted.max_size` together, or
//! nothing is imported.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::cache::index::{unix_now, unix_now_ms};
use crate::cache::{hash_copy, BlobSource, Cache, Pin, TagEntry};
use crate::hosted::Hosted;
use crate::oci::manifest;
use crate::oci::media::OCI_INDEX;
use crate::oci::references;
use crate::oci::{Digest, ErrorCode, Reference, RegistryError, RepoName, Tag};
use crate::ops::OpsError;
use crate::stream::BlobBody;

use super::{io_err, usage, CONVERTED_FROM, HOSTED, LAYOUT_VERSION, REF_NAME};

/// A fully qualified reference from a bundle: `host/repo:tag` or `host/repo@digest`.
fn parse_qualified(text: &str) -> Result<(String, RepoName, Reference), OpsError> {
    let bad = |m: String| usage(format!("bundle reference {text:?}: {m}"));
    let (name, reference) = if let Some((n, d)) = text.split_once('@') {
        (
            n,
            Reference::Digest(d.parse().map_err(|e| bad(format!("{e}")))?),
        )
    } else {
        let slash = text.rfind('/').map(|i| i + 1).unwrap_or(0);
        let colon = text[slash..]
            .rfind(':')
            .ok_or_else(|| bad("no tag".into()))?;
        let tag: Tag = text[slash + colon + 1..]
            .parse()
            .map_err(|e| bad(format!("{e}")))?;
        (&text[..slash + colon], Reference::Tag(tag))
    };
    let (host, repo) = name
        .split_once('/')
        .ok_or_else(|| bad("not fully qualified (host/repository)".into()))?;
    let repo: RepoName = repo.parse().map_err(|e| bad(format!("{e}")))?;
    Ok((host.to_ascii_lowercase(), repo, reference))
}

/// A fill source reading a verified, staged file.
struct FileSource {
    path: PathBuf,
    size: u64,
}

impl BlobSource for FileSource {
    fn open(
        &self,
        offset: u64,
    ) -> futures_util::future::BoxFuture<'_, Result<BlobBody, RegistryError>> {
        Box::pin(async move {
            let file = std::fs::File::open(&self.path).map_err(|e| {
                RegistryError::new(
                    ErrorCode::BlobUnknown,
                    format!("{}: {e}", self.path.display()),
                )
            })?;
            Ok(BlobBody {
                start: offset,
                total: Some(self.size),
                stream: crate::stream::file_stream(file, offset, self.size.saturating_sub(offset)),
            })
        })
    }
}

fn idx(e: crate::hosted::index::IndexError) -> OpsError {
    usage(format!("hosted index: {e}"))
}

fn valid_hex(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A bundle's verified content: `index.json` and the path of every blob by hex.
struct Bundle {
    index: serde_json::Value,
    blobs: HashMap<String, (PathBuf, u64)>,
    /// The staging directory to remove (tar bundles).
    staging: Option<PathBuf>,
}

impl Drop for Bundle {
    fn drop(&mut self) {
        if let Some(s) = &self.staging {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

fn tampered(hex: &str, got: &str, size: u64) -> OpsError {
    usage(format!(
        "bundle blob sha256:{hex} is corrupt (truncated or tampered): its {size} bytes hash to sha256:{got}; nothing was imported"
    ))
}

/// Checks an `oci-layout` file's content (`None`: the bundle has none).
fn check_layout(input: &Path, layout: Option<&[u8]>) -> Result<(), OpsError> {
    let not_layout = |why: String| {
        usage(format!(
            "{} is not an OCI image layout stowage can import: {why}",
            input.display()
        ))
    };
    let layout =
        layout.ok_or_else(|| not_layout("it has no oci-layout file (truncated?)".into()))?;
    let version = serde_json::from_slice::<serde_json::Value>(layout)
        .ok()
        .and_then(|v| v.get("imageLayoutVersion")?.as_str().map(str::to_owned))
        .ok_or_else(|| not_layout("its oci-layout file has no imageLayoutVersion".into()))?;
    if version != LAYOUT_VERSION {
        return Err(not_layout(format!(
            "its oci-layout says imageLayoutVersion {version:?}; stowage reads {LAYOUT_VERSION:?}"
        )));
    }
    Ok(())
}

/// Reads and verifies a bundle (a directory or a tar).
fn load_bundle(cache: &Cache, input: &Path) -> Result<Bundle, OpsError> {
    if input.is_dir() {
        load_dir(input)
    } else {
        load_tar(cache, input)
    }
}

/// Reads a layout directory, hashing every blob in place.
fn load_dir(input: &Path) -> Result<Bundle, OpsError> {
    let p = input.join("oci-layout");
    let layout = match std::fs::read(&p) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(usage(format!("{}: {e}", p.display()))),
    };
    check_layout(input, layout.as_deref())?;
    let p = input.join("index.json");
    let index = std::fs::read(&p).map_err(io_err(p.display()))?;
    let index =
        serde_json::from_slice(&index).map_err(|e| usage(format!("{}: {e}", p.display())))?;
    let mut blobs = HashMap::new();
    let dir = input.join("blobs").join("sha256");
    for e in std::fs::read_dir(&dir).map_err(io_err(dir.display()))? {
        let e = e.map_err(io_err(dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !valid_hex(&name) {
            return Err(usage(format!(
                "bundle file blobs/sha256/{name} is not a sha256 digest"
            )));
        }
        let path = e.path();
        let f = std::fs::File::open(&path).map_err(io_err(path.display()))?;
        let (got, size) = hash_copy(f, None, |_| {})
            .map(|(d, n)| (d.hex().to_owned(), n))
            .map_err(io_err(path.display()))?;
        if got != name {
            return Err(tampered(&name, &got, size));
        }
        blobs.insert(name, (path, size));
    }
    Ok(Bundle {
        index,
        blobs,
        staging: None,
    })
}

/// Reads a layout tar, staging (and hashing) every blob in a fresh directory under the cache's
/// root, on the cache's filesystem.
fn load_tar(cache: &Cache, input: &Path) -> Result<Bundle, OpsError> {
    let staging = cache.root().join(format!(
        "import-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&staging).map_err(io_err(staging.display()))?;
    let mut bundle = Bundle {
        index: serde_json::Value::Null,
        blobs: HashMap::new(),
        staging: Some(staging.clone()),
    };
    let file = std::fs::File::open(input).map_err(io_err(input.display()))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let what = format!("reading {}", input.display());
    let mut layout = None;
    for entry in tar.entries().map_err(io_err(&what))? {
        let mut entry = entry.map_err(io_err(&what))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(io_err(&what))?.into_owned();
        let name = path.to_string_lossy().trim_start_matches("./").to_owned();
        if name == "oci-layout" {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).map_err(io_err(&what))?;
            layout = Some(buf);
        } else if name == "index.json" {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).map_err(io_err(&what))?;
            bundle.index = serde_json::from_slice(&buf)
                .map_err(|e| usage(format!("{}: index.json: {e}", input.display())))?;
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            let staged = stage_blob(&staging, &name, hex, &mut entry)?;
            bundle.blobs.insert(hex.to_owned(), staged);
        }
    }
    check_layout(input, layout.as_deref())?;
    if bundle.index.is_null() {
        return Err(usage(format!(
            "{} has no index.json (not an OCI image layout, or truncated)",
            input.display()
        )));
    }
    Ok(bundle)
}

/// Copies the tar entry `name` (blob `hex`) into `staging`, verifying it on the way: its staged
/// path and size.
fn stage_blob(
    staging: &Path,
    name: &str,
    hex: &str,
    entry: &mut impl Read,
) -> Result<(PathBuf, u64), OpsError> {
    if !valid_hex(hex) {
        return Err(usage(format!("bundle file {name} is not a sha256 digest")));
    }
    let dest_path = staging.join(hex);
    let mut dest = std::fs::File::create(&dest_path).map_err(io_err(dest_path.display()))?;
    let (got, size) = hash_copy(entry, Some(&mut dest), |_| {})
        .map(|(d, n)| (d.hex().to_owned(), n))
        .map_err(|e| {
            usage(format!(
                "bundle blob sha256:{hex} cannot be read (truncated bundle?): {e}; nothing was imported"
            ))
        })?;
    if got != hex {
        return Err(tampered(hex, &got, size));
    }
    Ok((dest_path, size))
}

/// What one image of an import consists of, children before parents.
struct ImagePlan {
    name: String,
    /// Into hosted storage (`host` then empty), else into the cache.
    hosted: bool,
    host: String,
    repo: RepoName,
    reference: Reference,
    root: Digest,
    root_type: String,
    /// (digest, media type) in commit order (children first).
    manifests: Vec<(Digest, String)>,
    blobs: Vec<Digest>,
}

fn manifest_type(bytes: &[u8], fallback: &str) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| fallback.to_owned())
}

/// Where an entry named `name` goes: hosted storage (marked [`HOSTED`]) or the cache.
fn target(
    entry: &serde_json::Value,
    name: &str,
    hosted: Option<&Hosted>,
) -> Result<(bool, String, RepoName, Reference), OpsError> {
    let marked = entry
        .get("annotations")
        .and_then(|a| a.get(HOSTED))
        .is_some();
    if !marked {
        let (host, repo, reference) = parse_qualified(name)?;
        return Ok((false, host, repo, reference));
    }
    let (repo, reference) = hosted
        .and_then(|h| super::hosted_ref(name, h))
        .ok_or_else(|| {
            usage(format!(
                "{name} is a hosted image and this stowage does not host that name (add it to \
                 hosted.repositories); nothing was imported"
            ))
        })?;
    Ok((true, String::new(), repo, reference))
}

/// What each image of the bundle's `index.json` consists of (its OCI-typed copies skipped).
fn plan(
    cache: &Cache,
    hosted: Option<&Hosted>,
    bundle: &Bundle,
) -> Result<Vec<ImagePlan>, OpsError> {
    let entries = bundle
        .index
        .get("manifests")
        .and_then(|m| m.as_array())
        .ok_or_else(|| usage("index.json has no manifests"))?;
    let mut plans = Vec::new();
    for e in entries {
        if e.get("annotations")
            .and_then(|a| a.get(CONVERTED_FROM))
            .is_some()
        {
            // An OCI-typed copy for other readers: the original entry is imported instead.
            continue;
        }
        let name = e
            .get("annotations")
            .and_then(|a| a.get(REF_NAME))
            .and_then(|n| n.as_str())
            .ok_or_else(|| usage(format!("index.json entry without {REF_NAME}")))?;
        let (to_hosted, host, repo, reference) = target(e, name, hosted)?;
        let root: Digest = e
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| usage(format!("{name}: index.json entry has no valid digest")))?;
        let root_type = e
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or(OCI_INDEX)
            .to_owned();
        let (manifests, blobs) = match hosted.filter(|_| to_hosted) {
            Some(h) => {
                let blob = |b: &Digest| Ok(h.index().link(&repo, b).map_err(idx)?.is_some());
                let child = |c: &Digest| h.index().has_mlink(&repo, c).map_err(idx);
                walk_image(bundle, name, (&root, &root_type), &blob, &child)?
            }
            None => {
                let blob = |b: &Digest| Ok(cache.holds_blob(b)?);
                walk_image(bundle, name, (&root, &root_type), &blob, &|_| Ok(true))?
            }
        };
        let root_type = manifests
            .last()
            .map(|(_, t)| t.clone())
            .unwrap_or(root_type);
        plans.push(ImagePlan {
            name: name.to_owned(),
            hosted: to_hosted,
            host,
            repo,
            reference,
            root,
            root_type,
            manifests,
            blobs,
        });
    }
    Ok(plans)
}

/// An image's manifests (digest, media type), children first, and its blobs.
type Walked = (Vec<(Digest, String)>, Vec<Digest>);

/// Walks image `name` from its top manifest `root` (digest, media type) through the bundle: its
/// manifests (digest, media type) children first, and its blobs. The top manifest must be in
/// the bundle, every blob in the bundle or `held` (foreign layers aside); an index's child may
/// be missing when `child_held` says so (for the cache: the platforms that were not exported).
fn walk_image(
    bundle: &Bundle,
    name: &str,
    root: (&Digest, &str),
    held: &dyn Fn(&Digest) -> Result<bool, OpsError>,
    child_held: &dyn Fn(&Digest) -> Result<bool, OpsError>,
) -> Result<Walked, OpsError> {
    let mut manifests = Vec::new();
    let mut blobs = Vec::new();
    let mut seen = HashSet::new();
    // (digest, descriptor media type, required)
    let mut stack = vec![(root.0.clone(), root.1.to_owned(), true)];
    while let Some((d, dtype, required)) = stack.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let bytes = match bundle.blobs.get(d.hex()) {
            Some((p, _)) => std::fs::read(p).map_err(io_err(p.display()))?,
            None if required || !child_held(&d)? => {
                return Err(usage(format!("{name}: the bundle lacks manifest {d}")))
            }
            None => continue,
        };
        let foreign = foreign_layers(&bytes, &dtype);
        for (b, _) in references(&bytes).blobs {
            if bundle.blobs.contains_key(b.hex()) || held(&b)? {
                blobs.push(b);
            } else if !foreign.contains(&b) {
                return Err(usage(format!(
                    "{name}: the bundle lacks blob {b} (of manifest {d})"
                )));
            }
        }
        manifests.push((d.clone(), manifest_type(&bytes, &dtype)));
        stack.extend(
            child_manifests(&bytes)
                .into_iter()
                .map(|(c, t)| (c, t, false)),
        );
    }
    manifests.reverse();
    blobs.sort();
    blobs.dedup();
    Ok((manifests, blobs))
}

/// The non-distributable layers of a manifest (never pushed, so never exported).
fn foreign_layers(bytes: &[u8], media_type: &str) -> HashSet<Digest> {
    manifest::parse(bytes, Some(media_type))
        .map(|p| p.blobs)
        .unwrap_or_default()
        .into_iter()
        .filter(|b| {
            b.media_type
                .as_deref()
                .is_some_and(manifest::is_non_distributable)
        })
        .map(|b| b.digest)
        .collect()
}

/// The (digest, media type) of the manifests an index lists; none for an image manifest.
fn child_manifests(bytes: &[u8]) -> Vec<(Digest, String)> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("manifests").and_then(|m| m.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| {
            let d = m.get("digest")?.as_str()?.parse().ok()?;
            let t = m.get("mediaType")?.as_str()?.to_owned();
            Some((d, t))
        })
        .collect()
}

/// Puts a verified staged file into the cache through the fill engine.
async fn fill_from(cache: &Cache, digest: &Digest, path: &Path, size: u64) -> Result<(), OpsError> {
    use futures_util::StreamExt;
    let (fill, _) = cache.fill(digest, || {
        Box::new(FileSource {
            path: path.to_owned(),
            size,
        })
    })?;
    let failed = |e: String| usage(format!("storing blob {digest}: {e}"));
    fill.started().await.map_err(|e| failed(e.to_string()))?;
    let mut reader = fill.reader();
    while let Some(chunk) = reader.next().await {
        chunk.map_err(|e| failed(e.to_string()))?;
    }
    // The last byte comes once the blob verifies; the commit follows.
    fill.settled().await.map_err(|e| failed(e.to_string()))
}

/// `stowage import`.
pub fn import(
    cache: &Cache,
    hosted: Option<&Hosted>,
    input: &Path,
    pin: bool,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let bundle = load_bundle(cache, input)?;
    let plans = plan(cache, hosted, &bundle)?;
    if let Some(h) = hosted {
        check_room(h, &bundle, &plans)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| usage(format!("cannot start the runtime: {e}")))?;
    for p in &plans {
        match hosted.filter(|_| p.hosted) {
            Some(h) => import_hosted_image(h, &bundle, &runtime, p, pin, out)?,
            None => import_image(cache, &bundle, &runtime, p, pin, out)?,
        }
    }
    cache.index().flush()?;
    Ok(())
}

/// Refuses the import, before anything is written, when the bundle's hosted content that
/// hosted storage does not hold yet does not fit in `hosted.max_size`.
fn check_room(hosted: &Hosted, bundle: &Bundle, plans: &[ImagePlan]) -> Result<(), OpsError> {
    let mut needed = HashMap::new();
    let mut need = |d: &Digest, held: bool| {
        if let (false, Some((hex, (_, size)))) = (held, bundle.blobs.get_key_value(d.hex())) {
            needed.insert(hex.as_str(), *size);
        }
    };
    for p in plans.iter().filter(|p| p.hosted) {
        for b in &p.blobs {
            need(b, hosted.index().blob(b).map_err(idx)?.is_some());
        }
        for (d, _) in &p.manifests {
            need(d, hosted.index().manifest(d).map_err(idx)?.is_some());
        }
    }
    let needed: u64 = needed.values().sum();
    let room = hosted.room();
    if needed > room {
        return Err(usage(format!(
            "the bundle's hosted images need {} more and hosted storage has room for {} \
             (hosted.max_size = {}): nothing was imported",
            crate::ops::human(needed),
            crate::ops::human(room),
            crate::ops::human(hosted.settings().max_size),
        )));
    }
    Ok(())
}

/// Imports one hosted image: its blobs, then its manifests children first, the top one with
/// its tag last; each step durable before the next.
fn import_hosted_image(
    hosted: &Hosted,
    bundle: &Bundle,
    runtime: &tokio::runtime::Runtime,
    p: &ImagePlan,
    pin: bool,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let fail = |e: RegistryError| {
        usage(format!(
            "{}: {}; the image was not tagged",
            p.name, e.message
        ))
    };
    let mut new_blobs = 0;
    for b in &p.blobs {
        // Not in the bundle: already linked in the repository (checked by the plan).
        let Some((path, _)) = bundle.blobs.get(b.hex()) else {
            continue;
        };
        if runtime
            .block_on(hosted.import_blob(&p.repo, b, path))
            .map_err(fail)?
        {
            new_blobs += 1;
        }
    }
    let mut changed = 0;
    for (d, t) in &p.manifests {
        let bytes = manifest_bytes(bundle, p, d)?;
        let reference = if d == &p.root {
            p.reference.clone()
        } else {
            Reference::Digest(d.clone())
        };
        if runtime
            .block_on(hosted.import_manifest(&p.repo, &reference, t, bytes.into()))
            .map_err(fail)?
        {
            changed += 1;
        }
    }
    hosted.publish();
    let note = if pin {
        " (hosted: never evicted, --pin not needed)"
    } else {
        ""
    };
    if new_blobs == 0 && changed == 0 {
        let _ = writeln!(
            out,
            "{} ({}): already present (hosted){note}",
            p.name, p.root
        );
    } else {
        let _ = writeln!(
            out,
            "imported {} ({}) into hosted storage: {new_blobs} new blob(s), {changed} new or \
             retagged manifest(s){note}",
            p.name, p.root
        );
    }
    Ok(())
}

/// Imports one image: its blobs, then its manifests, then (once all of it is in) its tag, and
/// with `pin` its pin.
fn import_image(
    cache: &Cache,
    bundle: &Bundle,
    runtime: &tokio::runtime::Runtime,
    p: &ImagePlan,
    pin: bool,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    // Held until the tag is written: eviction (for this import's later fills, or for the
    // clients of a running serve) skips the image's blobs meanwhile.
    let _leases: Vec<_> = p
        .blobs
        .iter()
        .map(|b| cache.budget().lease(b.hex()))
        .collect();
    let new_blobs = import_blobs(cache, bundle, runtime, p)?;
    let new_manifests = import_manifests(cache, bundle, p)?;
    // A referrer (a manifest with a `subject`) joins its subject's referrers answer.
    for (d, _) in &p.manifests {
        if let Some(m) = cache.manifest_untouched(d)? {
            crate::mirror::referrers::remember_referrer(cache, &p.host, &p.repo, &m)?;
        }
    }
    // The tag last: the image becomes visible whole.
    for b in &p.blobs {
        if !cache.holds_blob(b)? {
            return Err(usage(format!(
                "{}: blob {b} is not in the cache after importing it; the image was not tagged",
                p.name
            )));
        }
    }
    let tag_moved = put_tag(cache, p)?;
    cache.touch_repo(&p.host, &p.repo)?;
    if pin {
        cache.index().put_pin(
            &p.root,
            &Pin {
                reference: p.name.clone(),
                pinned: unix_now(),
            },
        )?;
        // In force at once: the next images' fills must not evict this one.
        cache.refresh_pins()?;
    }
    cache.index().flush()?;
    if new_blobs == 0 && new_manifests == 0 && !tag_moved {
        let _ = writeln!(out, "{} ({}): already present", p.name, p.root);
    } else {
        let _ = writeln!(
            out,
            "imported {} ({}): {new_blobs} new blob(s), {new_manifests} new manifest(s){}",
            p.name,
            p.root,
            if pin { ", pinned" } else { "" }
        );
    }
    Ok(())
}

/// Fills the image's blobs the cache does not hold from the bundle. Returns how many.
fn import_blobs(
    cache: &Cache,
    bundle: &Bundle,
    runtime: &tokio::runtime::Runtime,
    p: &ImagePlan,
) -> Result<usize, OpsError> {
    let mut new_blobs = 0;
    for b in &p.blobs {
        if cache.holds_blob(b)? {
            continue;
        }
        let (path, size) = bundle
            .blobs
            .get(b.hex())
            .ok_or_else(|| usage(format!("{}: the bundle lacks blob {b}", p.name)))?;
        runtime
            .block_on(fill_from(cache, b, path, *size))
            .map_err(|e| usage(format!("{}: {e}; the image was not tagged", p.name)))?;
        new_blobs += 1;
    }
    Ok(new_blobs)
}

/// The bytes of manifest `d` of image `p`, as the bundle holds them.
fn manifest_bytes(bundle: &Bundle, p: &ImagePlan, d: &Digest) -> Result<Vec<u8>, OpsError> {
    let (path, _) = bundle
        .blobs
        .get(d.hex())
        .ok_or_else(|| usage(format!("{}: the bundle lacks manifest {d}", p.name)))?;
    std::fs::read(path).map_err(io_err(path.display()))
}

/// Stores the image's manifests the cache does not hold, children first. Returns how many.
fn import_manifests(cache: &Cache, bundle: &Bundle, p: &ImagePlan) -> Result<usize, OpsError> {
    let mut new_manifests = 0;
    for (d, t) in &p.manifests {
        if cache.manifest_untouched(d)?.is_some() {
            continue;
        }
        let bytes = manifest_bytes(bundle, p, d)?;
        cache.put_manifest(crate::cache::StoredManifest {
            digest: d.clone(),
            media_type: t.clone(),
            bytes: bytes.into(),
        })?;
        new_manifests += 1;
    }
    Ok(new_manifests)
}

/// Points the image's tag (if its reference is one) at its top manifest. Returns whether the
/// tag moved.
fn put_tag(cache: &Cache, p: &ImagePlan) -> Result<bool, OpsError> {
    let Reference::Tag(tag) = &p.reference else {
        return Ok(false);
    };
    let current = cache.index().tag(&p.host, &p.repo, tag)?;
    if current.as_ref().map(|e| e.digest.as_str()) == Some(&p.root.to_string()) {
        return Ok(false);
    }
    cache.put_tag(
        &p.host,
        &p.repo,
        tag,
        &TagEntry {
            digest: p.root.to_string(),
            media_type: p.root_type.clone(),
            checked: unix_now_ms(),
            variants: Default::default(),
        },
    )?;
    Ok(true)
}
