//! The cold pull: one client pulls a multi-layer image (the manifest by tag, then every blob in
//! turn) through a fresh stowage, against pulling it straight from the upstream, optionally with
//! the upstream behind a [`shape`] proxy (an internet-like round trip and rate).
//! The direct pull goes through the same proxy, so both see the same path; each run pairs a
//! direct pull with a stowage pull seconds apart (the ratio is per pair, on a shared machine).

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;

use super::shape::{self, Shape};
use super::{all, note, stowage_bin, stowage_command, BoxError, Cli, Proc, Upstream};

/// The subcommand's options.
#[derive(clap::Args, Clone, Debug)]
pub struct Opts {
    /// Round trip between the cache (or the direct client) and the upstream, in ms; 0 and
    /// `--rate-mbit 0`: plain loopback, no proxy.
    #[arg(long, default_value_t = 25)]
    pub rtt_ms: u64,
    /// Bottleneck rate in each direction, in Mbit/s; 0: unlimited.
    #[arg(long, default_value_t = 400)]
    pub rate_mbit: u64,
    /// Layers of the image.
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Size of each layer in MiB.
    #[arg(long, default_value_t = 16)]
    pub layer_mib: usize,
    /// Pairs of pulls (direct, then through a fresh stowage).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print each pull's per-blob timeline (first and last byte) on stderr.
    #[arg(long)]
    pub timeline: bool,
    /// nginx, for a third pull of each pair through a fresh nginx `proxy_cache` (the peer that
    /// copies to disk and serves without verifying anything); empty: skip it.
    #[arg(long, default_value = "nginx")]
    pub nginx: String,
}

/// One pull: its total time and, per blob (manifest first), first and last byte since start.
pub struct Pull {
    pub total: Duration,
    pub steps: Vec<(Duration, Duration)>,
    /// CPU time every process on the path spent during the pull (upstream, the cache if any,
    /// this client), if `/proc` says.
    pub cpu: Option<Duration>,
}

impl Pull {
    /// The shortest this pull could take on `cores` cores if its CPU work were spread perfectly:
    /// a bound no scheduling beats, for judging a ratio on a machine this small.
    pub fn cpu_floor(&self, cores: usize) -> Option<Duration> {
        Some(self.cpu? / cores.max(1) as u32)
    }
}

/// Cores this machine gives its processes.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU time of the processes `pids` so far (see [`cpu_time`]).
fn cpu_of(pids: &[u32]) -> Option<Duration> {
    pids.iter().map(|&p| cpu_time(p)).sum()
}

/// Runs a pull and adds the CPU the processes `pids` spent meanwhile.
async fn pull_measured(
    base: &str,
    image: (&str, &str, &[(String, u64)]),
    pids: &[u32],
) -> Result<Pull, BoxError> {
    let before = cpu_of(pids);
    let mut p = pull(base, image.0, image.1, image.2).await?;
    p.cpu = cpu_of(pids).zip(before).map(|(a, b)| a.saturating_sub(b));
    Ok(p)
}

/// One pair of pulls (and the peer's, if it ran).
pub struct Pair {
    pub direct: Pull,
    pub stowage: Pull,
    /// The same pull through a fresh nginx caching proxy.
    pub nginx: Option<Pull>,
    /// CPU time stowage spent from being ready to the pull's last byte, all threads (`None`
    /// where `/proc` does not say). On a shared machine this is steadier than the wall clock,
    /// and on a saturated one it is what the pull pays for.
    pub stowage_cpu: Option<Duration>,
}

impl Pair {
    pub fn ratio(&self) -> f64 {
        self.stowage.total.as_secs_f64() / self.direct.total.as_secs_f64()
    }

    /// The lowest ratio this machine allows for the stowage pull: its processes' CPU spread
    /// perfectly over the machine's cores, over the direct pull's wall time.
    pub fn floor_ratio(&self) -> Option<f64> {
        let floor = self.stowage.cpu_floor(cores())?;
        Some(floor.as_secs_f64() / self.direct.total.as_secs_f64())
    }

    /// nginx's time over the direct pull's.
    pub fn nginx_ratio(&self) -> Option<f64> {
        let n = self.nginx.as_ref()?;
        Some(n.total.as_secs_f64() / self.direct.total.as_secs_f64())
    }
}

