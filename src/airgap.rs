//! Air-gapped sites: `prefetch` into the cache, `export` of cached images to an OCI image
//! layout and `import` of one. (`offline = true` / `serve --offline` is in [`crate::mirror`].)
//!
//! `stowage prefetch REF... [--file] [--platform ...|--all-platforms] [--pin]` drives each image
//! through a [`crate::mirror::Mirror`]: the one of a `serve` running on the cache (through its
//! admin socket, [`crate::admin`], so fills are shared with live clients), or one opened by the
//! command itself. Per image: the manifest (by tag, verified), the selected platforms of an
//! index, and every blob's fill read to completion (several blobs and images at once). Progress
//! goes out as [`Event`]s that the command line renders. A failing image is reported and the
//! others continue.
//!
//! `stowage export REF... [--file images.txt] -o bundle.tar|dir/` writes a standard OCI image
//! layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), as a tar or (with `-o dir/`, or an
//! existing directory) a directory. Each `index.json` entry is an image's top manifest with
//! `org.opencontainers.image.ref.name` = the fully qualified reference
//! (`docker.io/library/alpine:3.19`), so `skopeo copy oci-archive:bundle.tar:<ref> ...` reads it.
//! A Docker schema 2 image (manifest or list) is followed by an OCI-typed copy of itself under
//! the same name (see `oci_variant`): skopeo reads the copy, `import` the original.
//! An image must be fully cached (its manifests, and every blob of those manifests); an index
//! exports with the children the cache holds (the platforms that were pulled).
//!
//! `stowage import bundle.tar|dir/ [--pin]` first verifies **every** blob of the bundle against
//! its digest (a tar is staged in a directory under `storage.path` while hashing), so a truncated
//! or tampered bundle fails naming the bad blob before anything is written. Then, image by image,
//! blobs go into the cache through the fill engine (budget and index as for any fill), then the
//! manifests, and last the tag: an image is visible only once all of it is in. Content already
//! cached is skipped, so importing the same bundle twice changes nothing.
//!
//! Like the other operator commands these run inside a `serve` holding the cache, or take the
//! cache lock themselves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::admin::Event;
use crate::cache::index::StoredManifest;
use crate::cache::index::{unix_now, unix_now_ms};
use crate::cache::{hash_copy, BlobSource, Cache, Pin, TagEntry};
use crate::config::Config;
use crate::oci::convert::{docker_list_to_oci, docker_manifest_to_oci, Replacement};
use crate::oci::media::{DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2, OCI_INDEX, OCI_MANIFEST};
use crate::oci::{references, Digest, ErrorCode, Reference, RegistryError, RepoName, Tag};
use crate::ops::{self, OpsError};
use crate::stream::BlobBody;

/// The annotation naming an image in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Marks an `index.json` entry `export` added as an OCI-typed copy of a Docker-typed image
/// (its value: the original's digest); `import` skips such entries.
pub const CONVERTED_FROM: &str = "io.stowage.converted-from";

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

/// One image of an export.
struct Entry {
    name: String,
    digest: Digest,
    media_type: String,
    size: u64,
    /// For the OCI-typed copy of a Docker-typed image: the original's digest.
    converted_from: Option<Digest>,
}

/// For an image whose top manifest is Docker schema 2 (a manifest or a manifest list): the
/// same image described with OCI media types (same config and layer blobs; a list keeps the
/// platforms held), its new manifests added to `manifests`. skopeo's `oci:` / `oci-archive:`
/// transports skip `index.json` entries of other types, so `export` writes this beside the
/// original under the same name, marked with [`CONVERTED_FROM`]; `import` skips it, so the
/// imported image keeps its original bytes and digests.
fn oci_variant(
    image: &HashMap<Digest, Arc<StoredManifest>>,
    root: &Digest,
    manifests: &mut BTreeMap<String, bytes::Bytes>,
) -> Option<Replacement> {
    let mut add = |bytes: Vec<u8>, media_type: &str| {
        let digest = Digest::of(&bytes);
        let size = bytes.len() as u64;
        manifests.insert(digest.hex().to_owned(), bytes.into());
        Replacement {
            digest,
            size,
            media_type: media_type.to_owned(),
        }
    };
    let top = image.get(root)?;
    match top.media_type.as_str() {
        DOCKER_MANIFEST_V2 => Some(add(docker_manifest_to_oci(&top.bytes)?, OCI_MANIFEST)),
        DOCKER_MANIFEST_LIST => {
            let mut children = HashMap::new();
            for (d, m) in image.iter().filter(|(d, _)| *d != root) {
                let r = match m.media_type.as_str() {
                    DOCKER_MANIFEST_V2 => match docker_manifest_to_oci(&m.bytes) {
                        Some(b) => add(b, OCI_MANIFEST),
                        None => continue,
                    },
                    OCI_MANIFEST => Replacement {
                        digest: d.clone(),
                        size: m.bytes.len() as u64,
                        media_type: OCI_MANIFEST.to_owned(),
                    },
                    _ => continue,
                };
                children.insert(d.clone(), r);
            }
            Some(add(docker_list_to_oci(&top.bytes, &children)?, OCI_INDEX))
        }
        _ => None,
    }
}

