//! The image the way CI ships it: `scripts/build-image` (a static release binary built on the
//! host, `FROM scratch`, no registry) on a private dockerd; its size and metadata; `docker run`
//! configured by environment variables alone against a real upstream; a skopeo pull through
//! it; a new container on the same volume serving that image from the cache it left (and
//! resolving the upstream by name, which a static binary in an empty image must still do);
//! `stowage health` as the HEALTHCHECK; and `docker stop`: exit code 0, in bounded time.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::clients::{run, Dockerd};
use support::images::{Format, Image};
use support::registry::Registry;
use support::{free_port, skopeo_ok, wait_until};

const TAG: &str = "stowage-test:ci";
const MAX_IMAGE_BYTES: u64 = 25 << 20;
/// `docker stop`'s own bound before it sends SIGKILL; stowage must be gone well within it.
const STOP_TIMEOUT_SECS: u64 = 30;
/// The cold release build on a busy 2-core machine: an upper bound, not an expectation.
const BUILD_TIMEOUT: Duration = Duration::from_secs(90 * 60);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `scripts/build-image TAG` against `dockerd`.
fn build_image(dockerd: &Dockerd) {
    let mut cmd = Command::new(repo_root().join("scripts/build-image"));
    cmd.arg(TAG)
        .current_dir(repo_root())
        .envs(dockerd.client_env())
        .env("DOCKER", "/usr/bin/docker")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");
    let out = run(&mut cmd, BUILD_TIMEOUT);
    assert!(
        out.status.success(),
        "scripts/build-image failed ({})\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image's size and the settings the issue names.
fn check_image(dockerd: &Dockerd) {
    let size: u64 = dockerd
        .docker_ok(&["image", "inspect", "--format", "{{.Size}}", TAG])
        .trim()
        .parse()
        .expect("image size");
    assert!(size < MAX_IMAGE_BYTES, "the image is {size} bytes");
    eprintln!("image {TAG}: {:.1} MiB", size as f64 / (1 << 20) as f64);
    let json = dockerd.docker_ok(&["image", "inspect", "--format", "{{json .Config}}", TAG]);
    let config: serde_json::Value = serde_json::from_str(&json).expect("image config");
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert!(config["ExposedPorts"].get("5000/tcp").is_some(), "{config}");
    assert!(
        config["Volumes"].get("/var/lib/stowage").is_some(),
        "{config}"
    );
    assert_eq!(config["Entrypoint"], serde_json::json!(["stowage"]));
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["serve", "--config", "/etc/stowage/config.toml"])
    );
    assert_eq!(
        config["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "stowage", "health"])
    );
    // FROM scratch: the image is its own three layers (config and certificates, binary, volume).
    let layers = dockerd.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{len .RootFS.Layers}}",
        TAG,
    ]);
    assert_eq!(layers.trim(), "3", "layers beyond our own COPYs");
}

/// `docker run -d` of the image on the host network, configured by `-e` only.
fn run_container(dockerd: &Dockerd, name: &str, volume: &Path, port: u16, upstream: &str) {
    let mount = format!("{}:/var/lib/stowage", volume.display());
    let listen = format!("STOWAGE_SERVER_LISTEN=127.0.0.1:{port}");
    let upstream = format!("STOWAGE_UPSTREAM_URL={upstream}");
    dockerd.docker_ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "-v",
        &mount,
        "-e",
        &listen,
        "-e",
        &upstream,
        "--health-interval",
        "1s",
        "--health-start-period",
        "1s",
        TAG,
    ]);
    let ready = wait_until(Duration::from_secs(60), || {
        reqwest::blocking::get(format!("http://127.0.0.1:{port}/readyz"))
            .is_ok_and(|r| r.status().is_success())
    });
    assert!(ready, "not ready\n{}", logs(dockerd, name));
    // The HEALTHCHECK (`stowage health` inside the scratch image) turns the container healthy.
    let healthy = wait_until(Duration::from_secs(120), || {
        let state = dockerd.docker(&["inspect", "--format", "{{.State.Health.Status}}", name]);
        String::from_utf8_lossy(&state.stdout).trim() == "healthy"
    });
    assert!(healthy, "never healthy\n{}", logs(dockerd, name));
}

