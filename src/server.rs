//! The running server (`stowage serve` once its configuration is loaded): opens the mirror,
//! binds the registry listener and the optional metrics listener, starts the admin socket and
//! the housekeeping task, reloads TLS and htpasswd on SIGHUP, and on SIGTERM / SIGINT stops
//! every one of them before the cache is flushed.
//!
//! Every background task started here is owned by [`run`] and stopped by it: a clean exit
//! means the last verified blobs are committed and the index is flushed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::AdminServer;
use crate::config::Config;
use crate::hosted::Hosted;
use crate::http::listener::Security;
use crate::mirror::Mirror;
use crate::Error;

/// How long in-flight requests get to finish after the shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

/// How long blobs filled just before the signal get to reach the fleet's shared store.
const FLEET_SETTLE: Duration = Duration::from_secs(30);

/// Runs the server until SIGTERM / SIGINT, then shuts it down cleanly.
pub async fn run(config: Config, security: Security) -> Result<(), Error> {
    let listen = config.server.listen;
    let metrics_listen = config.server.metrics_listen;
    // Before any listener is bound: a signal from here on stops the server cleanly.
    let signal = shutdown_signal();
    let reloader = reload_on_sighup(security.clone());
    let mirror = Arc::new(Mirror::new(config)?);
    let hosted = open_hosted(&mirror, security.auth.is_some())?;
    init_metrics(&mirror).await?;
    let listeners = Listeners::bind(listen, metrics_listen).await?;
    log_cache_opened(&mirror);
    let housekeeping = spawn_housekeeping(mirror.clone());
    let purging = hosted.clone().map(spawn_upload_purge);
    log_listening(&mirror, &listeners, &security)?;
    let admin = start_admin(&mirror, hosted.clone());
    let stop = stop_on(signal);
    let result = serve_until_stopped(listeners, &mirror, hosted.clone(), security, stop).await;
    if let Some(a) = admin {
        a.stop().await;
    }
    reloader.abort();
    housekeeping.abort();
    if let Some(p) = purging {
        p.abort();
    }
    if let Some(fleet) = &mirror.fleet {
        // Blobs filled just before the signal are shared with the fleet before we go.
        fleet.settle(FLEET_SETTLE).await;
    }
    result?;
    // Clients got their last byte as soon as their blob verified; finish committing those.
    mirror.cache.finish_commits().await;
    mirror.cache.flush()?;
    tracing::info!("stowage stopped cleanly");
    Ok(())
}

/// The bound sockets: the registry API and, if `server.metrics_listen` is set, metrics.
struct Listeners {
    api: TcpListener,
    metrics: Option<TcpListener>,
}

impl Listeners {
    async fn bind(listen: SocketAddr, metrics: Option<SocketAddr>) -> Result<Listeners, Error> {
        let api = TcpListener::bind(listen)
            .await
            .map_err(|e| Error::Startup(format!("cannot listen on {listen}: {e}")))?;
        let metrics = match metrics {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                Error::Startup(format!(
                    "cannot listen on {addr} (server.metrics_listen): {e}"
                ))
            })?),
            None => None,
        };
        Ok(Listeners { api, metrics })
    }
}

/// Sets the gauges that come from configuration and the index, and creates the per-upstream
/// series so that dashboards have zeros before the first event.
async fn init_metrics(mirror: &Arc<Mirror>) -> Result<(), Error> {
    let m = crate::metrics::metrics();
    m.cache_budget_bytes
        .set(i64::try_from(mirror.config.storage.max_size).unwrap_or(i64::MAX));
    m.init_upstreams(mirror.router.upstreams().iter().map(|u| u.host()));
    // `stowage_cache_blobs` and `stowage_cache_size_bytes` are the budget's, set as it loads.
    Ok(())
}

/// Logs that the cache is open. Its budget loads and its files reconcile in the background
/// ("cache reconciled" says what that found).
fn log_cache_opened(mirror: &Mirror) {
    let r = mirror.cache.reconciled();
    let stats = mirror.cache.stats();
    tracing::info!(
        temp_files = r.temp_files,
        budget = stats.budget_bytes,
        loading = mirror.cache.budget().loading(),
        "cache opened"
    );
}

