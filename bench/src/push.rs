//! The `push` workload: an image of random (incompressible) layers, built on disk as an OCI
//! layout, pushed with `skopeo copy` to stowage (a `[hosted]` repository) and to a plain
//! distribution registry (`docker-registry`, no proxy), then pulled back from each with
//! `skopeo copy` into a `dir:` directory.
//!
//! Every push goes to a fresh server with empty storage (skopeo skips blobs the registry already
//! has), so `VmHWM` read right after the push is that push's peak RSS, and the one read after the
//! pull is the peak over both. The image is pushed at two layer sizes (same layer count) to show
//! whether the peak grows with the layer size: a server that streams uploads stays flat.
//!
//! skopeo runs with `--preserve-digests`: without it, skopeo gzips uncompressed layers on their
//! way to a registry, and the figures would time skopeo's compressor, not the servers.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::RngCore;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::{free_port, note, stowage_bin, stowage_command, wait_ready};
use super::{registry_yaml, BoxError, Cli, Proc, ServerKind};

const REPO: &str = "bench/push";
const TAG: &str = "v1";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The longest one `skopeo copy` may take before the run is declared failed.
const SKOPEO_TIMEOUT: Duration = Duration::from_secs(900);
/// stowage needs an upstream in its config; nothing listens here and no request reaches it
/// (every name the bench uses is hosted).
const NO_UPSTREAM: &str = "http://127.0.0.1:9";

/// What to push (the `push` subcommand's options).
#[derive(clap::Args)]
pub struct Opts {
    /// Layers of the image.
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Size of each layer in MiB (the headline push).
    #[arg(long, default_value_t = 128)]
    pub layer_mib: usize,
    /// A second, smaller layer size for the peak-RSS comparison; 0 skips it.
    #[arg(long, default_value_t = 16)]
    pub small_layer_mib: usize,
    /// Fresh servers per server and layer size; the best time of them is reported.
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
}

/// One push and pull back, against a fresh server.
pub struct Run {
    pub server: ServerKind,
    pub layer_mib: usize,
    pub push: Duration,
    pub pull: Duration,
    /// `VmHWM` right after the push.
    pub rss_push_kib: Option<u64>,
    /// `VmHWM` right after the pull.
    pub rss_all_kib: Option<u64>,
    /// The server's CPU seconds (user + system) during the push.
    pub cpu_push_s: Option<f64>,
    /// The server's CPU seconds during the pull.
    pub cpu_pull_s: Option<f64>,
}

/// The figures of one server at one layer size: best times, worst peaks.
pub struct Summary {
    pub push_s: f64,
    pub pull_s: f64,
    pub rss_push_mib: Option<f64>,
    pub rss_all_mib: Option<f64>,
    /// The server's CPU seconds during the fastest push.
    pub cpu_push_s: Option<f64>,
    /// The server's CPU seconds during the fastest pull.
    pub cpu_pull_s: Option<f64>,
}

impl Opts {
    /// Whether there is anything to push.
    pub fn enabled(&self) -> bool {
        self.layers > 0 && self.layer_mib > 0
    }
}

/// Best push and pull time and the largest peaks of `runs` for `server` at `layer_mib`.
pub fn summary(runs: &[Run], server: ServerKind, layer_mib: usize) -> Option<Summary> {
    let mine: Vec<&Run> = runs
        .iter()
        .filter(|r| r.server == server && r.layer_mib == layer_mib)
        .collect();
    let fastest = mine.iter().min_by_key(|r| r.push)?;
    let fastest_pull = mine.iter().min_by_key(|r| r.pull)?;
    let best = |f: fn(&Run) -> Duration| mine.iter().map(|r| f(r)).min();
    let peak = |f: fn(&Run) -> Option<u64>| {
        mine.iter()
            .filter_map(|r| f(r))
            .max()
            .map(|k| k as f64 / 1024.0)
    };
    Some(Summary {
        push_s: best(|r| r.push)?.as_secs_f64(),
        pull_s: best(|r| r.pull)?.as_secs_f64(),
        rss_push_mib: peak(|r| r.rss_push_kib),
        rss_all_mib: peak(|r| r.rss_all_kib),
        cpu_push_s: fastest.cpu_push_s,
        cpu_pull_s: fastest_pull.cpu_pull_s,
    })
}

/// The layer sizes measured, smallest first.
pub fn sizes(o: &Opts) -> Vec<usize> {
    let mut s = vec![o.layer_mib];
    if o.small_layer_mib > 0 && o.small_layer_mib != o.layer_mib {
        s.insert(0, o.small_layer_mib);
    }
    s.sort_unstable();
    s
}

/// An OCI image layout on disk: `oci:<dir>:v1`.
struct Image {
    dir: PathBuf,
    /// (digest, size) of every layer.
    layers: Vec<(String, u64)>,
}