/// `stowage export`.
pub fn export(
    cache: &Cache,
    config: &Config,
    refs: &[String],
    output: &Path,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let mut entries = Vec::new();
    // Manifests (bytes) and blobs (paths) to write, by hex.
    let mut manifests: BTreeMap<String, bytes::Bytes> = BTreeMap::new();
    let mut blobs: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut leases = Vec::new();
    for text in refs {
        let r = ops::parse_image_ref(text, config)?;
        let root = ops::resolve(cache, &r)?;
        let (held, needed) = ops::closure(cache, &root)?;
        let mut image = HashMap::new();
        for d in &held {
            let m = cache
                .manifest_untouched(d)?
                .ok_or_else(|| usage(format!("{r}: manifest {d} vanished from the cache")))?;
            manifests.insert(d.hex().to_owned(), m.bytes.clone());
            image.insert(d.clone(), m);
        }
        let top = image
            .get(&root)
            .ok_or_else(|| usage(format!("{r}: manifest {root} is not in the cache")))?;
        if held.len() == 1 && crate::oci::media::is_index(&top.media_type) {
            return Err(usage(format!(
                "{r}: no platform of this index is cached (prefetch or pull one first)"
            )));
        }
        for (b, _) in &needed {
            // Held until the bundle is written: a running serve does not evict it meanwhile.
            leases.push(cache.budget().lease(b.hex()));
            let path = cache.blob_path(b);
            if !cache.holds_blob(b)? {
                return Err(usage(format!(
                    "{r}: blob {b} is not in the cache (prefetch or pull the image first)"
                )));
            }
            blobs.insert(b.hex().to_owned(), path);
        }
        let entry = Entry {
            name: r.to_string(),
            digest: root.clone(),
            media_type: top.media_type.clone(),
            size: top.bytes.len() as u64,
            converted_from: None,
        };
        let _ = writeln!(
            out,
            "export {} ({}): {} manifest(s), {} blob(s)",
            entry.name,
            entry.digest,
            held.len(),
            needed.len()
        );
        let variant = oci_variant(&image, &root, &mut manifests);
        entries.push(entry);
        if let Some(v) = variant {
            let _ = writeln!(
                out,
                "  + the same image with OCI media types ({}) for OCI-only readers",
                v.digest
            );
            entries.push(Entry {
                name: r.to_string(),
                digest: v.digest,
                media_type: v.media_type,
                size: v.size,
                converted_from: Some(root.clone()),
            });
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries.iter().map(|e| serde_json::json!({
            "mediaType": e.media_type,
            "digest": e.digest.to_string(),
            "size": e.size,
            "annotations": match &e.converted_from {
                None => serde_json::json!({ REF_NAME: e.name }),
                Some(d) => serde_json::json!({ REF_NAME: e.name, CONVERTED_FROM: d.to_string() }),
            },
        })).collect::<Vec<_>>(),
    });
    let index = serde_json::to_vec_pretty(&index).map_err(|e| usage(e.to_string()))?;
    let layout = format!(r#"{{"imageLayoutVersion":"{LAYOUT_VERSION}"}}"#);
    let layout = layout.as_bytes();

    let as_dir = output.as_os_str().to_string_lossy().ends_with('/') || output.is_dir();
    if as_dir {
        let dir = output.join("blobs").join("sha256");
        std::fs::create_dir_all(&dir).map_err(io_err(dir.display()))?;
        for (hex, bytes) in &manifests {
            let p = dir.join(hex);
            std::fs::write(&p, bytes).map_err(io_err(p.display()))?;
        }
        for (hex, src) in &blobs {
            let p = dir.join(hex);
            std::fs::copy(src, &p).map_err(io_err(p.display()))?;
        }
        let p = output.join("oci-layout");
        std::fs::write(&p, layout).map_err(io_err(p.display()))?;
        // index.json last: a layout without it is visibly incomplete.
        let p = output.join("index.json");
        std::fs::write(&p, &index).map_err(io_err(p.display()))?;
    } else {
        let tmp = PathBuf::from(format!("{}.partial", output.display()));
        let write = || -> std::io::Result<()> {
            let file = std::fs::File::create(&tmp)?;
            let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
            let mut add = |name: &str, data: &[u8]| {
                let mut h = tar::Header::new_ustar();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_mtime(unix_now());
                h.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut h, name, data)
            };
            add("oci-layout", layout)?;
            add("index.json", &index)?;
            for (hex, bytes) in &manifests {
                add(&format!("blobs/sha256/{hex}"), bytes)?;
            }
            for (hex, src) in &blobs {
                tar.append_path_with_name(src, format!("blobs/sha256/{hex}"))?;
            }
            let w = tar.into_inner()?;
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&tmp, output)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(usage(format!("writing {}: {e}", output.display())));
        }
    }
    let _ = writeln!(
        out,
        "wrote {} image(s), {} manifest(s), {} blob(s) to {}",
        entries.len(),
        manifests.len(),
        blobs.len(),
        output.display()
    );
    Ok(())
}

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

