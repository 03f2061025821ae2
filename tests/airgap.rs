//! Air-gapped sites: `prefetch` (by itself or inside a live `serve`, through its admin
//! socket), `export` to an OCI image layout, `import`, `serve --offline`.
//!
//! Images are synthetic, pushed to a real upstream registry and pulled through stowage with plain
//! HTTP, skopeo and dockerd; the upstream's access log proves what reached it.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::clients::{assert_unpacked, docker_daemon_json, docker_inspect, image_files, Dockerd};
use support::fake_upstream::FakeUpstream;
use support::images::push_test;
use support::images::{self, Format, Image, ImageIndex, Pushed};
use support::registry::Registry;
use support::scrape::Scrape;
use support::stowage::{command, command_ok, pull_image, text, Stowage, UpstreamSpec};
use support::{http, manifest_accept, sha256_digest, wait_until};

const KIB: usize = 1 << 10;

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

#[test]
fn offline_serves_cached_tags_past_ttl_and_never_contacts_upstream() {
    let upstream = Registry::start();
    let cached = push_test(&upstream, "cached", &[64 * KIB, 32 * KIB]);
    let absent = push_test(&upstream, "absent", &[16 * KIB]);
    let mut stowage = Stowage::builder()
        .upstream(
            UpstreamSpec::new("docker.io", &upstream.url()).with_extra("manifest_ttl = \"0s\""),
        )
        .start();
    pull_image(&stowage, &cached);
    stowage.stop();
    stowage.push_arg("--offline");
    stowage.restart();

    let before = upstream_requests(&upstream);
    // manifest_ttl = 0 would revalidate every time online; offline serves the cached tag.
    pull_image(&stowage, &cached);
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
/// (amd64) of an OCI index, a Docker schema 2 image and one platform (amd64) of a Docker
/// manifest list.
struct Seeded {
    stowage: Stowage,
    single: Pushed,
    index: images::ImageIndex,
    docker: Pushed,
    docker_list: Pushed,
}

fn seeded(upstream: &Registry) -> Seeded {
    let single = push_test(upstream, "single", &[48 * KIB, 16 * KIB]);
    // Docker schema 2 types keep their type and digest through export and import.
    let docker = upstream.push(
        "test/dockerfmt",
        "1",
        Image::build(Format::Docker, &[24 * KIB]),
    );
    let docker_list = upstream.push(
        "test/dockerlist",
        "1",
        ImageIndex::build(Format::Docker, &["amd64", "arm64"], &[20 * KIB]),
    );
    let index = images::ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[32 * KIB]);
    upstream.push("test/multi", "1", index.clone());
    let mut stowage = Stowage::for_docker_io(&upstream.url());
    stowage.stop();
    command_ok(
        &stowage,
        &[
            "prefetch",
            "--pin",
            "test/single:1",
            "test/multi:1",
            "test/dockerfmt:1",
            "test/dockerlist:1",
        ],
    );
    Seeded {
        stowage,
        single,
        index,
        docker,
        docker_list,
    }
}

/// The manifest of a skopeo `dir:` copy.
fn dir_manifest(dir: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(dir.join("manifest.json")).expect("manifest.json of a dir: copy");
    serde_json::from_slice(&bytes).expect("manifest.json is JSON")
}

