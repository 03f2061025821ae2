//! The `stowage` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use stowage::config::Config;
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
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
    let shutdown = shutdown_signal()?;
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
    tracing::info!(
        listen = %listener.local_addr()?,
        storage = %mirror.config.storage.path.display(),
        upstreams = %upstreams.join(","),
        "stowage listening"
    );
    stowage::http::serve(
        listener,
        mirror.clone(),
        shutdown,
        Duration::from_secs(10),
    )
    .await?;
    mirror.cache.flush()?;
    tracing::info!("stowage stopped cleanly");
    Ok(())
}

/// Registers SIGTERM / SIGINT handlers *now* (before the port opens, so an early signal is never
/// met by the default action) and returns a future that resolves on the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown signal received");
    })
}
