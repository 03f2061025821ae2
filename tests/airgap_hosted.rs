//! `export` / `import` of hosted images: pushed into one stowage, carried in an OCI image
//! layout beside cached images, imported into another stowage's hosted storage (not its
//! cache), pulled back byte-exact with skopeo and plain HTTP, and kept under cache pressure.

mod support;

use support::images::{self, Format, Image, ImageIndex, Pushed};
use support::registry::Registry;
use support::stowage::{command, command_ok, pull_image, text, Stowage, UpstreamSpec};
use support::{files_under, http, manifest_accept, sha256_digest};

const KIB: usize = 1 << 10;

fn hosted_toml(max_size: &str) -> String {
    format!("[hosted]\nrepositories = [\"team/**\"]\nmax_size = \"{max_size}\"\n")
}

/// GET `path` of `s`: (status, body).
fn get(s: &Stowage, path: &str) -> (u16, Vec<u8>) {
    let r = http()
        .get(format!("{}{path}", s.url()))
        .header("accept", manifest_accept())
        .send()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = r.status().as_u16();
    (status, r.bytes().map(|b| b.to_vec()).unwrap_or_default())
}

/// Every manifest (by digest, and the top one by tag) and every blob of `p` is served by `s`
/// byte-exact.
fn assert_served_byte_exact(s: &Stowage, p: &Pushed) {
    let (status, body) = get(s, &format!("/v2/{}/manifests/{}", p.name, p.tag));
    assert_eq!(status, 200, "{}:{} by tag", p.name, p.tag);
    assert_eq!(
        body,
        p.manifest().bytes,
        "{}:{} manifest bytes",
        p.name,
        p.tag
    );
    for m in p.manifests() {
        let (status, body) = get(s, &format!("/v2/{}/manifests/{}", p.name, m.digest));
        assert_eq!(status, 200, "{}@{}", p.name, m.digest);
        assert_eq!(body, m.bytes, "{}@{} bytes", p.name, m.digest);
    }
    for b in p.blobs() {
        let (status, body) = get(s, &format!("/v2/{}/blobs/{}", p.name, b.digest));
        assert_eq!(status, 200, "{} blob {}", p.name, b.digest);
        assert_eq!(sha256_digest(&body), b.digest, "{} blob bytes", p.name);
    }
}

/// skopeo copies `name:tag` from `s` into a `dir:`; the blob hexes it wrote, verified.
fn skopeo_pull(s: &Stowage, name: &str, dest: &std::path::Path) -> Vec<String> {
    let src = format!("docker://{}/{name}", s.host_port());
    support::skopeo_ok(&["copy", &src, &format!("dir:{}", dest.display())], &src);
    let mut hexes = Vec::new();
    for e in std::fs::read_dir(dest).expect("read skopeo dir") {
        let e = e.expect("dir entry");
        let file = e.file_name().to_string_lossy().into_owned();
        if file.len() == 64 && file.bytes().all(|b| b.is_ascii_hexdigit()) {
            let bytes = std::fs::read(e.path()).expect("read blob");
            assert_eq!(sha256_digest(&bytes), format!("sha256:{file}"));
            hexes.push(file);
        }
    }
    hexes.sort();
    hexes
}

fn hexes(p: &Pushed) -> Vec<String> {
    let mut v: Vec<String> = p.blobs().iter().map(|b| b.hex().to_owned()).collect();
    v.sort();
    v
}

fn hosted_blob_files(s: &Stowage) -> Vec<std::path::PathBuf> {
    files_under(&s.data_dir().join("hosted/blobs"))
}

/// A stowage mirroring `upstream` and hosting `team/**` that holds a cached image
/// (`test/cached:1`), a pushed image (`team/app:1`) and a pushed two-platform Docker list
/// (`team/multi:2`); and the bundle `bundle.tar` of all three, exported through the running
/// serve's admin socket for the first two and by the stopped binary for the third (as a
/// directory, then both merged by a second export).
struct Seeded {
    work: tempfile::TempDir,
    cached: Pushed,
    app: Pushed,
    multi: Pushed,
    tar: String,
}