/// skopeo read a Docker-typed `image` out of a bundle: the OCI-typed copy `export` adds, naming
/// the image's own config and layers (so every blob it copied hashes to its digest).
fn assert_read_as_oci(dir: &std::path::Path, image: &Image, what: &str) {
    let m = dir_manifest(dir);
    assert_eq!(
        m["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "{what}: {m}"
    );
    assert_eq!(
        m["config"]["mediaType"], "application/vnd.oci.image.config.v1+json",
        "{what}"
    );
    assert_eq!(
        m["config"]["digest"],
        image.config.digest.as_str(),
        "{what}"
    );
    let layers: Vec<&str> = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            assert_eq!(
                l["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
                "{what}"
            );
            l["digest"].as_str().expect("layer digest")
        })
        .collect();
    let want: Vec<&str> = image
        .layers
        .iter()
        .map(|l| l.blob.digest.as_str())
        .collect();
    assert_eq!(layers, want, "{what}: the image's own layers");
    assert_eq!(
        verified_dir_blobs(dir),
        hexes(&image.blobs()),
        "{what}: config + layers"
    );
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
    let Seeded {
        stowage,
        single,
        index,
        docker,
        docker_list,
    } = seeded(&upstream);
    let amd64 = &index.children[0];
    let work = tempfile::tempdir().expect("temp dir");
    let tar = work.path().join("bundle.tar");
    let tar_arg = tar.display().to_string();
    let layout = format!("{}/layout/", work.path().display());
    let list = work.path().join("images.txt");
    std::fs::write(
        &list,
        "# images\ntest/multi:1\n\ntest/dockerfmt:1\ntest/dockerlist:1\n",
    )
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
            "test/dockerfmt:1",
            "test/dockerlist:1",
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

    // Docker schema 2 images, a manifest and a manifest list: skopeo's OCI transports only take
    // OCI-typed entries, so it reads the OCI-typed copy export writes beside the original.
    let docker_image = docker.platform("amd64");
    let docker_amd64 = docker_list.platform("amd64");
    for (transport, bundle) in [
        ("oci-archive", tar_arg.as_str()),
        ("oci", layout.trim_end_matches('/')),
    ] {
        for (name, image) in [("dockerfmt", docker_image), ("dockerlist", docker_amd64)] {
            let src = format!("{transport}:{bundle}:docker.io/test/{name}:1");
            let out = work.path().join(format!("{transport}-{name}"));
            support::skopeo_ok(&["copy", &src, &format!("dir:{}", out.display())], "");
            assert_read_as_oci(&out, image, &src);
        }
    }
    let index_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{layout}index.json")).expect("index.json"),
    )
    .expect("index.json is JSON");
    let entries = index_json["manifests"].as_array().expect("manifests");
    for pushed in [&docker, &docker_list] {
        let name = format!("docker.io/{}:1", pushed.name);
        let named: Vec<&serde_json::Value> = entries
            .iter()
            .filter(|e| e["annotations"]["org.opencontainers.image.ref.name"] == name.as_str())
            .collect();
        assert_eq!(
            named.len(),
            2,
            "{name}: the original and its OCI copy: {index_json}"
        );
        assert_eq!(
            named[0]["digest"],
            pushed.digest(),
            "{name}: the original first"
        );
        assert_eq!(named[0]["mediaType"], pushed.media_type(), "{name}");
        assert_eq!(
            named[1]["annotations"]["io.stowage.converted-from"],
            pushed.digest(),
            "{name}: the copy is marked"
        );
    }

    // Import into a fresh mirror with no upstream, pinned; a second import changes nothing.
    let mut fresh = fresh_offline();
    // Four images: the OCI-typed copies are not imported.
    let first = command_ok(&fresh, &["import", &tar_arg, "--pin"]);
    assert_eq!(first.matches("imported ").count(), 4, "{first}");
    let files = fresh.blob_files();
    let again = command_ok(&fresh, &["import", &tar_arg, "--pin"]);
    assert_eq!(again.matches("already present").count(), 4, "{again}");
    assert_eq!(fresh.blob_files(), files, "a re-import wrote blobs");
    let ls = command_ok(&fresh, &["ls"]);
    assert!(ls.contains("test/single"), "{ls}");

    fresh.restart();
    let out = work.path().join("served-single");
    let src = format!("docker://{}/test/single:1", fresh.host_port());
    assert_eq!(skopeo_copy_to_dir(&src, &out), hexes(&single.blobs()));
    // Docker-typed images come back with their own bytes, types and digests.
    for pushed in [&docker, &docker_list] {
        let url = format!("{}/v2/{}/manifests/1", fresh.url(), pushed.name);
        let r = http()
            .get(&url)
            .header("Accept", manifest_accept())
            .send()
            .expect("GET manifest");
        assert_eq!(r.status(), 200, "{url}");
        let digest = r.headers()["docker-content-digest"]
            .to_str()
            .expect("digest header")
            .to_owned();
        let content_type = r.headers()["content-type"]
            .to_str()
            .expect("type header")
            .to_owned();
        assert_eq!(digest, pushed.digest(), "{url}");
        assert_eq!(content_type, pushed.media_type(), "{url}");
        assert_eq!(
            sha256_digest(&r.bytes().expect("body")),
            pushed.digest(),
            "{url}"
        );
    }
    let out = work.path().join("served-dockerfmt");
    let src = format!("docker://{}/test/dockerfmt:1", fresh.host_port());
    assert_eq!(skopeo_copy_to_dir(&src, &out), hexes(&docker_image.blobs()));
    let out = work.path().join("served-multi");
    let src = format!("docker://{}/test/multi:1", fresh.host_port());
    assert_eq!(skopeo_copy_to_dir(&src, &out), hexes(&amd64.blobs()));
}

