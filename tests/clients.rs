//! The real clients people point at a mirror, end to end against real `docker-registry`
//! upstreams: dockerd (`registry-mirrors`), containerd (`ctr images pull --hosts-dir`), podman
//! and skopeo (`registries.conf` mirrors).
//!
//! Run alone with `cargo test --test clients`. Each test starts its own upstreams, its own
//! stowage and its own client daemon (own temp root, socket, port), all stopped by drop guards.
//!
//! The world: stowage with two upstreams, `docker.io` (the default) and `ghcr.io`, each a real
//! `docker-registry` holding synthetic images whose layers are real gzip tars and whose configs
//! carry the right `diff_ids`, so the clients unpack them (dockerd and containerd verify the
//! diff_ids while unpacking). Docker Hub and ghcr.io are unreachable from this machine, so a
//! client that falls back past the mirror fails: a successful pull proves the mirror answered,
//! and the upstreams' access logs and stowage's request log prove which way each blob went.
//!
//! For every client the second pull of the same image, after removing it from the client,
//! must reach the upstream with no blob request, while the client really downloads the blobs
//! again from stowage.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use support::clients::{
    assert_unpacked, containerd_hosts_toml, containerd_override_path_hosts_toml,
    docker_daemon_json, docker_inspect, image_files, image_inspect, layer_files, registries_conf,
    stowage_blob_gets, stowage_requests, unpacked_test_files, Containerd, ContainersEnv, Dockerd,
};
use support::images::{self, Blob, Format, Image, ImageIndex, Layer, Manifest, Pushed, TestImage};
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{sha256_digest, sha256_hex, wait_until};

/// Two real upstreams behind one stowage.
struct World {
    hub: Registry,
    ghcr: Registry,
    stowage: Stowage,
}

fn world() -> World {
    let hub = Registry::start();
    let ghcr = Registry::start();
    let stowage = Stowage::start(&[
        UpstreamSpec::new("docker.io", &hub.url()),
        UpstreamSpec::new("ghcr.io", &ghcr.url()),
    ]);
    World { hub, ghcr, stowage }
}

/// Small layers with distinct sizes (so each layer's unpacked files are recognisable).
const SMALL: &[usize] = &[3_000, 200_000];

/// The single-platform image a pull of `pushed` on linux/amd64 selects.
fn amd64(pushed: &Pushed) -> &Image {
    pushed.platform("amd64")
}

fn arch<'a>(pushed: &'a Pushed, architecture: &str) -> &'a Image {
    pushed.platform(architecture)
}

fn upstream_blob_gets(upstream: &Registry, digest: &str) -> usize {
    upstream.count_requests("GET", &format!("/blobs/{digest}"))
}

/// After a client's first pull of `image`: stowage served every blob of it (its request log has
/// a GET for each) and fetched each from `upstream` (its access log has a GET for each), and
/// every blob is committed in stowage's cache before the test goes on.
fn assert_fetched_through_stowage(w: &World, upstream: &Registry, image: &Image, what: &str) {
    for blob in image.blobs() {
        assert!(
            stowage_blob_gets(&w.stowage, &blob.digest) >= 1,
            "{what}: the client never asked stowage for blob {}; stowage requests: {:#?}",
            blob.digest,
            stowage_requests(&w.stowage)
        );
        assert!(
            upstream_blob_gets(upstream, &blob.digest) >= 1,
            "{what}: blob {} never reached the upstream through stowage; upstream requests: {:#?}",
            blob.digest,
            upstream.access_log_lines()
        );
    }
    let committed = wait_until(Duration::from_secs(60), || {
        image
            .blobs()
            .iter()
            .all(|b| w.stowage.blob_path(&b.digest).is_file())
    });
    assert!(
        committed,
        "{what}: not every blob was committed to stowage's cache after the first pull; files: {:#?}",
        w.stowage.blob_files()
    );
}

/// What the second pull is compared against.
struct BeforeRepull {
    upstream_blob_gets: usize,
    upstream_lines: usize,
    stowage_gets: BTreeMap<String, usize>,
}

fn blobs_of<'a>(images: &[&'a Image]) -> Vec<&'a Blob> {
    images.iter().flat_map(|i| i.blobs()).collect()
}

