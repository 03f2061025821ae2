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
//! It is its own workspace member (`bench/`), so it is not installed with the server; build both
//! binaries (the bench looks for `stowage` next to itself unless `--stowage` names one):
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/stowage-bench cold-blob --size-mib 256 --clients 1,8,32
//! target/release/stowage-bench push --layers 8 --layer-mib 128 --small-layer-mib 16
//! target/release/stowage-bench all --json bench-results.json
//! ```
//!
//! `all` runs every workload, in one process and against one upstream: (1) warm blob throughput (1
//! and 8 clients) against nginx with `sendfile` serving the same file and a raw read of it (the
//! ceiling) and against distribution's proxy; (2) warm manifests by tag and digest with `wrk -t2
//! -c64`; (3) a cold pull of a multi-layer image against pulling from the upstream directly, then
//! in pairs on loopback and behind a shaping proxy, each pair also pulled through a fresh nginx
//! `proxy_cache` and with the CPU of every process on the path (see [`cold`]: its floor is that
//! CPU over the machine's cores); (4) the cold blob to N = 8 and 32 clients at once (the
//! `cold-blob` runs: upstream bytes, wall time, time to first byte); (5) each server's peak RSS
//! over 1-4; (6) the time from spawning the server until it is ready on a cache holding 100k
//! blobs, its memory 10 s later and once its background reconciliation is over (see [`startup`]);
//! (7) a push with skopeo of an image of random layers to stowage (a `[hosted]` repository) and to
//! a plain distribution registry, the pull back, and the peak RSS during the push at two layer
//! sizes (see [`push`]). It prints one table (stowage, peer, ratio) and writes a JSON file.
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

mod cold;
mod many;
mod push;
mod shape;

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
    /// An image of random layers pushed with skopeo to stowage (`[hosted]`) and to a plain
    /// distribution registry, then pulled back with skopeo: wall times and peak RSS, at two
    /// layer sizes.
    Push(push::Opts),
    /// A cold pull of a multi-layer image by one client through a fresh stowage, against the
    /// same pull straight from the upstream; the upstream behind a shaping proxy (round trip
    /// and rate), or on loopback with `--rtt-ms 0 --rate-mbit 0`.
    ColdPull(cold::Opts),
    /// N clients pulling N different images at once through a cold cache whose budget is half
    /// their total size: wall time, upstream bytes, failed pulls, peak cache size vs budget.
    ManyImages(many::Opts),
    /// Startup alone (workload 6 of `all`): time to ready and resident memory with N cached
    /// blobs, for each N.
    Startup {
        /// Cached blob counts.
        #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
        blobs: Vec<u64>,
        /// Fresh processes timed per server and count.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Every workload in one run: warm blob throughput (vs nginx sendfile and a raw read), warm
    /// manifests with `wrk`, a cold multi-layer pull (vs the upstream directly), the cold blob to
    /// N concurrent clients, peak RSS, startup with 100k cached blobs: one table on stdout and a
    /// JSON file.
    All {
        /// Warm blob size in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: usize,
        /// Layers of the cold-pull image.
        #[arg(long, default_value_t = 8)]
        layers: usize,
        /// Size of each layer in MiB.
        #[arg(long, default_value_t = 16)]
        layer_mib: usize,
        /// Seconds of each `wrk` run.
        #[arg(long, default_value_t = 5)]
        wrk_secs: u64,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-results.json")]
        json: PathBuf,
        /// The nginx binary.
        #[arg(long, default_value = "nginx")]
        nginx: String,
        /// Client counts of the cold-blob runs (workload 4; the blob is the warm one, `--size-mib`).
        #[arg(long, value_delimiter = ',', default_value = "8,32")]
        cold_clients: Vec<usize>,
        /// Cached blobs for the startup runs (workload 6); 0 skips them.
        #[arg(long, default_value_t = 100_000)]
        startup_blobs: u64,
        /// Fresh processes timed per server in the startup runs.
        #[arg(long, default_value_t = 3)]
        startup_runs: usize,
        /// Layers of the pushed image (workload 7).
        #[arg(long, default_value_t = 8)]
        push_layers: usize,
        /// Size of each pushed layer in MiB; 0 skips the push workload.
        #[arg(long, default_value_t = 128)]
        push_layer_mib: usize,
        /// The smaller layer size of the push peak-RSS comparison; 0 skips it.
        #[arg(long, default_value_t = 16)]
        push_small_layer_mib: usize,
        /// Fresh servers per server and layer size in the push workload.
        #[arg(long, default_value_t = 1)]
        push_runs: usize,
        #[command(flatten)]
        many: many::AllOpts,
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

/// A progress line on stderr, stamped with the seconds since the bench started.
fn note(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:7.1} s] {msg}");
}

fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// nginx on loopback with its own prefix in `dir`, `http_extra` in its `http` block and
/// `server_body` in its one `server`; one process (no master), so killing it stops it. Returns
/// the process and its base URL.
fn start_nginx_with(
    nginx: &str,
    dir: &Path,
    http_extra: &str,
    server_body: &str,
) -> Result<(Proc, String), BoxError> {
    let port = free_port()?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nuser root;\n\
             error_log {d}/logs/error.log warn;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             {http_extra}\n\
             server {{\n    listen 127.0.0.1:{port};\n    {server_body}\n  }}\n}}\n",
            d = dir.display(),
        ),
    )?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p").arg(dir).arg("-c").arg(&conf);
    let proc = Proc::spawn(cmd, &dir.join("nginx.out"))?;
    Ok((proc, format!("http://127.0.0.1:{port}")))
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

    /// Resident memory now (`VmRSS`).
    fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Proc {
    /// User + system CPU seconds the process has used so far (`/proc/<pid>/stat`, fields 14
    /// and 15, in clock ticks of 1/100 s as on every Linux the bench targets).
    fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // The command name (field 2) may hold spaces; the fields after it follow its `)`.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some((utime + stime) as f64 / 100.0)
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
    fn pid(&self) -> u32 {
        self._proc.child.id()
    }

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
                let bin = stowage_bin(cli)?;
                let cmd = stowage_command(&bin, dir, &dir.join("data"), port, &upstream.url, "")?;
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

/// The stowage binary under test.
fn stowage_bin(cli: &Cli) -> Result<PathBuf, BoxError> {
    Ok(match &cli.stowage {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("stowage"),
    })
}

/// `stowage serve` on `port` with its cache at `data`, config written in `dir`; `extra` is
/// appended to the config (more TOML sections).
fn stowage_command(
    bin: &Path,
    dir: &Path,
    data: &Path,
    port: u16,
    upstream: &str,
    extra: &str,
) -> Result<Command, BoxError> {
    let config = dir.join("stowage.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\npath = \"{}\"\n\
             [[upstreams]]\nhost = \"docker.io\"\nurl = \"{upstream}\"\n{extra}",
            data.display(),
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn");
    Ok(cmd)
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

/// `n` HTTP clients, each with its own connection pool, built before any timing starts:
/// building one loads the TLS root store, milliseconds of CPU that would otherwise be counted in
/// every client's first byte (32 of them on 2 cores: ~80 ms).
fn clients(n: usize) -> Result<Vec<reqwest::Client>, BoxError> {
    (0..n)
        .map(|_| Ok(reqwest::Client::builder().no_proxy().build()?))
        .collect()
}

/// One client: (time to first byte, time to last byte, bytes), timed from `t0`.
async fn fetch(
    client: reqwest::Client,
    url: String,
    t0: Instant,
) -> Result<(Duration, Duration, u64), BoxError> {
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
    note(&format!(
        "pushed {digest} ({size_mib} MiB) to {}",
        upstream.url
    ));
    cold_blob_runs(cli, &mut upstream, work, repo, &digest, size, counts).await
}

/// Workload 4 against an upstream that holds `repo@digest` (`size` bytes): for every server and
/// client count, a fresh server (empty cache) and N clients fetching the blob at the same instant.
async fn cold_blob_runs(
    cli: &Cli,
    upstream: &mut Upstream,
    work: &Path,
    repo: &str,
    digest: &str,
    size: u64,
    counts: &[usize],
) -> Result<Vec<Sample>, BoxError> {
    let mut samples = Vec::new();
    for &kind in &cli.servers {
        for &n in counts {
            let dir = work.join(format!("cold-{}-{n}", kind.name().replace(' ', "-")));
            let server = Server::start(kind, cli, upstream, &dir).await?;
            let from = upstream.sync_log().await?.len();
            let url = format!("{}/v2/{repo}/blobs/{digest}", server.url);
            let clients = clients(n)?;
            let t0 = Instant::now();
            let tasks: Vec<_> = clients
                .into_iter()
                .map(|c| tokio::spawn(fetch(c, url.clone(), t0)))
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
            note(&row(&sample, size));
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
            Workload::All {
                size_mib,
                layers,
                layer_mib,
                wrk_secs,
                json,
                nginx,
                cold_clients,
                startup_blobs,
                startup_runs,
                push_layers,
                push_layer_mib,
                push_small_layer_mib,
                push_runs,
                many,
            } => {
                let opts = all::Opts {
                    size_mib: *size_mib,
                    layers: *layers,
                    layer_mib: *layer_mib,
                    wrk_secs: *wrk_secs,
                    json: json.clone(),
                    nginx: nginx.clone(),
                    cold_clients: cold_clients.clone(),
                    startup_blobs: *startup_blobs,
                    startup_runs: (*startup_runs).max(1),
                    push: push::Opts {
                        layers: *push_layers,
                        layer_mib: *push_layer_mib,
                        small_layer_mib: *push_small_layer_mib,
                        runs: (*push_runs).max(1),
                    },
                    many: many.opts(),
                };
                all::run(&cli, &work, &opts).await
            }
            Workload::Push(o) => push::command(&cli, &work, o).await,
            Workload::ColdPull(o) => cold::command(&cli, &work, o).await,
            Workload::ManyImages(o) => many::command(&cli, &work, o).await,
            Workload::Startup { blobs, runs } => {
                startup::command(&cli, &work, blobs, (*runs).max(1)).await
            }
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

/// The `all` subcommand: every warm workload, the cold pull and peak RSS in one run.
mod all {
    use super::*;
    use serde_json::json;

    pub struct Opts {
        pub size_mib: usize,
        pub layers: usize,
        pub layer_mib: usize,
        pub wrk_secs: u64,
        pub json: PathBuf,
        pub nginx: String,
        pub cold_clients: Vec<usize>,
        pub startup_blobs: u64,
        pub startup_runs: usize,
        pub push: push::Opts,
        pub many: many::Opts,
    }

    const MANIFEST_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
        application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

    /// One row: a workload, stowage's figure, the peer's, and what "better" means.
    struct Line {
        workload: String,
        unit: &'static str,
        stowage: Option<f64>,
        peer: Option<f64>,
        peer_name: &'static str,
        higher_is_better: bool,
    }

    fn random(n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        rand::thread_rng().fill_bytes(&mut b);
        b
    }

    /// Pushes a schema-2 image of `layers` random layers; returns (manifest digest, blob digests
    /// with sizes, config digest included).
    pub async fn push_image(
        upstream: &str,
        repo: &str,
        tag: &str,
        layers: usize,
        layer_bytes: usize,
    ) -> Result<(String, Vec<(String, u64)>), BoxError> {
        let mut blobs = Vec::new();
        let mut layer_json = Vec::new();
        for _ in 0..layers {
            let d = push_blob(upstream, repo, random(layer_bytes)).await?;
            layer_json.push(json!({
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": layer_bytes, "digest": d,
            }));
            blobs.push((d, layer_bytes as u64));
        }
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }))?;
        let clen = config.len();
        let cd = push_blob(upstream, repo, config).await?;
        blobs.push((cd.clone(), clen as u64));
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "size": clen, "digest": cd},
            "layers": layer_json,
        }))?;
        let md = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
        let put = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .put(format!("{upstream}/v2/{repo}/manifests/{tag}"))
            .header("content-type", MANIFEST_TYPE)
            .body(manifest)
            .send()
            .await?;
        if put.status().as_u16() != 201 {
            return Err(format!("manifest upload answered {}", put.status()).into());
        }
        Ok((md, blobs))
    }

    /// A pull by one client: the manifest by tag, then every blob in turn, read to the end.
    async fn pull(
        base: &str,
        repo: &str,
        tag: &str,
        blobs: &[(String, u64)],
    ) -> Result<Duration, BoxError> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let t0 = Instant::now();
        let m = client
            .get(format!("{base}/v2/{repo}/manifests/{tag}"))
            .header("accept", ACCEPT)
            .send()
            .await?;
        if !m.status().is_success() {
            return Err(format!("manifest GET answered {}", m.status()).into());
        }
        m.bytes().await?;
        for (d, size) in blobs {
            let r = client
                .get(format!("{base}/v2/{repo}/blobs/{d}"))
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(format!("blob GET answered {}", r.status()).into());
            }
            let mut s = r.bytes_stream();
            let mut n = 0u64;
            while let Some(c) = s.next().await {
                n += c?.len() as u64;
            }
            if n != *size {
                return Err(format!("blob {d}: {n} of {size} bytes").into());
            }
        }
        Ok(t0.elapsed())
    }

    /// Warm throughput: `n` clients read `url` (of `size` bytes) at once; GB/s over all clients.
    async fn throughput(url: &str, size: u64, n: usize) -> Result<f64, BoxError> {
        let clients = clients(n)?;
        let t0 = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|c| tokio::spawn(fetch(c, url.to_owned(), t0)))
            .collect();
        let mut wall = Duration::ZERO;
        for t in tasks {
            let (_, done, got) = t.await??;
            if got != size {
                return Err(format!("{url}: got {got} of {size} bytes").into());
            }
            wall = wall.max(done);
        }
        Ok((size * n as u64) as f64 / wall.as_secs_f64() / 1e9)
    }

    /// `wrk` against `url` with the Accept header: (requests/s, p99 ms, non-2xx responses).
    fn wrk(url: &str, secs: u64) -> Result<(f64, f64, u64), BoxError> {
        let out = Command::new("wrk")
            .args([
                "-t2",
                "-c64",
                &format!("-d{secs}s"),
                "--latency",
                "--timeout",
                "5s",
            ])
            .arg("-H")
            .arg(format!("Accept: {ACCEPT}"))
            .arg(url)
            .stdin(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("wrk failed: {text}").into());
        }
        let rps = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("no Requests/sec in wrk output: {text}"))?;
        let p99 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("99%"))
            .map(|v| parse_wrk_time(v.trim()))
            .unwrap_or(f64::NAN);
        let non2xx = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok((rps, p99, non2xx))
    }

    /// `wrk` times (`812.00us`, `3.21ms`, `1.02s`) in ms.
    fn parse_wrk_time(v: &str) -> f64 {
        let (num, scale) = if let Some(n) = v.strip_suffix("us") {
            (n, 0.001)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1000.0)
        } else {
            (v, f64::NAN)
        };
        num.parse::<f64>().map(|x| x * scale).unwrap_or(f64::NAN)
    }

    /// nginx with sendfile serving `root` on loopback (see [`start_nginx_with`]).
    fn start_nginx(nginx: &str, dir: &Path, root: &Path) -> Result<(Proc, String), BoxError> {
        start_nginx_with(nginx, dir, "", &format!("root {};", root.display()))
    }

    async fn wait_get(url: &str) -> Result<(), BoxError> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(r) = client.head(url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("{url} did not answer").into())
    }

    /// Raw read of a file (page cache warm), GB/s, best of three.
    fn raw_read(path: &Path) -> Result<f64, BoxError> {
        use std::io::Read as _;
        let mut best: f64 = 0.0;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..3 {
            let mut f = std::fs::File::open(path)?;
            let t0 = Instant::now();
            let mut n = 0u64;
            loop {
                let k = f.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            best = best.max(n as f64 / t0.elapsed().as_secs_f64() / 1e9);
        }
        Ok(best)
    }

    /// The upstream's content and the ceiling, as the per-server workloads use them.
    struct Loaded<'a> {
        upstream: &'a Upstream,
        blob_repo: &'a str,
        digest: &'a str,
        size: u64,
        img_repo: &'a str,
        tag: &'a str,
        mdigest: &'a str,
        blobs: &'a [(String, u64)],
        nurl: &'a str,
    }

    /// Workloads 1-3 and 5 on a fresh `kind` server: a cold pull (against the upstream
    /// directly), warm blob throughput (against nginx in turn), manifests with `wrk`, and the
    /// server's peak RSS; one JSON object of figures.
    async fn measure_server(
        cli: &Cli,
        work: &Path,
        o: &Opts,
        kind: ServerKind,
        loaded: &Loaded<'_>,
    ) -> Result<serde_json::Value, BoxError> {
        let Loaded {
            upstream,
            blob_repo,
            digest,
            size,
            img_repo,
            tag,
            mdigest,
            blobs,
            nurl,
        } = *loaded;
        let dir = work.join(format!("all-{}", kind.name().replace(' ', "-")));
        let server = Server::start(kind, cli, upstream, &dir).await?;
        // The same pull straight from the upstream (same client code), best of two, just
        // before: the ratio compares runs seconds apart on this shared machine.
        let direct = {
            let a = pull(&upstream.url, img_repo, tag, blobs).await?;
            let b = pull(&upstream.url, img_repo, tag, blobs).await?;
            a.min(b)
        };
        let cold = pull(&server.url, img_repo, tag, blobs).await?;
        note(&format!(
            "{}: cold pull {:.3} s (direct {:.3} s)",
            kind.name(),
            cold.as_secs_f64(),
            direct.as_secs_f64()
        ));
        let burl = format!("{}/v2/{blob_repo}/blobs/{digest}", server.url);
        // Fill the cache; distribution stores in the background after answering: let it finish.
        throughput(&burl, size, 1).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // nginx (the ceiling) and the server take turns, best of each: both see the same
        // background load.
        let (mut w1, mut w8, mut n1, mut n8) = (0f64, 0f64, 0f64, 0f64);
        for _ in 0..3 {
            n1 = n1.max(throughput(nurl, size, 1).await?);
            w1 = w1.max(throughput(&burl, size, 1).await?);
        }
        for _ in 0..2 {
            n8 = n8.max(throughput(nurl, size, 8).await?);
            w8 = w8.max(throughput(&burl, size, 8).await?);
        }
        note(&format!(
            "{}: warm blob {w1:.2} GB/s (1), {w8:.2} GB/s (8); nginx sendfile in turn \
             {n1:.2} GB/s (1), {n8:.2} GB/s (8)",
            kind.name()
        ));
        let by_tag = format!("{}/v2/{img_repo}/manifests/{tag}", server.url);
        let by_digest = format!("{}/v2/{img_repo}/manifests/{mdigest}", server.url);
        let (tag_rps, tag_p99, tag_bad) = wrk(&by_tag, o.wrk_secs)?;
        let (dig_rps, dig_p99, dig_bad) = wrk(&by_digest, o.wrk_secs)?;
        note(&format!(
            "{}: manifests by tag {tag_rps:.0}/s p99 {tag_p99:.2} ms ({tag_bad} non-2xx), \
             by digest {dig_rps:.0}/s p99 {dig_p99:.2} ms ({dig_bad} non-2xx)",
            kind.name()
        ));
        let rss = server.proc.peak_rss_kib();
        let figures = json!({
            "cold_pull_s": cold.as_secs_f64(),
            "direct_pull_s": direct.as_secs_f64(),
            "warm_blob_gbps_1": w1, "warm_blob_gbps_8": w8,
            "nginx_gbps_1": n1, "nginx_gbps_8": n8,
            "manifest_tag_rps": tag_rps, "manifest_tag_p99_ms": tag_p99,
            "manifest_tag_non2xx": tag_bad,
            "manifest_digest_rps": dig_rps, "manifest_digest_p99_ms": dig_p99,
            "manifest_digest_non2xx": dig_bad,
            "peak_rss_mib": rss.map(|k| k as f64 / 1024.0),
        });
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(figures)
    }

    /// Adds the paired cold pulls (loopback and shaped, see [`cold::for_all`]) to stowage's
    /// figures.
    fn merge_cold_pulls(per: &mut [(ServerKind, serde_json::Value)], pulls: serde_json::Value) {
        for (_, v) in per.iter_mut().filter(|(k, _)| *k == ServerKind::Stowage) {
            if let (Some(v), Some(p)) = (v.as_object_mut(), pulls.as_object()) {
                v.extend(p.clone());
            }
        }
    }

    /// Adds the cold-blob runs (workload 4) to each server's figures, and the peak RSS over
    /// workloads 1-4.
    fn merge_cold_runs(per: &mut [(ServerKind, serde_json::Value)], cold: &[Sample], size: u64) {
        for (kind, v) in per.iter_mut() {
            let mut peak = v["peak_rss_mib"].as_f64();
            for c in cold.iter().filter(|c| c.server == *kind) {
                let n = c.clients;
                let mib = c.peak_rss_kib.map(|k| k as f64 / 1024.0);
                v[format!("cold_blob_{n}_upstream_x")] =
                    json!(c.upstream_bytes as f64 / size as f64);
                v[format!("cold_blob_{n}_upstream_gets")] = json!(c.upstream_gets);
                v[format!("cold_blob_{n}_wall_s")] = json!(c.wall.as_secs_f64());
                v[format!("cold_blob_{n}_ttfb_median_ms")] =
                    json!(c.ttfb_median.as_secs_f64() * 1000.0);
                v[format!("cold_blob_{n}_ttfb_max_ms")] = json!(c.ttfb_max.as_secs_f64() * 1000.0);
                v[format!("cold_blob_{n}_peak_rss_mib")] = json!(mib);
                v[format!("cold_blob_{n}_failed_clients")] = json!(c.failures);
                peak = match (peak, mib) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            v["peak_rss_mib_1_to_4"] = json!(peak);
        }
    }

    /// Adds the startup times (workload 6) to each server's figures: the median and every run.
    fn merge_startup(
        per: &mut [(ServerKind, serde_json::Value)],
        times: Vec<(ServerKind, Vec<startup::Started>)>,
    ) {
        for (kind, t) in times {
            let secs: Vec<f64> = t.iter().map(|r| r.ready.as_secs_f64()).collect();
            let (median, rss, peak) = startup::medians(&t);
            if let Some((_, v)) = per.iter_mut().find(|(k, _)| *k == kind) {
                v["startup_s_median"] = json!(median);
                v["startup_s_runs"] = json!(secs);
                v["startup_rss_mib"] = json!(rss);
                v["startup_peak_rss_mib"] = json!(peak);
                let (rec_s, rec_rss, rec_peak) = startup::reconciled_medians(&t);
                if rec_s.is_some() {
                    v["startup_reconciled_s"] = json!(rec_s);
                    v["startup_reconciled_rss_mib"] = json!(rec_rss);
                    v["startup_reconciled_peak_rss_mib"] = json!(rec_peak);
                }
            }
        }
    }

    /// Workloads 6 (startup with many cached blobs) and 7 (push with skopeo and pull back, at two
    /// layer sizes), each unless its options turn it off.
    async fn startup_and_push(
        cli: &Cli,
        upstream: &str,
        work: &Path,
        o: &Opts,
        per: &mut [(ServerKind, serde_json::Value)],
    ) -> Result<(), BoxError> {
        if o.startup_blobs > 0 {
            let times = startup::run(cli, upstream, work, o.startup_blobs, o.startup_runs).await?;
            merge_startup(per, times);
        }
        if o.push.enabled() {
            let runs = push::run(cli, work, &o.push).await?;
            merge_push(per, &o.push, &runs);
        }
        Ok(())
    }

    /// Adds the push runs (workload 7) to each server's figures, per layer size.
    fn merge_push(per: &mut [(ServerKind, serde_json::Value)], o: &push::Opts, runs: &[push::Run]) {
        for (kind, v) in per.iter_mut() {
            for mib in push::sizes(o) {
                let Some(s) = push::summary(runs, *kind, mib) else {
                    continue;
                };
                v[format!("push_{mib}_s")] = json!(s.push_s);
                v[format!("push_{mib}_pull_s")] = json!(s.pull_s);
                v[format!("push_{mib}_peak_rss_mib")] = json!(s.rss_push_mib);
                v[format!("push_{mib}_pull_peak_rss_mib")] = json!(s.rss_all_mib);
                v[format!("push_{mib}_server_cpu_s")] = json!(s.cpu_push_s);
                v[format!("push_{mib}_pull_server_cpu_s")] = json!(s.cpu_pull_s);
            }
        }
    }

    /// The rows of workload 7: push and pull-back times of the large layers, and the peak RSS
    /// during the push at each layer size.
    fn push_lines(
        o: &push::Opts,
        get: &dyn Fn(ServerKind, &str) -> Option<f64>,
        lines: &mut Vec<Line>,
    ) {
        let (n, big) = (o.layers, o.layer_mib);
        let best = if o.runs > 1 {
            format!(" (best of {})", o.runs)
        } else {
            String::new()
        };
        let mut add = |w: String, unit, key: String| {
            lines.push(Line {
                workload: w,
                unit,
                stowage: get(ServerKind::Stowage, &key),
                peer: get(ServerKind::Distribution, &key),
                peer_name: "distribution",
                higher_is_better: false,
            })
        };
        add(
            format!("push {n} x {big} MiB with skopeo{best}"),
            "s",
            format!("push_{big}_s"),
        );
        add(
            format!("pull it back with skopeo{best}"),
            "s",
            format!("push_{big}_pull_s"),
        );
        for mib in push::sizes(o) {
            add(
                format!("peak RSS during the push, {n} x {mib} MiB layers"),
                "MiB",
                format!("push_{mib}_peak_rss_mib"),
            );
        }
    }

    /// The table's rows: stowage's figure beside its peer's for every workload.
    fn table_lines(o: &Opts, raw: f64, per: &[(ServerKind, serde_json::Value)]) -> Vec<Line> {
        let get = |k: ServerKind, f: &str| {
            per.iter()
                .find(|(kind, _)| *kind == k)
                .and_then(|(_, v)| v[f].as_f64())
        };
        let s = |f: &str| get(ServerKind::Stowage, f);
        let d = |f: &str| get(ServerKind::Distribution, f);
        let line = |w: &str, unit, st, pe, peer_name, hib| Line {
            workload: w.to_owned(),
            unit,
            stowage: st,
            peer: pe,
            peer_name,
            higher_is_better: hib,
        };
        let mut lines = vec![
            line(
                "warm blob, 1 client",
                "GB/s",
                s("warm_blob_gbps_1"),
                s("nginx_gbps_1"),
                "nginx sendfile",
                true,
            ),
            line(
                "warm blob, 8 clients",
                "GB/s",
                s("warm_blob_gbps_8"),
                s("nginx_gbps_8"),
                "nginx sendfile",
                true,
            ),
            line(
                "warm blob, 1 client",
                "GB/s",
                s("warm_blob_gbps_1"),
                d("warm_blob_gbps_1"),
                "distribution",
                true,
            ),
            line(
                "warm blob, 8 clients",
                "GB/s",
                s("warm_blob_gbps_8"),
                d("warm_blob_gbps_8"),
                "distribution",
                true,
            ),
            line(
                "raw read of the blob file (ceiling)",
                "GB/s",
                None,
                Some(raw),
                "raw read",
                true,
            ),
            line(
                "manifest by tag, wrk -t2 -c64",
                "req/s",
                s("manifest_tag_rps"),
                d("manifest_tag_rps"),
                "distribution",
                true,
            ),
            line(
                "manifest by tag, p99",
                "ms",
                s("manifest_tag_p99_ms"),
                d("manifest_tag_p99_ms"),
                "distribution",
                false,
            ),
            line(
                "manifest by digest, wrk -t2 -c64",
                "req/s",
                s("manifest_digest_rps"),
                d("manifest_digest_rps"),
                "distribution",
                true,
            ),
            line(
                "manifest by digest, p99",
                "ms",
                s("manifest_digest_p99_ms"),
                d("manifest_digest_p99_ms"),
                "distribution",
                false,
            ),
            line(
                "cold pull, 1 client",
                "s",
                s("cold_pull_s"),
                s("direct_pull_s"),
                "upstream direct",
                false,
            ),
            line(
                "cold pull, 1 client",
                "s",
                s("cold_pull_s"),
                d("cold_pull_s"),
                "distribution",
                false,
            ),
            line(
                "cold pull, 1 client, loopback (median of 3 pairs)",
                "s",
                s("cold_pull_loopback_s"),
                s("direct_pull_loopback_s"),
                "upstream direct",
                false,
            ),
            line(
                "cold pull, 1 client, loopback (median of 3 pairs)",
                "s",
                s("cold_pull_loopback_s"),
                s("nginx_cache_pull_loopback_s"),
                "nginx proxy_cache",
                false,
            ),
            line(
                "cold pull, loopback: the machine's floor (CPU of all processes / cores)",
                "s",
                s("cold_pull_loopback_s"),
                s("cold_pull_loopback_floor_s"),
                "CPU floor",
                false,
            ),
            line(
                &cold::shaped_label(),
                "s",
                s("cold_pull_shaped_s"),
                s("direct_pull_shaped_s"),
                "upstream direct",
                false,
            ),
            line(
                &cold::shaped_label(),
                "s",
                s("cold_pull_shaped_s"),
                s("nginx_cache_pull_shaped_s"),
                "nginx proxy_cache",
                false,
            ),
        ];
        for n in &o.cold_clients {
            let w = |what: &str| format!("cold blob, {n} clients: {what}");
            let f = |what: &str| format!("cold_blob_{n}_{what}");
            lines.push(line(
                &w("upstream bytes (x blob)"),
                "x",
                s(&f("upstream_x")),
                d(&f("upstream_x")),
                "distribution",
                false,
            ));
            lines.push(line(
                &w("wall time"),
                "s",
                s(&f("wall_s")),
                d(&f("wall_s")),
                "distribution",
                false,
            ));
            lines.push(line(
                &w("TTFB median"),
                "ms",
                s(&f("ttfb_median_ms")),
                d(&f("ttfb_median_ms")),
                "distribution",
                false,
            ));
            lines.push(line(
                &w("TTFB max"),
                "ms",
                s(&f("ttfb_max_ms")),
                d(&f("ttfb_max_ms")),
                "distribution",
                false,
            ));
        }
        if o.startup_blobs > 0 {
            lines.push(line(
                &format!(
                    "startup to ready, {} cached blobs (median of {})",
                    o.startup_blobs, o.startup_runs
                ),
                "s",
                s("startup_s_median"),
                d("startup_s_median"),
                "distribution",
                false,
            ));
        }
        if o.startup_blobs > 0 {
            lines.push(line(
                &format!("RSS 10 s after ready, {} cached blobs", o.startup_blobs),
                "MiB",
                s("startup_rss_mib"),
                d("startup_rss_mib"),
                "distribution",
                false,
            ));
            lines.push(line(
                &format!("peak RSS to then, {} cached blobs", o.startup_blobs),
                "MiB",
                s("startup_peak_rss_mib"),
                d("startup_peak_rss_mib"),
                "distribution",
                false,
            ));
            lines.push(line(
                &format!(
                    "RSS once reconciled (1 s after), {} cached blobs",
                    o.startup_blobs
                ),
                "MiB",
                s("startup_reconciled_rss_mib"),
                d("startup_rss_mib"),
                "distribution (10 s after ready)",
                false,
            ));
            lines.push(line(
                &format!(
                    "peak RSS until reconciled, {} cached blobs",
                    o.startup_blobs
                ),
                "MiB",
                s("startup_reconciled_peak_rss_mib"),
                d("startup_peak_rss_mib"),
                "distribution (10 s after ready)",
                false,
            ));
        }
        lines.push(line(
            "peak RSS over workloads 1-4",
            "MiB",
            s("peak_rss_mib_1_to_4"),
            d("peak_rss_mib_1_to_4"),
            "distribution",
            false,
        ));
        if o.push.enabled() {
            push_lines(&o.push, &get, &mut lines);
        }
        if o.many.enabled() {
            for r in many::rows(&o.many) {
                lines.push(line(
                    &r.workload,
                    r.unit,
                    s(r.key),
                    get(r.peer.0, r.peer.1),
                    r.peer_name,
                    false,
                ));
            }
        }
        lines
    }

    /// What `run` measured outside the per-server figures, for the report.
    struct Run {
        raw: f64,
        nginx_rss: Option<u64>,
        load_start: String,
        t_start: Instant,
    }

    /// Prints the Markdown table of `lines` and writes the JSON file of every figure.
    fn report(
        o: &Opts,
        lines: &[Line],
        per: &[(ServerKind, serde_json::Value)],
        run: &Run,
    ) -> Result<(), BoxError> {
        let Run {
            raw,
            nginx_rss,
            load_start,
            t_start,
        } = run;
        let fmt = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "–".into());
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "warm blob {} MiB; cold pull of {} x {} MiB layers; wrk {} s per run; load average at start {}, at end {}\n\n\
             | workload | unit | stowage | peer | peer figure | stowage / peer |\n|---|---|---|---|---|---|",
            o.size_mib,
            o.layers,
            o.layer_mib,
            o.wrk_secs,
            load_start.trim(),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        )?;
        let mut rows = Vec::new();
        for l in lines {
            let ratio = match (l.stowage, l.peer) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                l.workload,
                l.unit,
                fmt(l.stowage),
                l.peer_name,
                fmt(l.peer),
                ratio
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_else(|| "–".into()),
            )?;
            rows.push(json!({
                "workload": l.workload, "unit": l.unit, "stowage": l.stowage,
                "peer": l.peer_name, "peer_value": l.peer, "ratio": ratio,
                "higher_is_better": l.higher_is_better,
            }));
        }
        let doc = json!({
            "config": {"blob_mib": o.size_mib, "layers": o.layers, "layer_mib": o.layer_mib,
                       "wrk_secs": o.wrk_secs, "cold_clients": o.cold_clients,
                       "startup_blobs": o.startup_blobs, "startup_runs": o.startup_runs,
                       "push_layers": o.push.layers, "push_layer_mib": o.push.layer_mib,
                       "push_small_layer_mib": o.push.small_layer_mib, "push_runs": o.push.runs,
                       "many_clients": o.many.clients, "many_images": o.many.images,
                       "many_layers": o.many.layers, "many_layer_mib": o.many.layer_mib,
                       "many_budget_mib": o.many.budget() >> 20, "many_runs": o.many.runs},
            "load_average_start": load_start.trim(),
            "load_average_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "ceiling": {"raw_read_gbps": raw,
                        "nginx_peak_rss_mib": nginx_rss.map(|k| k as f64 / 1024.0)},
            "servers": per.iter().map(|(k, v)| (k.name().to_owned(), v.clone()))
                .collect::<serde_json::Map<_, _>>(),
            "rows": rows,
            "run_seconds": t_start.elapsed().as_secs_f64(),
        });
        std::fs::write(&o.json, serde_json::to_vec_pretty(&doc)?)?;
        writeln!(out, "\nJSON: {}", o.json.display())?;
        Ok(())
    }

    pub async fn run(cli: &Cli, work: &Path, o: &Opts) -> Result<(), BoxError> {
        let t_start = Instant::now();
        let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut upstream = Upstream::start(&cli.registry, work).await?;
        let size = (o.size_mib as u64) << 20;
        let blob_repo = "bench/warm";
        let digest = push_blob(&upstream.url, blob_repo, random(size as usize)).await?;
        let (img_repo, tag) = ("bench/image", "v1");
        let (mdigest, blobs) =
            push_image(&upstream.url, img_repo, tag, o.layers, o.layer_mib << 20).await?;
        note(&format!(
            "upstream {} loaded: blob {digest}, image {img_repo}:{tag} = {mdigest}",
            upstream.url
        ));

        // The ceiling: the upstream's own file of the blob, by nginx with sendfile and raw.
        let hexd = digest.trim_start_matches("sha256:");
        let blob_dir = work.join(format!(
            "upstream-data/docker/registry/v2/blobs/sha256/{}/{hexd}",
            &hexd[..2]
        ));
        let raw = raw_read(&blob_dir.join("data"))?;
        let (nginx_proc, nginx_url) = start_nginx(&o.nginx, &work.join("nginx"), &blob_dir)?;
        let nurl = format!("{nginx_url}/data");
        wait_get(&nurl).await?;
        note(&format!("ceiling: raw read {raw:.2} GB/s"));

        let loaded = Loaded {
            upstream: &upstream,
            blob_repo,
            digest: &digest,
            size,
            img_repo,
            tag,
            mdigest: &mdigest,
            blobs: &blobs,
            nurl: &nurl,
        };
        let mut per: Vec<(ServerKind, serde_json::Value)> = Vec::new();
        for &kind in &cli.servers {
            per.push((kind, measure_server(cli, work, o, kind, &loaded).await?));
        }

        if cli.servers.contains(&ServerKind::Stowage) {
            let image = (img_repo, tag, blobs.as_slice());
            let pulls = cold::for_all(cli, work, &upstream, image, &o.nginx).await?;
            merge_cold_pulls(&mut per, pulls);
        }
        let nginx_rss = nginx_proc.peak_rss_kib();
        drop(nginx_proc);

        // Workload 4: the same blob, cold, to N clients at once; a fresh server per N.
        let cold = cold_blob_runs(
            cli,
            &mut upstream,
            work,
            blob_repo,
            &digest,
            size,
            &o.cold_clients,
        )
        .await?;
        merge_cold_runs(&mut per, &cold, size);

        // Workload 8: many images at once through a cache half their size.
        if o.many.enabled() {
            let runs = many::run(cli, &mut upstream, work, &o.many).await?;
            for (kind, v) in per.iter_mut() {
                if let (Some(serde_json::Value::Object(f)), Some(m)) =
                    (many::figures(&runs, *kind), v.as_object_mut())
                {
                    m.extend(f);
                }
            }
        }

        startup_and_push(cli, &upstream.url, work, o, &mut per).await?;
        let lines = table_lines(o, raw, &per);
        let run = Run {
            raw,
            nginx_rss,
            load_start,
            t_start,
        };
        report(o, &lines, &per, &run)
    }
}

