//! Air-gapped sites (issue 8): `serve --offline`, `export` to an OCI image layout, `import`.
//!
//! Images are synthetic, pushed to a real upstream registry and pulled through stowage with plain
//! HTTP; the upstream's access log proves that an offline mirror never contacts it.

mod support;

use std::process::Output;

use support::images::{self, Format, Image, Pushed};
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{http, manifest_accept, sha256_digest};

const KIB: usize = 1 << 10;

fn push(upstream: &Registry, name: &str, layers: &[usize]) -> Pushed {
    images::push(
        &upstream.url(),
        &format!("test/{name}"),
        "1",
        Image::build(Format::Oci, layers),
    )
}

/// Pulls an image through stowage: manifest by tag, then every blob, checking each blob's bytes.
fn pull(stowage: &Stowage, p: &Pushed) {
    let c = http();
    let url = format!("{}/v2/{}/manifests/{}", stowage.url(), p.name, p.tag);
    let r = c
        .get(&url)
        .header("accept", manifest_accept())
        .send()
        .expect("GET manifest");
    assert_eq!(r.status().as_u16(), 200, "GET {url}");
    let body = r.bytes().expect("manifest body");
    assert_eq!(sha256_digest(&body), p.digest(), "manifest bytes of {url}");
    for b in p.blobs() {
        let url = format!("{}/v2/{}/blobs/{}", stowage.url(), p.name, b.digest);
        let r = http().get(&url).send().expect("GET blob");
        assert_eq!(r.status().as_u16(), 200, "GET {url}");
        let bytes = r.bytes().expect("blob body");
        assert_eq!(sha256_digest(&bytes), b.digest, "bytes of {}", b.digest);
    }
}

/// GET `url`: (status, body text).
fn get(url: &str) -> (u16, String) {
    let r = http()
        .get(url)
        .header("accept", manifest_accept())
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().unwrap_or_default())
}