/// nginx as a pull-through cache of `upstream` (every `200` kept, keyed by URL) with an empty
/// cache in `dir`.
fn start_nginx_cache(nginx: &str, dir: &Path, upstream: &str) -> Result<(Proc, String), BoxError> {
    let cache = format!(
        "proxy_cache_path {}/cache levels=1:2 keys_zone=blobs:10m max_size=10g \
         use_temp_path=off;",
        dir.display()
    );
    let location = format!(
        "location / {{\n      proxy_pass {upstream};\n      proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\";\n      proxy_cache blobs;\n\
         proxy_cache_valid 200 1h;\n    }}"
    );
    super::start_nginx_with(nginx, dir, &cache, &location)
}

/// A pull through a fresh nginx cache in `dir`, or `None` if nginx cannot be started.
async fn nginx_pull(
    nginx: &str,
    dir: &Path,
    via: &str,
    image: (&str, &str, &[(String, u64)]),
    pids: &[u32],
) -> Result<Option<Pull>, BoxError> {
    if nginx.is_empty() {
        return Ok(None);
    }
    let (proc, url) = match start_nginx_cache(nginx, dir, via) {
        Ok(p) => p,
        Err(e) => {
            note(&format!("nginx peer skipped: {e}"));
            return Ok(None);
        }
    };
    super::wait_ready(&url).await?;
    let pids: Vec<u32> = pids.iter().copied().chain([proc.child.id()]).collect();
    let p = pull_measured(&url, image, &pids).await?;
    drop(proc);
    let _ = std::fs::remove_dir_all(dir);
    Ok(Some(p))
}

/// CPU time `pid` has spent so far, summed over its live threads (`/proc/<pid>/task/*/schedstat`,
/// nanoseconds on a CPU). Threads that ended are not counted: stowage's runtime and blocking
/// threads outlive a pull.
fn cpu_time(pid: u32) -> Option<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(ns))
}

/// Reads a response to its end: (first byte, last byte, bytes) since `t0`.
async fn drain(
    resp: reqwest::Response,
    t0: Instant,
) -> Result<(Duration, Duration, u64), BoxError> {
    if !resp.status().is_success() {
        return Err(format!("GET {} answered {}", resp.url(), resp.status()).into());
    }
    let mut s = resp.bytes_stream();
    let (mut first, mut n) = (None, 0u64);
    while let Some(c) = s.next().await {
        n += c?.len() as u64;
        first.get_or_insert_with(|| t0.elapsed());
    }
    let last = t0.elapsed();
    Ok((first.unwrap_or(last), last, n))
}

/// A pull by one client, timed per step.
async fn pull(
    base: &str,
    repo: &str,
    tag: &str,
    blobs: &[(String, u64)],
) -> Result<Pull, BoxError> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let t0 = Instant::now();
    let m = client
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", all::ACCEPT)
        .send()
        .await?;
    let (f, l, _) = drain(m, t0).await?;
    let mut steps = vec![(f, l)];
    for (d, size) in blobs {
        let r = client
            .get(format!("{base}/v2/{repo}/blobs/{d}"))
            .send()
            .await?;
        let (f, l, n) = drain(r, t0).await?;
        if n != *size {
            return Err(format!("blob {d}: {n} of {size} bytes").into());
        }
        steps.push((f, l));
    }
    Ok(Pull {
        total: t0.elapsed(),
        steps,
        cpu: None,
    })
}

fn timeline(label: &str, p: &Pull) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let steps: Vec<String> = p
        .steps
        .iter()
        .map(|(f, l)| format!("{:.0}/{:.0}", ms(*f), ms(*l)))
        .collect();
    note(&format!(
        "{label}: {:.0} ms; first/last byte (ms) manifest, blobs: {}",
        ms(p.total),
        steps.join(" ")
    ));
}