/// Workload 6: time from spawning a server until it answers ready, on a cache that already holds
/// `n` blobs. stowage: its cache directory with `n` blob files, their index entries and access
/// records (what a long-running mirror leaves behind), polled on `/readyz`. distribution's
/// proxy: `n` blob files in its filesystem storage plus its proxy's `scheduler-state.json` with
/// one TTL entry per blob (the proxy's own index of what it cached, read and turned into timers
/// at startup), polled on `/v2/`.
mod startup {
    use super::*;

    /// One timed startup: until ready, then the resident memory once settled and its peak.
    pub struct Started {
        pub ready: Duration,
        pub rss_kib: Option<u64>,
        pub peak_kib: Option<u64>,
        /// For stowage: seconds from ready to its log's "cache reconciled" (the background
        /// reconciliation over), and the resident memory and its peak a second after that.
        pub reconciled: Option<(f64, Option<u64>, Option<u64>)>,
    }

    /// How long after ready the resident memory is sampled: long enough for work the server
    /// does in the background after it is ready (a reconciliation of the cache) to show.
    const SETTLE: Duration = Duration::from_secs(10);

    /// The longest the bench waits for stowage's background reconciliation after ready.
    const RECONCILE_WAIT: Duration = Duration::from_secs(300);

    /// After ready: the memory of `proc` [`SETTLE`] later, and with `reconciles` (stowage) the
    /// time its `log` says "cache reconciled" and the memory a second after that (`None` if it
    /// never says so within [`RECONCILE_WAIT`]; distribution never does).
    async fn after_ready(
        proc: &Proc,
        log: &Path,
        reconciles: bool,
    ) -> (
        Option<u64>,
        Option<u64>,
        Option<(f64, Option<u64>, Option<u64>)>,
    ) {
        let ready = Instant::now();
        let mut settled = None;
        let mut seen: Option<f64> = None;
        loop {
            let t = ready.elapsed();
            if settled.is_none() && t >= SETTLE {
                settled = Some((proc.rss_kib(), proc.peak_rss_kib()));
            }
            if reconciles && seen.is_none() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if text.contains("cache reconciled") {
                    seen = Some(t.as_secs_f64());
                }
            }
            let done_waiting = !reconciles
                || seen.is_some_and(|s| t.as_secs_f64() >= s + 1.0)
                || t >= RECONCILE_WAIT;
            if let (Some((rss, peak)), true) = (settled, done_waiting) {
                let then = seen.map(|s| (s, proc.rss_kib(), proc.peak_rss_kib()));
                return (rss, peak, then);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The digests of the seeded blobs: the sha256 of each index's 8 little-endian bytes.
    fn seeded(n: u64) -> impl Iterator<Item = (Vec<u8>, String)> {
        (0..n).map(|i| {
            let bytes = i.to_le_bytes().to_vec();
            let hex = hex::encode(Sha256::digest(&bytes));
            (bytes, hex)
        })
    }

    /// A stowage cache of `n` 8-byte blobs: files, index entries and access records.
    pub fn seed_stowage(data: &Path, n: u64) -> Result<(), BoxError> {
        use stowage::cache::{index::unix_now, BlobMeta, Index};
        use stowage::oci::Digest;
        let blobs = data.join("blobs/sha256");
        for i in 0..256 {
            std::fs::create_dir_all(blobs.join(format!("{i:02x}")))?;
        }
        let index = Index::open(&data.join("index"))?;
        let now = unix_now();
        let mut access = Vec::with_capacity(n as usize);
        for (i, (bytes, hex)) in seeded(n).enumerate() {
            let digest: Digest = format!("sha256:{hex}").parse()?;
            std::fs::write(blobs.join(&hex[..2]).join(&hex), &bytes)?;
            index.put_blob(
                &digest,
                &BlobMeta {
                    size: 8,
                    added: now,
                },
            )?;
            let mut k = vec![b'b'];
            k.extend_from_slice(hex.as_bytes());
            access.push((k, Some((i as u64 + 1, now))));
        }
        index.write_access(access.iter().map(|(k, v)| (k, v)))?;
        index.flush()?;
        Ok(())
    }

    /// distribution's storage with `n` 8-byte blobs and its proxy's TTL state for each.
    pub fn seed_distribution(data: &Path, n: u64) -> Result<(), BoxError> {
        let root = data.join("docker/registry/v2/blobs/sha256");
        let mut state = serde_json::Map::new();
        for (bytes, hex) in seeded(n) {
            let dir = root.join(&hex[..2]).join(&hex);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("data"), &bytes)?;
            let key = format!("bench/startup@sha256:{hex}");
            state.insert(
                key.clone(),
                serde_json::json!({"Key": key, "ExpiryData": "2099-01-01T00:00:00Z", "EntryType": 0}),
            );
        }
        std::fs::write(
            data.join("scheduler-state.json"),
            serde_json::to_vec(&serde_json::Value::Object(state))?,
        )?;
        Ok(())
    }

    /// Spawns `cmd` and polls `url` until it answers 2xx: the time from spawn; then the
    /// resident memory [`SETTLE`] later and the peak until then.
    /// With `reconciles` (stowage), also the memory once its background reconciliation is over.
    async fn time_to_ready(
        cmd: Command,
        log: &Path,
        url: &str,
        reconciles: bool,
    ) -> Result<Started, BoxError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let t0 = Instant::now();
        let proc = Proc::spawn(cmd, log)?;
        loop {
            if let Ok(r) = client.get(url).send().await {
                if r.status().is_success() {
                    let ready = t0.elapsed();
                    let (rss_kib, peak_kib, reconciled) = after_ready(&proc, log, reconciles).await;
                    return Ok(Started {
                        ready,
                        rss_kib,
                        peak_kib,
                        reconciled,
                    });
                }
            }
            if t0.elapsed() > Duration::from_secs(120) {
                return Err(format!("{url} not ready after 120 s; see {}", log.display()).into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The fixture of `n` blobs for `kind`, built once and kept (outside the run's work
    /// directory) for later runs: building it and deleting it take minutes on a busy disk.
    async fn fixture(kind: ServerKind, n: u64) -> Result<PathBuf, BoxError> {
        let data = fixtures_dir()?.join(format!("startup-{}-{n}", kind.name().replace(' ', "-")));
        let done = data.join("stowage-bench-fixture-complete");
        if done.exists() {
            note(&format!("{}: reusing {}", kind.name(), data.display()));
            return Ok(data);
        }
        if data.exists() {
            std::fs::remove_dir_all(&data)?;
        }
        std::fs::create_dir_all(&data)?;
        let t = Instant::now();
        {
            let data = data.clone();
            tokio::task::spawn_blocking(move || match kind {
                ServerKind::Stowage => seed_stowage(&data, n),
                ServerKind::Distribution => seed_distribution(&data, n),
            })
            .await??;
        }
        std::fs::write(&done, b"")?;
        note(&format!(
            "{}: seeded {n} blobs in {:.1} s into {} (kept for later runs)",
            kind.name(),
            t.elapsed().as_secs_f64(),
            data.display()
        ));
        Ok(data)
    }

    /// KiB as MiB with one decimal, or `-`.
    pub fn mib(kib: Option<u64>) -> String {
        kib.map_or("-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
    }

    /// Median of the runs' ready times (s), and of their settled and peak RSS (MiB).
    pub fn medians(runs: &[Started]) -> (f64, Option<f64>, Option<f64>) {
        fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            v.get(v.len() / 2).copied()
        }
        let ready = median(runs.iter().map(|r| r.ready.as_secs_f64()).collect()).unwrap_or(0.0);
        let to_mib = |k: u64| k as f64 / 1024.0;
        let rss = median(runs.iter().filter_map(|r| r.rss_kib).map(to_mib).collect());
        let peak = median(runs.iter().filter_map(|r| r.peak_kib).map(to_mib).collect());
        (ready, rss, peak)
    }

    /// Medians over the runs that saw the reconciliation end: seconds after ready, RSS then and
    /// peak (MiB).
    pub fn reconciled_medians(runs: &[Started]) -> (Option<f64>, Option<f64>, Option<f64>) {
        fn median(mut v: Vec<f64>) -> Option<f64> {
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied()
        }
        let done: Vec<_> = runs.iter().filter_map(|r| r.reconciled).collect();
        let to_mib = |k: u64| k as f64 / 1024.0;
        (
            median(done.iter().map(|r| r.0).collect()),
            median(done.iter().filter_map(|r| r.1).map(to_mib).collect()),
            median(done.iter().filter_map(|r| r.2).map(to_mib).collect()),
        )
    }

    /// The `startup` subcommand: one table row per server and blob count.
    pub async fn command(
        cli: &Cli,
        work: &Path,
        counts: &[u64],
        runs: usize,
    ) -> Result<(), BoxError> {
        let upstream = "http://127.0.0.1:9"; // never asked: startup needs no upstream
        let mut rows = Vec::new();
        for &n in counts {
            for (kind, started) in run(cli, upstream, work, n, runs).await? {
                let (ready, rss, peak) = medians(&started);
                let all: Vec<String> = started
                    .iter()
                    .map(|r| format!("{:.3}", r.ready.as_secs_f64()))
                    .collect();
                let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
                let (rec_s, rec_rss, rec_peak) = reconciled_medians(&started);
                rows.push(format!(
                    "| {} | {n} | {ready:.3} ({}) | {} | {} | {} | {} | {} |",
                    kind.name(),
                    all.join(", "),
                    f(rss),
                    f(peak),
                    f(rec_s),
                    f(rec_rss),
                    f(rec_peak)
                ));
            }
        }
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "startup with N cached blobs (median of {runs} fresh processes; RSS {} s after ready, \
             and 1 s after the background reconciliation is over)\n\n\
             | server | N | ready s (runs) | RSS MiB | peak RSS MiB | reconciled after s | \
             RSS then MiB | peak then MiB |\n|---|---|---|---|---|---|---|---|",
            SETTLE.as_secs()
        )?;
        for r in rows {
            writeln!(out, "{r}")?;
        }
        Ok(())
    }

    /// Where fixtures are kept between runs: `bench-fixtures/` in the target directory this
    /// program was built into (`target/release/stowage-bench` → `target/bench-fixtures`), so
    /// `cargo clean` removes them.
    fn fixtures_dir() -> Result<PathBuf, BoxError> {
        let exe = std::env::current_exe()?;
        let target = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("cannot locate the target directory from this program's path")?;
        Ok(target.join("bench-fixtures"))
    }

    /// Startup times (`runs` fresh processes each) of every server in `cli.servers`.
    pub async fn run(
        cli: &Cli,
        upstream: &str,
        work: &Path,
        n: u64,
        runs: usize,
    ) -> Result<Vec<(ServerKind, Vec<Started>)>, BoxError> {
        let mut out = Vec::new();
        for &kind in &cli.servers {
            let dir = work.join(format!("startup-{}", kind.name().replace(' ', "-")));
            std::fs::create_dir_all(&dir)?;
            let data = fixture(kind, n).await?;
            let mut times = Vec::new();
            for run in 0..runs {
                let port = free_port()?;
                let url = format!("http://127.0.0.1:{port}");
                let log = dir.join(format!("server-{run}.log"));
                let started = match kind {
                    ServerKind::Stowage => {
                        let mut cmd =
                            stowage_command(&stowage_bin(cli)?, &dir, &data, port, upstream, "")?;
                        // The one info line the bench waits for: "cache reconciled".
                        cmd.env("RUST_LOG", "warn,stowage::cache::startup=info");
                        time_to_ready(cmd, &log, &format!("{url}/readyz"), true).await?
                    }
                    ServerKind::Distribution => {
                        let config = dir.join("proxy.yml");
                        std::fs::write(&config, registry_yaml(&data, port, Some(upstream), false))?;
                        let mut cmd = Command::new(&cli.registry);
                        cmd.arg("serve").arg(&config);
                        time_to_ready(cmd, &log, &format!("{url}/v2/"), false).await?
                    }
                };
                note(&format!(
                    "{}: ready in {:.3} s with {n} cached blobs; RSS {} MiB {} s later, peak {} MiB{}",
                    kind.name(),
                    started.ready.as_secs_f64(),
                    mib(started.rss_kib),
                    SETTLE.as_secs(),
                    mib(started.peak_kib),
                    started.reconciled.map_or(String::new(), |(s, rss, peak)| format!(
                        "; reconciled {s:.1} s after ready, RSS then {} MiB, peak {} MiB",
                        mib(rss),
                        mib(peak)
                    )),
                ));
                times.push(started);
            }
            out.push((kind, times));
        }
        Ok(out)
    }
}