/// The second half of every client test, after the client removed what it pulled: nothing of
/// it stays unpacked under `root` (else the second pull would prove nothing), then `pull`
/// downloads every blob of `images` again from stowage, and not one blob request reaches
/// either upstream.
fn repull_from_cache(
    w: &World,
    images: &[&Image],
    root: Option<&Path>,
    what: &str,
    pull: impl FnOnce(),
) {
    if let Some(root) = root {
        assert_nothing_unpacked(root, &format!("removing after {what}"));
    }
    let before = BeforeRepull {
        upstream_blob_gets: w.hub.blob_gets() + w.ghcr.blob_gets(),
        upstream_lines: w.hub.access_log_lines().len() + w.ghcr.access_log_lines().len(),
        stowage_gets: blobs_of(images)
            .iter()
            .map(|b| (b.digest.clone(), stowage_blob_gets(&w.stowage, &b.digest)))
            .collect(),
    };
    pull();
    let what = format!("second {what}");
    for blob in blobs_of(images) {
        let now = stowage_blob_gets(&w.stowage, &blob.digest);
        assert!(
            now > before.stowage_gets[&blob.digest],
            "{what}: the second pull did not download blob {} from stowage again (the client kept it?), so it proves nothing; stowage requests: {:#?}",
            blob.digest,
            stowage_requests(&w.stowage)
        );
    }
    let gets = w.hub.blob_gets() + w.ghcr.blob_gets();
    if gets != before.upstream_blob_gets {
        let mut lines = w.hub.access_log_lines();
        lines.extend(w.ghcr.access_log_lines());
        panic!(
            "{what}: the second pull sent {} blob request(s) upstream; upstream requests since the first pull (hub then ghcr): {:#?}",
            gets - before.upstream_blob_gets,
            &lines[before.upstream_lines.min(lines.len())..]
        );
    }
}

/// No request for `repo` (a ghcr.io repository) reached the docker.io upstream.
fn assert_nothing_reached_hub(w: &World, repo: &str) {
    let lines: Vec<String> = w
        .hub
        .access_log_lines()
        .into_iter()
        .filter(|l| l.contains(repo))
        .collect();
    assert!(
        lines.is_empty() && w.hub.blob_gets() == 0,
        "nothing for ghcr.io/{repo} may reach the docker.io upstream: {:#?}",
        w.hub.access_log_lines()
    );
}

fn assert_nothing_unpacked(root: &Path, what: &str) {
    let left = unpacked_test_files(root);
    assert!(
        left.is_empty(),
        "{what}: after removing the image the client still has its layers unpacked, so a second pull would prove nothing: {left:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The scenario every client runs: pull through the mirror, remove, pull again from the cache
// ---------------------------------------------------------------------------------------------

/// What the shared scenario needs of a client that unpacks images (dockerd, containerd,
/// podman): pull and check it holds exactly the pushed image, remove it, and where it unpacks.
trait Client {
    /// Pulls `reference` and checks the client holds `image` of `pushed`, unpacked.
    fn pull_and_verify(&self, reference: &str, pushed: &Pushed, image: &Image);
    /// Removes `reference` (and its layers) from the client.
    fn remove(&self, reference: &str);
    /// Where the client unpacks layers.
    fn unpack_root(&self) -> PathBuf;
}

/// Pushes a small image (`build`) to `upstream` as `repo:tag`; returns it and its amd64 image.
fn push_small(
    upstream: &Registry,
    repo: &str,
    tag: &str,
    build: impl Into<TestImage>,
) -> (Pushed, Image) {
    let pushed = upstream.push(repo, tag, build);
    let image = amd64(&pushed).clone();
    (pushed, image)
}

/// The first pull: `client` pulls `reference` and holds `image`, whose every blob stowage
/// served and fetched from `upstream`.
fn first_pull(
    w: &World,
    client: &impl Client,
    upstream: &Registry,
    (reference, pushed, image): (&str, &Pushed, &Image),
    what: &str,
) {
    client.pull_and_verify(reference, pushed, image);
    assert_fetched_through_stowage(w, upstream, image, what);
}

/// The second pull: `client` removes `reference`, then pulls it again from stowage's cache
/// alone (see [`repull_from_cache`]).
fn remove_and_repull(
    w: &World,
    client: &impl Client,
    (reference, pushed, image): (&str, &Pushed, &Image),
    what: &str,
) {
    client.remove(reference);
    let root = client.unpack_root();
    repull_from_cache(w, &[image], Some(&root), what, || {
        client.pull_and_verify(reference, pushed, image)
    });
}

/// One image a scenario pushes and pulls: `repo:tag` built as `build` on `upstream`, pulled
/// by the client as `reference`.
struct Pull<'a> {
    upstream: &'a Registry,
    repo: &'static str,
    tag: &'static str,
    build: TestImage,
    reference: &'a str,
}

/// `library/alpine:3.19`, a small single-platform Docker image on the docker.io upstream.
fn hub_alpine<'a>(w: &'a World, reference: &'a str) -> Pull<'a> {
    let build = Image::build(Format::Docker, SMALL).into();
    Pull {
        upstream: &w.hub,
        repo: "library/alpine",
        tag: "3.19",
        build,
        reference,
    }
}

/// `acme/tool:1.0` on the ghcr.io upstream, pulled as `ghcr.io/acme/tool:1.0`.
fn ghcr_tool(w: &World, build: impl Into<TestImage>) -> Pull<'_> {
    let build = build.into();
    let reference = "ghcr.io/acme/tool:1.0";
    Pull {
        upstream: &w.ghcr,
        repo: "acme/tool",
        tag: "1.0",
        build,
        reference,
    }
}