/// Writes `size` random bytes as a blob of `blobs` (the layout's `blobs/sha256`), hashing them
/// on the way; returns the digest.
fn random_blob(blobs: &Path, size: u64) -> Result<String, BoxError> {
    let tmp = blobs.join("incoming");
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut rng = rand::thread_rng();
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let hex = hex::encode(hasher.finalize());
    std::fs::rename(&tmp, blobs.join(&hex))?;
    Ok(format!("sha256:{hex}"))
}

/// Writes `bytes` as a blob of `blobs`; returns the digest.
fn bytes_blob(blobs: &Path, bytes: &[u8]) -> Result<String, BoxError> {
    let hex = hex::encode(Sha256::digest(bytes));
    std::fs::write(blobs.join(&hex), bytes)?;
    Ok(format!("sha256:{hex}"))
}

/// Builds an image of `layers` random uncompressed layers of `layer_bytes` each in `dir`.
fn build_image(dir: &Path, layers: usize, layer_bytes: u64) -> Result<Image, BoxError> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let mut digests = Vec::new();
    for _ in 0..layers {
        digests.push((random_blob(&blobs, layer_bytes)?, layer_bytes));
    }
    // Uncompressed layers: each diff ID is the layer's own digest.
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers",
                   "diff_ids": digests.iter().map(|(d, _)| d).collect::<Vec<_>>()},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "size": config.len(),
                   "digest": bytes_blob(&blobs, &config)?},
        "layers": digests.iter()
            .map(|(d, s)| json!({"mediaType": LAYER_TYPE, "size": s, "digest": d}))
            .collect::<Vec<_>>(),
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST_TYPE, "size": manifest.len(),
            "digest": bytes_blob(&blobs, &manifest)?,
            "annotations": {"org.opencontainers.image.ref.name": TAG},
        }],
    }))?;
    std::fs::write(dir.join("index.json"), index)?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(Image {
        dir: dir.to_owned(),
        layers: digests,
    })
}

