//! The `many-images` workload: N clients pull N different images at once through a cold server
//! whose cache budget (`storage.max_size`) is a fraction of the images' total size, so eviction
//! runs while the pulls are still going.
//!
//! Each client pulls like dockerd does: the manifest by tag, then the config blob, then the
//! layers, at most `--parallel` (dockerd's `max-concurrent-downloads`, 3) at a time. Every body
//! is hashed by the client and checked against its digest (the manifest's too); a pull with any
//! error, short body or digest mismatch is a failed pull (no retries: a server that needs them
//! is reported as failing).
//!
//! Measured per server (a fresh one per run, empty cache):
//! - wall time until the last client is done, and each client's time (p50 and max);
//! - upstream bytes: the sizes of the blob `GET`s in the upstream's access log, as a multiple of
//!   the images' total blob bytes (1.00x: every blob fetched once);
//! - failed pulls;
//! - the cache's peak size, sampled every [`SAMPLE_EVERY`] during the run: stowage's
//!   `stowage_cache_size_bytes` gauge (committed blobs) and the apparent size of every file under
//!   its data directory except the index (committed blobs plus fills in progress in `tmp/`),
//!   against the budget; for distribution (whose proxy has no size bound) the same file sum;
//! - stowage's evictions during the run (`stowage_evictions_total`) and the server's peak RSS.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

use super::{all, clients, free_port, note, registry_yaml, stowage_bin, stowage_command};
use super::{wait_ready, BoxError, Cli, Proc, ServerKind, Upstream};

/// How often the cache's size is sampled during a run.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// The workload's shape (the `many-images` subcommand's options).
#[derive(clap::Args, Clone)]
pub struct Opts {
    /// Concurrent clients; client i pulls image i mod `--images`.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Different images in the upstream.
    #[arg(long, default_value_t = 16)]
    pub images: usize,
    /// Layers per image.
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Size of each layer in MiB.
    #[arg(long, default_value_t = 4)]
    pub layer_mib: usize,
    /// stowage's `storage.max_size` in MiB; 0: half the images' total size.
    #[arg(long, default_value_t = 0)]
    pub budget_mib: usize,
    /// Layers one client fetches at once (dockerd's default `max-concurrent-downloads`).
    #[arg(long, default_value_t = 3)]
    pub parallel: usize,
    /// Fresh servers (cold runs) per server kind.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
}

/// The same options under `all`, prefixed; `--many-layer-mib 0` skips the workload.
#[derive(clap::Args, Clone)]
pub struct AllOpts {
    /// Clients of the many-images workload.
    #[arg(long, default_value_t = 16)]
    pub many_clients: usize,
    /// Images of the many-images workload.
    #[arg(long, default_value_t = 16)]
    pub many_images: usize,
    /// Layers per image of the many-images workload.
    #[arg(long, default_value_t = 8)]
    pub many_layers: usize,
    /// Layer size in MiB of the many-images workload; 0 skips it.
    #[arg(long, default_value_t = 4)]
    pub many_layer_mib: usize,
    /// stowage's budget in the many-images workload, MiB; 0: half the images' total size.
    #[arg(long, default_value_t = 0)]
    pub many_budget_mib: usize,
    /// Cold runs per server of the many-images workload.
    #[arg(long, default_value_t = 1)]
    pub many_runs: usize,
}

impl AllOpts {
    pub fn opts(&self) -> Opts {
        Opts {
            clients: self.many_clients,
            images: self.many_images,
            layers: self.many_layers,
            layer_mib: self.many_layer_mib,
            budget_mib: self.many_budget_mib,
            parallel: 3,
            runs: self.many_runs.max(1),
        }
    }
}

impl Opts {
    pub fn enabled(&self) -> bool {
        self.clients > 0 && self.images > 0 && self.layers > 0 && self.layer_mib > 0
    }

    /// Bytes of all layers of all images (the config blobs, a few hundred bytes each, aside).
    fn layer_bytes(&self) -> u64 {
        (self.images * self.layers * self.layer_mib) as u64 * (1 << 20)
    }

    /// stowage's `storage.max_size` in bytes.
    pub fn budget(&self) -> u64 {
        match self.budget_mib {
            0 => self.layer_bytes() / 2,
            m => (m as u64) << 20,
        }
    }
}

