//! Synthetic container images, built in memory with no network, and a v2 push client.
//!
//! Layers are real gzip-compressed tar archives holding a few files of random bytes (so every
//! test image is unique and incompressible; pass a multi-MiB size for big layers). Configs are
//! valid image configs whose `rootfs.diff_ids` are the sha256 of each *uncompressed* tar, so
//! dockerd/containerd could unpack them. Manifests come in all four formats: Docker schema 2,
//! OCI manifest, Docker manifest list and OCI index.
//!
//! Bytes are exact: every manifest is serialised once, hashed from those bytes and pushed as
//! those bytes, so a test can compare what a client received byte for byte.

use std::collections::BTreeMap;
use std::io::Write;

use rand::RngCore;
use serde_json::json;

use super::{http, sha256_digest};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The four manifest media types a modern client accepts.
pub const ALL_MANIFEST_TYPES: [&str; 4] = [DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX];

/// Which family of media types an image uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Docker schema 2 manifest / Docker manifest list.
    Docker,
    /// OCI image manifest / OCI image index.
    Oci,
}

impl Format {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_MANIFEST,
            Format::Oci => OCI_MANIFEST,
        }
    }
    pub fn index_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_LIST,
            Format::Oci => OCI_INDEX,
        }
    }
    pub fn config_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_CONFIG,
            Format::Oci => OCI_CONFIG,
        }
    }
    pub fn layer_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_LAYER,
            Format::Oci => OCI_LAYER,
        }
    }
}

/// A content-addressed blob (config or layer) with its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
    /// The hex part of the digest (the file name skopeo's `dir:` transport uses).
    pub fn hex(&self) -> &str {
        hex_of(&self.digest)
    }
    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "size": self.size(), "digest": self.digest})
    }
}

/// A serialised manifest (image manifest, list or index) with its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Manifest {
    fn from_json(media_type: &str, value: &serde_json::Value) -> Manifest {
        let bytes = serde_json::to_vec_pretty(value).expect("serialise manifest");
        let Blob {
            media_type,
            digest,
            bytes,
        } = Blob::new(media_type, bytes);
        Manifest {
            media_type,
            digest,
            bytes,
        }
    }
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
    pub fn hex(&self) -> &str {
        hex_of(&self.digest)
    }
}

/// A compressed layer plus the digest of its uncompressed tar (its diff_id).
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

/// A gzip-compressed tar with three random files totalling about `content_size` bytes
/// (at least one byte per file), plus a directory entry.
pub fn random_layer(format: Format, content_size: usize) -> Layer {
    let mut rng = rand::thread_rng();
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir_header = tar::Header::new_gnu();
    dir_header.set_entry_type(tar::EntryType::Directory);
    dir_header.set_mode(0o755);
    dir_header.set_mtime(1_700_000_000);
    dir_header.set_size(0);
    builder
        .append_data(&mut dir_header, "stowage-test/", std::io::empty())
        .expect("append dir to tar");
    let sizes = [
        content_size / 2,
        content_size / 3,
        content_size - content_size / 2 - content_size / 3,
    ];
    for (i, size) in sizes.iter().enumerate() {
        let mut data = vec![0u8; (*size).max(1)];
        rng.fill_bytes(&mut data);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_size(data.len() as u64);
        builder
            .append_data(
                &mut header,
                format!("stowage-test/file-{i}.bin"),
                data.as_slice(),
            )
            .expect("append file to tar");
    }
    let tar_bytes = builder.into_inner().expect("finish tar");
    let diff_id = sha256_digest(&tar_bytes);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_bytes).expect("gzip layer");
    let compressed = gz.finish().expect("finish gzip");
    Layer {
        blob: Blob::new(format.layer_type(), compressed),
        diff_id,
    }
}

/// A single-platform image: manifest, config and layers.
#[derive(Debug, Clone)]
pub struct Image {
    pub format: Format,
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub manifest: Manifest,
    pub config: Blob,
    pub layers: Vec<Layer>,
}

impl Image {
    /// A `linux/amd64` image with one layer per entry of `layer_sizes` (uncompressed content bytes).
    pub fn build(format: Format, layer_sizes: &[usize]) -> Image {
        Image::build_for(format, "amd64", layer_sizes)
    }

