//! Two nodes on one shared directory, each advertising its URL (`storage.advertise_url`): a node
//! that finds the other's fill lease streams the blob from that node while it fills, instead of
//! waiting for the shared copy. The in-process fake upstream holds the rest of a blob back after
//! its first bytes, so "while it fills" is an ordering, not a timing: the follower's client
//! receives bytes before the upstream is let go.
//!
//! Each test starts its own upstream, shared directory and nodes (own ports, own temp dirs).

mod support;

use std::io::Read as _;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use support::fake_upstream::{FakeUpstream, Fault, WrongBytes};
use support::scrape::Scrape;
use support::stowage::{Stowage, StowageBuilder, UpstreamSpec};
use support::{http, sha256_hex, wait_until, write_htpasswd};

/// The bytes the upstream sends before it holds the rest.
const HEAD: u64 = 64 * 1024;

/// A node in front of `upstream` on the shared directory `shared`, advertising itself.
fn node(upstream: &FakeUpstream, shared: &Path, lease_ttl: &str) -> Stowage {
    builder(upstream, shared, lease_ttl).start()
}

fn builder(upstream: &FakeUpstream, shared: &Path, lease_ttl: &str) -> StowageBuilder {
    Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .storage_toml(&format!(
            "shared_path = \"{}\"\nfill_lease_ttl = \"{lease_ttl}\"",
            shared.display()
        ))
        .advertise()
}

fn blob(len: u32, modulus: u32) -> Vec<u8> {
    (0..len).map(|i| (i % modulus) as u8).collect()
}

fn metric(node: &Stowage, name: &str, labels: &[(&str, &str)]) -> f64 {
    Scrape::get(&node.url()).find(name, labels).unwrap_or(0.0)
}

/// A client's GET running in a thread: the whole body, or the error that ended it.
type Client = std::thread::JoinHandle<Result<Vec<u8>, String>>;

/// A GET of `url` in a thread: the number of bytes first received is sent on the returned
/// channel as soon as there are some.
fn streaming_get(url: String) -> (mpsc::Receiver<usize>, Client) {
    streaming_get_with(url, None)
}

/// [`streaming_get`] with a bearer token.
fn streaming_get_with(url: String, token: Option<&str>) -> (mpsc::Receiver<usize>, Client) {
    let (tx, rx) = mpsc::channel();
    let token = token.map(str::to_owned);
    let handle = std::thread::spawn(move || {
        let mut req = http().get(&url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let mut resp = req
            .send()
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = resp.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(body);
            }
            if body.is_empty() {
                let _ = tx.send(n);
            }
            body.extend_from_slice(&buf[..n]);
        }
    });
    (rx, handle)
}

/// Starts node A's fill of `digest` (held by the upstream after [`HEAD`] bytes) and node B's
/// client on the same blob; returns both clients once B's has received its first bytes, which
/// must happen while the upstream still holds.
fn a_fills_b_follows(
    upstream: &FakeUpstream,
    a: &Stowage,
    b: &Stowage,
    digest: &str,
) -> (Client, Client) {
    let (_, get_a) = streaming_get(format!("{}/v2/fleet/app/blobs/{digest}", a.url()));
    assert!(
        wait_until(Duration::from_secs(30), || !upstream
            .blob_gets(digest)
            .is_empty()),
        "node A never asked the upstream"
    );
    let (first_b, get_b) = streaming_get(format!("{}/v2/fleet/app/blobs/{digest}", b.url()));
    let first = first_b
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "node B's client got no byte while node A's upstream held the blob\n--- B\n{}",
                b.log()
            )
        });
    assert!(first > 0);
    (get_a, get_b)
}

/// A fake upstream holding a 2 MiB blob after its first [`HEAD`] bytes (served wrong if
/// `wrong`), and two advertising nodes in front of it on one shared directory.
struct HeldPair {
    upstream: FakeUpstream,
    bytes: Vec<u8>,
    digest: String,
    shared: tempfile::TempDir,
    a: Stowage,
    b: Stowage,
}