/// One image in the upstream: its repository, manifest digest, config and layers.
struct Image {
    repo: String,
    manifest: String,
    config: (String, u64),
    layers: Vec<(String, u64)>,
}

const TAG: &str = "v1";

/// Pushes `o.images` images of random layers to the upstream, four at a time.
async fn load(upstream: &str, o: &Opts) -> Result<Vec<Image>, BoxError> {
    let t = Instant::now();
    let pushes = futures_util::stream::iter(0..o.images).map(|i| async move {
        let repo = format!("bench/many-{i}");
        let (manifest, mut blobs) =
            all::push_image(upstream, &repo, TAG, o.layers, o.layer_mib << 20).await?;
        let config = blobs.pop().ok_or("push_image returned no config blob")?;
        Ok::<_, BoxError>(Image {
            repo,
            manifest,
            config,
            layers: blobs,
        })
    });
    let mut images: Vec<Image> = pushes
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    images.sort_by_key(|i| i.repo.clone());
    note(&format!(
        "many images: pushed {} images of {} x {} MiB in {:.1} s",
        images.len(),
        o.layers,
        o.layer_mib,
        t.elapsed().as_secs_f64()
    ));
    Ok(images)
}

/// `body` hashes to `digest` (`sha256:<hex>`).
fn check_digest(hasher: Sha256, digest: &str, what: &str) -> Result<(), BoxError> {
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    if got != digest {
        return Err(format!("{what}: body hashes to {got}, expected {digest}").into());
    }
    Ok(())
}

/// One blob, read to the end and checked against its digest and size.
async fn blob(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    d: &str,
    size: u64,
) -> Result<(), BoxError> {
    let r = c.get(format!("{base}/v2/{repo}/blobs/{d}")).send().await?;
    if !r.status().is_success() {
        return Err(format!("blob {repo}@{d}: {}", r.status()).into());
    }
    let mut s = r.bytes_stream();
    let (mut h, mut n) = (Sha256::new(), 0u64);
    while let Some(chunk) = s.next().await {
        let chunk = chunk?;
        n += chunk.len() as u64;
        h.update(&chunk);
    }
    if n != size {
        return Err(format!("blob {repo}@{d}: {n} of {size} bytes").into());
    }
    check_digest(h, d, &format!("blob {repo}"))
}

/// One client's pull, as dockerd does it: manifest, config, then the layers `parallel` at a
/// time. Returns when the last layer is read, timed from `t0`.
async fn pull(
    c: reqwest::Client,
    base: String,
    img: Arc<Image>,
    parallel: usize,
    t0: Instant,
) -> Result<Duration, BoxError> {
    let m = c
        .get(format!("{base}/v2/{}/manifests/{TAG}", img.repo))
        .header("accept", all::ACCEPT)
        .send()
        .await?;
    if !m.status().is_success() {
        return Err(format!("manifest {}:{TAG}: {}", img.repo, m.status()).into());
    }
    let mut h = Sha256::new();
    h.update(m.bytes().await?);
    check_digest(h, &img.manifest, &format!("manifest {}", img.repo))?;
    let (cd, cs) = &img.config;
    blob(&c, &base, &img.repo, cd, *cs).await?;
    let fetches: Vec<_> = (img.layers.iter())
        .map(|(d, size)| blob(&c, &base, &img.repo, d, *size))
        .collect();
    let mut layers = futures_util::stream::iter(fetches).buffer_unordered(parallel.max(1));
    while let Some(r) = layers.next().await {
        r?;
    }
    Ok(t0.elapsed())
}

/// The largest values seen by [`sample`].
#[derive(Default)]
struct Peaks {
    /// `stowage_cache_size_bytes` (stowage only).
    gauge: Option<u64>,
    /// Apparent bytes of the files under the data directory, the index aside.
    disk: u64,
    samples: usize,
}

/// A gauge or counter's value in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Apparent size of every file under `dir`, except in directories named `index` (stowage's
/// sled index: metadata, not cached content). Files vanishing meanwhile are skipped.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            if e.file_name() != "index" {
                n += tree_bytes(&e.path());
            }
        } else if let Ok(m) = e.metadata() {
            n += m.len();
        }
    }
    n
}