    /// A linux image for `architecture` (`arm64` gets variant `v8`).
    pub fn build_for(format: Format, architecture: &str, layer_sizes: &[usize]) -> Image {
        let layers: Vec<Layer> = layer_sizes
            .iter()
            .map(|s| random_layer(format, *s))
            .collect();
        let variant = (architecture == "arm64").then(|| "v8".to_string());
        let mut nonce = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut nonce);
        let mut config_json = json!({
            "architecture": architecture,
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "Labels": {"org.stowage.test.nonce": hex::encode(nonce)}
            },
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()
            },
            "history": layers.iter().enumerate().map(|(i, _)| json!({
                "created": "2024-01-01T00:00:00Z",
                "created_by": format!("stowage test layer {i}")
            })).collect::<Vec<_>>()
        });
        if let Some(v) = &variant {
            config_json["variant"] = json!(v);
        }
        let config = Blob::new(
            format.config_type(),
            serde_json::to_vec(&config_json).expect("serialise config"),
        );
        let manifest_json = json!({
            "schemaVersion": 2,
            "mediaType": format.manifest_type(),
            "config": config.descriptor(),
            "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>()
        });
        Image {
            format,
            os: "linux".to_string(),
            architecture: architecture.to_string(),
            variant,
            manifest: Manifest::from_json(format.manifest_type(), &manifest_json),
            config,
            layers,
        }
    }

    /// Config first, then layers.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config)
            .chain(self.layers.iter().map(|l| &l.blob))
            .collect()
    }

    fn platform(&self) -> serde_json::Value {
        let mut p = json!({"architecture": self.architecture, "os": self.os});
        if let Some(v) = &self.variant {
            p["variant"] = json!(v);
        }
        p
    }
}

/// A multi-platform image: a Docker manifest list or OCI index over child images.
#[derive(Debug, Clone)]
pub struct ImageIndex {
    pub format: Format,
    pub manifest: Manifest,
    pub children: Vec<Image>,
}

impl ImageIndex {
    /// One child per architecture (e.g. `["amd64", "arm64"]`), each with `layer_sizes` layers.
    pub fn build(format: Format, architectures: &[&str], layer_sizes: &[usize]) -> ImageIndex {
        let children: Vec<Image> = architectures
            .iter()
            .map(|a| Image::build_for(format, a, layer_sizes))
            .collect();
        let index_json = json!({
            "schemaVersion": 2,
            "mediaType": format.index_type(),
            "manifests": children.iter().map(|c| json!({
                "mediaType": c.manifest.media_type,
                "size": c.manifest.size(),
                "digest": c.manifest.digest,
                "platform": c.platform()
            })).collect::<Vec<_>>()
        });
        ImageIndex {
            format,
            manifest: Manifest::from_json(format.index_type(), &index_json),
            children,
        }
    }
}

/// Anything that can be pushed under a tag.
#[derive(Debug, Clone)]
pub enum TestImage {
    Single(Image),
    Index(ImageIndex),
}

impl From<Image> for TestImage {
    fn from(i: Image) -> Self {
        TestImage::Single(i)
    }
}

impl From<ImageIndex> for TestImage {
    fn from(i: ImageIndex) -> Self {
        TestImage::Index(i)
    }
}

impl TestImage {
    /// The manifest the tag points at (the list/index for multi-platform images).
    pub fn manifest(&self) -> &Manifest {
        match self {
            TestImage::Single(i) => &i.manifest,
            TestImage::Index(i) => &i.manifest,
        }
    }

    /// The top manifest followed by every child manifest.
    pub fn manifests(&self) -> Vec<&Manifest> {
        match self {
            TestImage::Single(i) => vec![&i.manifest],
            TestImage::Index(i) => std::iter::once(&i.manifest)
                .chain(i.children.iter().map(|c| &c.manifest))
                .collect(),
        }
    }

    /// The child images (one for a single-platform image).
    pub fn images(&self) -> Vec<&Image> {
        match self {
            TestImage::Single(i) => vec![i],
            TestImage::Index(i) => i.children.iter().collect(),
        }
    }

    /// Every config and layer blob of every platform.
    pub fn blobs(&self) -> Vec<&Blob> {
        self.images().into_iter().flat_map(|i| i.blobs()).collect()
    }

    /// Blob lookup by `sha256:<hex>` digest or bare hex.
    pub fn blob(&self, digest_or_hex: &str) -> Option<&Blob> {
        let hex = hex_of(digest_or_hex);
        self.blobs().into_iter().find(|b| b.hex() == hex)
    }

    /// Manifest lookup by `sha256:<hex>` digest or bare hex.
    pub fn manifest_by(&self, digest_or_hex: &str) -> Option<&Manifest> {
        let hex = hex_of(digest_or_hex);
        self.manifests().into_iter().find(|m| m.hex() == hex)
    }

    /// Every blob as `digest -> size`.
    pub fn blob_sizes(&self) -> BTreeMap<String, usize> {
        self.blobs()
            .into_iter()
            .map(|b| (b.digest.clone(), b.size()))
            .collect()
    }
}