fn held_pair(modulus: u32, lease_ttl: &str, wrong: Option<WrongBytes>) -> HeldPair {
    let upstream = FakeUpstream::start();
    let bytes = blob(2 * 1024 * 1024, modulus);
    let digest = upstream.add_blob("fleet/app", bytes.clone());
    if let Some(w) = wrong {
        upstream.serve_wrong_bytes(&digest, w);
    }
    upstream.push_faults(&digest, [Fault::HoldAt(HEAD)]);
    let shared = tempfile::tempdir().expect("tempdir");
    let a = node(&upstream, shared.path(), lease_ttl);
    let b = node(&upstream, shared.path(), lease_ttl);
    HeldPair {
        upstream,
        bytes,
        digest,
        shared,
        a,
        b,
    }
}

#[test]
fn the_follower_streams_from_the_filling_node_before_the_upstream_finishes() {
    let HeldPair {
        upstream,
        bytes,
        digest,
        shared: _shared,
        a,
        b,
    } = held_pair(251, "2m", None);

    let (get_a, get_b) = a_fills_b_follows(&upstream, &a, &b, &digest);
    // B's first bytes came while A's upstream still held the rest: released only now.
    upstream.release_holds();

    let body_a = get_a.join().expect("thread").expect("node A's answer");
    let body_b = get_b.join().expect("thread").expect("node B's answer");
    assert_eq!(sha256_hex(&body_a), sha256_hex(&bytes));
    assert_eq!(sha256_hex(&body_b), sha256_hex(&bytes));
    assert_eq!(
        upstream.blob_gets(&digest).len(),
        1,
        "one upstream transfer for the whole fleet"
    );
    assert_eq!(
        metric(&b, "stowage_fill_sources_total", &[("source", "peer")]),
        1.0
    );
    assert_eq!(
        metric(
            &b,
            "stowage_fleet_peer_fetches_total",
            &[("result", "complete")]
        ),
        1.0
    );
    // B verified and kept its own copy: the next request is a local hit.
    b.wait_committed(&digest, &bytes, Duration::from_secs(60));
    assert!(b.log().contains("streaming it from that node"));
}

#[test]
fn a_filler_dying_mid_stream_leaves_the_follower_with_the_right_blob() {
    // A lease short enough that B stops waiting on the dead node's lease soon.
    let HeldPair {
        upstream,
        bytes,
        digest,
        shared: _shared,
        mut a,
        b,
    } = held_pair(241, "10s", None);

    let (get_a, get_b) = a_fills_b_follows(&upstream, &a, &b, &digest);
    a.stop();
    let _ = get_a.join();
    upstream.release_holds();

    // B's client gets the right blob, or a broken body: never wrong bytes as a clean end.
    match get_b.join().expect("thread") {
        Ok(body) => assert_eq!(sha256_hex(&body), sha256_hex(&bytes)),
        Err(e) => eprintln!("node B's client was cut off: {e}"),
    }
    assert!(
        metric(
            &b,
            "stowage_fleet_peer_fetches_total",
            &[("result", "broken")]
        ) >= 1.0,
        "{}",
        b.log()
    );
    // A later pull works, and is the verified blob.
    let again = http()
        .get(format!("{}/v2/fleet/app/blobs/{digest}", b.url()))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.bytes())
        .expect("a later pull through node B");
    assert_eq!(sha256_hex(&again), sha256_hex(&bytes));
    let resumed = upstream.blob_gets(&digest);
    assert!(
        resumed.len() >= 2 && resumed[1].range.is_some(),
        "node B resumes from the upstream where node A left it: {resumed:#?}"
    );
}

/// The lease object of `digest` in the shared directory, as JSON.
fn lease(shared: &Path, digest: &str) -> Option<serde_json::Value> {
    let hex = digest.trim_start_matches("sha256:");
    let text = std::fs::read(shared.join(format!("leases/sha256/{hex}"))).ok()?;
    serde_json::from_slice(&text).ok()
}

