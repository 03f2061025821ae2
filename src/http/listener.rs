//! The connection layer under the router: the accept loop (hyper-util, HTTP/1.1 and HTTP/2),
//! optional TLS ([`super::tls`]), and the limits that keep hostile clients cheap:
//!
//! - at most `server.max_connections` connections at once — one more is closed on accept rather
//!   than left waiting in the kernel's backlog;
//! - `server.header_read_timeout` for a new connection's first bytes, the TLS handshake and every
//!   HTTP/1.1 request head, idle keep-alive included (slow-loris). The protocol is chosen before
//!   hyper sees the connection — by ALPN over TLS, by the HTTP/2 preface on plain TCP — because
//!   hyper-util's own sniffing waits for bytes without a deadline;
//! - `server.max_header_size` for a request head (HTTP/1.1 read buffer → `431`; HTTP/2 header
//!   list), `server.max_uri_length` for the request target (→ `414`);
//! - at most 100 concurrent HTTP/2 streams per connection, and HTTP/2 keep-alive pings so a
//!   vanished peer does not hold a connection slot.
//!
//! A plain-HTTP request sent to the TLS port is answered with a plain `400` saying so, then
//! closed. Each request carries the peer address as axum's [`ConnectInfo`], which the auth
//! middleware uses for per-IP failed-login limits. On shutdown, connections are told to finish
//! (keep-alive ends, HTTP/2 sends GOAWAY) and get `grace` to do so.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::auth::Auth;
use super::tls::Tls;
use crate::config::{Config, ConfigError, ServerConfig};
use crate::oci::{ErrorCode, RegistryError};

/// Limits on what a client may make the server hold.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_size: usize,
    pub max_uri_length: usize,
}

impl Limits {
    pub fn from_config(server: &ServerConfig) -> Limits {
        Limits {
            max_connections: server.max_connections,
            header_read_timeout: server.header_read_timeout,
            max_header_size: server.max_header_size,
            max_uri_length: server.max_uri_length,
        }
    }
}

/// Everything the listener needs beyond the mirror: TLS, client auth and limits, loaded from
/// the config once at startup (errors name the key) and reloadable on SIGHUP.
#[derive(Clone, Debug)]
pub struct Security {
    pub tls: Option<Arc<Tls>>,
    pub auth: Option<Arc<Auth>>,
    pub limits: Limits,
}

impl Security {
    /// Reads the certificate, key and htpasswd files named in the config.
    pub fn from_config(config: &Config) -> Result<Security, ConfigError> {
        Ok(Security {
            tls: config.server.tls.as_ref().map(Tls::new).transpose()?,
            auth: Auth::from_config(&config.auth)?,
            limits: Limits::from_config(&config.server),
        })
    }

    /// Re-reads the TLS certificate/key and the htpasswd file. What fails to load is reported
    /// and the current version kept.
    pub fn reload(&self) {
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate NOT reloaded; keeping the current one")
                }
            }
        }
        if let Some(auth) = &self.auth {
            match auth.reload() {
                Ok(n) => tracing::info!(users = n, "htpasswd reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "htpasswd NOT reloaded; keeping the current users")
                }
            }
        }
    }
}

/// What a plain-HTTP client reads from the TLS port.
const PLAIN_HTTP_ON_TLS: &str = "This port speaks HTTPS: use https:// to reach stowage.\n";

/// Accepts connections until `shutdown` resolves, then gives open ones `grace` to finish.
pub async fn run(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<Tls>>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let builders = connection_builders(&limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refused: u64 = 0;

    loop {
        let (stream, peer) = tokio::select! {
            accepted = accept(&listener) => accepted,
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    client = %peer,
                    limit = limits.max_connections,
                    refused,
                    "connection limit reached; closing new connections"
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service(app.clone(), peer, limits.max_uri_length);
        let watcher = graceful.watcher();
        let builders = builders.clone();
        let tls = tls.clone();
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let (h1, h2) = &*builders;
            let result = match tls {
                None => {
                    let Some(is_h2) = sniff_h2(&stream, handshake_timeout).await else {
                        return;
                    };
                    let builder = if is_h2 { h2 } else { h1 };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
                Some(tls) => {
                    let Some(stream) = tls_handshake(&tls, stream, peer, handshake_timeout).await
                    else {
                        return;
                    };
                    let is_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let builder = if is_h2 { h2 } else { h1 };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(client = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => Ok(()),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("requests still in flight after {grace:?}; closing them");
            Ok(())
        }
    }
}

/// The HTTP/1.1-only and HTTP/2-only connection builders, with the limits applied: a
/// connection is served by the one its protocol (sniffed preface or TLS ALPN) asks for.
fn connection_builders(
    limits: &Limits,
) -> Arc<(auto::Builder<TokioExecutor>, auto::Builder<TokioExecutor>)> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .max_concurrent_streams(100)
        // An HTTP/2 peer that stops answering pings is dropped (HTTP/1.1 idles are bounded by
        // the header read timeout).
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    Arc::new((builder.clone().http1_only(), builder.http2_only()))
}

/// The next connection. Out of file descriptors and the like: back off instead of spinning.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(a) => return a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The per-connection service: the request target limit, the peer address, then the router.
fn service(
    app: Router,
    peer: SocketAddr,
    max_uri_length: usize,
) -> impl hyper::service::Service<
    http::Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        let app = app.clone();
        async move {
            let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
            if target_len > max_uri_length {
                tracing::info!(
                    client = %peer,
                    method = %req.method(),
                    status = 414,
                    bytes = target_len,
                    "request target too long"
                );
                let e = RegistryError::new(
                    ErrorCode::NameInvalid,
                    format!("request target longer than {max_uri_length} bytes"),
                )
                .with_status(414);
                return Ok(super::error_response(
                    &e,
                    req.method() == http::Method::HEAD,
                ));
            }
            req.extensions_mut().insert(ConnectInfo(peer));
            Ok(app
                .oneshot(req.map(axum::body::Body::new))
                .await
                .unwrap_or_else(|never| match never {}))
        }
    })
}

/// Waits (up to `timeout`) until the client's first bytes tell HTTP/2 prior knowledge (the
/// 24-byte preface) from HTTP/1.1. `None`: nothing useful arrived in time, or the peer left.
async fn sniff_h2(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 24];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != PREFACE[..n] {
            return Some(false);
        }
        if n == PREFACE.len() {
            return Some(true);
        }
        // A prefix of the preface so far: peek returns at once while bytes are waiting, so
        // pause before looking again.
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The TLS handshake within `timeout`; a plain-HTTP request gets a readable 400 instead.
async fn tls_handshake(
    tls: &Tls,
    mut stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(_) => return None,
        Err(_) => {
            tracing::debug!(client = %peer, "no TLS handshake within {timeout:?}; closing");
            return None;
        }
    }
    // 0x16 opens a TLS handshake record; an upper-case letter opens an HTTP method.
    if first[0] != 0x16 {
        if first[0].is_ascii_uppercase() {
            tracing::info!(client = %peer, "plain HTTP on the TLS port; answered 400");
            let _ = tokio::time::timeout(timeout, async {
                // Read what the client sent first: closing a socket with unread bytes makes
                // the kernel reset the connection, and the client might lose the answer.
                let mut sink = [0u8; 16 * 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await;
                let response = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\
                     Connection: close\r\nContent-Length: {}\r\n\r\n{PLAIN_HTTP_ON_TLS}",
                    PLAIN_HTTP_ON_TLS.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        }
        return None;
    }
    match tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(client = %peer, "TLS handshake not finished within {timeout:?}");
            None
        }
    }
}