/// The scenario every unpacking client runs once per upstream: push `pull`, pull it through
/// the mirror ([`first_pull`], named `what[0]`), run the client's own `checks`, then remove it
/// and pull it again from the cache alone ([`remove_and_repull`], named `what[1]`).
fn pull_twice(w: &World, client: &impl Client, pull: Pull, what: [&str; 2], checks: impl FnOnce()) {
    let (pushed, image) = push_small(pull.upstream, pull.repo, pull.tag, pull.build);
    let image_pull = (pull.reference, &pushed, &image);
    first_pull(w, client, pull.upstream, image_pull, what[0]);
    checks();
    remove_and_repull(w, client, image_pull, what[1]);
}

/// [`pull_twice`] of [`hub_alpine`] as `docker.io/library/alpine:3.19`, by `who` (`ctr`,
/// `podman`).
fn hub_alpine_pulled_twice(w: &World, client: &impl Client, who: &str, checks: impl FnOnce()) {
    let pull = hub_alpine(w, "docker.io/library/alpine:3.19");
    let what = [
        format!("{who} pull docker.io/library/alpine"),
        format!("{who} pull of alpine"),
    ];
    pull_twice(w, client, pull, [&what[0], &what[1]], checks);
}

/// [`pull_twice`] of [`ghcr_tool`] as an index of `format` for amd64 and arm64, by `who`; not a
/// request for it may reach the docker.io upstream.
fn ghcr_index_pulled_twice(
    w: &World,
    client: &impl Client,
    format: Format,
    who: &str,
    checks: impl FnOnce(),
) {
    let pull = ghcr_tool(w, ImageIndex::build(format, &["amd64", "arm64"], SMALL));
    let what = [
        format!("{who} pull ghcr.io/acme/tool"),
        format!("{who} pull of ghcr.io/acme/tool"),
    ];
    pull_twice(w, client, pull, [&what[0], &what[1]], || {
        checks();
        assert_nothing_reached_hub(w, "acme/tool");
    });
}

/// stowage logged a `200` for `path`: `who` asked the mirror for it.
fn assert_asked_mirror_for(w: &World, path: &str, who: &str) {
    let requests = stowage_requests(&w.stowage);
    assert!(
        requests.iter().any(|l| l.path == path && l.status == 200),
        "{who} should ask the mirror for {path}; stowage requests: {requests:#?}"
    );
}

/// Every repository request stowage logged addressed it as `127.0.0.1:<port>/<prefix>/...`.
fn assert_prefix_style(w: &World, prefix: &str, who: &str) {
    let requests = stowage_requests(&w.stowage);
    assert!(
        requests
            .iter()
            .filter(|l| l.path.starts_with("/v2/") && l.path != "/v2/")
            .all(|l| l.path.starts_with(&format!("/v2/{prefix}/"))),
        "{who} should address stowage as 127.0.0.1:<port>/{prefix}: {requests:#?}"
    );
}

/// The checks of `image` a client's inspect output must pass: the ID is the pushed config's
/// digest and the RootFS layers are the diff_ids.
fn assert_id_and_layers(id: &str, layers: &[String], image: &Image, what: &str) {
    assert_eq!(
        id, image.config.digest,
        "{what}: image ID is not the pushed config's digest"
    );
    let diff_ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(
        layers, diff_ids,
        "{what}: RootFS.Layers are not the diff_ids"
    );
}

