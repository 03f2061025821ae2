//! `stowage-bench`: benchmarks stowage against distribution's own pull-through proxy
//! (Debian's `docker-registry` with `proxy.remoteurl`), both in front of the same local
//! `docker-registry` upstream. A command, not a test: it prints a Markdown table for
//! `BENCHMARKS.md`.
//!
//! Workloads are subcommands; each run starts every server afresh (cold cache, fresh process, so
//! `VmHWM` is that run's peak RSS) and measures, per server and client count:
//! - upstream bytes: the sizes of the blob `GET`s in the upstream's access log, as a multiple of
//!   the blob size;
//! - wall time until the last client has its last byte;
//! - time to first byte (median and worst over the clients);
//! - the server's peak RSS (`VmHWM` from `/proc/<pid>/status`).
//!
//! ```text
//! cargo build --release --bins
//! target/release/stowage-bench cold-blob --size-mib 256 --clients 1,8,32
//! ```
//!
//! To add a workload: a new [`Workload`] variant and a function that drives clients against a
//! [`Server`] and returns [`Sample`]s; the servers, upstream and reporting are shared.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use rand::RngCore;
use sha2::{Digest as _, Sha256};

#[derive(Parser)]
#[command(about = "Benchmarks stowage against distribution's pull-through proxy")]
struct Cli {
    /// The stowage binary (default: `stowage` next to this program).
    #[arg(long, global = true)]
    stowage: Option<PathBuf>,
    /// distribution's registry binary.
    #[arg(long, global = true, default_value = "docker-registry")]
    registry: String,
    /// Servers to compare.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "stowage,distribution"
    )]
    servers: Vec<ServerKind>,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand)]
enum Workload {
    /// One cold blob fetched by N concurrent clients at once.
    ColdBlob {
        /// Blob size in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: usize,
        /// Client counts, one cold run each.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        clients: Vec<usize>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ServerKind {
    Stowage,
    Distribution,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            ServerKind::Stowage => "stowage",
            ServerKind::Distribution => "distribution proxy",
        }
    }
}

/// One measured run.
struct Sample {
    server: ServerKind,
    clients: usize,
    upstream_bytes: u64,
    upstream_gets: usize,
    wall: Duration,
    ttfb_median: Duration,
    ttfb_max: Duration,
    peak_rss_kib: Option<u64>,
    failures: usize,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed on drop.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(mut cmd: Command, log: &Path) -> Result<Proc, BoxError> {
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Proc { child })
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry_yaml(data: &Path, port: u16, remote: Option<&str>, access_log: bool) -> String {
    let mut y = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: {}\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: stowage-bench\n",
        !access_log,
        data.display()
    );
    if let Some(r) = remote {
        y.push_str(&format!("proxy:\n  remoteurl: {r}\n"));
    }
    y
}

async fn wait_ready(url: &str) -> Result<(), BoxError> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = client.get(format!("{url}/v2/")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{url} did not become ready").into())
}

/// The shared upstream: a plain `docker-registry` with its access log.
struct Upstream {
    _proc: Proc,
    url: String,
    log: PathBuf,
    markers: u64,
}

impl Upstream {
    async fn start(registry: &str, dir: &Path) -> Result<Upstream, BoxError> {
        let port = free_port()?;
        let config = dir.join("upstream.yml");
        std::fs::write(
            &config,
            registry_yaml(&dir.join("upstream-data"), port, None, true),
        )?;
        let log = dir.join("upstream.log");
        let mut cmd = Command::new(registry);
        cmd.arg("serve").arg(&config);
        let proc = Proc::spawn(cmd, &log)?;
        let url = format!("http://127.0.0.1:{port}");
        wait_ready(&url).await?;
        Ok(Upstream {
            _proc: proc,
            url,
            log,
            markers: 0,
        })
    }

