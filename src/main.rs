//! The `stowage` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
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
    // Certificate, key and htpasswd are read now, so a bad one is a config error (exit 2).
    let security = match Security::from_config(&config) {
        Ok(s) => s,
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
        tls = security.tls.is_some(),
        auth = security.auth.is_some(),
        "stowage listening"
    );
    let reloader = reload_on_sighup(security.clone());
    stowage::http::serve(
        listener,
        mirror.clone(),
        security,
        shutdown_signal(),
        Duration::from_secs(10),
    )
    .await?;
    reloader.abort();
    mirror.cache.flush()?;
    tracing::info!("stowage stopped cleanly");
    Ok(())
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
