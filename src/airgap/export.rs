//! `stowage export REF... [--file images.txt] -o bundle.tar|dir/`: cached images as a standard
//! OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), as a tar or (with
//! `-o dir/`, or an existing directory) a directory.
//!
//! Each `index.json` entry is an image's top manifest with `org.opencontainers.image.ref.name` =
//! the fully qualified reference (`docker.io/library/alpine:3.19`), so
//! `skopeo copy oci-archive:bundle.tar:<ref> ...` reads it. A Docker schema 2 image (manifest or
//! list) is followed by an OCI-typed copy of itself under the same name (see `oci_variant`):
//! skopeo reads the copy, `import` the original. An image must be fully cached (its manifests,
//! and every blob of those manifests); an index exports with the children the cache holds (the
//! platforms that were pulled).
//!
//! A reference whose name `hosted.repositories` holds (`team/app:1`) exports the hosted image,
//! read from hosted storage: all of it (an index with every child, as pushed). Its entry is
//! named as clients address it (`team/app:1`) and marked with [`HOSTED`], so that `import`
//! puts it back into hosted storage.
//!
//! With `--with-referrers`, each image's referrers follow it (see [`super::referrers`]): one
//! entry each, named by digest (`docker.io/library/alpine@sha256:...`) or by its tag (cosign's
//! `...:sha256-<hex>.sig`), so that `import` restores them and their subjects' referrers
//! answers. A referrer the cache does not hold whole is skipped, and said so.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::index::{unix_now, StoredManifest};
use crate::cache::{BlobLease, Cache};
use crate::config::Config;
use crate::hosted::Hosted;
use crate::oci::convert::{docker_list_to_oci, docker_manifest_to_oci, Replacement};
use crate::oci::media::{DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2, OCI_INDEX, OCI_MANIFEST};
use crate::oci::{manifest, Digest, Reference, RepoName};
use crate::ops::{self, ImageRef, OpsError};

use super::{io_err, usage, CONVERTED_FROM, HOSTED, LAYOUT_VERSION, REF_NAME};

/// One image of an export.
struct Entry {
    name: String,
    digest: Digest,
    media_type: String,
    size: u64,
    /// For the OCI-typed copy of a Docker-typed image: the original's digest.
    converted_from: Option<Digest>,
    /// A hosted image (named as clients address it).
    hosted: bool,
}

/// What an export writes, gathered before anything is written.
#[derive(Default)]
struct Contents {
    entries: Vec<Entry>,
    /// Manifests (bytes) to write, by hex.
    manifests: BTreeMap<String, bytes::Bytes>,
    /// Blobs (paths in the cache) to write, by hex.
    blobs: BTreeMap<String, PathBuf>,
    /// Held until the bundle is written: a running serve does not evict the blobs meanwhile.
    leases: Vec<BlobLease>,
}