// ---------------------------------------------------------------------------------------------
// dockerd
// ---------------------------------------------------------------------------------------------

/// `docker pull <reference> [--platform p]` through the mirror, then checks that dockerd holds
/// exactly `image` (config digest = image ID, diff_ids = RootFS layers, the manifest digest that
/// was pushed) and unpacked all of its `files`.
fn docker_pull_and_verify(
    docker: &Dockerd,
    reference: &str,
    platform: Option<&str>,
    pushed: &Pushed,
    image: &Image,
    files: &[(String, u64)],
) {
    let mut args = vec!["pull"];
    if let Some(p) = platform {
        args.extend(["--platform", p]);
    }
    args.push(reference);
    docker.docker_ok(&args);
    let what = format!("docker pull {reference} ({})", image.architecture);
    let (id, architecture, layers, repo_digests) = docker_inspect(docker, reference);
    assert_id_and_layers(&id, &layers, image, &what);
    assert_eq!(architecture, image.architecture, "{what}: architecture");
    // dockerd 20.10 keeps `repo@<list digest>` on the image that got it first, so after a
    // default-platform pull the `--platform` pull of another child has no RepoDigests.
    if platform.is_none() {
        let repo = pushed.name.trim_start_matches("library/");
        let expected_repo_digest = format!("{repo}@{}", pushed.digest());
        assert!(
            repo_digests.contains(&expected_repo_digest),
            "{what}: RepoDigests {repo_digests:?} should contain {expected_repo_digest} (the pushed manifest's digest)"
        );
    }
    assert_unpacked(&docker.data_root(), files, &what);
}

/// dockerd pulls the default platform and unpacks every file of the image's layers.
impl Client for Dockerd {
    fn pull_and_verify(&self, reference: &str, pushed: &Pushed, image: &Image) {
        docker_pull_and_verify(self, reference, None, pushed, image, &image_files(image));
    }

    fn remove(&self, reference: &str) {
        self.docker_ok(&["rmi", reference]);
    }

    fn unpack_root(&self) -> PathBuf {
        self.data_root()
    }
}

struct DockerWorld {
    docker: Dockerd,
    w: World,
}

fn docker_world() -> DockerWorld {
    let w = world();
    let docker = Dockerd::start(&docker_daemon_json(&w.stowage));
    DockerWorld { docker, w }
}

#[test]
fn dockerd_pulls_a_bare_name_through_the_mirror_and_repulls_from_the_cache() {
    let DockerWorld { docker, w } = docker_world();
    // `alpine:3.19` = docker.io/library/alpine:3.19; Docker Hub is unreachable, so success
    // means the mirror answered.
    let what = ["docker pull alpine:3.19"; 2];
    pull_twice(&w, &docker, hub_alpine(&w, "alpine:3.19"), what, || {
        assert_asked_mirror_for(
            &w,
            "/v2/library/alpine/manifests/3.19",
            "dockerd (with library/, no ns)",
        );
        let requests = stowage_requests(&w.stowage);
        assert!(
            requests.iter().all(|l| !l.query.contains("ns=")),
            "dockerd's classic puller sends no ?ns=; stowage requests: {requests:#?}"
        );
    });
}