#[test]
fn tampered_or_truncated_bundle_is_rejected_naming_the_blob_and_nothing_is_visible() {
    let upstream = Registry::start();
    let Seeded {
        stowage, single, ..
    } = seeded(&upstream);
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

#[test]
fn import_pin_keeps_each_imported_image_whole_under_a_tight_budget() {
    let upstream = Registry::start();
    // Random layers do not compress: each image weighs about 600 KiB.
    let a = push_test(&upstream, "a", &[600 * KIB]);
    let b = push_test(&upstream, "b", &[600 * KIB]);
    let seeder = Stowage::for_docker_io(&upstream.url());
    pull_image(&seeder, &a);
    pull_image(&seeder, &b);
    let mut seeder = seeder;
    seeder.stop();
    let work = tempfile::tempdir().expect("temp dir");
    let tar = work.path().join("bundle.tar").display().to_string();
    command_ok(&seeder, &["export", "test/a:1", "test/b:1", "-o", &tar]);

    // Room for one image, not two: the second must not evict the first, pinned.
    let mut fresh = Stowage::builder().arg("--offline").max_size("1MiB").start();
    fresh.stop();
    let o = command(&fresh, &["import", &tar, "--pin"]);
    let all = text(&o);
    assert!(
        !o.status.success() && all.contains("test/b:1"),
        "b cannot fit beside pinned a: the import fails naming it: {all}"
    );
    for blob in a.blobs() {
        assert!(
            fresh.blob_path(&blob.digest).is_file(),
            "a, imported and pinned first, lost blob {}: {all}",
            blob.digest
        );
    }
    fresh.restart();
    // What is tagged is whole; b is not tagged at all.
    let out = work.path().join("a");
    let src = format!("docker://{}/test/a:1", fresh.host_port());
    assert_eq!(skopeo_copy_to_dir(&src, &out), hexes(&a.blobs()));
    let (status, body) = get(&format!("{}/v2/test/b/manifests/1", fresh.url()));
    assert_eq!(status, 404, "b was tagged without its blobs: {body}");
}

#[test]
fn export_refuses_an_index_none_of_whose_platforms_is_cached() {
    let upstream = Registry::start();
    let index = ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[4 * KIB]);
    upstream.push("test/bare", "1", index);
    let mut stowage = Stowage::for_docker_io(&upstream.url());
    // The index alone, as a client that reads it and stops there.
    let r = http()
        .get(format!("{}/v2/test/bare/manifests/1", stowage.url()))
        .header("Accept", manifest_accept())
        .send()
        .expect("GET index");
    assert_eq!(r.status(), 200);
    stowage.stop();
    let work = tempfile::tempdir().expect("temp dir");
    let tar = work.path().join("bundle.tar").display().to_string();
    let o = command(&stowage, &["export", "test/bare:1", "-o", &tar]);
    assert!(!o.status.success(), "an empty index exported: {}", text(&o));
    assert!(
        text(&o).contains("no platform of this index is cached"),
        "{}",
        text(&o)
    );
    assert!(!std::path::Path::new(&tar).exists(), "a bundle was written");
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
    let single = push_test(&upstream, "single", &[40 * KIB, 8 * KIB]);
    let index = images::ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[20 * KIB]);
    upstream.push("test/multi", "1", index.clone());
    let (amd64, arm64) = (&index.children[0], &index.children[1]);
    let mut stowage = Stowage::for_docker_io(&upstream.url());
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
    assert!(
        again.contains("0 blob(s) fetched, 3 already cached"),
        "{again}"
    );
    upstream.sync_log();
    assert_eq!(upstream.blob_gets(), before, "{again}");

    // The cache serves them.
    stowage.restart();
    pull_image(&stowage, &single);
}

