//! A blob client on a thread of its own, for tests that watch bodies stream: it publishes its
//! progress while reading, can hang up after N bytes, and reports what it saw (status, headers,
//! length, sha256, the body if kept, and whether the body broke off).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::{sha256_hex, wait_until};

/// Generous: a busy 2-core machine.
const EVENTUALLY: Duration = Duration::from_secs(180);

/// A blocking client for blob transfers: no proxy, no redirects, a timeout long enough for a
/// slow fill on a busy machine.
pub fn client() -> reqwest::blocking::Client {
    super::http_with_timeout(Duration::from_secs(600))
}

/// What one streaming client saw.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub len: u64,
    pub sha256: String,
    /// The body, if asked to keep it.
    pub body: Vec<u8>,
    /// Set if the body broke off (connection aborted) or could not be read.
    pub error: Option<String>,
}

/// A client reading a response in a thread of its own, publishing its progress.
pub struct Reader {
    /// Body bytes received so far.
    progress: Arc<AtomicU64>,
    /// Status and headers, as soon as they arrive.
    head: mpsc::Receiver<(u16, reqwest::header::HeaderMap)>,
    handle: JoinHandle<Got>,
}

impl Reader {
    /// `GET url`, body not kept, read to the end.
    pub fn get(url: &str) -> Reader {
        Reader::start(url, &[], false, None)
    }

    /// `GET url` with `headers`; keeps the body if `keep`, hangs up after `stop_after` bytes.
    pub fn start(
        url: &str,
        headers: &[(&str, &str)],
        keep: bool,
        stop_after: Option<u64>,
    ) -> Reader {
        let progress = Arc::new(AtomicU64::new(0));
        let (head_tx, head) = mpsc::channel();
        let url = url.to_owned();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let seen = progress.clone();
        let handle = std::thread::spawn(move || {
            let mut req = client().get(&url);
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            let mut resp = match req.send() {
                Ok(r) => r,
                Err(e) => {
                    return Got {
                        status: 0,
                        headers: Default::default(),
                        len: 0,
                        sha256: String::new(),
                        body: Vec::new(),
                        error: Some(format!("request failed: {e}")),
                    }
                }
            };
            let status = resp.status().as_u16();
            let resp_headers = resp.headers().clone();
            let _ = head_tx.send((status, resp_headers.clone()));
            let mut hasher = Sha256::new();
            let mut body = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut len = 0u64;
            let mut error = None;
            loop {
                if stop_after.is_some_and(|s| len >= s) {
                    break; // hang up: dropping the response closes the connection
                }
                match resp.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        hasher.update(&buf[..n]);
                        if keep {
                            body.extend_from_slice(&buf[..n]);
                        }
                        len += n as u64;
                        seen.store(len, Ordering::SeqCst);
                    }
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            Got {
                status,
                headers: resp_headers,
                len,
                sha256: hex::encode(hasher.finalize()),
                body,
                error,
            }
        });
        Reader {
            progress,
            head,
            handle,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.progress.load(Ordering::SeqCst)
    }

    /// Status and headers (waits for them).
    pub fn head(&self) -> (u16, reqwest::header::HeaderMap) {
        self.head
            .recv_timeout(EVENTUALLY)
            .expect("response headers never arrived")
    }

    pub fn finish(self) -> Got {
        self.handle.join().expect("client thread panicked")
    }
}

/// Waits until `reader` has at least `n` body bytes, or fails the test.
pub fn wait_for_bytes(reader: &Reader, n: u64, what: &str) {
    assert!(
        wait_until(EVENTUALLY, || reader.bytes() >= n),
        "{what}: only {} bytes arrived, expected at least {n} before the upstream finished",
        reader.bytes()
    );
}

/// Asserts a complete, correct 200 body.
pub fn assert_whole(got: &Got, blob: &[u8], what: &str) {
    assert_eq!(got.status, 200, "{what}: status ({:?})", got.error);
    assert!(
        got.error.is_none(),
        "{what}: body broke off: {:?}",
        got.error
    );
    assert_eq!(got.len, blob.len() as u64, "{what}: body length");
    assert_eq!(got.sha256, sha256_hex(blob), "{what}: body sha256");
}