/// `runs` pairs of pulls of the image (already in `upstream`) with the upstream shaped as
/// `shape`: each pair a direct pull and a pull through a fresh stowage.
#[allow(clippy::too_many_arguments)]
pub async fn runs(
    cli: &Cli,
    work: &Path,
    upstream: &Upstream,
    image: (&str, &str, &[(String, u64)]),
    shape: Shape,
    runs: usize,
    show: bool,
    nginx: &str,
) -> Result<Vec<Pair>, BoxError> {
    let proxy = if shape.is_none() {
        None
    } else {
        let target = upstream.url.trim_start_matches("http://").parse()?;
        Some(shape::start(target, shape).await?)
    };
    let via = proxy.as_ref().map_or(upstream.url.as_str(), |p| &p.url);
    let bin = stowage_bin(cli)?;
    let mut pairs = Vec::new();
    for i in 0..runs {
        let pids = [upstream.pid(), std::process::id()];
        let direct = pull_measured(via, image, &pids).await?;
        let dir = work.join(format!("cold-pull-{i}"));
        std::fs::create_dir_all(&dir)?;
        let port = super::free_port()?;
        let cmd = stowage_command(&bin, &dir, &dir.join("data"), port, via, "")?;
        let server = Proc::spawn(cmd, &dir.join("server.log"))?;
        let url = format!("http://127.0.0.1:{port}");
        super::wait_ready(&url).await?;
        let cpu_before = cpu_time(server.child.id());
        let with_server = [upstream.pid(), std::process::id(), server.child.id()];
        let stowage = match pull_measured(&url, image, &with_server).await {
            Ok(p) => p,
            Err(e) => {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                return Err(format!("pull through stowage: {e}; its log:\n{log}").into());
            }
        };
        let stowage_cpu = cpu_time(server.child.id())
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before));
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
        let nginx_dir = work.join(format!("cold-nginx-{i}"));
        let nginx = nginx_pull(nginx, &nginx_dir, via, image, &pids).await?;
        if show {
            timeline("direct ", &direct);
            timeline("stowage", &stowage);
            if let Some(n) = &nginx {
                timeline("nginx  ", n);
            }
        }
        let pair = Pair {
            direct,
            stowage,
            nginx,
            stowage_cpu,
        };
        note(&format!(
            "cold pull {}/{runs} ({:?} RTT, {} B/s): stowage {:.3} s (CPU {}), direct {:.3} s, \
             {:.2}x; nginx cache {}; CPU of all processes: direct {}, stowage {}, nginx {}; \
             floor {}",
            i + 1,
            shape.rtt,
            shape.rate,
            pair.stowage.total.as_secs_f64(),
            pair.stowage_cpu
                .map_or("?".to_owned(), |c| format!("{:.3} s", c.as_secs_f64())),
            pair.direct.total.as_secs_f64(),
            pair.ratio(),
            pair.nginx_ratio()
                .map_or("-".to_owned(), |r| format!("{r:.2}x")),
            secs(pair.direct.cpu),
            secs(pair.stowage.cpu),
            secs(pair.nginx.as_ref().and_then(|n| n.cpu)),
            pair.floor_ratio()
                .map_or("-".to_owned(), |r| format!("{r:.2}x")),
        ));
        pairs.push(pair);
    }
    Ok(pairs)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".to_owned(), |d| format!("{:.3} s", d.as_secs_f64()))
}

/// Median, min and max of `v` (not empty).
pub fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// One figure of a pair, if measured.
type Figure = dyn Fn(&Pair) -> Option<f64>;

/// The `cold-pull` subcommand: its own upstream and image, then `o.runs` pairs; a table.
pub async fn command(cli: &Cli, work: &Path, o: &Opts) -> Result<(), BoxError> {
    let upstream = Upstream::start(&cli.registry, work).await?;
    let (repo, tag) = ("bench/image", "v1");
    let (_, blobs) = all::push_image(&upstream.url, repo, tag, o.layers, o.layer_mib << 20).await?;
    let shape = Shape::new(o.rtt_ms, o.rate_mbit);
    let image = (repo, tag, blobs.as_slice());
    let pairs = runs(
        cli,
        work,
        &upstream,
        image,
        shape,
        o.runs.max(1),
        o.timeline,
        &o.nginx,
    )
    .await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "cold pull of {} x {} MiB layers, 1 client; upstream {}\n\n\
         | | median | min | max |\n|---|---|---|---|",
        o.layers,
        o.layer_mib,
        if shape.is_none() {
            "on loopback".to_owned()
        } else {
            format!("behind {} ms RTT, {} Mbit/s", o.rtt_ms, o.rate_mbit)
        }
    )?;
    let col = |f: &dyn Fn(&Pair) -> f64| spread(pairs.iter().map(f).collect());
    for (name, (m, lo, hi), unit) in [
        ("stowage", col(&|p| p.stowage.total.as_secs_f64()), " s"),
        ("direct", col(&|p| p.direct.total.as_secs_f64()), " s"),
        ("ratio (per pair)", col(&|p| p.ratio()), "x"),
    ] {
        writeln!(
            out,
            "| {name} | {m:.3}{unit} | {lo:.3}{unit} | {hi:.3}{unit} |"
        )?;
    }
    let ng: Vec<f64> = pairs.iter().filter_map(Pair::nginx_ratio).collect();
    if !ng.is_empty() {
        let (m, lo, hi) = spread(ng);
        let name = "nginx proxy_cache over direct";
        writeln!(out, "| {name} | {m:.3}x | {lo:.3}x | {hi:.3}x |")?;
    }
    let rows: [(&str, &Figure, &str); 5] = [
        (
            "stowage CPU during the pull",
            &|p| p.stowage_cpu.map(|c| c.as_secs_f64()),
            " s",
        ),
        (
            "CPU of all processes, direct pull",
            &|p| p.direct.cpu.map(|c| c.as_secs_f64()),
            " s",
        ),
        (
            "CPU of all processes, stowage pull",
            &|p| p.stowage.cpu.map(|c| c.as_secs_f64()),
            " s",
        ),
        (
            "CPU of all processes, nginx pull",
            &|p| p.nginx.as_ref()?.cpu.map(|c| c.as_secs_f64()),
            " s",
        ),
        (
            "ratio floor (stowage pull's CPU / cores / direct)",
            &|p| p.floor_ratio(),
            "x",
        ),
    ];
    for (name, f, unit) in rows {
        let v: Vec<f64> = pairs.iter().filter_map(f).collect();
        if !v.is_empty() {
            let (m, lo, hi) = spread(v);
            writeln!(
                out,
                "| {name} | {m:.3}{unit} | {lo:.3}{unit} | {hi:.3}{unit} |"
            )?;
        }
    }
    Ok(())
}

