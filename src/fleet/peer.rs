//! Streaming a blob from the fleet node that is filling it.
//!
//! A node that claims a fill lease and has `storage.advertise_url` names itself in the lease
//! (its URL and a random token made for this one lease). A node that finds that live lease reads
//! the blob from the filler's internal endpoint ([`PEER_PATH`]), which joins the filler's fill in
//! progress (or serves the committed file) and answers only a request that carries the lease's
//! token: only a party that can read the shared store can use it. The bytes feed the follower's
//! own fill, so they are hashed and verified there like any other source's, and a filler's
//! reader never releases the last byte of a blob that failed to verify.

use std::time::Duration;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::metrics::metrics;
use crate::oci::Digest;
use crate::stream::BlobBody;

/// Where a node serves blobs to its peers: `<advertise_url><PEER_PATH><digest>`.
pub const PEER_PATH: &str = "/_stowage/fleet/blobs/";

/// The filling node as a lease names it: where to reach it and the token it wants.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerLease {
    /// The filler's `storage.advertise_url`.
    pub url: String,
    /// Random, made for this lease alone; sent as `Authorization: Bearer <token>`.
    pub token: String,
}

impl PeerLease {
    /// A fresh lease body for a node reachable at `url`.
    pub fn fresh(url: &str) -> PeerLease {
        PeerLease {
            url: url.to_owned(),
            token: hex::encode(rand::random::<[u8; 32]>()),
        }
    }
}

/// Why a peer could not be read from.
#[derive(Debug)]
pub enum PeerFailure {
    /// It answered, but not with the blob (no such fill, wrong token, an error).
    Refused(String),
    /// No answer: connection refused, reset, or timed out.
    Unreachable(String),
}

impl PeerFailure {
    pub fn label(&self) -> &'static str {
        match self {
            PeerFailure::Refused(_) => "refused",
            PeerFailure::Unreachable(_) => "unreachable",
        }
    }
}

impl std::fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerFailure::Refused(m) | PeerFailure::Unreachable(m) => f.write_str(m),
        }
    }
}

/// The HTTP client a node reads its peers with.
pub struct PeerClient {
    http: reqwest::Client,
}

impl PeerClient {
    /// A client whose connections give up after `connect_timeout`. Peers are reached directly
    /// (no proxy from the environment): they are on the fleet's own network.
    pub fn new(connect_timeout: Duration) -> Result<PeerClient, String> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(connect_timeout)
            .user_agent(concat!("stowage/", env!("CARGO_PKG_VERSION"), " (fleet)"))
            .build()
            .map_err(|e| format!("fleet peer client: {e}"))?;
        Ok(PeerClient { http })
    }

    /// Opens `digest` on `peer` at `offset`, waiting at most `wait` for its answer (the filler
    /// answers once its own upstream has). The body's end or break is counted in
    /// `stowage_fleet_peer_fetches_total`; so is a failure to open.
    pub async fn open(
        &self,
        peer: &PeerLease,
        digest: &Digest,
        offset: u64,
        wait: Duration,
    ) -> Result<BlobBody, PeerFailure> {
        let r = self.try_open(peer, digest, offset, wait).await;
        if let Err(e) = &r {
            metrics()
                .fleet_peer_fetches
                .with_label_values(&[e.label()])
                .inc();
        }
        r
    }

    async fn try_open(
        &self,
        peer: &PeerLease,
        digest: &Digest,
        offset: u64,
        wait: Duration,
    ) -> Result<BlobBody, PeerFailure> {
        let url = format!("{}{PEER_PATH}{digest}", peer.url);
        let mut req = self.http.get(&url).bearer_auth(&peer.token);
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let resp = match tokio::time::timeout(wait, req.send()).await {
            Err(_) => {
                return Err(PeerFailure::Unreachable(format!(
                    "{url}: no answer within {wait:?}"
                )))
            }
            Ok(Err(e)) => return Err(PeerFailure::Unreachable(format!("{url}: {e}"))),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status().as_u16();
        let header = |name: reqwest::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (start, total) = match status {
            200 => (0, resp.content_length()),
            206 => header(reqwest::header::CONTENT_RANGE)
                .as_deref()
                .and_then(content_range)
                .filter(|&(start, _)| start == offset)
                .ok_or_else(|| {
                    PeerFailure::Refused(format!("{url}: 206 without a usable Content-Range"))
                })?,
            _ => return Err(PeerFailure::Refused(format!("{url}: answered {status}"))),
        };
        Ok(BlobBody {
            start,
            total,
            stream: counted(resp.bytes_stream()),
        })
    }
}

/// `bytes <start>-<end>/<total>`: the start and total.
fn content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    let total = match total {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.parse().ok()?, total))
}

/// Counts how a peer's body ends, once: `complete` at its end, `broken` on an error or when the
/// fill drops it before the end.
struct Ending {
    counted: bool,
}

impl Ending {
    fn count(&mut self, result: &str) {
        if !self.counted {
            self.counted = true;
            metrics()
                .fleet_peer_fetches
                .with_label_values(&[result])
                .inc();
        }
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.count("broken");
    }
}

fn counted(
    body: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
) -> crate::stream::ByteStream {
    let state = (Box::pin(body), Ending { counted: false });
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut body, mut ending)| async move {
            match body.next().await {
                Some(Ok(b)) => Some((Ok(b), (body, ending))),
                Some(Err(e)) => {
                    ending.count("broken");
                    Some((Err(std::io::Error::other(e)), (body, ending)))
                }
                None => {
                    ending.count("complete");
                    None
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(content_range("bytes 10-99/100"), Some((10, Some(100))));
        assert_eq!(content_range("bytes 10-99/*"), Some((10, None)));
        assert_eq!(content_range("bytes */100"), None);
        assert_eq!(content_range("items 1-2/3"), None);
    }

    #[test]
    fn lease_tokens_are_fresh_and_long() {
        let (a, b) = (PeerLease::fresh("http://a"), PeerLease::fresh("http://a"));
        assert_ne!(a.token, b.token);
        assert_eq!(a.token.len(), 64);
    }
}