/// The hosted repositories, when `[hosted]` is set. Without `[auth]` anyone who reaches the
/// port may push (as with `registry:2`): said once, at startup. With a fleet's shared store,
/// hosted content is kept there too.
fn open_hosted(mirror: &Mirror, auth: bool) -> Result<Option<Arc<Hosted>>, Error> {
    let config = &mirror.config;
    let Some(settings) = config.hosted.clone() else {
        return Ok(None);
    };
    let mut hosted = Hosted::open(settings, &config.storage.path)?;
    if let Some(fleet) = &mirror.fleet {
        hosted = hosted.with_shared_store(fleet.store(), fleet.timeout());
    }
    hosted.publish();
    let patterns: Vec<String> = hosted
        .settings()
        .repositories
        .iter()
        .map(|p| p.to_string())
        .collect();
    tracing::info!(repositories = %patterns.join(","), "hosted repositories open");
    if !auth {
        tracing::warn!(
            "hosted repositories without [auth]: anyone who reaches the port can push to them"
        );
    }
    Ok(Some(Arc::new(hosted)))
}

/// Purges upload sessions idle past `hosted.upload_timeout`, checking at a quarter of it
/// (between 1 s and 1 min). The caller owns the task and aborts it at shutdown.
fn spawn_upload_purge(hosted: Arc<Hosted>) -> JoinHandle<()> {
    let every = (hosted.settings().upload_timeout / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let purged = hosted.purge_idle_uploads().await;
            if purged > 0 {
                tracing::info!(purged, "idle upload sessions purged");
                hosted.publish();
            }
        }
    })
}

/// Housekeeping: recency to sled in batches, deferred evictions, every
/// `storage.access_flush_interval`. The caller owns the task and aborts it at shutdown.
fn spawn_housekeeping(mirror: Arc<Mirror>) -> JoinHandle<()> {
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
}

/// The "stowage listening" line: addresses, storage, upstreams and the security settings.
fn log_listening(mirror: &Mirror, listeners: &Listeners, security: &Security) -> Result<(), Error> {
    let upstreams: Vec<String> = mirror
        .router
        .upstreams()
        .iter()
        .map(|u| format!("{}={}", u.host(), u.config.url))
        .collect();
    tracing::info!(
        listen = %listeners.api.local_addr()?,
        metrics_listen = %listeners
            .metrics
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
    Ok(())
}

/// The admin socket for operator commands against this server (`stowage pin|prefetch|...
/// --config` beside it). Without one the server still runs; the commands then need it stopped.
fn start_admin(mirror: &Arc<Mirror>, hosted: Option<Arc<Hosted>>) -> Option<AdminServer> {
    match AdminServer::start(mirror.clone(), hosted) {
        Ok(a) => {
            tracing::info!(socket = %a.path().display(), "admin socket listening");
            Some(a)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no admin socket: operator commands need serve stopped");
            None
        }
    }
}

/// Turns the one shutdown signal into a flag that any number of listeners can wait on.
fn stop_on(signal: impl Future<Output = ()> + Send + 'static) -> watch::Receiver<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        let _ = stop_tx.send(true);
    });
    stop_rx
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Serves the registry API (and the metrics listener beside it) until the stop flag is set;
/// in-flight requests get [`GRACE`] to finish.
async fn serve_until_stopped(
    listeners: Listeners,
    mirror: &Arc<Mirror>,
    hosted: Option<Arc<Hosted>>,
    security: Security,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let metrics_server = listeners.metrics.map(|l| {
        tokio::spawn(crate::http::serve_metrics(
            l,
            mirror.clone(),
            security.auth.clone(),
            stopped(stop.clone()),
        ))
    });
    let result = crate::http::serve(
        listeners.api,
        mirror.clone(),
        hosted,
        security,
        stopped(stop),
        GRACE,
    )
    .await;
    if let Some(task) = metrics_server {
        // It stops on the same signal; if the main server ended for another reason, stop it too.
        task.abort();
        let _ = task.await;
    }
    result
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (not when the
/// future is first polled), so a signal arriving right after the listener is bound is not lost.
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
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
fn reload_on_sighup(security: Security) -> JoinHandle<()> {
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