fn upstream_requests(upstream: &Registry) -> usize {
    upstream.sync_log();
    upstream.access_log().len()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn offline_serves_cached_tags_past_ttl_and_never_contacts_upstream() {
    let upstream = Registry::start();
    let cached = push(&upstream, "cached", &[64 * KIB, 32 * KIB]);
    let absent = push(&upstream, "absent", &[16 * KIB]);
    let mut stowage = Stowage::builder()
        .upstream(
            UpstreamSpec::new("docker.io", &upstream.url()).with_extra("manifest_ttl = \"0s\""),
        )
        .start();
    pull(&stowage, &cached);
    stowage.stop();
    stowage.push_arg("--offline");
    stowage.restart();

    let before = upstream_requests(&upstream);
    // manifest_ttl = 0 would revalidate every time online; offline serves the cached tag.
    pull(&stowage, &cached);
    let (status, body) = get(&format!("{}/readyz", stowage.url()));
    assert_eq!(status, 200, "offline readiness: {body}");
    assert!(
        body.contains("\"offline\":true"),
        "offline readiness: {body}"
    );
    let (status, body) = get(&format!("{}/v2/test/cached/tags/list", stowage.url()));
    assert_eq!(status, 200, "offline tag list: {body}");
    assert!(body.contains("\"1\""), "offline tag list: {body}");

    // The upstream has these, but an offline mirror does not ask.
    let base = stowage.url();
    for url in [
        format!("{base}/v2/test/absent/manifests/1"),
        format!("{base}/v2/test/absent/manifests/{}", absent.digest()),
        format!("{base}/v2/test/absent/blobs/{}", absent.blobs()[0].digest),
        format!("{base}/v2/test/absent/tags/list"),
    ] {
        let (status, body) = get(&url);
        assert_eq!(status, 404, "GET {url}: {body}");
        assert!(body.contains("offline"), "GET {url} says why: {body}");
    }
    assert_eq!(
        upstream_requests(&upstream),
        before,
        "an offline mirror contacted the upstream:\n{}",
        upstream.access_log_lines().join("\n")
    );
}

/// Runs `stowage <args> --config <stowage's config>` (the server must be stopped).
fn command(stowage: &Stowage, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(args)
        .arg("--config")
        .arg(stowage.config_path())
        .output()
        .expect("run the stowage binary")
}

fn command_ok(stowage: &Stowage, args: &[&str]) -> String {
    let o = command(stowage, args);
    assert!(o.status.success(), "stowage {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every file of a skopeo `dir:` copy whose name is a digest hex hashes to that name; returns
/// the hexes.
fn verified_dir_blobs(dir: &std::path::Path) -> Vec<String> {
    let mut hexes = Vec::new();
    for e in std::fs::read_dir(dir).expect("read skopeo dir") {
        let e = e.expect("dir entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            let bytes = std::fs::read(e.path()).expect("read blob");
            assert_eq!(
                sha256_digest(&bytes),
                format!("sha256:{name}"),
                "{}",
                e.path().display()
            );
            hexes.push(name);
        }
    }
    hexes.sort();
    hexes
}

fn skopeo_copy_to_dir(src: &str, dest: &std::path::Path) -> Vec<String> {
    let dest_arg = format!("dir:{}", dest.display());
    support::skopeo_ok(&["copy", src, &dest_arg], "");
    verified_dir_blobs(dest)
}

fn hexes(blobs: &[&images::Blob]) -> Vec<String> {
    let mut v: Vec<String> = blobs.iter().map(|b| b.hex().to_owned()).collect();
    v.sort();
    v
}

/// A stopped cache holding (prefetched, pinned) a single-platform OCI image, one platform
/// (amd64) of an OCI index and a Docker schema 2 image.
fn seeded(upstream: &Registry) -> (Stowage, Pushed, images::ImageIndex) {
    let single = push(upstream, "single", &[48 * KIB, 16 * KIB]);
    // Docker schema 2 types keep their type and digest through export and import.
    images::push(
        &upstream.url(),
        "test/dockerfmt",
        "1",
        Image::build(Format::Docker, &[24 * KIB]),
    );
    let index = images::ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[32 * KIB]);
    images::push(&upstream.url(), "test/multi", "1", index.clone());
    let mut stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .start();
    stowage.stop();
    command_ok(
        &stowage,
        &[
            "prefetch",
            "--pin",
            "test/single:1",
            "test/multi:1",
            "test/dockerfmt:1",
        ],
    );
    (stowage, single, index)
}

/// A fresh, stopped stowage with no upstream configured, for `--offline` serving.
fn fresh_offline() -> Stowage {
    let mut s = Stowage::builder().arg("--offline").start();
    s.stop();
    s
}

#[test]
fn export_is_read_by_skopeo_and_import_serves_offline_with_every_digest_verified() {
    let upstream = Registry::start();
    let (stowage, single, index) = seeded(&upstream);
    let amd64 = &index.children[0];
    let work = tempfile::tempdir().expect("temp dir");
    let tar = work.path().join("bundle.tar");
    let tar_arg = tar.display().to_string();
    let layout = format!("{}/layout/", work.path().display());
    let list = work.path().join("images.txt");
    std::fs::write(&list, "# images\ntest/multi:1\n\ntest/dockerfmt:1\n")
        .expect("write images.txt");
    let list_arg = list.display().to_string();
    command_ok(
        &stowage,
        &[
            "export",
            "test/single:1",
            "--file",
            &list_arg,
            "-o",
            &tar_arg,
        ],
    );
    command_ok(
        &stowage,
        &[
            "export",
            "docker.io/test/single:1",
            "test/multi:1",
            "-o",
            &layout,
        ],
    );

    // The index names the images fully qualified.
    let index_json = std::fs::read_to_string(format!("{layout}index.json")).expect("index.json");
    assert!(
        index_json.contains("\"docker.io/test/single:1\""),
        "{index_json}"
    );
    assert!(
        index_json.contains("\"docker.io/test/multi:1\""),
        "{index_json}"
    );

    // skopeo reads the archive and the directory.
    let out = work.path().join("from-archive");
    let got = skopeo_copy_to_dir(
        &format!("oci-archive:{tar_arg}:docker.io/test/single:1"),
        &out,
    );
    assert_eq!(
        got,
        hexes(&single.blobs()),
        "blobs skopeo read from the archive"
    );
    let out = work.path().join("from-layout");
    let got = skopeo_copy_to_dir(
        &format!(
            "oci:{}:docker.io/test/multi:1",
            layout.trim_end_matches('/')
        ),
        &out,
    );
    assert_eq!(
        got,
        hexes(&amd64.blobs()),
        "amd64 blobs skopeo read from the layout"
    );

    // Import into a fresh mirror with no upstream, pinned; a second import changes nothing.
    let mut fresh = fresh_offline();
    let first = command_ok(&fresh, &["import", &tar_arg, "--pin"]);
    assert_eq!(first.matches("imported ").count(), 3, "{first}");
    let files = fresh.blob_files();
    let again = command_ok(&fresh, &["import", &tar_arg, "--pin"]);
    assert_eq!(again.matches("already present").count(), 3, "{again}");
    assert_eq!(fresh.blob_files(), files, "a re-import wrote blobs");
    let ls = command_ok(&fresh, &["ls"]);
    assert!(ls.contains("test/single"), "{ls}");

    fresh.restart();
    let out = work.path().join("served-single");
    let src = format!("docker://{}/test/single:1", fresh.host_port());
    assert_eq!(skopeo_copy_to_dir(&src, &out), hexes(&single.blobs()));
    let out = work.path().join("served-dockerfmt");
    let src = format!("docker://{}/test/dockerfmt:1", fresh.host_port());
    assert_eq!(skopeo_copy_to_dir(&src, &out).len(), 2, "config + layer");
    let out = work.path().join("served-multi");
    let src = format!("docker://{}/test/multi:1", fresh.host_port());
    assert_eq!(skopeo_copy_to_dir(&src, &out), hexes(&amd64.blobs()));
}

#[test]
fn tampered_or_truncated_bundle_is_rejected_naming_the_blob_and_nothing_is_visible() {
    let upstream = Registry::start();
    let (stowage, single, _) = seeded(&upstream);
    let work = tempfile::tempdir().expect("temp dir");
    let layout = format!("{}/layout/", work.path().display());
    let tar = work.path().join("bundle.tar");
    let tar_arg = tar.display().to_string();
    command_ok(&stowage, &["export", "test/single:1", "-o", &layout]);
    command_ok(&stowage, &["export", "test/single:1", "-o", &tar_arg]);

    // One layer with a byte flipped.
    let layer = &single.image.blobs()[1].digest;
    let layer_hex = layer.trim_start_matches("sha256:");
    let path = format!("{layout}blobs/sha256/{layer_hex}");
    let mut bytes = std::fs::read(&path).expect("read exported layer");
    bytes[100] ^= 0xff;
    std::fs::write(&path, bytes).expect("tamper");

    let mut fresh = fresh_offline();
    let o = command(&fresh, &["import", &layout]);
    assert!(
        !o.status.success(),
        "tampered import succeeded: {}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(layer.as_str()),
        "the error names {layer}: {}",
        text(&o)
    );

    // A tar cut short.
    let len = std::fs::metadata(&tar).expect("tar size").len();
    let cut = work.path().join("cut.tar");
    let bytes = std::fs::read(&tar).expect("read tar");
    std::fs::write(&cut, &bytes[..(len as usize) * 2 / 3]).expect("write cut tar");
    let o = command(&fresh, &["import", &cut.display().to_string()]);
    assert!(
        !o.status.success(),
        "truncated import succeeded: {}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sha256:"),
        "the error names a blob: {}",
        text(&o)
    );

    fresh.restart();
    let (status, body) = get(&format!("{}/v2/test/single/manifests/1", fresh.url()));
    assert_eq!(
        status, 404,
        "a failed import left the image visible: {body}"
    );
    assert!(
        fresh.blob_files().is_empty(),
        "a failed import stored blobs: {:?}",
        fresh.blob_files()
    );
    fresh.stop();

    // The intact tar imports.
    let o = command_ok(&fresh, &["import", &tar_arg]);
    assert!(o.contains("imported docker.io/test/single:1"), "{o}");
}

/// The `ls` line of `name` ends with its pin state.
fn ls_pinned(stowage: &Stowage, name: &str) -> Option<bool> {
    let ls = command_ok(stowage, &["ls"]);
    ls.lines()
        .find(|l| l.starts_with(name))
        .map(|l| l.trim_end().ends_with("yes"))
}

#[test]
fn prefetch_fetches_selected_platforms_pins_and_reports_unknown_images() {
    let upstream = Registry::start();
    let single = push(&upstream, "single", &[40 * KIB, 8 * KIB]);
    let index = images::ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[20 * KIB]);
    images::push(&upstream.url(), "test/multi", "1", index.clone());
    let (amd64, arm64) = (&index.children[0], &index.children[1]);
    let mut stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .start();
    stowage.stop();

    let o = command(
        &stowage,
        &[
            "prefetch",
            "test/single:1",
            "test/nope:1",
            "test/multi:1",
            "--platform",
            "linux/amd64",
            "--pin",
        ],
    );
    let out = text(&o);
    assert!(!o.status.success(), "an unknown image must fail: {out}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("docker.io/test/nope:1"),
        "names the unknown image: {out}"
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("prefetched docker.io/test/single:1"),
        "{out}"
    );
    assert!(
        stdout.contains("prefetched docker.io/test/multi:1"),
        "{out}"
    );
    assert!(stdout.contains("2 image(s) fetched, 1 failed"), "{out}");
    for b in single.blobs().into_iter().chain(amd64.blobs()) {
        assert!(
            stowage.blob_path(&b.digest).exists(),
            "{} cached: {out}",
            b.digest
        );
    }
    for b in arm64.layers.iter().map(|l| &l.blob) {
        assert!(
            !stowage.blob_path(&b.digest).exists(),
            "arm64 {} fetched: {out}",
            b.digest
        );
    }
    assert_eq!(ls_pinned(&stowage, "docker.io/test/single:1"), Some(true));
    assert_eq!(ls_pinned(&stowage, "docker.io/test/multi:1"), Some(true));

    // Everything is held now: a second run fetches no blob.
    upstream.sync_log();
    let before = upstream.blob_gets();
    let again = command_ok(&stowage, &["prefetch", "test/single:1"]);
    assert!(again.contains("3 blob(s) (3 already cached)"), "{again}");
    upstream.sync_log();
    assert_eq!(upstream.blob_gets(), before, "{again}");

    // The cache serves them.
    stowage.restart();
    pull(&stowage, &single);
}