/// `skopeo copy --preserve-digests src dst` with its own empty configuration in `home` (no
/// registries.conf mirrors, no credentials, a policy accepting anything); returns the wall time.
async fn skopeo_copy(home: &Path, src: &str, dst: &str) -> Result<Duration, BoxError> {
    let tmp = home.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let policy = home.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let registries = home.join("registries.conf");
    std::fs::write(&registries, "")?;
    let auth = home.join("auth.json");
    std::fs::write(&auth, r#"{"auths":{}}"#)?;
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.env("HOME", home)
        .env("XDG_RUNTIME_DIR", home)
        .env("XDG_CONFIG_HOME", home)
        .env("REGISTRY_AUTH_FILE", &auth)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .arg("--policy")
        .arg(&policy)
        .arg("--registries-conf")
        .arg(&registries)
        .arg("--tmpdir")
        .arg(&tmp)
        .args(["copy", "--quiet", "--preserve-digests"])
        .args([
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            src,
            dst,
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let t0 = Instant::now();
    let out = tokio::time::timeout(SKOPEO_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("skopeo copy {src} {dst}: no answer in {SKOPEO_TIMEOUT:?}"))??;
    let elapsed = t0.elapsed();
    if !out.status.success() {
        return Err(format!(
            "skopeo copy {src} {dst}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(elapsed)
}

/// A fresh registry that accepts pushes to `bench/*`: stowage with `[hosted]`, or plain
/// distribution (filesystem storage, no proxy). Returns the process and its `host:port`.
async fn start_target(kind: ServerKind, cli: &Cli, dir: &Path) -> Result<(Proc, String), BoxError> {
    let port = free_port()?;
    std::fs::create_dir_all(dir)?;
    let data = dir.join("data");
    let proc = match kind {
        ServerKind::Stowage => {
            let hosted = "[hosted]\nrepositories = [\"bench/**\"]\nmax_size = \"1TiB\"\n";
            let cmd = stowage_command(&stowage_bin(cli)?, dir, &data, port, NO_UPSTREAM, hosted)?;
            Proc::spawn(cmd, &dir.join("server.log"))?
        }
        ServerKind::Distribution => {
            let config = dir.join("registry.yml");
            std::fs::write(&config, registry_yaml(&data, port, None, false))?;
            let mut cmd = std::process::Command::new(&cli.registry);
            cmd.arg("serve").arg(&config);
            Proc::spawn(cmd, &dir.join("server.log"))?
        }
    };
    let hp = format!("127.0.0.1:{port}");
    wait_ready(&format!("http://{hp}")).await?;
    Ok((proc, hp))
}

/// Every layer of `image` is in the `dir:` copy at `out`, at its size (skopeo checked each
/// digest as it read the blob from the server).
fn check_pulled(out: &Path, image: &Image) -> Result<(), BoxError> {
    for (digest, size) in &image.layers {
        let hex = digest.trim_start_matches("sha256:");
        let got = std::fs::metadata(out.join(hex))
            .map_err(|e| format!("pulled copy lacks layer {digest}: {e}"))?
            .len();
        if got != *size {
            return Err(format!("pulled layer {digest}: {got} of {size} bytes").into());
        }
    }
    Ok(())
}

/// Pushes `image` to a fresh `kind` server, pulls it back, and reads the peaks.
async fn push_pull(
    cli: &Cli,
    work: &Path,
    kind: ServerKind,
    image: &Image,
    layer_mib: usize,
) -> Result<Run, BoxError> {
    let dir = work.join(format!("push-{kind:?}-{layer_mib}").to_lowercase());
    let (proc, hp) = start_target(kind, cli, &dir).await?;
    let home = dir.join("skopeo");
    let src = format!("oci:{}:{TAG}", image.dir.display());
    let dst = format!("docker://{hp}/{REPO}:{TAG}");
    let cpu_before = proc.cpu_secs();
    let push = skopeo_copy(&home, &src, &dst).await?;
    let rss_push_kib = proc.peak_rss_kib();
    let cpu_push_s = proc.cpu_secs().zip(cpu_before).map(|(a, b)| a - b);
    let out = dir.join("pulled");
    let cpu_before = proc.cpu_secs();
    let pull = skopeo_copy(&home, &dst, &format!("dir:{}", out.display())).await?;
    let rss_all_kib = proc.peak_rss_kib();
    let cpu_pull_s = proc.cpu_secs().zip(cpu_before).map(|(a, b)| a - b);
    check_pulled(&out, image)?;
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Run {
        server: kind,
        layer_mib,
        push,
        pull,
        rss_push_kib,
        rss_all_kib,
        cpu_push_s,
        cpu_pull_s,
    })
}

/// Every server in `cli.servers` at every layer size of `o`, `o.runs` times, the servers taking
/// turns (so both see the same background load).
pub async fn run(cli: &Cli, work: &Path, o: &Opts) -> Result<Vec<Run>, BoxError> {
    let mut runs = Vec::new();
    for mib in sizes(o) {
        let dir = work.join(format!("push-image-{mib}"));
        let t0 = Instant::now();
        let image = build_image(&dir, o.layers, (mib as u64) << 20)?;
        note(&format!(
            "push: built {} x {mib} MiB random layers in {:.1} s",
            o.layers,
            t0.elapsed().as_secs_f64()
        ));
        for _ in 0..o.runs.max(1) {
            for &kind in &cli.servers {
                let r = push_pull(cli, work, kind, &image, mib).await?;
                note(&format!(
                    "push: {} {} x {mib} MiB: push {:.2} s (server CPU {} s), pull {:.2} s \
                     (server CPU {} s), peak RSS {} / {} MiB",
                    label(kind),
                    o.layers,
                    r.push.as_secs_f64(),
                    secs_text(r.cpu_push_s),
                    r.pull.as_secs_f64(),
                    secs_text(r.cpu_pull_s),
                    mib_text(r.rss_push_kib.map(|k| k as f64 / 1024.0)),
                    mib_text(r.rss_all_kib.map(|k| k as f64 / 1024.0)),
                ));
                runs.push(r);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(runs)
}

/// The server's name in this workload's rows: distribution here is a plain registry, no proxy.
pub fn label(kind: ServerKind) -> &'static str {
    match kind {
        ServerKind::Stowage => "stowage",
        ServerKind::Distribution => "distribution",
    }
}

fn secs_text(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.2}")).unwrap_or_else(|| "?".into())
}

fn mib_text(v: Option<f64>) -> String {
    v.map(|m| format!("{m:.1}")).unwrap_or_else(|| "?".into())
}

/// The `push` subcommand: every run, then the table on stdout.
pub async fn command(cli: &Cli, work: &Path, o: &Opts) -> Result<(), BoxError> {
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let runs = run(cli, work, o).await?;
    print_table(cli, o, &runs, &load_start)
}

/// The `push` subcommand's table on stdout.
fn print_table(cli: &Cli, o: &Opts, runs: &[Run], load_start: &str) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "push with skopeo of {} random layers, then pull back with skopeo; best of {} fresh \
         servers per row; load average at start {}, at end {}\n\n\
         | layers | server | push | push MB/s | server CPU during push | pull back | \
         server CPU during pull | peak RSS during push | peak RSS push + pull |\n\
         |---|---|---|---|---|---|---|---|---|",
        o.layers,
        o.runs.max(1),
        load_start.trim(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    )?;
    for mib in sizes(o) {
        let bytes = (o.layers as f64) * (mib as f64) * 1024.0 * 1024.0;
        for &kind in &cli.servers {
            let Some(s) = summary(runs, kind, mib) else {
                continue;
            };
            writeln!(
                out,
                "| {} x {mib} MiB | {} | {:.2} s | {:.0} | {} s | {:.2} s | {} s | {} MiB | {} MiB |",
                o.layers,
                label(kind),
                s.push_s,
                bytes / s.push_s / 1e6,
                secs_text(s.cpu_push_s),
                s.pull_s,
                secs_text(s.cpu_pull_s),
                mib_text(s.rss_push_mib),
                mib_text(s.rss_all_mib),
            )?;
        }
    }
    Ok(())
}