    /// Everything answered before this call is in the access log afterwards (distribution writes
    /// a line when a response completes): a marked request, then wait for its line.
    async fn sync_log(&mut self) -> Result<String, BoxError> {
        self.markers += 1;
        let marker = format!("stowage-bench-marker={}", self.markers);
        reqwest::Client::builder()
            .no_proxy()
            .build()?
            .get(format!("{}/v2/?{marker}", self.url))
            .send()
            .await?;
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log)?;
            if log.contains(&marker) {
                return Ok(log);
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err("upstream access log marker never appeared".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Blob `GET`s (count, bytes sent) in the log after byte offset `from`.
    fn blob_gets(log: &str, from: usize) -> (usize, u64) {
        let mut count = 0;
        let mut bytes = 0;
        for line in log.get(from..).unwrap_or("").lines() {
            // `IP - - [date] "GET /v2/<name>/blobs/sha256:… HTTP/1.1" 200 268435456 "" "ua"`
            let Some(q) = line.find("\"GET /v2/") else {
                continue;
            };
            let rest = &line[q + 1..];
            let Some(close) = rest.find('"') else {
                continue;
            };
            if !rest[..close].contains("/blobs/sha256:") {
                continue;
            }
            let mut fields = rest[close + 1..].split_whitespace();
            let _status = fields.next();
            if let Some(size) = fields.next().and_then(|s| s.parse::<u64>().ok()) {
                count += 1;
                bytes += size;
            }
        }
        (count, bytes)
    }
}

/// A server under test, fresh for each run.
struct Server {
    proc: Proc,
    url: String,
}

impl Server {
    async fn start(
        kind: ServerKind,
        cli: &Cli,
        upstream: &Upstream,
        dir: &Path,
    ) -> Result<Server, BoxError> {
        let port = free_port()?;
        std::fs::create_dir_all(dir)?;
        let proc = match kind {
            ServerKind::Stowage => {
                let bin = match &cli.stowage {
                    Some(p) => p.clone(),
                    None => std::env::current_exe()?.with_file_name("stowage"),
                };
                let config = dir.join("stowage.toml");
                std::fs::write(
                    &config,
                    format!(
                        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\npath = \"{}\"\n\
                         [[upstreams]]\nhost = \"docker.io\"\nurl = \"{}\"\n",
                        dir.join("data").display(),
                        upstream.url
                    ),
                )?;
                let mut cmd = Command::new(bin);
                cmd.arg("serve")
                    .arg("--config")
                    .arg(&config)
                    .env("RUST_LOG", "warn");
                Proc::spawn(cmd, &dir.join("server.log"))?
            }
            ServerKind::Distribution => {
                let config = dir.join("proxy.yml");
                std::fs::write(
                    &config,
                    registry_yaml(&dir.join("data"), port, Some(&upstream.url), false),
                )?;
                let mut cmd = Command::new(&cli.registry);
                cmd.arg("serve").arg(&config);
                Proc::spawn(cmd, &dir.join("server.log"))?
            }
        };
        let url = format!("http://127.0.0.1:{port}");
        wait_ready(&url).await?;
        Ok(Server { proc, url })
    }
}

/// Pushes `bytes` to the upstream as a blob of `repo` (monolithic upload).
async fn push_blob(upstream: &str, repo: &str, bytes: Vec<u8>) -> Result<String, BoxError> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let client = reqwest::Client::builder().no_proxy().build()?;
    let start = client
        .post(format!("{upstream}/v2/{repo}/blobs/uploads/"))
        .header("content-length", "0")
        .send()
        .await?;
    let location = start
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or("upload start without Location")?
        .to_owned();
    let location = if location.starts_with('/') {
        format!("{upstream}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = client
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await?;
    if put.status().as_u16() != 201 {
        return Err(format!("blob upload answered {}", put.status()).into());
    }
    Ok(digest)
}

/// One client: (time to first byte, time to last byte, bytes), timed from `t0`.
async fn fetch(url: String, t0: Instant) -> Result<(Duration, Duration, u64), BoxError> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client.get(&url).send().await?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: {}", resp.status()).into());
    }
    let mut stream = resp.bytes_stream();
    let mut ttfb = None;
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if ttfb.is_none() && !chunk.is_empty() {
            ttfb = Some(t0.elapsed());
        }
        n += chunk.len() as u64;
    }
    Ok((ttfb.unwrap_or_else(|| t0.elapsed()), t0.elapsed(), n))
}