/// The shaped path of `all`: an internet-like upstream (the subcommand's defaults).
const ALL_SHAPED: (u64, u64) = (25, 400);

/// Pairs per path in `all`.
const ALL_RUNS: usize = 3;

/// The cold-pull pairs of `all`, on loopback and with the upstream shaped, as figures for
/// stowage's JSON object: per path the median times and the median, min and max ratio.
pub async fn for_all(
    cli: &Cli,
    work: &Path,
    upstream: &Upstream,
    image: (&str, &str, &[(String, u64)]),
    nginx: &str,
) -> Result<serde_json::Value, BoxError> {
    let mut figures = serde_json::Map::new();
    for (key, shape) in [
        ("loopback", Shape::new(0, 0)),
        ("shaped", Shape::new(ALL_SHAPED.0, ALL_SHAPED.1)),
    ] {
        let pairs = runs(cli, work, upstream, image, shape, ALL_RUNS, false, nginx).await?;
        let col = |f: &dyn Fn(&Pair) -> f64| spread(pairs.iter().map(f).collect());
        let (s, _, _) = col(&|p| p.stowage.total.as_secs_f64());
        let (d, _, _) = col(&|p| p.direct.total.as_secs_f64());
        let (r, lo, hi) = col(&|p| p.ratio());
        figures.insert(format!("cold_pull_{key}_s"), s.into());
        figures.insert(format!("direct_pull_{key}_s"), d.into());
        figures.insert(format!("cold_pull_{key}_ratio"), r.into());
        figures.insert(format!("cold_pull_{key}_ratio_min"), lo.into());
        figures.insert(format!("cold_pull_{key}_ratio_max"), hi.into());
        let ng: Vec<f64> = pairs.iter().filter_map(Pair::nginx_ratio).collect();
        let ng_s: Vec<f64> = pairs
            .iter()
            .filter_map(|p| Some(p.nginx.as_ref()?.total.as_secs_f64()))
            .collect();
        if !ng.is_empty() {
            figures.insert(format!("nginx_cache_pull_{key}_ratio"), spread(ng).0.into());
            figures.insert(format!("nginx_cache_pull_{key}_s"), spread(ng_s).0.into());
        }
        let fl: Vec<f64> = pairs.iter().filter_map(Pair::floor_ratio).collect();
        let fl_s: Vec<f64> = pairs
            .iter()
            .filter_map(|p| Some(p.stowage.cpu_floor(cores())?.as_secs_f64()))
            .collect();
        if !fl.is_empty() {
            figures.insert(format!("cold_pull_{key}_ratio_floor"), spread(fl).0.into());
            figures.insert(format!("cold_pull_{key}_floor_s"), spread(fl_s).0.into());
        }
    }
    Ok(figures.into())
}

/// The path of the shaped figures, for the table.
pub fn shaped_label() -> String {
    format!(
        "cold pull, 1 client, upstream at {} ms RTT / {} Mbit/s (median of {ALL_RUNS})",
        ALL_SHAPED.0, ALL_SHAPED.1
    )
}