#[test]
fn dockerd_falls_back_to_docker_hub_silently_when_the_mirror_has_no_such_image() {
    // Pins the quirk the README warns about: a mirror error is not reported as such; dockerd
    // retries at Docker Hub (unreachable here) and only that error reaches the user.
    let DockerWorld { docker, w } = docker_world();
    let out = docker.docker(&["pull", "nosuch:1.0"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "pulling an image that exists nowhere must fail: {stderr}"
    );
    assert!(
        stderr.contains("registry-1.docker.io"),
        "dockerd should report the failure of its fallback to Docker Hub, not the mirror's 404: {stderr}"
    );
    let requests = stowage_requests(&w.stowage);
    assert!(
        requests
            .iter()
            .any(|l| l.path == "/v2/library/nosuch/manifests/1.0" && l.status == 404),
        "dockerd should have asked the mirror first and got 404: {requests:#?}"
    );
}

#[test]
fn dockerd_pulls_a_multi_arch_image_for_the_default_platform_and_for_arm64() {
    let DockerWorld { docker, w } = docker_world();
    let build = ImageIndex::build(Format::Docker, &["amd64", "arm64"], SMALL);
    let (pushed, amd) = push_small(&w.hub, "library/multi", "1.0", build);
    let arm = arch(&pushed, "arm64").clone();
    let pull_arm64 = || {
        let files = image_files(&arm);
        docker_pull_and_verify(
            &docker,
            "multi:1.0",
            Some("linux/arm64"),
            &pushed,
            &arm,
            &files,
        )
    };

    first_pull(
        &w,
        &docker,
        &w.hub,
        ("multi:1.0", &pushed, &amd),
        "docker pull multi:1.0",
    );
    for blob in arm.blobs() {
        assert_eq!(
            upstream_blob_gets(&w.hub, &blob.digest),
            0,
            "pulling the default platform (amd64) fetched arm64 blob {} upstream",
            blob.digest
        );
    }

    pull_arm64();
    assert_fetched_through_stowage(&w, &w.hub, &arm, "docker pull --platform linux/arm64");

    // Remove both (the arm64 pull left the amd64 image untagged), then pull both again.
    docker.docker_ok(&["rmi", "multi:1.0", &amd.config.digest]);
    let root = docker.data_root();
    let what = "docker pull multi:1.0 and --platform linux/arm64";
    repull_from_cache(&w, &[&amd, &arm], Some(&root), what, || {
        docker.pull_and_verify("multi:1.0", &pushed, &amd);
        pull_arm64();
    });
}

#[test]
fn dockerd_pulls_an_oci_index_image() {
    let DockerWorld { docker, w } = docker_world();
    let build = ImageIndex::build(Format::Oci, &["amd64", "arm64"], SMALL).into();
    let reference = "ociapp:2.0";
    let pull = Pull {
        upstream: &w.hub,
        repo: "library/ociapp",
        tag: "2.0",
        build,
        reference,
    };
    let what = [
        "docker pull ociapp:2.0 (OCI index)",
        "docker pull ociapp:2.0",
    ];
    pull_twice(&w, &docker, pull, what, || {});
}

/// A linux/amd64 Docker image of `big` random bytes in one layer plus a small layer, built with
/// the system's tools (`head /dev/urandom`, `tar`, `gzip -1`, `sha256sum`): the harness's
/// pure-Rust path takes minutes for this size in an unoptimised test build on a busy machine.
/// Returns the image and the files its layers hold.
fn big_image(big: u64) -> (Image, Vec<(String, u64)>) {
    let dir = tempfile::tempdir().expect("temp dir for the big layer");
    let d = dir.path();
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(d)
            .output()
            .expect("run sh");
        assert!(
            out.status.success(),
            "building the big layer failed: {script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    sh(&format!(
        "mkdir -p root/stowage-test && head -c {big} /dev/urandom > root/stowage-test/file-0.bin && \
         tar --format=gnu --owner=0 --group=0 --numeric-owner --mtime=@1700000000 \
             -cf layer.tar -C root stowage-test && \
         gzip -1 -n -c layer.tar > layer.tar.gz"
    ));
    let sha = |file: &str| {
        let out = sh(&format!("sha256sum {file}"));
        format!(
            "sha256:{}",
            out.split_whitespace().next().expect("sha256sum output")
        )
    };
    let diff_id = sha("layer.tar");
    let big_layer = Layer {
        blob: Blob {
            media_type: images::DOCKER_LAYER.to_string(),
            digest: sha("layer.tar.gz"),
            bytes: std::fs::read(d.join("layer.tar.gz")).expect("read big layer"),
        },
        diff_id,
    };
    let small = images::random_layer(Format::Docker, 5_000);
    let mut files = vec![("stowage-test/file-0.bin".to_string(), big)];
    files.extend(layer_files(&small));
    let layers = vec![big_layer, small];
    let config = Blob::new(
        images::DOCKER_CONFIG,
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()
            },
            "history": [
                {"created": "2024-01-01T00:00:00Z", "created_by": "big layer"},
                {"created": "2024-01-01T00:00:00Z", "created_by": "small layer"}
            ]
        }))
        .expect("serialise config"),
    );
    let manifest_bytes = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": images::DOCKER_MANIFEST,
        "config": {"mediaType": config.media_type, "size": config.size(), "digest": config.digest},
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.blob.media_type, "size": l.blob.size(), "digest": l.blob.digest
        })).collect::<Vec<_>>()
    }))
    .expect("serialise manifest");
    let image = Image {
        format: Format::Docker,
        os: "linux".to_string(),
        architecture: "amd64".to_string(),
        variant: None,
        manifest: Manifest {
            media_type: images::DOCKER_MANIFEST.to_string(),
            digest: sha256_digest(&manifest_bytes),
            bytes: manifest_bytes,
        },
        config,
        layers,
    };
    (image, files)
}