/// The image layout version written and read.
const LAYOUT_VERSION: &str = "1.0.0";

/// Reads and verifies a bundle (a directory or a tar).
fn load_bundle(cache: &Cache, input: &Path) -> Result<Bundle, OpsError> {
    if input.is_dir() {
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
        return Ok(Bundle {
            index,
            blobs,
            staging: None,
        });
    }
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
            if !valid_hex(hex) {
                return Err(usage(format!("bundle file {name} is not a sha256 digest")));
            }
            let dest_path = staging.join(hex);
            let mut dest =
                std::fs::File::create(&dest_path).map_err(io_err(dest_path.display()))?;
            let (got, size) = hash_copy(&mut entry, Some(&mut dest), |_| {}).map(|(d, n)| (d.hex().to_owned(), n)).map_err(|e| {
                usage(format!(
                    "bundle blob sha256:{hex} cannot be read (truncated bundle?): {e}; nothing was imported"
                ))
            })?;
            if got != hex {
                return Err(tampered(hex, &got, size));
            }
            bundle.blobs.insert(hex.to_owned(), (dest_path, size));
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

/// What one image of an import consists of, children before parents.
struct ImagePlan {
    name: String,
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

fn plan(cache: &Cache, bundle: &Bundle) -> Result<Vec<ImagePlan>, OpsError> {
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
        let (host, repo, reference) = parse_qualified(name)?;
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
        let mut manifests = Vec::new();
        let mut blobs = Vec::new();
        let mut seen = HashSet::new();
        // (digest, descriptor media type, required)
        let mut stack = vec![(root.clone(), root_type.clone(), true)];
        while let Some((d, dtype, required)) = stack.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            let bytes = match bundle.blobs.get(d.hex()) {
                Some((p, _)) => std::fs::read(p).map_err(io_err(p.display()))?,
                None if required => {
                    return Err(usage(format!("{name}: the bundle lacks manifest {d}")))
                }
                // An index's platforms that were not exported.
                None => continue,
            };
            let refs = references(&bytes);
            for (b, _) in refs.blobs {
                let have = bundle.blobs.contains_key(b.hex()) || cache.holds_blob(&b)?;
                if !have {
                    return Err(usage(format!(
                        "{name}: the bundle lacks blob {b} (of manifest {d})"
                    )));
                }
                blobs.push(b);
            }
            let children: Vec<(Digest, String)> =
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("manifests").and_then(|m| m.as_array()).cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|m| {
                        let d = m.get("digest")?.as_str()?.parse().ok()?;
                        let t = m.get("mediaType")?.as_str()?.to_owned();
                        Some((d, t))
                    })
                    .collect();
            manifests.push((d.clone(), manifest_type(&bytes, &dtype)));
            stack.extend(children.into_iter().map(|(c, t)| (c, t, false)));
        }
        manifests.reverse();
        blobs.sort();
        blobs.dedup();
        let root_type = manifests
            .last()
            .map(|(_, t)| t.clone())
            .unwrap_or(root_type);
        plans.push(ImagePlan {
            name: name.to_owned(),
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
pub fn import(cache: &Cache, input: &Path, pin: bool, out: &mut dyn Write) -> Result<(), OpsError> {
    let bundle = load_bundle(cache, input)?;
    let plans = plan(cache, &bundle)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| usage(format!("cannot start the runtime: {e}")))?;
    for p in &plans {
        // Held until the tag is written: eviction (for this import's later fills, or for the
        // clients of a running serve) skips the image's blobs meanwhile.
        let _leases: Vec<_> = p
            .blobs
            .iter()
            .map(|b| cache.budget().lease(b.hex()))
            .collect();
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
        let mut new_manifests = 0;
        for (d, t) in &p.manifests {
            if cache.manifest_untouched(d)?.is_some() {
                continue;
            }
            let (path, _) = bundle
                .blobs
                .get(d.hex())
                .ok_or_else(|| usage(format!("{}: the bundle lacks manifest {d}", p.name)))?;
            let bytes = std::fs::read(path).map_err(io_err(path.display()))?;
            cache.put_manifest(crate::cache::StoredManifest {
                digest: d.clone(),
                media_type: t.clone(),
                bytes: bytes.into(),
            })?;
            new_manifests += 1;
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
        let mut tag_moved = false;
        if let Reference::Tag(tag) = &p.reference {
            let current = cache.index().tag(&p.host, &p.repo, tag)?;
            if current.as_ref().map(|e| e.digest.as_str()) != Some(&p.root.to_string()) {
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
                tag_moved = true;
            }
        }
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
    }
    cache.index().flush()?;
    Ok(())
}

/// Which platforms of an index `prefetch` takes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platforms {
    All,
    /// `os/arch` or `os/arch/variant`.
    Some(Vec<String>),
}

impl Platforms {
    fn wants(&self, platform: Option<&serde_json::Value>) -> bool {
        let Platforms::Some(list) = self else {
            return true;
        };
        let Some(p) = platform else {
            return false;
        };
        let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let (os, arch, variant) = (field("os"), field("architecture"), field("variant"));
        list.iter().any(|want| {
            let mut parts = want.split('/');
            let (wo, wa, wv) = (parts.next(), parts.next(), parts.next());
            wo == Some(os) && wa == Some(arch) && wv.is_none_or(|v| v == variant)
        })
    }
}

/// What `stowage prefetch` asks for; the same value goes over the admin socket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrefetchRequest {
    /// Image references as typed (Docker syntax), `--file` already read.
    pub refs: Vec<String>,
    pub platforms: Platforms,
    /// Pin the images fetched.
    pub pin: bool,
}

/// Images prefetched at once; each fills up to `min(max_concurrent_fills, 8)` blobs at once.
const IMAGES_AT_ONCE: usize = 3;

/// Progress events of one image are sent at most this often (the display throttles further).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Totals of one prefetched image.
#[derive(Default)]
struct Fetched {
    manifests: usize,
    blobs: usize,
    cached: usize,
    bytes: u64,
    /// Blobs this image read from a fill (its own or another's), and how many bytes.
    filled: Vec<(Digest, u64)>,
    /// Blobs that were already cached.
    held: Vec<Digest>,
}

/// Counts one image's fetched bytes and sends (throttled) [`Event::Progress`].
struct Meter<'a> {
    id: usize,
    bytes: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<std::time::Instant>,
    emit: &'a Emit,
}