async fn cold_blob(
    cli: &Cli,
    work: &Path,
    size_mib: usize,
    counts: &[usize],
) -> Result<Vec<Sample>, BoxError> {
    let mut upstream = Upstream::start(&cli.registry, work).await?;
    let mut bytes = vec![0u8; size_mib << 20];
    rand::thread_rng().fill_bytes(&mut bytes);
    let size = bytes.len() as u64;
    let repo = "bench/cold";
    let digest = push_blob(&upstream.url, repo, bytes).await?;
    eprintln!("pushed {digest} ({size_mib} MiB) to {}", upstream.url);
    let mut samples = Vec::new();
    for &kind in &cli.servers {
        for &n in counts {
            let dir = work.join(format!("{}-{n}", kind.name().replace(' ', "-")));
            let server = Server::start(kind, cli, &upstream, &dir).await?;
            let from = upstream.sync_log().await?.len();
            let url = format!("{}/v2/{repo}/blobs/{digest}", server.url);
            let t0 = Instant::now();
            let tasks: Vec<_> = (0..n)
                .map(|_| tokio::spawn(fetch(url.clone(), t0)))
                .collect();
            let mut ttfbs = Vec::new();
            let mut wall = Duration::ZERO;
            let mut failures = 0;
            for t in tasks {
                match t.await? {
                    Ok((ttfb, done, got)) if got == size => {
                        ttfbs.push(ttfb);
                        wall = wall.max(done);
                    }
                    Ok((_, _, got)) => {
                        eprintln!("{}: a client got {got} of {size} bytes", kind.name());
                        failures += 1;
                    }
                    Err(e) => {
                        eprintln!("{}: a client failed: {e}", kind.name());
                        failures += 1;
                    }
                }
            }
            // Let background transfers (distribution's proxy keeps fetching to store) finish.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let log = upstream.sync_log().await?;
            let (gets, up_bytes) = Upstream::blob_gets(&log, from);
            ttfbs.sort();
            let sample = Sample {
                server: kind,
                clients: n,
                upstream_bytes: up_bytes,
                upstream_gets: gets,
                wall,
                ttfb_median: ttfbs.get(ttfbs.len() / 2).copied().unwrap_or_default(),
                ttfb_max: ttfbs.last().copied().unwrap_or_default(),
                peak_rss_kib: server.proc.peak_rss_kib(),
                failures,
            };
            eprintln!("{}", row(&sample, size));
            samples.push(sample);
            drop(server);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(samples)
}

fn row(s: &Sample, size: u64) -> String {
    format!(
        "| {} | {} | {:.2}x ({} GETs) | {:.2} s | {:.0} ms / {:.0} ms | {} | {} |",
        s.server.name(),
        s.clients,
        s.upstream_bytes as f64 / size as f64,
        s.upstream_gets,
        s.wall.as_secs_f64(),
        s.ttfb_median.as_secs_f64() * 1000.0,
        s.ttfb_max.as_secs_f64() * 1000.0,
        s.peak_rss_kib
            .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "?".into()),
        s.failures,
    )
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stowage-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let work = std::env::temp_dir().join(format!("stowage-bench-{}", std::process::id()));
    let result = rt.block_on(async {
        std::fs::create_dir_all(&work)?;
        match &cli.workload {
            Workload::ColdBlob { size_mib, clients } => {
                let samples = cold_blob(&cli, &work, *size_mib, clients).await?;
                let size = (*size_mib as u64) << 20;
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "cold blob of {size_mib} MiB, N concurrent clients\n\n\
                     | server | N | upstream bytes | wall time (last client done) | TTFB median / max | peak RSS | failed clients |\n\
                     |---|---|---|---|---|---|---|"
                )?;
                for s in &samples {
                    writeln!(out, "{}", row(s, size))?;
                }
                Ok::<(), BoxError>(())
            }
        }
    });
    let _ = std::fs::remove_dir_all(&work);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stowage-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