/// Small real tar layers of distinct sizes, with matching diff_ids: dockerd unpacks them.
const CLIENT_LAYERS: &[usize] = &[3_000, 60_000];

#[test]
fn prefetched_images_carried_in_a_bundle_are_pulled_by_dockerd_and_skopeo_from_a_fresh_mirror() {
    let upstream = Registry::start();
    // dockerd uses mirrors for docker.io images only: push them under library/ to the registry
    // that stands for docker.io.
    let single_image = Image::build(Format::Docker, CLIENT_LAYERS);
    let single = upstream.push("library/single", "1", single_image);
    let multi = upstream.push(
        "library/multi",
        "1",
        ImageIndex::build(Format::Docker, &["amd64", "arm64"], CLIENT_LAYERS),
    );
    let ociapp = upstream.push(
        "library/ociapp",
        "1",
        ImageIndex::build(Format::Oci, &["amd64", "arm64"], CLIENT_LAYERS),
    );
    let mut seeder = Stowage::for_docker_io(&upstream.url());
    seeder.stop();
    let out = command_ok(
        &seeder,
        &[
            "prefetch",
            "--pin",
            "--platform",
            "linux/amd64",
            "single:1",
            "multi:1",
            "docker.io/library/ociapp:1",
        ],
    );
    assert!(out.contains("3 image(s) fetched, 0 failed"), "{out}");
    let work = tempfile::tempdir().expect("temp dir");
    let tar = work.path().join("bundle.tar").display().to_string();
    command_ok(
        &seeder,
        &["export", "single:1", "multi:1", "ociapp:1", "-o", &tar],
    );
    // The issue's own example: skopeo reads Docker Hub images, Docker-typed, straight from the
    // archive by their fully qualified names.
    for (name, image) in [
        ("single", single.platform("amd64")),
        ("multi", multi.platform("amd64")),
    ] {
        let src = format!("oci-archive:{tar}:docker.io/library/{name}:1");
        let out = work.path().join(format!("archive-{name}"));
        support::skopeo_ok(&["copy", &src, &format!("dir:{}", out.display())], "");
        assert_read_as_oci(&out, image, &src);
    }
    // Nothing upstream from here on: the fresh mirror has none configured, and this one is gone.
    drop(seeder);
    drop(upstream);

    let mut fresh = fresh_offline();
    let imported = command_ok(&fresh, &["import", &tar, "--pin"]);
    assert_eq!(imported.matches("imported ").count(), 3, "{imported}");
    fresh.restart();

    let images = [
        ("single", single.platform("amd64")),
        ("multi", multi.platform("amd64")),
        ("ociapp", ociapp.platform("amd64")),
    ];
    for (name, image) in images {
        let out = work.path().join(format!("skopeo-{name}"));
        let src = format!("docker://{}/library/{name}:1", fresh.host_port());
        assert_eq!(
            skopeo_copy_to_dir(&src, &out),
            hexes(&image.blobs()),
            "skopeo copy {src}: every blob, each hashing to its digest"
        );
    }

    let docker = Dockerd::start(&docker_daemon_json(&fresh));
    for (name, image) in images {
        // `single:1` = docker.io/library/single:1; Docker Hub is unreachable, so success means
        // the mirror answered.
        let reference = format!("{name}:1");
        docker.docker_ok(&["pull", &reference]);
        let what = format!("docker pull {reference}");
        let (id, architecture, layers, _) = docker_inspect(&docker, &reference);
        assert_eq!(id, image.config.digest, "{what}: image ID = config digest");
        assert_eq!(architecture, "amd64", "{what}");
        let diff_ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
        assert_eq!(layers, diff_ids, "{what}: RootFS.Layers = the diff_ids");
        assert_unpacked(&docker.data_root(), &image_files(image), &what);
    }
}