/// `stowage export`.
pub fn export(
    cache: &Cache,
    hosted: Option<&Hosted>,
    config: &Config,
    refs: &[String],
    output: &Path,
    with_referrers: bool,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let mut contents = Contents::default();
    for text in refs {
        if let Some((h, (repo, reference))) =
            hosted.and_then(|h| Some((h, super::hosted_ref(text, h)?)))
        {
            let top = add_hosted_image(h, &repo, &reference, &mut contents, out)?;
            if with_referrers {
                add_hosted_referrers(h, &repo, &top, &mut contents, out)?;
            }
            continue;
        }
        let r = ops::parse_image_ref(text, config)?;
        let held = add_image(cache, &r, &mut contents, out)?;
        if with_referrers {
            add_cached_referrers(cache, &r, &held, &mut contents, out)?;
        }
    }
    let index = index_json(&contents.entries)?;
    let layout = format!(r#"{{"imageLayoutVersion":"{LAYOUT_VERSION}"}}"#);
    let layout = layout.as_bytes();
    let as_dir = output.as_os_str().to_string_lossy().ends_with('/') || output.is_dir();
    if as_dir {
        write_dir(output, &contents, layout, &index)?;
    } else {
        write_tar(output, &contents, layout, &index)?;
    }
    let _ = writeln!(
        out,
        "wrote {} image(s), {} manifest(s), {} blob(s) to {}",
        contents.entries.len(),
        contents.manifests.len(),
        contents.blobs.len(),
        output.display()
    );
    drop(contents.leases);
    Ok(())
}

/// Adds the referrers the cache holds of image `r` (whose manifests are `held`), recursively,
/// each as an entry of its own; one not held whole is skipped with a note.
fn add_cached_referrers(
    cache: &Cache,
    r: &ImageRef,
    held: &[Digest],
    contents: &mut Contents,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    for c in super::referrers::cached_referrers(cache, &r.host, &r.repo, held)? {
        let reference = match c.tag {
            Some(t) => Reference::Tag(t),
            None => Reference::Digest(c.digest),
        };
        let referrer = ImageRef {
            host: r.host.clone(),
            repo: r.repo.clone(),
            reference,
        };
        if contents
            .entries
            .iter()
            .any(|e| e.name == referrer.to_string())
        {
            continue;
        }
        let _ = write!(out, "  referrer: ");
        if let Err(e) = add_image(cache, &referrer, contents, out) {
            let _ = writeln!(out, "skipped {referrer}: {e}");
        }
    }
    Ok(())
}

/// Adds the referrers of hosted manifest `top` in `repo`, recursively, each as a hosted entry.
fn add_hosted_referrers(
    hosted: &Hosted,
    repo: &RepoName,
    top: &Digest,
    contents: &mut Contents,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let referrers = super::referrers::hosted_referrers(hosted, repo, top)
        .map_err(|e| usage(format!("{repo}: referrers of {top}: {}", e.message)))?;
    for d in referrers {
        let _ = write!(out, "  referrer: ");
        add_hosted_image(hosted, repo, &Reference::Digest(d), contents, out)?;
    }
    Ok(())
}

/// Adds image `r` to `contents`: its manifests, its blobs (leased), its `index.json` entry and,
/// for a Docker-typed image, the entry of its OCI-typed copy. Fails unless all of it is cached.
/// Returns the digests of its manifests.
fn add_image(
    cache: &Cache,
    r: &ImageRef,
    contents: &mut Contents,
    out: &mut dyn Write,
) -> Result<Vec<Digest>, OpsError> {
    let root = ops::resolve(cache, r)?;
    let (held, needed) = ops::closure(cache, &root)?;
    let mut image = HashMap::new();
    for d in &held {
        let m = cache
            .manifest_untouched(d)?
            .ok_or_else(|| usage(format!("{r}: manifest {d} vanished from the cache")))?;
        contents
            .manifests
            .insert(d.hex().to_owned(), m.bytes.clone());
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
        contents.leases.push(cache.budget().lease(b.hex()));
        let path = cache.blob_path(b);
        if !cache.holds_blob(b)? {
            return Err(usage(format!(
                "{r}: blob {b} is not in the cache (prefetch or pull the image first)"
            )));
        }
        contents.blobs.insert(b.hex().to_owned(), path);
    }
    let entry = Entry {
        name: r.to_string(),
        digest: root.clone(),
        media_type: top.media_type.clone(),
        size: top.bytes.len() as u64,
        converted_from: None,
        hosted: false,
    };
    let _ = writeln!(
        out,
        "export {} ({}): {} manifest(s), {} blob(s)",
        entry.name,
        entry.digest,
        held.len(),
        needed.len()
    );
    push_entry(&image, entry, contents, out);
    Ok(held.into_iter().collect())
}

/// Adds `entry` and, for a Docker-typed image, the entry of its OCI-typed copy.
fn push_entry(
    image: &HashMap<Digest, Arc<StoredManifest>>,
    entry: Entry,
    contents: &mut Contents,
    out: &mut dyn Write,
) {
    let variant = oci_variant(image, &entry.digest, &mut contents.manifests);
    let (name, root, hosted) = (entry.name.clone(), entry.digest.clone(), entry.hosted);
    contents.entries.push(entry);
    if let Some(v) = variant {
        let _ = writeln!(
            out,
            "  + the same image with OCI media types ({}) for OCI-only readers",
            v.digest
        );
        contents.entries.push(Entry {
            name,
            digest: v.digest,
            media_type: v.media_type,
            size: v.size,
            converted_from: Some(root),
            hosted,
        });
    }
}

/// Adds hosted image `reference` of `repo` to `contents`: every manifest it reaches and every
/// blob of those (foreign layers, never pushed, aside), read from hosted storage (with a shared
/// store, what this node lacks is fetched from it first).
fn add_hosted_image(
    hosted: &Hosted,
    repo: &RepoName,
    reference: &Reference,
    contents: &mut Contents,
    out: &mut dyn Write,
) -> Result<Digest, OpsError> {
    let name = super::hosted_name(repo, reference);
    let fail = |e: crate::oci::RegistryError| usage(format!("{name}: {}", e.message));
    let top = hosted
        .wait(hosted.manifest(repo, reference))
        .and_then(|r| r)
        .map_err(fail)?;
    let mut image = HashMap::new();
    let mut blobs = 0;
    let mut stack = vec![top.digest.clone()];
    while let Some(d) = stack.pop() {
        if image.contains_key(&d) {
            continue;
        }
        let by_digest = Reference::Digest(d.clone());
        let m = hosted
            .wait(hosted.manifest(repo, &by_digest))
            .and_then(|r| r)
            .map_err(fail)?;
        let parsed = manifest::parse(&m.bytes, Some(&m.media_type))
            .map_err(|e| usage(format!("{name}: hosted manifest {d}: {e}")))?;
        for b in &parsed.blobs {
            if b.media_type
                .as_deref()
                .is_some_and(manifest::is_non_distributable)
            {
                continue;
            }
            // Fetched from the shared store (verified, kept locally) when this node lacks it.
            hosted
                .wait(hosted.blob(repo, &b.digest))
                .and_then(|r| r)
                .map_err(fail)?;
            let path = hosted.blob_path(&b.digest);
            if contents
                .blobs
                .insert(b.digest.hex().to_owned(), path)
                .is_none()
            {
                blobs += 1;
            }
        }
        stack.extend(parsed.children.iter().map(|c| c.digest.clone()));
        contents
            .manifests
            .insert(d.hex().to_owned(), m.bytes.clone());
        let stored = StoredManifest {
            digest: m.digest,
            media_type: m.media_type,
            bytes: m.bytes,
        };
        image.insert(d, Arc::new(stored));
    }
    let _ = writeln!(
        out,
        "export hosted {name} ({}): {} manifest(s), {blobs} blob(s)",
        top.digest,
        image.len(),
    );
    let entry = Entry {
        name,
        digest: top.digest.clone(),
        media_type: top.media_type.clone(),
        size: top.bytes.len() as u64,
        converted_from: None,
        hosted: true,
    };
    push_entry(&image, entry, contents, out);
    Ok(top.digest)
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

/// The layout's `index.json`: one entry an image (and one for each OCI-typed copy).
fn index_json(entries: &[Entry]) -> Result<Vec<u8>, OpsError> {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries.iter().map(|e| serde_json::json!({
            "mediaType": e.media_type,
            "digest": e.digest.to_string(),
            "size": e.size,
            "annotations": annotations(e),
        })).collect::<Vec<_>>(),
    });
    serde_json::to_vec_pretty(&index).map_err(|e| usage(e.to_string()))
}

