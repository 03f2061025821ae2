//! The `stowage` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use stowage::admin::{self, Request};
use stowage::airgap;
use stowage::config::Config;
use stowage::http::listener::Security;
use stowage::mirror::Mirror;

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
        images: Vec<String>,
    },
    /// Write cached images as an OCI image layout: a tar, or a directory with `-o dir/`.
    Export {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A file of image references, one a line (`#` comments allowed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// `bundle.tar`, or `dir/` (trailing slash or an existing directory) for a directory.
        #[arg(long, short, required = true)]
        output: PathBuf,
        images: Vec<String>,
    },
    /// Load an OCI image layout (tar or directory) into the cache, verifying every blob.
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
        Command::Gc { config } => operate(config, Request::Gc),
        Command::Prefetch {
            config,
            file,
            platforms,
            all_platforms,
            pin,
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
                }),
            )
        }
        Command::Export {
            config,
            file,
            output,
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
            operate(config, Request::Export { images, output })
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
    match runtime.block_on(run(config, security)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stowage stopped");
            eprintln!("stowage: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, security: Security) -> Result<(), stowage::Error> {
    let listen = config.server.listen;
    let metrics_listen = config.server.metrics_listen;
    // Before any listener is bound: a signal from here on stops the server cleanly.
    let signal = shutdown_signal();
    let reloader = reload_on_sighup(security.clone());
    let mirror = Arc::new(Mirror::new(config)?);
    init_metrics(&mirror).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| stowage::Error::Startup(format!("cannot listen on {listen}: {e}")))?;
    let metrics_listener = match metrics_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            stowage::Error::Startup(format!(
                "cannot listen on {addr} (server.metrics_listen): {e}"
            ))
        })?),
        None => None,
    };
    let upstreams: Vec<String> = mirror
        .router
        .upstreams()
        .iter()
        .map(|u| format!("{}={}", u.host(), u.config.url))
        .collect();
    let r = mirror.cache.reconciled();
    let stats = mirror.cache.stats();
    tracing::info!(
        blobs = r.blobs,
        dropped_entries = r.dropped_entries,
        adopted_files = r.adopted_files,
        removed_files = r.removed_files,
        temp_files = r.temp_files,
        size = stats.size_bytes,
        budget = stats.budget_bytes,
        "cache opened"
    );
    // Housekeeping: recency to sled in batches, deferred evictions. Owned here, stopped below.
    let maintenance = {
        let mirror = mirror.clone();
        let every = mirror.config.storage.access_flush_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let m = mirror.clone();
                let _ = tokio::task::spawn_blocking(move || m.cache.maintain()).await;
            }
        })
    };
    tracing::info!(
        listen = %listener.local_addr()?,
        metrics_listen = %metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
        storage = %mirror.config.storage.path.display(),
        upstreams = %upstreams.join(","),
        tls = security.tls.is_some(),
        auth = security.auth.is_some(),
        offline = mirror.config.offline,
        shared_store = %mirror.fleet.as_ref().map(|f| f.describe()).unwrap_or("-"),
        "stowage listening"
    );
    // Operator commands against this server (`stowage pin|prefetch|... --config` beside it).
    let admin = match admin::AdminServer::start(mirror.clone()) {
        Ok(a) => {
            tracing::info!(socket = %a.path().display(), "admin socket listening");
            Some(a)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no admin socket: operator commands need serve stopped");
            None
        }
    };
    // One signal stops both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let metrics_server = metrics_listener.map(|l| {
        tokio::spawn(stowage::http::serve_metrics(
            l,
            mirror.clone(),
            security.auth.clone(),
            stopped(stop_rx.clone()),
        ))
    });
    let result = stowage::http::serve(
        listener,
        mirror.clone(),
        security,
        stopped(stop_rx),
        Duration::from_secs(10),
    )
    .await;
    if let Some(task) = metrics_server {
        // It stops on the same signal; if the main server ended for another reason, stop it too.
        task.abort();
        let _ = task.await;
    }
    if let Some(a) = admin {
        a.stop().await;
    }
    reloader.abort();
    maintenance.abort();
    if let Some(fleet) = &mirror.fleet {
        // Blobs filled just before the signal are shared with the fleet before we go.
        fleet.settle(Duration::from_secs(30)).await;
    }
    result?;
    // Clients got their last byte as soon as their blob verified; finish committing those.
    mirror.cache.finish_commits().await;
    mirror.cache.flush()?;
    tracing::info!("stowage stopped cleanly");
    Ok(())
}

/// Sets the gauges that come from configuration and the index, and creates the per-upstream
/// series so that dashboards have zeros before the first event.
async fn init_metrics(mirror: &Arc<Mirror>) -> Result<(), stowage::Error> {
    let m = stowage::metrics::metrics();
    m.cache_budget_bytes
        .set(i64::try_from(mirror.config.storage.max_size).unwrap_or(i64::MAX));
    m.init_upstreams(mirror.router.upstreams().iter().map(|u| u.host()));
    let index = mirror.cache.index().clone();
    let (blobs, bytes) = tokio::task::spawn_blocking(move || index.blob_totals())
        .await
        .map_err(|e| stowage::Error::Startup(format!("scanning the index: {e}")))?
        .map_err(stowage::cache::CacheError::from)?;
    m.cache_blobs.set(i64::try_from(blobs).unwrap_or(i64::MAX));
    m.cache_size_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (not when the
/// future is first polled), so a signal arriving right after the listener is bound is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
                match s {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term) => {}
                _ = wait(int) => {}
            }
            tracing::info!("shutdown signal received");
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received");
    }
}

/// SIGHUP re-reads the TLS certificate/key and the htpasswd file without dropping connections.
/// The handler is installed before this returns (so a SIGHUP right after startup cannot kill the
/// process); the returned task serves it.
fn reload_on_sighup(security: Security) -> tokio::task::JoinHandle<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP received: reloading TLS certificate and htpasswd");
                    security.reload();
                }
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificate reload needs a restart");
                tokio::spawn(async {})
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = security;
        tokio::spawn(async {})
    }
}
