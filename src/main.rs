//! The `stowage` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use stowage::cache::Cache;
use stowage::config::Config;
use stowage::mirror::Mirror;
use stowage::ops;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Pin { config, images } => operate(config, |c, cfg, out| {
            ops::pin(c, cfg, &images, out).map(|_| true)
        }),
        Command::Unpin { config, images } => operate(config, |c, cfg, out| {
            ops::unpin(c, cfg, &images, out).map(|_| true)
        }),
        Command::Ls { config } => operate(config, |c, _, out| ops::ls(c, out).map(|_| true)),
        Command::Verify { config, repair } => operate(config, |c, _, out| {
            ops::verify(c, repair, out).map(|r| r.clean() || repair)
        }),
        Command::Gc { config } => operate(config, |c, cfg, out| {
            ops::gc(c, cfg.storage.gc_max_age, out).map(|_| true)
        }),
    }
}

/// Runs an operator command on the cache: exit 0 on success, 1 if it found problems or failed,
/// 2 for a bad config.
fn operate(
    config_path: Option<PathBuf>,
    f: impl FnOnce(&Cache, &Config, &mut dyn std::io::Write) -> Result<bool, ops::OpsError>,
) -> ExitCode {
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
    let cache = match Cache::open(&config.storage) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let result = f(&cache, &config, &mut out);
    if let Err(e) = cache.flush() {
        eprintln!("stowage: {e}");
        return ExitCode::FAILURE;
    }
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("stowage: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn serve(config_path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(config_path.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stowage: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stowage stopped");
            eprintln!("stowage: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), stowage::Error> {
    let listen = config.server.listen;
    let mirror = Arc::new(Mirror::new(config)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| stowage::Error::Startup(format!("cannot listen on {listen}: {e}")))?;
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
        storage = %mirror.config.storage.path.display(),
        upstreams = %upstreams.join(","),
        "stowage listening"
    );
    stowage::http::serve(
        listener,
        mirror.clone(),
        shutdown_signal(),
        Duration::from_secs(10),
    )
    .await?;
    maintenance.abort();
    mirror.cache.flush()?;
    tracing::info!("stowage stopped cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
