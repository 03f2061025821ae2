//! The `stowage` command line: parses the arguments and dispatches. `serve` loads the
//! configuration and logging here and runs [`stowage::server`]; the operator commands go
//! through a running server's admin socket or open the cache themselves ([`stowage::admin`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use stowage::admin::{self, Request};
use stowage::airgap;
use stowage::config::Config;
use stowage::http::listener::Security;

/// jemalloc, not glibc's malloc: at a million cached blobs the long-lived records (the budget's
/// slots, sled's page table) mixed with per-request churn leave glibc's per-thread arenas
/// fragmented by ~40% of the heap; jemalloc's size classes keep RSS near the live heap.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `stowage --version`: the crate's version and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BUILD_GIT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "stowage",
    version = VERSION,
    about = "A pull-through caching mirror for container registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Log format: `text` for people, `json` (one object per line) for machines.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "STOWAGE_LOG_FORMAT")]
        log_format: LogFormat,
        /// Never contact an upstream: serve only what the cache holds (same as `offline = true`).
        #[arg(long)]
        offline: bool,
    },
    /// Print the configuration in effect (file, then STOWAGE_* variables): every key with
    /// where its value came from (default, file, env), secrets masked. Exit 2 if it is invalid.
    Config {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Ask the configured listener's /readyz: exit 0 when ready, 1 when not (a container
    /// HEALTHCHECK needing no curl).
    Health {
        #[command(flatten)]
        config: ConfigArg,
        /// How long to wait for the answer.
        #[arg(long, default_value = "5s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// Pin images (manifest, an index's children held, all their blobs): never evicted.
    Pin {
        #[command(flatten)]
        config: ConfigArg,
        /// Image references: `alpine:3.19`, `docker.io/library/alpine:3.19`, `ghcr.io/o/a@sha256:..`.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Unpin images.
    Unpin {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// List cached tags with sizes, last use and pin state.
    Ls {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Re-hash every cached blob; report corrupt or missing ones (exit 1 if any).
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// Drop corrupt and missing blobs from the cache so that they refill on the next pull.
        #[arg(long)]
        repair: bool,
    },
    /// Remove tags and manifests unused for `storage.gc_max_age`, and orphaned blobs.
    Gc {
        #[command(flatten)]
        config: ConfigArg,
        /// Report what hosted content would be removed (this node's and, with a shared store,
        /// the fleet's), removing nothing; the cache is not collected.
        #[arg(long)]
        dry_run: bool,
    },
    /// Pull images (manifests, the selected platforms, all blobs) into the cache through the
    /// fill engine: inside a `serve` running on the cache (its admin socket), else directly.
    Prefetch {
        #[command(flatten)]
        config: ConfigArg,
        /// A file of image references, one a line (`#` comments allowed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Platforms of an index to fetch (`linux/amd64`, `linux/arm64/v8`); default linux/amd64.
        #[arg(long = "platform", conflicts_with = "all_platforms")]
        platforms: Vec<String>,
        /// Every platform of an index.
        #[arg(long)]
        all_platforms: bool,
        /// Pin the fetched images.
        #[arg(long)]
        pin: bool,
        /// Also each image's referrers (signatures, SBOMs, attestations; the referrers API and
        /// cosign's `sha256-<hex>.sig` / `.att` / `.sbom` tags), recursively.
        #[arg(long)]
        with_referrers: bool,
        images: Vec<String>,
    },
    /// Write cached and hosted images as an OCI image layout: a tar, or a directory (`-o dir/`).
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// A file of image references, one a line (`#` comments allowed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// `bundle.tar`, or `dir/` (trailing slash or an existing directory) for a directory.
        #[arg(long, short, required = true)]
        output: PathBuf,
        /// Also each image's referrers the cache (or hosted storage) holds, recursively.
        #[arg(long)]
        with_referrers: bool,
        images: Vec<String>,
    },
    /// Load an OCI image layout (tar or directory), verifying every blob: hosted images into
    /// hosted storage, the others into the cache.
    Import {
        #[command(flatten)]
        config: ConfigArg,
        /// Pin the imported images.
        #[arg(long)]
        pin: bool,
        bundle: PathBuf,
    },
}

/// `--config`, shared by every command.
#[derive(Args)]
struct ConfigArg {
    /// Config file (default: ./config.toml if it exists, else built-in defaults).
    #[arg(long = "config", short = 'c', env = "STOWAGE_CONFIG")]
    path: Option<PathBuf>,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    stowage::config::parse_duration(text)
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            log_format,
            offline,
        } => serve(config.path, log_format, offline),
        Command::Config { config } => describe(config.path),
        Command::Health { config, timeout } => health(config.path, timeout),
        Command::Pin { config, images } => operate(config.path, Request::Pin { images }),
        Command::Unpin { config, images } => operate(config.path, Request::Unpin { images }),
        Command::Ls { config } => operate(config.path, Request::Ls),
        Command::Verify { config, repair } => operate(config.path, Request::Verify { repair }),
        Command::Gc { config, dry_run } => operate(config.path, Request::Gc { dry_run }),
        Command::Prefetch {
            config,
            file,
            platforms,
            all_platforms,
            pin,
            with_referrers,
            images,
        } => {
            let platforms = if all_platforms {
                airgap::Platforms::All
            } else if platforms.is_empty() {
                airgap::Platforms::Some(vec!["linux/amd64".into()])
            } else {
                airgap::Platforms::Some(platforms)
            };
            match airgap::gather_refs(&images, file.as_deref()) {
                Ok(refs) => operate(
                    config.path,
                    Request::Prefetch(airgap::PrefetchRequest {
                        refs,
                        platforms,
                        pin,
                        with_referrers,
                    }),
                ),
                Err(e) => usage_failure(&e, ExitCode::from(2)),
            }
        }
        Command::Export {
            config,
            file,
            output,
            with_referrers,
            images,
        } => match airgap::gather_refs(&images, file.as_deref()) {
            Ok(images) => operate(
                config.path,
                Request::Export {
                    images,
                    output: absolute(output),
                    with_referrers,
                },
            ),
            Err(e) => usage_failure(&e, ExitCode::FAILURE),
        },
        Command::Import {
            config,
            pin,
            bundle,
        } => operate(
            config.path,
            Request::Import {
                bundle: absolute(bundle),
                pin,
            },
        ),
    }
}