fn seed(upstream: &Registry) -> Seeded {
    let cached = images::push_test(upstream, "cached", &[24 * KIB]);
    let mut origin = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml(&hosted_toml("1GiB"))
        .start();
    pull_image(&origin, &cached);
    let app = images::push(
        &origin.url(),
        "team/app",
        "1",
        Image::build(Format::Oci, &[40 * KIB, 20 * KIB]),
    );
    let multi = images::push(
        &origin.url(),
        "team/multi",
        "2",
        ImageIndex::build(Format::Docker, &["amd64", "arm64"], &[8 * KIB]),
    );
    let work = tempfile::tempdir().expect("temp dir");
    let tar = work.path().join("bundle.tar").display().to_string();
    // Inside the running serve, through its admin socket.
    let out = command_ok(
        &origin,
        &["export", "team/app:1", "test/cached:1", "-o", &tar],
    );
    assert!(out.contains("export hosted team/app:1"), "{out}");
    // Standalone, on the stopped store.
    origin.stop();
    let layout = format!("{}/layout/", work.path().display());
    command_ok(&origin, &["export", "team/multi:2", "-o", &layout]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{layout}index.json")).expect("index.json"))
            .expect("index.json is JSON");
    let entries = index["manifests"].as_array().expect("manifests");
    let original = entries
        .iter()
        .find(|e| e["digest"] == multi.digest())
        .unwrap_or_else(|| panic!("no entry for the pushed list: {index}"));
    assert_eq!(
        original["annotations"]["org.opencontainers.image.ref.name"], "team/multi:2",
        "{index}"
    );
    assert_eq!(
        original["annotations"]["io.stowage.hosted"], "true",
        "{index}"
    );
    let all = format!("{}/all.tar", work.path().display());
    command_ok(
        &origin,
        &[
            "export",
            "team/app:1",
            "team/multi:2",
            "test/cached:1",
            "-o",
            &all,
        ],
    );
    Seeded {
        work,
        cached,
        app,
        multi,
        tar: all,
    }
}

#[test]
fn hosted_images_travel_beside_cached_ones_into_hosted_storage_and_outlive_cache_pressure() {
    let upstream = Registry::start();
    let s = seed(&upstream);

    // skopeo reads the hosted image from the bundle by the name clients push it by.
    let from_bundle = s.work.path().join("from-bundle");
    let src = format!("oci-archive:{}:team/app:1", s.tar);
    support::skopeo_ok(
        &["copy", &src, &format!("dir:{}", from_bundle.display())],
        &src,
    );
    let manifest = std::fs::read(from_bundle.join("manifest.json")).expect("manifest.json");
    assert_eq!(
        manifest,
        s.app.manifest().bytes,
        "skopeo read the pushed bytes"
    );

    // A fresh stowage hosting team/** with a cache far smaller than what it is about to see.
    let others: Vec<Pushed> = ["p1", "p2", "p3"]
        .iter()
        .map(|n| images::push_test(&upstream, n, &[48 * KIB]))
        .collect();
    let fresh = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .max_size("96KiB")
        .extra_toml(&hosted_toml("1GiB"))
        .start();
    let out = command_ok(&fresh, &["import", &s.tar]);
    assert!(
        out.contains("imported team/app:1")
            && out.contains("imported team/multi:2")
            && out.contains("imported docker.io/test/cached:1"),
        "{out}"
    );
    assert_eq!(
        out.matches("into hosted storage").count(),
        2,
        "the two hosted images go into hosted storage: {out}"
    );
    // Idempotent.
    let again = command_ok(&fresh, &["import", &s.tar]);
    assert_eq!(again.matches("already present").count(), 3, "{again}");

    // The hosted blobs are in hosted storage, not in the cache; the cached one in the cache.
    for b in s.app.blobs().iter().chain(s.multi.blobs().iter()) {
        assert!(
            !fresh.blob_path(&b.digest).exists(),
            "hosted blob {} went into the cache",
            b.digest
        );
    }
    let mut pushed: Vec<String> = s
        .app
        .blobs()
        .iter()
        .chain(s.multi.blobs().iter())
        .map(|b| b.hex().to_owned())
        .collect();
    pushed.sort();
    pushed.dedup();
    let mut held: Vec<String> = hosted_blob_files(&fresh)
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect();
    held.sort();
    assert_eq!(
        held, pushed,
        "hosted storage holds exactly the pushed blobs"
    );
    for b in s.cached.blobs() {
        assert!(
            fresh.blob_path(&b.digest).is_file(),
            "cached blob {}",
            b.digest
        );
    }

    assert_served_byte_exact(&fresh, &s.app);
    assert_served_byte_exact(&fresh, &s.multi);
    let dest = s.work.path().join("pulled-app");
    assert_eq!(skopeo_pull(&fresh, "team/app:1", &dest), hexes(&s.app));

    // Cache pressure: three more images through a 96 KiB cache evict the imported cached one;
    // the hosted images stay whole.
    for p in &others {
        pull_image(&fresh, p);
    }
    let evicted = s
        .cached
        .blobs()
        .iter()
        .any(|b| !fresh.blob_path(&b.digest).exists());
    assert!(evicted, "the cache was under pressure:\n{}", fresh.log());
    assert_served_byte_exact(&fresh, &s.app);
    assert_served_byte_exact(&fresh, &s.multi);
    let dest = s.work.path().join("pulled-app-after");
    assert_eq!(skopeo_pull(&fresh, "team/app:1", &dest), hexes(&s.app));
    let ls = command_ok(&fresh, &["ls"]);
    assert!(ls.contains("team/app") && ls.contains("team/multi"), "{ls}");
}

#[test]
fn a_hosted_import_is_refused_whole_when_it_does_not_fit_or_the_name_is_not_hosted() {
    let upstream = Registry::start();
    let s = seed(&upstream);

    // hosted.max_size far below the hosted images: nothing at all is imported.
    let mut small = Stowage::builder()
        .arg("--offline")
        .extra_toml(&hosted_toml("16KiB"))
        .start();
    small.stop();
    let o = command(&small, &["import", &s.tar]);
    let all = text(&o);
    assert!(
        !o.status.success() && all.contains("hosted.max_size") && all.contains("nothing"),
        "{all}"
    );
    assert!(hosted_blob_files(&small).is_empty(), "{all}");
    assert!(
        files_under(&small.data_dir().join("hosted/uploads")).is_empty(),
        "{all}"
    );
    for b in s.cached.blobs() {
        assert!(!small.blob_path(&b.digest).exists(), "refused whole: {all}");
    }
    small.restart();
    let (status, _) = get(&small, "/v2/team/app/manifests/1");
    assert_eq!(status, 404);

    // A stowage that does not host team/** refuses the bundle before writing anything.
    let mut mirror = Stowage::builder().arg("--offline").start();
    mirror.stop();
    let o = command(&mirror, &["import", &s.tar]);
    let all = text(&o);
    assert!(
        !o.status.success() && all.contains("hosted.repositories") && all.contains("team/"),
        "{all}"
    );
    for b in s.cached.blobs() {
        assert!(
            !mirror.blob_path(&b.digest).exists(),
            "refused whole: {all}"
        );
    }
}