impl Meter<'_> {
    fn add(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= PROGRESS_EVERY {
            *last = std::time::Instant::now();
            drop(last);
            (self.emit)(Event::Progress {
                id: self.id,
                bytes: total,
            });
        }
    }
}

/// Where prefetch events go: a channel to the display, local or over the admin socket.
pub type Emit = dyn Fn(Event) + Send + Sync;

/// Drives one blob into the cache: `None` if held, else its fill read to the end (counted).
async fn fetch_blob(
    mirror: &crate::mirror::Mirror,
    route: &crate::upstream::Route,
    digest: &Digest,
    meter: &Meter<'_>,
) -> Result<Option<u64>, RegistryError> {
    use futures_util::StreamExt;
    match mirror.blob(route, digest, false).await? {
        crate::mirror::BlobAnswer::Filling { fill, .. } => {
            let mut n = 0u64;
            let mut reader = fill.reader();
            while let Some(chunk) = reader.next().await {
                let chunk = chunk.map_err(|e| {
                    RegistryError::new(ErrorCode::BlobUnknown, format!("blob {digest}: {e}"))
                })?;
                n += chunk.len() as u64;
                meter.add(chunk.len() as u64);
            }
            // In the cache (not only verified) before the image counts as prefetched.
            fill.settled().await?;
            Ok(Some(n))
        }
        _ => Ok(None),
    }
}