#[test]
fn dockerd_pulls_an_image_of_at_least_128_mib() {
    let DockerWorld { docker, w } = docker_world();
    // Random content does not compress: the big layer is ~130 MiB on the wire too.
    let (image, files) = big_image(130 * 1024 * 1024);
    let total: usize = image.blobs().iter().map(|b| b.size()).sum();
    assert!(
        total >= 128 * 1024 * 1024,
        "the big image should be at least 128 MiB, is {total} bytes"
    );
    let pushed = w.hub.push("library/big", "1", image.clone());

    docker_pull_and_verify(&docker, "big:1", None, &pushed, &image, &files);
    assert_fetched_through_stowage(&w, &w.hub, &image, "docker pull big:1");

    docker.docker_ok(&["rmi", "big:1"]);
    let root = docker.data_root();
    repull_from_cache(&w, &[&image], Some(&root), "docker pull big:1", || {
        docker_pull_and_verify(&docker, "big:1", None, &pushed, &image, &files)
    });
}

#[test]
fn dockerd_pulls_another_upstream_by_naming_stowage_with_a_host_prefix() {
    // registry-mirrors only ever apply to Docker Hub; other upstreams are pulled from stowage
    // as a registry of its own, `<stowage>/ghcr.io/<repo>` (127.0.0.0/8 is insecure by default).
    let DockerWorld { docker, w } = docker_world();
    let build = ImageIndex::build(Format::Oci, &["amd64", "arm64"], SMALL);
    let (_, image) = push_small(&w.ghcr, "acme/tool", "1.0", build);
    let reference = format!("{}/ghcr.io/acme/tool:1.0", w.stowage.host_port());
    docker.docker_ok(&["pull", &reference]);
    let (id, _, layers, _) = docker_inspect(&docker, &reference);
    assert_id_and_layers(&id, &layers, &image, &format!("docker pull {reference}"));
    assert_unpacked(&docker.data_root(), &image_files(&image), &reference);
    assert_fetched_through_stowage(&w, &w.ghcr, &image, &reference);
    assert_nothing_reached_hub(&w, "acme/tool");
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// A containerd whose hosts dir mirrors both `docker.io` and `ghcr.io` through stowage.
fn containerd_for(w: &World) -> Containerd {
    let containerd = Containerd::start();
    containerd.write_hosts_toml(
        "docker.io",
        &containerd_hosts_toml("https://registry-1.docker.io", &w.stowage),
    );
    containerd.write_hosts_toml(
        "ghcr.io",
        &containerd_hosts_toml("https://ghcr.io", &w.stowage),
    );
    containerd
}

/// `ctr images pull` through the mirror, then checks the image record points at the pushed
/// manifest, ctr unpacked the amd64 platform, and every file of it is in a native snapshot.
impl Client for Containerd {
    fn pull_and_verify(&self, reference: &str, pushed: &Pushed, image: &Image) {
        let out = self.pull(reference);
        let what = format!("ctr images pull {reference}");
        assert!(
            out.contains(&format!("unpacking linux/amd64 {}", pushed.digest())),
            "{what}: ctr did not report unpacking linux/amd64 of {}; output:\n{out}",
            pushed.digest()
        );
        let list = self.ctr_ok(&["images", "ls"]);
        let line = list
            .lines()
            .find(|l| l.split_whitespace().next() == Some(reference))
            .unwrap_or_else(|| panic!("{what}: image not listed by ctr images ls:\n{list}"));
        assert!(
            line.contains(pushed.digest()),
            "{what}: ctr images ls should show the pushed digest {}: {line}",
            pushed.digest()
        );
        assert_unpacked(&self.root(), &image_files(image), &what);
    }

    fn remove(&self, reference: &str) {
        self.ctr_ok(&["images", "rm", "--sync", reference]);
    }

    fn unpack_root(&self) -> PathBuf {
        self.root()
    }
}

/// Every request stowage logged for repository path `repo_path` carried `?ns=<ns>`.
fn assert_all_carry_ns(w: &World, repo_path: &str, ns: &str) {
    let requests: Vec<_> = stowage_requests(&w.stowage)
        .into_iter()
        .filter(|l| l.path.starts_with(&format!("/v2/{repo_path}/")))
        .collect();
    assert!(
        !requests.is_empty(),
        "containerd sent nothing for /v2/{repo_path}/ to stowage; stowage requests: {:#?}",
        stowage_requests(&w.stowage)
    );
    let want = format!("ns={ns}");
    assert!(
        requests
            .iter()
            .all(|l| l.query.split('&').any(|kv| kv == want)),
        "every containerd request should carry ?{want}: {requests:#?}"
    );
}

#[test]
fn containerd_pulls_docker_io_through_a_hosts_toml_mirror_and_repulls_from_the_cache() {
    let w = world();
    hub_alpine_pulled_twice(&w, &containerd_for(&w), "ctr", || {
        assert_all_carry_ns(&w, "library/alpine", "docker.io")
    });
}

#[test]
fn containerd_mirrors_a_second_upstream_host_through_the_same_stowage_by_ns() {
    let w = world();
    ghcr_index_pulled_twice(&w, &containerd_for(&w), Format::Oci, "ctr", || {
        assert_all_carry_ns(&w, "acme/tool", "ghcr.io")
    });
}

#[test]
fn containerd_reaches_a_path_prefixed_mirror_with_override_path() {
    let w = world();
    let containerd = Containerd::start();
    // The mirror URL names the API root itself (`/v2/ghcr.io`): without `override_path`
    // containerd would append another `/v2`.
    containerd.write_hosts_toml(
        "ghcr.io",
        &containerd_override_path_hosts_toml("https://ghcr.io", &w.stowage, "ghcr.io"),
    );
    let pull = ghcr_tool(&w, Image::build(Format::Oci, SMALL));
    let what = ["ctr pull with override_path"; 2];
    pull_twice(&w, &containerd, pull, what, || {
        assert_all_carry_ns(&w, "ghcr.io/acme/tool", "ghcr.io");
        assert_nothing_reached_hub(&w, "acme/tool");
    });
}

// ---------------------------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------------------------

fn podman_env(w: &World) -> ContainersEnv {
    ContainersEnv::new(&registries_conf(&w.stowage, &["ghcr.io"]))
}

/// `podman pull` through the mirror, then checks podman's image is the pushed one (ID = config
/// digest, manifest digest, diff_ids) and every file was unpacked into vfs.
impl Client for ContainersEnv {
    fn pull_and_verify(&self, reference: &str, pushed: &Pushed, image: &Image) {
        self.podman_ok(&["pull", reference]);
        let what = format!("podman pull {reference}");
        let fields = ["{{.Id}}", "{{.Digest}}", "{{json .RootFS.Layers}}"];
        let parts = image_inspect(|args| self.podman_ok(args), &fields, reference, &what);
        let layers: Vec<String> = serde_json::from_str(&parts[2]).expect("RootFS.Layers is JSON");
        assert_id_and_layers(&format!("sha256:{}", parts[0]), &layers, image, &what);
        assert_eq!(parts[1], pushed.digest(), "{what}: manifest digest");
        assert_unpacked(&self.graphroot(), &image_files(image), &what);
    }

    fn remove(&self, reference: &str) {
        self.podman_ok(&["rmi", reference]);
    }

    fn unpack_root(&self) -> PathBuf {
        self.graphroot()
    }
}

#[test]
fn podman_pulls_docker_io_through_a_registries_conf_mirror_and_repulls_from_the_cache() {
    let w = world();
    hub_alpine_pulled_twice(&w, &podman_env(&w), "podman", || {
        assert_asked_mirror_for(&w, "/v2/library/alpine/manifests/3.19", "podman")
    });
}

#[test]
fn podman_without_insecure_on_the_mirror_never_reaches_plain_http_stowage() {
    // Pins the README's quirk: `insecure = true` belongs on the mirror entry; without it podman
    // only tries HTTPS at the mirror, then falls back to the (unreachable) primary location.
    let w = world();
    let conf = registries_conf(&w.stowage, &[]).replace("insecure = true\n", "");
    assert!(!conf.contains("insecure"), "{conf}");
    let env = ContainersEnv::new(&conf);
    w.hub.push(
        "library/alpine",
        "3.19",
        Image::build(Format::Docker, SMALL),
    );
    let out = env.podman(&["pull", "docker.io/library/alpine:3.19"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "podman must not pull over plain http from a mirror that is not insecure: {stderr}"
    );
    let requests = stowage_requests(&w.stowage);
    assert!(
        requests.iter().all(|l| !l.path.starts_with("/v2/library/")),
        "podman should not have spoken plain HTTP to the mirror: {requests:#?}"
    );
    assert_eq!(w.hub.blob_gets(), 0, "nothing may reach the upstream");
}

#[test]
fn podman_pulls_a_second_upstream_through_a_prefix_style_mirror_location() {
    let w = world();
    ghcr_index_pulled_twice(&w, &podman_env(&w), Format::Docker, "podman", || {
        assert_prefix_style(&w, "ghcr.io/acme/tool", "podman")
    });
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

/// Checks a skopeo `dir:` copy holds `pushed` byte for byte: `manifest.json` is the pushed top
/// manifest, child manifests (with `--all`) and every blob of `images` are present and equal.
fn verify_skopeo_dir(out: &Path, pushed: &Pushed, images: &[&Image], what: &str) {
    let top = std::fs::read(out.join("manifest.json"))
        .unwrap_or_else(|e| panic!("{what}: no manifest.json: {e}"));
    assert!(
        top == pushed.manifest().bytes,
        "{what}: manifest.json (sha256:{}) is not the pushed manifest {}",
        sha256_hex(&top),
        pushed.digest()
    );
    if let TestImage::Index(index) = &pushed.image {
        for child in images {
            assert!(index.children.iter().any(|c| c.manifest == child.manifest));
            let bytes = std::fs::read(out.join(format!("{}.manifest.json", child.manifest.hex())))
                .unwrap_or_else(|e| panic!("{what}: child manifest missing: {e}"));
            assert!(
                bytes == child.manifest.bytes,
                "{what}: child manifest bytes"
            );
        }
    }
    for image in images {
        for blob in image.blobs() {
            let bytes = std::fs::read(out.join(blob.hex()))
                .unwrap_or_else(|e| panic!("{what}: blob {} missing: {e}", blob.digest));
            assert!(bytes == blob.bytes, "{what}: blob {} differs", blob.digest);
        }
    }
}

fn skopeo_copy_twice(w: &World, env: &ContainersEnv, reference: &str, pushed: &Pushed, all: bool) {
    let images: Vec<&Image> = pushed.image.images();
    let upstream = if reference.starts_with("docker.io/") {
        &w.hub
    } else {
        &w.ghcr
    };
    let first = tempfile::tempdir().expect("temp dir");
    let second = tempfile::tempdir().expect("temp dir");
    let src = format!("docker://{reference}");
    let copy = |out: &Path| {
        let dst = format!("dir:{}", out.display());
        let mut args = vec!["copy"];
        if all {
            args.push("--all");
        }
        args.extend([src.as_str(), dst.as_str()]);
        env.skopeo_ok(&args);
    };

    copy(first.path());
    verify_skopeo_dir(first.path(), pushed, &images, &format!("skopeo copy {src}"));
    for image in &images {
        assert_fetched_through_stowage(w, upstream, image, &format!("skopeo copy {src}"));
    }
    repull_from_cache(w, &images, None, &format!("skopeo copy {src}"), || {
        copy(second.path());
        verify_skopeo_dir(second.path(), pushed, &images, "second skopeo copy");
    });
}

#[test]
fn skopeo_copies_docker_io_through_a_registries_conf_mirror_and_recopies_from_the_cache() {
    let w = world();
    let env = podman_env(&w);
    let pushed = w
        .hub
        .push("library/alpine", "3.19", Image::build(Format::Oci, SMALL));
    skopeo_copy_twice(&w, &env, "docker.io/library/alpine:3.19", &pushed, false);
    assert_asked_mirror_for(&w, "/v2/library/alpine/manifests/3.19", "skopeo");
}

#[test]
fn skopeo_copies_a_second_upstream_through_a_prefix_style_mirror_location() {
    let w = world();
    let env = podman_env(&w);
    let pushed = w.ghcr.push(
        "acme/tool",
        "1.0",
        ImageIndex::build(Format::Oci, &["amd64", "arm64"], SMALL),
    );
    skopeo_copy_twice(&w, &env, "ghcr.io/acme/tool:1.0", &pushed, true);
    assert_prefix_style(&w, "ghcr.io/acme/tool", "skopeo");
    assert_nothing_reached_hub(&w, "acme/tool");
}