/// `GET` of node `a`'s peer endpoint for `digest` with `token` (if any): status and OCI code.
fn peer_get(a: &Stowage, digest: &str, token: Option<&str>) -> (u16, String) {
    let mut req = http().get(format!("{}/_stowage/fleet/blobs/{digest}", a.url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().expect("peer endpoint answers");
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().unwrap_or_default();
    let code = body["errors"][0]["code"].as_str().unwrap_or("").to_owned();
    (status, code)
}

/// With client authentication on (`[auth]`): the endpoint answers to the lease's token, not to
/// client credentials.
#[test]
fn the_peer_endpoint_wants_the_fill_leases_token() {
    let upstream = FakeUpstream::start();
    let bytes = blob(512 * 1024, 239);
    let digest = upstream.add_blob("fleet/app", bytes.clone());
    let other = upstream.add_blob("fleet/app", blob(1024, 13));
    upstream.push_faults(&digest, [Fault::HoldAt(HEAD)]);
    let shared = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("tempdir");
    let htpasswd = write_htpasswd(files.path(), &[("alice", "horse")]);
    let a = builder(&upstream, shared.path(), "2m")
        .extra_toml(&format!("[auth]\nhtpasswd = \"{}\"", htpasswd.display()))
        .auth_required()
        .start();
    let with_creds = a.url().replace("http://", "http://alice:horse@");

    let (_, get_a) = streaming_get(format!("{with_creds}/v2/fleet/app/blobs/{digest}"));
    let mut held = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            held = lease(shared.path(), &digest);
            held.is_some()
        }),
        "node A never claimed the fill"
    );
    let held = held.expect("lease");
    assert_eq!(
        held["peer"]["url"].as_str(),
        Some(a.url().as_str()),
        "{held}"
    );
    let token = held["peer"]["token"].as_str().expect("a token").to_owned();

    assert_eq!(peer_get(&a, &digest, None), (401, "UNAUTHORIZED".into()));
    // A 403, not client auth's 401: the endpoint is outside it, behind its own token.
    assert_eq!(
        peer_get(&a, &digest, Some("not-the-token")),
        (403, "DENIED".into())
    );
    // The token is for that blob only.
    assert_eq!(peer_get(&a, &other, Some(&token)), (403, "DENIED".into()));
    assert_eq!(peer_get(&a, "sha256:nope", Some(&token)).0, 400);

    let (first, with_token) = streaming_get_with(
        format!("{}/_stowage/fleet/blobs/{digest}", a.url()),
        Some(&token),
    );
    assert!(
        first.recv_timeout(Duration::from_secs(60)).is_ok(),
        "the token holder streams while the fill is held"
    );
    upstream.release_holds();
    let body = with_token.join().expect("thread").expect("peer body");
    assert_eq!(sha256_hex(&body), sha256_hex(&bytes));
    get_a.join().expect("thread").expect("node A's answer");
    // Once the blob is shared the lease is released, and with it the token.
    assert!(
        wait_until(Duration::from_secs(60), || lease(shared.path(), &digest)
            .is_none()),
        "the lease was never released"
    );
    assert_eq!(peer_get(&a, &digest, Some(&token)), (403, "DENIED".into()));
}

#[test]
fn a_blob_that_fails_verification_on_the_filler_is_not_served_as_good_by_the_follower() {
    let HeldPair {
        upstream,
        bytes,
        digest,
        shared,
        a,
        b,
    } = held_pair(233, "2m", Some(WrongBytes::FlippedByte));
    let hex = digest.trim_start_matches("sha256:").to_owned();

    let (get_a, get_b) = a_fills_b_follows(&upstream, &a, &b, &digest);
    upstream.release_holds();
    for (name, got) in [("A", get_a), ("B", get_b)] {
        let got = got.join().expect("thread");
        assert!(
            got.as_ref().map(|b| sha256_hex(b) != hex).unwrap_or(true),
            "node {name} sent a clean, complete body that is not the blob"
        );
        assert!(
            got.as_ref().map(|b| b.len() < bytes.len()).unwrap_or(true),
            "node {name} sent every byte of a blob that does not verify"
        );
    }
    assert!(
        a.blob_files().is_empty(),
        "node A committed an unverified blob"
    );
    assert!(
        b.blob_files().is_empty(),
        "node B committed an unverified blob"
    );
    assert!(
        !shared.path().join(format!("blobs/sha256/{hex}")).exists(),
        "an unverified blob was shared"
    );
}