/// Prefetches one image: its manifest, the selected platforms' manifests, all their blobs (at
/// most `parallel` at once). Sends [`Event::Start`] once the blobs are known.
async fn prefetch_one(
    mirror: &crate::mirror::Mirror,
    id: usize,
    r: &ops::ImageRef,
    platforms: &Platforms,
    parallel: usize,
    emit: &Emit,
) -> Result<Fetched, RegistryError> {
    use futures_util::StreamExt;
    let upstream = mirror
        .router
        .upstreams()
        .iter()
        .find(|u| u.host() == r.host)
        .cloned()
        .ok_or_else(|| {
            RegistryError::new(ErrorCode::NameUnknown, format!("no upstream {}", r.host))
        })?;
    let route = crate::upstream::Route {
        upstream,
        repo: r.repo.clone(),
        prefix: None,
    };
    let accept = crate::oci::media::Accept::parse(&crate::oci::media::upstream_manifest_accept());
    let top = mirror
        .manifest(&route, &r.reference, &accept)
        .await?
        .manifest;
    let mut done = Fetched {
        manifests: 1,
        ..Fetched::default()
    };
    let mut images = vec![top.clone()];
    let v: serde_json::Value = serde_json::from_slice(&top.bytes).unwrap_or_default();
    if let Some(children) = v.get("manifests").and_then(|m| m.as_array()) {
        images.clear();
        for c in children {
            if !platforms.wants(c.get("platform")) {
                continue;
            }
            let Some(d) = c
                .get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| d.parse().ok())
            else {
                continue;
            };
            let m = mirror
                .manifest(&route, &Reference::Digest(d), &accept)
                .await?
                .manifest;
            done.manifests += 1;
            images.push(m);
        }
        if images.is_empty() {
            return Err(RegistryError::new(
                ErrorCode::ManifestUnknown,
                "the index has no manifest for the requested platform(s)",
            ));
        }
    }
    let mut blobs: Vec<(Digest, u64)> = images
        .iter()
        .flat_map(|m| references(&m.bytes).blobs)
        .collect();
    blobs.sort();
    blobs.dedup_by(|a, b| a.0 == b.0);
    let held = blobs
        .iter()
        .filter(|(d, _)| mirror.cache.budget().contains(d.hex()))
        .count();
    emit(Event::Start {
        id,
        image: r.to_string(),
        blobs: blobs.len(),
        cached: held,
        bytes: blobs
            .iter()
            .filter(|(d, _)| !mirror.cache.budget().contains(d.hex()))
            .map(|(_, s)| s)
            .sum(),
    });
    done.blobs = blobs.len();
    let meter = Meter {
        id,
        bytes: Default::default(),
        last: std::sync::Mutex::new(std::time::Instant::now()),
        emit,
    };
    let (route, meter) = (&route, &meter);
    // Owned items and `async move`: borrowed ones trip the compiler's higher-ranked lifetime
    // check once the future is spawned.
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let results: Vec<(Digest, Result<Option<u64>, RegistryError>)> =
        futures_util::stream::iter(digests)
            .map(move |d| async move {
                let r = fetch_blob(mirror, route, &d, meter).await;
                (d, r)
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
    for (d, r) in results {
        match r? {
            Some(n) => {
                done.bytes += n;
                done.filled.push((d, n));
            }
            None => {
                done.cached += 1;
                done.held.push(d);
            }
        }
    }
    Ok(done)
}

/// One reference of a prefetch, start to end: `Some(reference as typed)` if it was fetched.
async fn prefetch_ref(
    mirror: std::sync::Arc<crate::mirror::Mirror>,
    id: usize,
    text: &str,
    req: &PrefetchRequest,
    parallel: usize,
    emit: &Emit,
) -> (Option<String>, Fetched) {
    let platforms = &req.platforms;
    let r = match ops::parse_image_ref(text, &mirror.config) {
        Ok(r) => r,
        Err(e) => {
            emit(Event::Failed {
                id,
                image: text.to_owned(),
                error: e.to_string(),
            });
            return (None, Fetched::default());
        }
    };
    let started = std::time::Instant::now();
    match prefetch_one(&mirror, id, &r, platforms, parallel, emit).await {
        Ok(f) => {
            emit(Event::Done {
                id,
                image: r.to_string(),
                manifests: f.manifests,
                blobs: f.blobs,
                cached: f.cached,
                bytes: f.bytes,
                secs: started.elapsed().as_secs_f64(),
            });
            if req.pin {
                // Pinned as soon as it is in, so that the next images' fills cannot evict it
                // (sled work: off the runtime threads).
                let (m, refs) = (mirror.clone(), vec![text.to_owned()]);
                let pinned = tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    ops::pin(&m.cache, &m.config, &refs, &mut out).map(|()| out)
                })
                .await;
                let failed = match pinned {
                    Ok(Ok(out)) => {
                        emit(Event::Out {
                            text: String::from_utf8_lossy(&out).into_owned(),
                        });
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = failed {
                    emit(Event::Failed {
                        id,
                        image: r.to_string(),
                        error: format!("fetched, but pinning failed: {e}"),
                    });
                    return (None, f);
                }
            }
            (Some(text.to_owned()), f)
        }
        Err(e) => {
            emit(Event::Failed {
                id,
                image: r.to_string(),
                error: e.message,
            });
            (None, Fetched::default())
        }
    }
}

/// `stowage prefetch`, wherever it runs (the command itself, or `serve` for the admin socket):
/// each image through `mirror`'s fill engine (several images at once, each with its blobs
/// filling concurrently) and, with `--pin`, pinned as soon as it is in; events to `emit`, then
/// [`Event::Summary`]. Returns
/// whether every image was fetched: an unknown image fails alone.
pub async fn prefetch(
    mirror: std::sync::Arc<crate::mirror::Mirror>,
    req: &PrefetchRequest,
    emit: &Emit,
) -> Result<bool, OpsError> {
    use futures_util::StreamExt;
    if mirror.config.offline {
        return Err(usage(
            "prefetch needs an upstream; the config says offline = true",
        ));
    }
    let started = std::time::Instant::now();
    let parallel = mirror.config.storage.max_concurrent_fills.min(8);
    let results: Vec<(Option<String>, Fetched)> =
        futures_util::stream::iter(req.refs.clone().into_iter().enumerate())
            .map(|(id, text)| {
                let m = mirror.clone();
                async move { prefetch_ref(m, id, &text, req, parallel, emit).await }
            })
            .buffered(IMAGES_AT_ONCE)
            .collect()
            .await;
    mirror.cache.index().durable().await;
    let ok: Vec<String> = results.iter().filter_map(|(t, _)| t.clone()).collect();
    let failed = results.len() - ok.len();
    // The flush is sled work: off the runtime threads.
    let m = mirror.clone();
    tokio::task::spawn_blocking(move || m.cache.flush())
        .await
        .map_err(|e| usage(format!("prefetch: {e}")))??;
    // Distinct blobs: images that share one both read its (single) fill.
    let filled: HashMap<&Digest, u64> = results
        .iter()
        .flat_map(|(_, f)| f.filled.iter().map(|(d, n)| (d, *n)))
        .collect();
    let held: HashSet<&Digest> = results
        .iter()
        .flat_map(|(_, f)| f.held.iter())
        .filter(|d| !filled.contains_key(d))
        .collect();
    emit(Event::Summary {
        ok: ok.len(),
        failed,
        fetched: filled.len(),
        cached: held.len(),
        bytes: filled.values().sum(),
        secs: started.elapsed().as_secs_f64(),
    });
    Ok(failed == 0)
}
