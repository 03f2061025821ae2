//! The `stowage` command line: parses the arguments and dispatches. `serve` loads the
//! configuration and logging here and runs [`stowage::server`]; the operator commands go
//! through a running server's admin socket or open the cache themselves ([`stowage::admin`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stowage::admin::{self, Request};
use stowage::airgap;
use stowage::config::Config;
use stowage::http::listener::Security;

#[derive(Parser)]
#[command(
    name = "stowage",
    version,
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
        /// Config file (default: ./config.toml if it exists, else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log format: `text` for people, `json` (one object per line) for machines.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Never contact an upstream: serve only what the cache holds (same as `offline = true`).
        #[arg(long)]
        offline: bool,
    },
    /// Pin images (manifest, an index's children held, all their blobs): never evicted.
    Pin {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Image references: `alpine:3.19`, `docker.io/library/alpine:3.19`, `ghcr.io/o/a@sha256:..`.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Unpin images.
    Unpin {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// List cached tags with sizes, last use and pin state.
    Ls {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Re-hash every cached blob; report corrupt or missing ones (exit 1 if any).
    Verify {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Drop corrupt and missing blobs from the cache so that they refill on the next pull.
        #[arg(long)]
        repair: bool,
    },
    /// Remove tags and manifests unused for `storage.gc_max_age`, and orphaned blobs.
    Gc {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Report what hosted content would be removed (this node's and, with a shared store,
        /// the fleet's), removing nothing; the cache is not collected.
        #[arg(long)]
        dry_run: bool,
    },
    /// Pull images (manifests, the selected platforms, all blobs) into the cache through the
    /// fill engine: inside a `serve` running on the cache (its admin socket), else directly.
    Prefetch {
        #[arg(long, short)]
        config: Option<PathBuf>,
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
        #[arg(long, short)]
        config: Option<PathBuf>,
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
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Pin the imported images.
        #[arg(long)]
        pin: bool,
        bundle: PathBuf,
    },
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
        } => serve(config, log_format, offline),
        Command::Pin { config, images } => operate(config, Request::Pin { images }),
        Command::Unpin { config, images } => operate(config, Request::Unpin { images }),
        Command::Ls { config } => operate(config, Request::Ls),
        Command::Verify { config, repair } => operate(config, Request::Verify { repair }),
        Command::Gc { config, dry_run } => operate(config, Request::Gc { dry_run }),
        Command::Prefetch {
            config,
            file,
            platforms,
            all_platforms,
            pin,
            with_referrers,
            images,
        } => {
            let refs = match airgap::gather_refs(&images, file.as_deref()) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("stowage: {e}");
                    return ExitCode::from(2);
                }
            };
            let platforms = if all_platforms {
                airgap::Platforms::All
            } else if platforms.is_empty() {
                airgap::Platforms::Some(vec!["linux/amd64".into()])
            } else {
                airgap::Platforms::Some(platforms)
            };
            operate(
                config,
                Request::Prefetch(airgap::PrefetchRequest {
                    refs,
                    platforms,
                    pin,
                    with_referrers,
                }),
            )
        }
        Command::Export {
            config,
            file,
            output,
            with_referrers,
            images,
        } => {
            let images = match airgap::gather_refs(&images, file.as_deref()) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("stowage: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let output = absolute(output);
            operate(
                config,
                Request::Export {
                    images,
                    output,
                    with_referrers,
                },
            )
        }
        Command::Import {
            config,
            pin,
            bundle,
        } => operate(
            config,
            Request::Import {
                bundle: absolute(bundle),
                pin,
            },
        ),
    }
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
    let config = match Config::load(config_path.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::from(2);
        }
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

fn serve(config_path: Option<PathBuf>, log_format: LogFormat, offline: bool) -> ExitCode {
    let mut config = match Config::load(config_path.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::from(2);
        }
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
            ExitCode::FAILURE
        }
    }
}