#[test]
fn prefetch_runs_inside_a_live_serve_through_its_admin_socket() {
    let upstream = Registry::start();
    let live = push_test(&upstream, "live", &[2 << 20, 16 * KIB]);
    let mut stowage = Stowage::for_docker_io(&upstream.url());
    let socket = stowage.data_dir().join("admin.sock");
    let mode = std::fs::metadata(&socket)
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()))
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the admin socket is for its owner only"
    );

    // A client pulls while the prefetch runs inside the server: whatever the interleaving,
    // each blob is fetched from upstream once (the fills are shared).
    let prefetch = {
        let args = ["prefetch", "--pin", "test/live:1"];
        let config = stowage.config_path();
        std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
                .args(args)
                .arg("--config")
                .arg(config)
                .output()
                .expect("run the stowage binary")
        })
    };
    pull_image(&stowage, &live);
    let o = prefetch.join().expect("prefetch thread");
    let out = text(&o);
    assert!(o.status.success(), "prefetch through the live serve: {out}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("prefetched docker.io/test/live:1: 1 manifest(s), 3 blob(s)"),
        "{out}"
    );
    assert!(stdout.contains("1 image(s) fetched, 0 failed"), "{out}");
    assert!(stdout.contains("pinned docker.io/test/live:1"), "{out}");
    // Not a terminal: plain progress lines instead of bars.
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("prefetch docker.io/test/live:1: 3 blob(s)"),
        "{out}"
    );
    assert!(
        stowage.log().contains("admin command"),
        "ran in the server: {}",
        stowage.log()
    );
    upstream.sync_log();
    for b in live.blobs() {
        assert_eq!(
            upstream.count_requests("GET", &format!("/blobs/{}", b.digest)),
            1,
            "upstream GETs of {}:\n{}",
            b.digest,
            upstream.access_log_lines().join("\n")
        );
    }

    // ls (and the pin) through the live server; the content is served with no upstream blob.
    assert_eq!(ls_pinned(&stowage, "docker.io/test/live:1"), Some(true));
    let before = upstream.blob_gets();
    pull_image(&stowage, &live);
    upstream.sync_log();
    assert_eq!(upstream.blob_gets(), before, "served from the cache");
    let out = command_ok(&stowage, &["unpin", "test/live:1"]);
    assert!(out.contains("unpinned docker.io/test/live:1"), "{out}");
    assert_eq!(ls_pinned(&stowage, "docker.io/test/live:1"), Some(false));

    // export and import run in the server too (paths resolved by the command line).
    let work = tempfile::tempdir().expect("temp dir");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["export", "test/live:1", "-o", "bundle.tar", "--config"])
        .arg(stowage.config_path())
        .current_dir(work.path())
        .output()
        .expect("run the stowage binary");
    assert!(o.status.success(), "export: {}", text(&o));
    let tar = work.path().join("bundle.tar").display().to_string();
    let out = command_ok(&stowage, &["import", &tar]);
    assert!(out.contains("already present"), "{out}");

    // Without an answering socket, a command works on the cache, which serve holds: it says so.
    std::fs::remove_file(&socket).expect("remove the admin socket");
    let o = command(&stowage, &["ls"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use by another stowage process"),
        "{}",
        text(&o)
    );

    // A restart makes a new socket; a clean stop removes it, and commands then work on the cache
    // directly.
    stowage.restart();
    assert!(socket.exists(), "no admin socket after a restart");
    let status = stowage.terminate(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "clean stop: {status:?}"
    );
    assert!(!socket.exists(), "the admin socket outlived serve");
    assert_eq!(ls_pinned(&stowage, "docker.io/test/live:1"), Some(false));
}