/// An entry's annotations: its name, and the marks `import` reads.
fn annotations(e: &Entry) -> serde_json::Value {
    let mut a = serde_json::Map::new();
    a.insert(REF_NAME.into(), e.name.clone().into());
    if let Some(d) = &e.converted_from {
        a.insert(CONVERTED_FROM.into(), d.to_string().into());
    }
    if e.hosted {
        a.insert(HOSTED.into(), "true".into());
    }
    a.into()
}

/// Writes the layout as a directory at `output`.
fn write_dir(
    output: &Path,
    contents: &Contents,
    layout: &[u8],
    index: &[u8],
) -> Result<(), OpsError> {
    let dir = output.join("blobs").join("sha256");
    std::fs::create_dir_all(&dir).map_err(io_err(dir.display()))?;
    for (hex, bytes) in &contents.manifests {
        let p = dir.join(hex);
        std::fs::write(&p, bytes).map_err(io_err(p.display()))?;
    }
    for (hex, src) in &contents.blobs {
        let p = dir.join(hex);
        std::fs::copy(src, &p).map_err(io_err(p.display()))?;
    }
    let p = output.join("oci-layout");
    std::fs::write(&p, layout).map_err(io_err(p.display()))?;
    // index.json last: a layout without it is visibly incomplete.
    let p = output.join("index.json");
    std::fs::write(&p, index).map_err(io_err(p.display()))?;
    Ok(())
}

/// Writes the layout as a tar at `output`: into `<output>.partial`, synced, then renamed, so
/// that `output` is whole or absent.
fn write_tar(
    output: &Path,
    contents: &Contents,
    layout: &[u8],
    index: &[u8],
) -> Result<(), OpsError> {
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
        add("index.json", index)?;
        for (hex, bytes) in &contents.manifests {
            add(&format!("blobs/sha256/{hex}"), bytes)?;
        }
        for (hex, src) in &contents.blobs {
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
    Ok(())
}