/// A figure, not a check (`cargo test --release --test fleet_peer -- --ignored --nocapture`):
/// `n` cold clients split over two nodes start at once on one 16 MiB blob; the first byte of
/// the clients of the node that did not fill (the follower), with and without
/// `advertise_url`, as median / max in ms.
#[test]
#[ignore]
fn figure_followers_first_byte() {
    let n: usize = std::env::var("FOLLOWERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let modes: &[bool] = if std::env::var("FOLLOWERS_ONLY_PEER").is_ok() {
        &[true]
    } else {
        &[true, false]
    };
    for &advertise in modes {
        for _run in 0..std::env::var("FOLLOWERS_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3)
        {
            let (follower, filler) = first_bytes(n, advertise);
            println!(
                "advertise_url {advertise:5}  {n} clients over 2 nodes: first byte median / max, follower node {:.1} / {:.1} ms, filling node {:.1} / {:.1} ms",
                follower.0, follower.1, filler.0, filler.1
            );
        }
    }
}

/// (median, max) first byte in ms of the follower node's clients, then of the filler's.
fn first_bytes(n: usize, advertise: bool) -> ((f64, f64), (f64, f64)) {
    let upstream = FakeUpstream::start();
    let bytes = blob(16 * 1024 * 1024, 229);
    let digest = upstream.add_blob("fleet/app", bytes.clone());
    let shared = tempfile::tempdir().expect("tempdir");
    let start = |adv: bool| {
        let b = Stowage::builder()
            .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
            .storage_toml(&format!("shared_path = \"{}\"", shared.path().display()));
        if adv { b.advertise() } else { b }.start()
    };
    let nodes = [start(advertise), start(advertise)];
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let url = format!("{}/v2/fleet/app/blobs/{digest}", nodes[i % 2].url());
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let client = http();
                barrier.wait();
                let t0 = std::time::Instant::now();
                let mut resp = client.get(&url).send().expect("GET");
                let mut buf = vec![0u8; 64 * 1024];
                let mut first = None;
                let mut hasher = Vec::new();
                loop {
                    let got = resp.read(&mut buf).expect("body");
                    if got == 0 {
                        break;
                    }
                    first.get_or_insert(t0.elapsed());
                    hasher.extend_from_slice(&buf[..got]);
                }
                (i % 2, first.expect("a byte"), sha256_hex(&hasher))
            })
        })
        .collect();
    let results: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    assert!(results.iter().all(|(_, _, h)| *h == sha256_hex(&bytes)));
    assert_eq!(
        upstream.blob_gets(&digest).len(),
        1,
        "one upstream transfer"
    );
    let filler = (0..2)
        .find(|&i| {
            metric(
                &nodes[i],
                "stowage_fill_sources_total",
                &[("source", "upstream")],
            ) == 1.0
        })
        .expect("one node filled from the upstream");
    let spread = |on: usize| {
        let mut ms: Vec<f64> = results
            .iter()
            .filter(|(node, _, _)| *node == on)
            .map(|(_, t, _)| t.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        (ms[ms.len() / 2], ms[ms.len() - 1])
    };
    if std::env::var("FOLLOWERS_LOG").is_ok() {
        for line in nodes[1 - filler].log().lines() {
            if line.contains("another node")
                || line.contains("falling back")
                || line.contains("fill started")
            {
                println!("  {line}");
            }
        }
    }
    (spread(1 - filler), spread(filler))
}
