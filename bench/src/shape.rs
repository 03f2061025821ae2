//! A TCP shaping proxy: what an upstream on the internet looks like from the cache, on loopback.
//!
//! Every accepted connection is relayed to the target; each direction of the relay is one link
//! shared by all connections of the proxy (as a site's uplink is): bytes leave at most at the
//! configured rate (a token bucket kept as a virtual clock: a chunk departs when the link has
//! sent everything queued before it) and arrive half the round trip later. A new connection
//! relays nothing for one round trip (the handshake), a request waits one round trip for its
//! first response byte, and a large body takes its size over the rate, as through a real path
//! with that RTT and bottleneck.
//!
//! The reading side sleeps whenever the link is more than [`AHEAD`] behind, so the sender is held
//! back by TCP flow control rather than by an unbounded queue in the proxy. (The sender's own
//! congestion control sees loopback: no slow start over the long path is simulated.)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::BoxError;

/// How the path to the target looks.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Round trip added to every exchange (half each way).
    pub rtt: Duration,
    /// Bytes per second in each direction; 0: unlimited.
    pub rate: u64,
}

impl Shape {
    /// From the command line's units: milliseconds and Mbit/s.
    pub fn new(rtt_ms: u64, rate_mbit: u64) -> Shape {
        Shape {
            rtt: Duration::from_millis(rtt_ms),
            rate: rate_mbit * 1_000_000 / 8,
        }
    }

    /// Whether this is no shaping at all (plain loopback).
    pub fn is_none(&self) -> bool {
        self.rtt.is_zero() && self.rate == 0
    }
}

/// How far the reading side may run ahead of the link before it stops reading.
const AHEAD: Duration = Duration::from_millis(2);

/// Bytes read at once from a socket.
const CHUNK: usize = 64 * 1024;

/// One direction of the path: when it is next free to send.
struct Link {
    free_at: Mutex<Instant>,
    rate: u64,
}

impl Link {
    /// When a chunk of `n` bytes handed over now has left the link.
    fn depart(&self, n: usize) -> Instant {
        let now = Instant::now();
        let mut free = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*free).max(now);
        let done = if self.rate == 0 {
            start
        } else {
            start + Duration::from_secs_f64(n as f64 / self.rate as f64)
        };
        *free = done;
        done
    }
}

/// A running proxy; stops (its listener and every relay) when dropped.
pub struct Proxy {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on an ephemeral loopback port and relays every connection to `target`.
pub async fn start(target: SocketAddr, shape: Shape) -> Result<Proxy, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let link = |_| {
        Arc::new(Link {
            free_at: Mutex::new(Instant::now()),
            rate: shape.rate,
        })
    };
    let (up, down) = (link(()), link(()));
    let delay = shape.rtt / 2;
    let task = tokio::spawn(async move {
        let mut relays = tokio::task::JoinSet::new();
        while let Ok((client, _)) = listener.accept().await {
            let (up, down) = (up.clone(), down.clone());
            relays.spawn(async move {
                // The handshake's round trip: nothing crosses before it.
                tokio::time::sleep(delay * 2).await;
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(relay(cr, sw, up, delay), relay(sr, cw, down, delay));
            });
            // Reap finished relays so the set does not grow with every connection.
            while relays.try_join_next().is_some() {}
        }
    });
    Ok(Proxy { url, task })
}

/// Copies `from` to `to` through `link`, each chunk arriving `delay` after it left the link.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            let left = link.depart(n);
            if tx.send((left + delay, buf)).is_err() {
                break;
            }
            if left > Instant::now() + AHEAD {
                tokio::time::sleep_until(left - AHEAD).await;
            }
        }
        // Dropping the sender ends the writer once everything queued is delivered.
    };
    let writer = async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