/// What a push left in a registry: the repository, the tag and the exact image content.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Repository name as pushed upstream, e.g. `library/alpine`.
    pub name: String,
    pub tag: String,
    pub image: TestImage,
}

impl Pushed {
    /// The manifest the tag points at.
    pub fn manifest(&self) -> &Manifest {
        self.image.manifest()
    }
    /// `sha256:<hex>` of the tag's manifest.
    pub fn digest(&self) -> &str {
        &self.manifest().digest
    }
    pub fn media_type(&self) -> &str {
        &self.manifest().media_type
    }
    pub fn blobs(&self) -> Vec<&Blob> {
        self.image.blobs()
    }
    pub fn manifests(&self) -> Vec<&Manifest> {
        self.image.manifests()
    }
    /// The linux image for `architecture` (the image itself, or that child of an index).
    pub fn platform(&self, architecture: &str) -> &Image {
        self.image
            .images()
            .into_iter()
            .find(|i| i.architecture == architecture)
            .unwrap_or_else(|| panic!("the pushed image has no linux/{architecture} platform"))
    }
}

/// Pushes `image` to the registry at `registry_url` (e.g. `http://127.0.0.1:5000`) as
/// `name:tag`: every blob, then child manifests by digest (for lists/indexes), then the tag.
pub fn push(registry_url: &str, name: &str, tag: &str, image: impl Into<TestImage>) -> Pushed {
    let image = image.into();
    for blob in image.blobs() {
        push_blob(registry_url, name, blob);
    }
    if let TestImage::Index(index) = &image {
        for child in &index.children {
            push_manifest(registry_url, name, &child.manifest.digest, &child.manifest);
        }
    }
    push_manifest(registry_url, name, tag, image.manifest());
    Pushed {
        name: name.to_string(),
        tag: tag.to_string(),
        image,
    }
}

/// Monolithic blob upload: `POST /v2/<name>/blobs/uploads/` then `PUT <Location>&digest=`.
pub fn push_blob(registry_url: &str, name: &str, blob: &Blob) {
    let client = http();
    let start = client
        .post(format!("{registry_url}/v2/{name}/blobs/uploads/"))
        .header("Content-Length", "0")
        .send()
        .unwrap_or_else(|e| panic!("POST blob upload for {name}: {e}"));
    assert_eq!(
        start.status().as_u16(),
        202,
        "starting a blob upload to {name} should answer 202: {:?}",
        start.text()
    );
    let location = start
        .headers()
        .get("Location")
        .expect("upload start has a Location header")
        .to_str()
        .expect("Location is ASCII")
        .to_string();
    let location = if location.starts_with('/') {
        format!("{registry_url}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = client
        .put(format!("{location}{sep}digest={}", blob.digest))
        .header("Content-Type", "application/octet-stream")
        .body(blob.bytes.clone())
        .send()
        .unwrap_or_else(|e| panic!("PUT blob {} to {name}: {e}", blob.digest));
    let status = put.status().as_u16();
    assert_eq!(
        status,
        201,
        "finishing the upload of {} to {name} should answer 201: {:?}",
        blob.digest,
        put.text()
    );
}

/// `PUT /v2/<name>/manifests/<reference>` with the manifest's own media type; checks the
/// registry computed the same digest.
pub fn push_manifest(registry_url: &str, name: &str, reference: &str, manifest: &Manifest) {
    let resp = http()
        .put(format!("{registry_url}/v2/{name}/manifests/{reference}"))
        .header("Content-Type", &manifest.media_type)
        .body(manifest.bytes.clone())
        .send()
        .unwrap_or_else(|e| panic!("PUT manifest {name}:{reference}: {e}"));
    let status = resp.status().as_u16();
    let digest = resp
        .headers()
        .get("Docker-Content-Digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(
        status,
        201,
        "pushing manifest {name}:{reference} ({}) should answer 201: {:?}",
        manifest.media_type,
        resp.text()
    );
    assert_eq!(
        digest.as_deref(),
        Some(manifest.digest.as_str()),
        "registry's digest for {name}:{reference} differs from ours"
    );
}

fn hex_of(digest_or_hex: &str) -> &str {
    digest_or_hex
        .split_once(':')
        .map(|(_, h)| h)
        .unwrap_or(digest_or_hex)
}

/// Pushes `test/<name>:1` to `upstream`: an OCI image with layers of the given sizes (the
/// lifecycle and air-gap tests' standard image).
pub fn push_test(upstream: &super::registry::Registry, name: &str, layers: &[usize]) -> Pushed {
    push(
        &upstream.url(),
        &format!("test/{name}"),
        "1",
        Image::build(Format::Oci, layers),
    )
}