#[test]
fn a_stale_admin_socket_is_replaced_and_ignored() {
    let mut stowage = Stowage::builder().arg("--offline").start();
    stowage.stop();
    // serve was killed: its socket file stays behind, and nothing answers it.
    let socket = stowage.data_dir().join("admin.sock");
    assert!(socket.exists(), "a killed serve leaves its socket file");
    let out = command_ok(&stowage, &["ls"]);
    assert!(out.contains("0 blob(s)"), "{out}");
    stowage.restart();
    let out = command_ok(&stowage, &["ls"]);
    assert!(out.contains("0 blob(s)"), "{out}");
    assert!(
        stowage.log().contains("admin command"),
        "ls went through the new socket: {}",
        stowage.log()
    );
}

/// One raw HTTP/1.1 request on the admin socket: (status, body).
fn admin_post(socket: &std::path::Path, version: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect admin socket");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let version = version
        .map(|v| format!("Stowage-Version: {v}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST /v1/run HTTP/1.1\r\nHost: stowage-admin\r\nContent-Type: application/json\r\n\
         {version}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read answer");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn the_admin_socket_runs_commands_only_from_its_own_version() {
    let stowage = Stowage::builder().arg("--offline").start();
    let socket = stowage.data_dir().join("admin.sock");
    let own = env!("CARGO_PKG_VERSION");
    for (version, what) in [
        (Some("0.0.0-other"), "0.0.0-other"),
        (None, "no version sent"),
    ] {
        let (status, body) = admin_post(&socket, version, r#"{"command":"ls"}"#);
        assert_eq!(status, 409, "client version {version:?}: {body}");
        assert!(
            body.contains(&format!("stowage {own}")) && body.contains(what),
            "the refusal names both versions: {body}"
        );
    }
    assert!(
        !stowage.log().contains("command=Ls"),
        "a refused command ran: {}",
        stowage.log()
    );
    // Same version, not a request: 400, not a crash.
    let (status, body) = admin_post(&socket, Some(own), r#"{"command":"format_disk"}"#);
    assert_eq!(status, 400, "{body}");
    // The same version runs, through the socket.
    let (status, body) = admin_post(&socket, Some(own), r#"{"command":"ls"}"#);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("0 blob(s)") && body.contains(r#""event":"end""#),
        "{body}"
    );
    assert!(
        stowage.log().contains("command=Ls"),
        "the accepted command is logged (so its absence above means something): {}",
        stowage.log()
    );
    let out = command_ok(&stowage, &["ls"]);
    assert!(
        out.contains("0 blob(s)"),
        "the command line sends its version: {out}"
    );
}

#[test]
fn prefetch_takes_all_platforms_a_digest_reference_and_a_file_of_references() {
    let upstream = Registry::start();
    let index = ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[12 * KIB]);
    upstream.push("test/multi", "1", index.clone());
    let by_digest = push_test(&upstream, "bydigest", &[20 * KIB]);
    let a = push_test(&upstream, "fromfile-a", &[8 * KIB]);
    let b = push_test(&upstream, "fromfile-b", &[9 * KIB]);
    // Against a live serve: the flags travel through the admin socket.
    let stowage = Stowage::for_docker_io(&upstream.url());
    let cached =
        |blobs: Vec<&images::Blob>| blobs.iter().all(|b| stowage.blob_path(&b.digest).is_file());

    let out = command_ok(&stowage, &["prefetch", "--all-platforms", "test/multi:1"]);
    assert!(out.contains("3 manifest(s), 4 blob(s)"), "{out}");
    assert!(
        out.contains("1 image(s) fetched, 0 failed; 4 blob(s) fetched, 0 already cached"),
        "the summary: {out}"
    );
    for child in &index.children {
        assert!(
            cached(child.blobs()),
            "{} blobs cached: {out}",
            child.architecture
        );
    }

    let reference = format!("test/bydigest@{}", by_digest.digest());
    let out = command_ok(&stowage, &["prefetch", &reference]);
    assert!(
        out.contains(&format!(
            "prefetched docker.io/test/bydigest@{}",
            by_digest.digest()
        )),
        "{out}"
    );
    assert!(cached(by_digest.blobs()), "{out}");

    let work = tempfile::tempdir().expect("temp dir");
    let list = work.path().join("images.txt");
    std::fs::write(
        &list,
        "# to carry across\ntest/fromfile-a:1\n\n  docker.io/test/fromfile-b:1  \n",
    )
    .expect("write images.txt");
    let list = list.display().to_string();
    let out = command_ok(&stowage, &["prefetch", "--file", &list]);
    assert!(out.contains("2 image(s) fetched, 0 failed"), "{out}");
    assert!(cached(a.blobs()) && cached(b.blobs()), "{out}");
}

#[test]
fn a_bundle_without_oci_layout_or_of_another_layout_version_is_rejected() {
    let upstream = Registry::start();
    push_test(&upstream, "single", &[16 * KIB]);
    let mut stowage = Stowage::for_docker_io(&upstream.url());
    stowage.stop();
    command_ok(&stowage, &["prefetch", "test/single:1"]);
    let work = tempfile::tempdir().expect("temp dir");
    let layout = format!("{}/layout/", work.path().display());
    command_ok(&stowage, &["export", "test/single:1", "-o", &layout]);
    let fresh = fresh_offline();
    let marker = format!("{layout}oci-layout");

    std::fs::write(&marker, r#"{"imageLayoutVersion":"2.0.0"}"#).expect("write oci-layout");
    let o = command(&fresh, &["import", &layout]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        stderr.contains("not an OCI image layout") && stderr.contains("\"2.0.0\""),
        "{}",
        text(&o)
    );

    std::fs::remove_file(&marker).expect("remove oci-layout");
    let o = command(&fresh, &["import", &layout]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no oci-layout file"),
        "{}",
        text(&o)
    );
    // The same as a tar.
    let tar = work.path().join("no-layout.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&tar).expect("create tar"));
    builder
        .append_dir_all(".", layout.trim_end_matches('/'))
        .expect("tar the layout");
    builder.finish().expect("finish tar");
    let o = command(&fresh, &["import", &tar.display().to_string()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no oci-layout file"),
        "{}",
        text(&o)
    );
    assert!(fresh.blob_files().is_empty(), "{:?}", fresh.blob_files());
}

#[test]
fn stopping_serve_interrupts_a_prefetch_running_in_it_and_the_command_says_so() {
    let fake = FakeUpstream::start();
    let image = Image::build(Format::Oci, &[8 * KIB]);
    for b in image.blobs() {
        fake.add_blob("test/held", b.bytes.clone());
    }
    fake.add_manifest(
        "test/held",
        "1",
        &image.manifest.media_type,
        image.manifest.bytes.clone(),
    );
    let layer = image.layers[0].blob.digest.clone();
    fake.hold_blob(&layer);
    let mut stowage = Stowage::for_docker_io(&fake.url());
    let socket = stowage.data_dir().join("admin.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["prefetch", "test/held:1", "--config"])
        .arg(stowage.config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the stowage binary");
    // The layer's fill is in flight inside serve: the upstream holds its answer.
    assert!(
        wait_until(Duration::from_secs(60), || {
            Scrape::get(&stowage.url()).value("stowage_fills_in_flight", &[]) == 1.0
        }),
        "the prefetch never started the layer's fill in serve"
    );
    let status = stowage.terminate(Duration::from_secs(60));
    let o = child.wait_with_output().expect("wait for prefetch");
    fake.release_blob(&layer);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("serve is stopping"),
        "{}",
        text(&o)
    );
    assert!(status.is_some(), "serve did not stop on SIGTERM");
    assert!(!socket.exists(), "the admin socket outlived serve");
}