fn logs(dockerd: &Dockerd, name: &str) -> String {
    let out = dockerd.docker(&["logs", name]);
    format!(
        "--- docker logs {name}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `docker stop`: the time it took (bounded by [`STOP_TIMEOUT_SECS`]) and a clean exit (0, the
/// log's last word).
fn stop_cleanly(dockerd: &Dockerd, name: &str) {
    let started = Instant::now();
    dockerd.docker_ok(&["stop", "--time", &STOP_TIMEOUT_SECS.to_string(), name]);
    let took = started.elapsed();
    let code = dockerd.docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", name]);
    let log = logs(dockerd, name);
    assert_eq!(code.trim(), "0", "exit code after docker stop\n{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    // Reaching the bound would mean SIGKILL (exit 137, caught above); this is the headroom.
    assert!(
        took < Duration::from_secs(STOP_TIMEOUT_SECS),
        "docker stop took {took:?}"
    );
    eprintln!("docker stop {name}: {took:?}");
}

fn pull(port: u16, reference: &str) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("pull dir");
    let src = format!("docker://127.0.0.1:{port}/{reference}");
    let dst = format!("dir:{}", out.path().display());
    skopeo_ok(
        &["copy", "--src-tls-verify=false", &src, &dst],
        &format!("pulling {reference} through the container"),
    );
    out
}

/// The files of `pulled` (a skopeo `dir:`) named like blobs, each found in the volume.
fn assert_cached(volume: &Path, pulled: &Path) {
    let mut found = 0;
    for entry in std::fs::read_dir(pulled).expect("pull dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit()) {
            let blob = volume.join("blobs/sha256").join(&name[..2]).join(&name);
            assert!(blob.is_file(), "{} not in the volume", blob.display());
            found += 1;
        }
    }
    assert!(found >= 2, "config and layers pulled: {found}");
}

#[test]
fn the_image_runs_as_a_mirror_and_keeps_its_cache_in_the_volume() {
    let dockerd = Dockerd::start("{}\n");
    build_image(&dockerd);
    check_image(&dockerd);

    let upstream = Registry::start();
    upstream.push(
        "team/app",
        "1",
        Image::build(Format::Docker, &[2048, 300_000]),
    );
    upstream.push("team/other", "1", Image::build(Format::Oci, &[4096]));
    let volume = tempfile::tempdir().expect("volume dir");
    // The image runs as uid 65532: the host directory must be its.
    std::os::unix::fs::chown(volume.path(), Some(65532), Some(65532)).expect("chown volume");
    let port = free_port();

    run_container(&dockerd, "stowage-a", volume.path(), port, &upstream.url());
    let first = pull(port, "team/app:1");
    assert_cached(volume.path(), first.path());
    let config = dockerd.docker_ok(&["exec", "stowage-a", "stowage", "config"]);
    assert!(
        config.contains("# env STOWAGE_SERVER_LISTEN")
            && config.contains("path = \"/var/lib/stowage\"")
            && config.contains("/etc/stowage/config.toml"),
        "{config}"
    );
    stop_cleanly(&dockerd, "stowage-a");
    dockerd.docker_ok(&["rm", "stowage-a"]);

    // A new container on the same volume, the upstream named by host name this time.
    let blob_gets = upstream.blob_gets();
    let by_name = format!(
        "http://localhost:{}",
        upstream.url().rsplit(':').next().unwrap()
    );
    run_container(&dockerd, "stowage-b", volume.path(), port, &by_name);
    let again = pull(port, "team/app:1");
    assert_cached(volume.path(), again.path());
    assert_eq!(
        upstream.blob_gets(),
        blob_gets,
        "served from the volume, not refetched"
    );
    let other = pull(port, "team/other:1");
    assert_cached(volume.path(), other.path());
    assert!(
        upstream.blob_gets() > blob_gets,
        "the new image came from upstream by name"
    );
    stop_cleanly(&dockerd, "stowage-b");
    dockerd.docker_ok(&["rm", "stowage-b"]);
}

/// Both Dockerfiles end in the same image: the lines after their last `FROM scratch` agree
/// except where one copies from the build stage and the other from its context.
#[test]
fn the_builder_dockerfile_makes_the_same_image() {
    let final_stage = |file: &str| -> Vec<String> {
        let text = std::fs::read_to_string(repo_root().join(file)).expect(file);
        let at = text.rfind("FROM scratch").expect("FROM scratch");
        text[at..]
            .lines()
            .map(|l| {
                l.replace("COPY --from=build --chown", "COPY --chown")
                    .replace("COPY --from=build /context/", "COPY ")
                    .replace("--chown=65532:65532 /context/", "--chown=65532:65532 ")
            })
            .collect()
    };
    assert_eq!(final_stage("Dockerfile"), final_stage("Dockerfile.builder"));
    let scratch = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert_eq!(
        scratch
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .collect::<Vec<_>>(),
        ["FROM scratch"],
        "the Dockerfile scripts/build-image uses needs no registry"
    );
}