/// Samples the cache's size every [`SAMPLE_EVERY`] until `stop`: `metrics` is stowage's
/// `/metrics` URL, `data` the server's data directory.
async fn sample(metrics: Option<String>, data: PathBuf, stop: Arc<AtomicBool>) -> Peaks {
    let client = reqwest::Client::builder().no_proxy().build().ok();
    let mut peaks = Peaks::default();
    loop {
        let done = stop.load(Ordering::Acquire);
        if let (Some(url), Some(c)) = (&metrics, &client) {
            if let Ok(r) = c.get(url).send().await {
                if let Some(v) = r
                    .text()
                    .await
                    .ok()
                    .and_then(|t| metric(&t, "stowage_cache_size_bytes"))
                {
                    peaks.gauge = Some(peaks.gauge.unwrap_or(0).max(v));
                }
            }
        }
        let d = data.clone();
        if let Ok(bytes) = tokio::task::spawn_blocking(move || tree_bytes(&d)).await {
            peaks.disk = peaks.disk.max(bytes);
        }
        peaks.samples += 1;
        if done {
            return peaks;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// One cold run against one fresh server.
pub struct Run {
    pub server: ServerKind,
    pub wall: Duration,
    /// Each successful client's time, sorted.
    pub clients: Vec<Duration>,
    pub failures: usize,
    pub upstream_bytes: u64,
    pub upstream_gets: usize,
    /// The images' total blob bytes (what one fetch of everything costs).
    pub total_bytes: u64,
    pub peak_gauge: Option<u64>,
    pub peak_disk: u64,
    pub samples: usize,
    /// stowage's evictions during the run.
    pub evictions: Option<u64>,
    pub budget: u64,
    pub peak_rss_kib: Option<u64>,
}

impl Run {
    fn client_p50(&self) -> Duration {
        self.clients
            .get(self.clients.len() / 2)
            .copied()
            .unwrap_or_default()
    }

    fn client_max(&self) -> Duration {
        self.clients.last().copied().unwrap_or_default()
    }

    /// The larger of the two peak measures.
    fn peak(&self) -> u64 {
        self.peak_gauge.unwrap_or(0).max(self.peak_disk)
    }
}

/// A fresh `kind` server in `dir` in front of `upstream`; stowage with a budget of `budget`
/// bytes (`STOWAGE_STORAGE_MAX_SIZE`), distribution's proxy as configured for every workload.
async fn start(
    kind: ServerKind,
    cli: &Cli,
    upstream: &str,
    dir: &Path,
    budget: u64,
) -> Result<(Proc, String), BoxError> {
    let port = free_port()?;
    std::fs::create_dir_all(dir)?;
    let log = dir.join("server.log");
    let proc = match kind {
        ServerKind::Stowage => {
            let bin = stowage_bin(cli)?;
            let mut cmd = stowage_command(&bin, dir, &dir.join("data"), port, upstream, "")?;
            cmd.env("STOWAGE_STORAGE_MAX_SIZE", budget.to_string());
            Proc::spawn(cmd, &log)?
        }
        ServerKind::Distribution => {
            let config = dir.join("proxy.yml");
            let yaml = registry_yaml(&dir.join("data"), port, Some(upstream), false);
            std::fs::write(&config, yaml)?;
            let mut cmd = std::process::Command::new(&cli.registry);
            cmd.arg("serve").arg(&config);
            Proc::spawn(cmd, &log)?
        }
    };
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await?;
    Ok((proc, url))
}

/// stowage's `stowage_evictions_total` now.
async fn evictions(base: &str) -> Option<u64> {
    let c = reqwest::Client::builder().no_proxy().build().ok()?;
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metric(&text, "stowage_evictions_total")
}

/// Every client at once against `base`; (wall time, sorted client times, failures).
async fn drive(
    base: &str,
    images: &[Arc<Image>],
    o: &Opts,
) -> Result<(Duration, Vec<Duration>, usize), BoxError> {
    let cs = clients(o.clients)?;
    let t0 = Instant::now();
    let tasks: Vec<_> = cs
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let img = images[i % images.len()].clone();
            tokio::spawn(pull(c, base.to_owned(), img, o.parallel, t0))
        })
        .collect();
    let (mut times, mut failures) = (Vec::new(), 0);
    for t in tasks {
        match t.await? {
            Ok(d) => times.push(d),
            Err(e) => {
                eprintln!("many images: a pull failed: {e}");
                failures += 1;
            }
        }
    }
    let wall = t0.elapsed();
    times.sort();
    Ok((wall, times, failures))
}

/// One cold run of `kind`: a fresh server, every client at once, the cache sampled throughout.
async fn run_once(
    cli: &Cli,
    upstream: &mut Upstream,
    dir: &Path,
    kind: ServerKind,
    images: &[Arc<Image>],
    o: &Opts,
) -> Result<Run, BoxError> {
    let budget = o.budget();
    let (proc, base) = start(kind, cli, &upstream.url, dir, budget).await?;
    let from = upstream.sync_log().await?.len();
    let evictions0 = match kind {
        ServerKind::Stowage => evictions(&base).await,
        ServerKind::Distribution => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = (kind == ServerKind::Stowage).then(|| format!("{base}/metrics"));
    let sampler = tokio::spawn(sample(metrics, dir.join("data"), stop.clone()));
    let (wall, clients, failures) = drive(&base, images, o).await?;
    // distribution's proxy may still be storing what it streamed: let it finish, sampling on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    let peaks = sampler.await?;
    let log = upstream.sync_log().await?;
    let (upstream_gets, upstream_bytes) = Upstream::blob_gets(&log, from);
    let evictions = match (evictions0, evictions(&base).await) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let total_bytes = images
        .iter()
        .flat_map(|i| std::iter::once(&i.config).chain(&i.layers))
        .map(|(_, s)| s)
        .sum();
    Ok(Run {
        server: kind,
        wall,
        clients,
        failures,
        upstream_bytes,
        upstream_gets,
        total_bytes,
        peak_gauge: peaks.gauge,
        peak_disk: peaks.disk,
        samples: peaks.samples,
        evictions,
        budget,
        peak_rss_kib: proc.peak_rss_kib(),
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// A Markdown row of one run.
fn row(r: &Run) -> String {
    let peak = match r.server {
        ServerKind::Stowage => format!(
            "{:.1} MiB (gauge {} / files {:.1}) of {:.0} MiB",
            mib(r.peak()),
            r.peak_gauge
                .map_or("?".to_owned(), |g| format!("{:.1}", mib(g))),
            mib(r.peak_disk),
            mib(r.budget)
        ),
        ServerKind::Distribution => format!("{:.1} MiB (files; no budget)", mib(r.peak_disk)),
    };
    format!(
        "| {} | {:.2} s | {:.2} s / {:.2} s | {:.2}x ({} GETs) | {} | {peak} ({} samples) | {} | {} |",
        r.server.name(),
        r.wall.as_secs_f64(),
        r.client_p50().as_secs_f64(),
        r.client_max().as_secs_f64(),
        r.upstream_bytes as f64 / r.total_bytes as f64,
        r.upstream_gets,
        r.failures,
        r.samples,
        r.evictions.map_or("–".to_owned(), |e| e.to_string()),
        r.peak_rss_kib
            .map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
    )
}

/// Loads the images into `upstream`, then `o.runs` cold runs per server, the servers taking
/// turns (run 1 of each, then run 2 of each: both see the same background load).
pub async fn run(
    cli: &Cli,
    upstream: &mut Upstream,
    work: &Path,
    o: &Opts,
) -> Result<Vec<Run>, BoxError> {
    let images: Vec<Arc<Image>> = load(&upstream.url, o)
        .await?
        .into_iter()
        .map(Arc::new)
        .collect();
    let mut runs = Vec::new();
    for i in 0..o.runs.max(1) {
        for &kind in &cli.servers {
            let dir = work.join(format!("many-{}-{i}", kind.name().replace(' ', "-")));
            let r = run_once(cli, upstream, &dir, kind, &images, o).await?;
            note(&format!("many images, run {}: {}", i + 1, row(&r)));
            runs.push(r);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(runs)
}

/// The table's header.
pub fn header(o: &Opts) -> String {
    format!(
        "many images: {} clients at once, {} images of {} x {} MiB ({:.0} MiB), \
         {} layers at a time per client; stowage's budget {:.0} MiB\n\n\
         | server | wall time | per client p50 / max | upstream bytes (x images) | failed pulls | \
         peak cache vs budget | evictions | peak RSS |\n|---|---|---|---|---|---|---|---|",
        o.clients,
        o.images,
        o.layers,
        o.layer_mib,
        mib(o.layer_bytes()),
        o.parallel,
        mib(o.budget())
    )
}

/// The `many-images` subcommand: its own upstream, one table row per run.
pub async fn command(cli: &Cli, work: &Path, o: &Opts) -> Result<(), BoxError> {
    let mut upstream = Upstream::start(&cli.registry, work).await?;
    let runs = run(cli, &mut upstream, work, o).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", header(o))?;
    for r in &runs {
        writeln!(out, "{}", row(r))?;
    }
    let failed: usize = runs.iter().map(|r| r.failures).sum();
    let over = runs
        .iter()
        .filter(|r| r.server == ServerKind::Stowage && r.peak() > r.budget)
        .count();
    if failed > 0 || over > 0 {
        return Err(format!("{failed} failed pulls, {over} stowage runs over budget").into());
    }
    Ok(())
}

/// The figures of `kind` for `all`'s JSON: the median run's times, every run's wall time, the
/// failures summed and the peaks maxed over the runs.
pub fn figures(runs: &[Run], kind: ServerKind) -> Option<serde_json::Value> {
    let mut mine: Vec<&Run> = runs.iter().filter(|r| r.server == kind).collect();
    mine.sort_by_key(|r| r.wall);
    let median = mine.get(mine.len() / 2)?;
    let peak = mine.iter().map(|r| r.peak()).max().unwrap_or(0);
    let gauge = mine.iter().filter_map(|r| r.peak_gauge).max();
    let disk = mine.iter().map(|r| r.peak_disk).max().unwrap_or(0);
    Some(serde_json::json!({
        "many_wall_s": median.wall.as_secs_f64(),
        "many_wall_s_runs": mine.iter().map(|r| r.wall.as_secs_f64()).collect::<Vec<_>>(),
        "many_client_p50_s": median.client_p50().as_secs_f64(),
        "many_client_max_s": median.client_max().as_secs_f64(),
        "many_upstream_x": mine.iter().map(|r| r.upstream_bytes as f64 / r.total_bytes as f64)
            .fold(0.0, f64::max),
        "many_upstream_gets": median.upstream_gets,
        "many_failed_pulls": mine.iter().map(|r| r.failures).sum::<usize>(),
        "many_peak_mib": mib(peak),
        "many_peak_gauge_mib": gauge.map(mib),
        "many_peak_files_mib": mib(disk),
        "many_budget_mib": mib(median.budget),
        "many_evictions": median.evictions,
        "many_peak_rss_mib": mine.iter().filter_map(|r| r.peak_rss_kib).max()
            .map(|k| k as f64 / 1024.0),
    }))
}

/// One row of `all`'s table: (workload, unit, JSON key, peer name, peer's key and server).
pub struct Row {
    pub workload: String,
    pub unit: &'static str,
    pub key: &'static str,
    pub peer_name: &'static str,
    pub peer: (ServerKind, &'static str),
}

/// `all`'s rows for this workload: stowage against distribution, and stowage's peak against
/// its budget.
pub fn rows(o: &Opts) -> Vec<Row> {
    let w = |what: &str| {
        format!(
            "many images, {} clients x {} x {} MiB, budget {:.0} MiB: {what}",
            o.clients,
            o.layers,
            o.layer_mib,
            mib(o.budget())
        )
    };
    let d = |what: &str, unit, key| Row {
        workload: w(what),
        unit,
        key,
        peer_name: "distribution",
        peer: (ServerKind::Distribution, key),
    };
    let runs = if o.runs > 1 {
        format!(" (median of {})", o.runs)
    } else {
        String::new()
    };
    vec![
        d(&format!("wall time{runs}"), "s", "many_wall_s"),
        d("per-client p50", "s", "many_client_p50_s"),
        d("per-client max", "s", "many_client_max_s"),
        d("upstream bytes (x images)", "x", "many_upstream_x"),
        d("failed pulls", "count", "many_failed_pulls"),
        Row {
            workload: w("peak cache size"),
            unit: "MiB",
            key: "many_peak_mib",
            peer_name: "budget",
            peer: (ServerKind::Stowage, "many_budget_mib"),
        },
    ]
}