/// Says why a command could not start, and exits with `code`.
fn usage_failure(e: &impl std::fmt::Display, code: ExitCode) -> ExitCode {
    eprintln!("stowage: {e}");
    code
}

/// `path` against the working directory, for a server that has another one (`join` keeps a
/// trailing `/`, which asks `export` for a directory).
fn absolute(path: PathBuf) -> PathBuf {
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => cwd.join(path),
        _ => path,
    }
}

/// Runs an operator command: through the admin socket of a `serve` running on the cache if one
/// answers there (see [`admin`]), else on the cache directly. Exit 0 on success, 1 if it found
/// problems or failed, 2 for a bad config.
fn operate(config_path: Option<PathBuf>, req: Request) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let exit = |ok: bool| {
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    };
    let mut display = admin::Display::new();
    match admin::run_remote(&config.storage.path, &req, &mut display) {
        Ok(Some(ok)) => return exit(ok),
        Ok(None) => {}
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::FAILURE;
        }
    }
    match admin::run_local(&config, &req, &mut display) {
        Ok(ok) => exit(ok),
        Err(e) => {
            eprintln!("stowage: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One JSON object per line; event fields at the top level, the request span (with the
        // request id) under "span".
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// The process environment's variables that are valid UTF-8 (the others can name no key).
fn env_vars() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// The configuration from `path` (or ./config.toml) and the environment; a problem is printed
/// and becomes exit code 2.
fn load_config(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    Config::load_vars(path.as_deref(), &env_vars()).map_err(|e| {
        eprintln!("stowage: {e}");
        ExitCode::from(2)
    })
}

/// `stowage config`.
fn describe(path: Option<PathBuf>) -> ExitCode {
    match Config::describe(path.as_deref(), &env_vars()) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stowage: {e}");
            ExitCode::from(2)
        }
    }
}

/// `stowage health`: GET /readyz on the configured listener (its loopback address when it
/// listens on all of them), never through a proxy; exit 0 on a 2xx, 1 otherwise.
fn health(path: Option<PathBuf>, timeout: Duration) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut addr = config.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{addr}/readyz");
    let ask = async {
        // The certificate names the server's public host, not the loopback address asked.
        let client = reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .timeout(timeout)
            .build()?;
        let response = client.get(&url).send().await?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Ok::<_, reqwest::Error>((status, body))
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime.map(|rt| rt.block_on(ask)) {
        Ok(Ok((status, _))) if status.is_success() => {
            println!("stowage: ready ({url})");
            ExitCode::SUCCESS
        }
        Ok(Ok((status, body))) => {
            println!(
                "stowage: not ready: {url} answered {status}: {}",
                body.trim()
            );
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            println!("stowage: not ready: {url}: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("stowage: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `stowage serve`. Exit codes: 0 after a clean stop on SIGTERM / SIGINT, 1 when the server
/// failed (at startup or while running), 2 for a bad configuration.
fn serve(config_path: Option<PathBuf>, log_format: LogFormat, offline: bool) -> ExitCode {
    let mut config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    config.offline |= offline;
    // Certificate, key and htpasswd are read now, so a bad one is a config error (exit 2).
    let security = match Security::from_config(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stowage: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(stowage::server::run(config, security)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stowage stopped");
            eprintln!("stowage: {e}");
            match e {
                stowage::Error::Config(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
