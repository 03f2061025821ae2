//! Hostile input against a running stowage with a real upstream: a corpus of request targets
//! (traversal, encoded slashes and dots, NUL, invalid UTF-8, upper case, huge names, 10 000
//! segments), oversized heads and URIs, bad `Range` headers, a slow-loris client and more
//! connections than allowed.
//!
//! Every hostile request must get a 4xx (never a 5xx, never a panic), the process must keep
//! running, the upstream must not be asked anything, and nothing may be written to the cache.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::images::{Format, Image, Pushed};
use support::registry::Registry;
use support::stowage::{Stowage, StowageBuilder, UpstreamSpec};
use support::{http, raw_request, wait_until};

struct World {
    stowage: Stowage,
    upstream: Registry,
    pushed: Pushed,
}

fn world_with(configure: impl FnOnce(StowageBuilder) -> StowageBuilder) -> World {
    let upstream = Registry::start();
    let pushed = upstream.push(
        "library/present",
        "1.0",
        Image::build(Format::Docker, &[64 * 1024]),
    );
    let stowage =
        configure(Stowage::builder().upstream(UpstreamSpec::new("docker.io", &upstream.url())))
            .start();
    World {
        stowage,
        upstream,
        pushed,
    }
}

/// Sends raw bytes as a request and returns the status code, or `None` if the server closed
/// the connection without an answer.
fn raw_bytes(port: u16, request: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // The server may answer and close before it has read everything we send.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
}

fn assert_unharmed(w: &World) {
    // A handler that panicked leaves the process running (tokio catches it) but logs it.
    let log = w.stowage.log();
    assert!(!log.contains("panicked"), "a request panicked:\n{log}");
    let r = raw_request(w.stowage.port(), "GET", "/v2/", &[]);
    assert_eq!(r.status, 200, "stowage stopped answering: {r:?}");
    assert!(
        w.stowage.blob_files().is_empty(),
        "blobs written: {:?}",
        w.stowage.blob_files()
    );
    assert!(
        w.stowage.tmp_files().is_empty(),
        "tmp files written: {:?}",
        w.stowage.tmp_files()
    );
    let catalog = raw_request(w.stowage.port(), "GET", "/v2/_catalog", &[]);
    assert_eq!(
        catalog.body_text(),
        "{\"repositories\":[]}",
        "index written"
    );
}

#[test]
fn a_corpus_of_hostile_paths_gets_4xx_and_touches_nothing() {
    let w = world_with(|b| b);
    let d = &w.pushed.manifest().digest;
    let long_name = "a".repeat(300);
    let ten_thousand = "a/".repeat(10_000);
    let deep_valid = "ab/".repeat(100);
    let corpus: Vec<String> = vec![
        "/v2/../../etc/passwd".into(),
        "/v2/library/../../../etc/manifests/latest".into(),
        "/v2/library/present/manifests/../../../../etc/passwd".into(),
        format!("/v2/library/present/blobs/../{d}"),
        "/v2/library%2fpresent/manifests/1.0".into(),
        "/v2/library%2Fpresent/manifests/1.0".into(),
        "/v2/library/present%2fmanifests%2f1.0".into(),
        "/v2/%2e%2e/%2e%2e/etc/manifests/latest".into(),
        "/v2/library/present/manifests/%2e%2e%2f%2e%2e%2fetc".into(),
        "/v2/library/present/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd".into(),
        "/v2/library/present/blobs/sha256%3a0000".into(),
        "/v2/library/present%00/manifests/1.0".into(),
        "/v2/library/present/manifests/1.0%00".into(),
        "/v2/library/present/blobs/sha256:%00".into(),
        "/v2/Library/Present/manifests/1.0".into(),
        "/v2/LIBRARY/present/tags/list".into(),
        "/v2/library/present/manifests/UPPER%20CASE".into(),
        format!("/v2/{long_name}/manifests/latest"),
        format!("/v2/library/{long_name}/blobs/{d}"),
        format!("/v2/{ten_thousand}manifests/latest"),
        format!("/v2/{deep_valid}manifests/latest"),
        format!("/v2/library/present/manifests/{}", "t".repeat(129)),
        "/v2/library/present/blobs/sha256:".into(),
        format!("/v2/library/present/blobs/sha256:{}", "A".repeat(64)),
        format!("/v2/library/present/blobs/sha256:{}", "0".repeat(65)),
        format!("/v2/library/present/blobs/md5:{}", "0".repeat(32)),
        "/v2/library/present/blobs/".into(),
        "/v2/library/present/manifests/".into(),
        "/v2//manifests/latest".into(),
        "/v2/library//present/manifests/1.0".into(),
        "/v2/library/present/manifests/1.0/".into(),
        "/v2/./library/present/manifests/1.0".into(),
        "/v2/library/present/manifests/1.0?ns=../../etc".into(),
        "/v2/library/present/manifests/1.0?ns=%0d%0aX-Evil:%201".into(),
        "/v2/library/present/tags/list?n=-1".into(),
        "/v2/library/present/tags/list?n=99999999999999999999999".into(),
        "/v2/_catalog?n=abc".into(),
        "/v2/library/present/referrers/x".into(),
        "/v2/-lead/manifests/latest".into(),
        "/v2/a__b___c/manifests/latest".into(),
        "/v2/a./manifests/latest".into(),
        "/v2/%C3%A4/manifests/latest".into(),
        "/v3/".into(),
        "/".into(),
        "/etc/passwd".into(),
    ];
    for target in &corpus {
        for method in ["GET", "HEAD"] {
            let r = raw_request(w.stowage.port(), method, target, &[]);
            assert!(
                (400..500).contains(&r.status),
                "{method} {}: expected 4xx, got {} {}",
                &target[..target.len().min(120)],
                r.status,
                r.body_text()
            );
        }
    }
    for method in [
        "CONNECT", "TRACE", "OPTIONS", "PUT", "DELETE", "PATCH", "POST", "BREW",
    ] {
        let r = raw_request(
            w.stowage.port(),
            method,
            "/v2/library/present/manifests/1.0",
            &[],
        );
        assert!((400..500).contains(&r.status), "{method}: {}", r.status);
    }
    // The upstream's log holds its readiness probe and the test's pushes; reads come from stowage.
    let reached: Vec<String> = w
        .upstream
        .access_log_lines()
        .into_iter()
        .filter(|l| (l.starts_with("GET ") || l.starts_with("HEAD ")) && l != "GET /v2/")
        .collect();
    // `ns=../../etc` and the CRLF one name no upstream; everything else is refused by grammar.
    assert!(
        reached.is_empty(),
        "hostile requests reached the upstream: {reached:?}"
    );
    assert_unharmed(&w);
}

#[test]
fn invalid_bytes_in_the_request_line_and_oversized_heads_are_refused() {
    let w = world_with(|b| b.server_toml("max_header_size = \"16KiB\"\nmax_uri_length = \"2KiB\""));
    let port = w.stowage.port();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "invalid UTF-8 in the path",
            b"GET /v2/\xff\xfe/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "raw NUL in the path",
            b"GET /v2/a\x00b/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "space in the path",
            b"GET /v2/a b/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "invalid UTF-8 in a header",
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nAccept: \xff\xfe\x00\r\n\r\n".to_vec(),
        ),
        (
            "header without colon",
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nnonsense\r\n\r\n".to_vec(),
        ),
        ("garbage", b"\x16\x03\x01\x00\xff\xff\xff\r\n\r\n".to_vec()),
        ("HTTP/0.9", b"GET /v2/\r\n\r\n".to_vec()),
        (
            "bad version",
            b"GET /v2/ HTTP/7.3\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "conflicting lengths",
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
                .to_vec(),
        ),
    ];
    for (what, bytes) in &cases {
        let status = raw_bytes(port, bytes);
        assert!(
            status.is_none_or(|s| (400..500).contains(&s)),
            "{what}: expected 4xx or a closed connection, got {status:?}"
        );
    }

    // Request head over max_header_size: 431, however it is made up.
    let big = "x".repeat(20 * 1024);
    let r = raw_request(port, "GET", "/v2/", &[("X-Big", &big)]);
    assert_eq!(r.status, 431, "one huge header");
    let many: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("X-H{i}"), "v".repeat(8)))
        .collect();
    let many_refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = raw_request(port, "GET", "/v2/", &many_refs);
    assert_eq!(r.status, 431, "many headers");
    // Request target over max_uri_length (but within the head limit): 414.
    let long_target = format!("/v2/library/present/manifests/1.0?pad={}", "p".repeat(4096));
    let r = raw_request(port, "GET", &long_target, &[]);
    assert_eq!(r.status, 414, "{}", r.body_text());
    // Just below the limits all is well.
    let r = raw_request(port, "GET", "/v2/", &[("X-Big", &"x".repeat(4096))]);
    assert_eq!(r.status, 200);
    assert_unharmed(&w);
}

#[test]
fn bad_range_headers_never_get_a_5xx_or_wrong_bytes() {
    let w = world_with(|b| b);
    let blob = w
        .pushed
        .blobs()
        .into_iter()
        .max_by_key(|b| b.size())
        .unwrap()
        .clone();
    let target = format!("/v2/library/present/blobs/{}", blob.digest);
    let size = blob.size();
    let ranges = [
        "bytes=".to_string(),
        "bytes=-".to_string(),
        "bytes=5-2".to_string(),
        "bytes=abc-def".to_string(),
        format!("bytes={}-", size * 10),
        format!("bytes=0-{}", u64::MAX),
        "bytes=99999999999999999999999999-".to_string(),
        "bytes=-0".to_string(),
        "bytes=0-1,".to_string(),
        "bytes=--1".to_string(),
        "bytes=1-2-3".to_string(),
        "lines=0-10".to_string(),
        "bytes=0-1,2-3,".to_string() + &"4-5,".repeat(1000),
        "bytes = 0 - 10".to_string(),
        "\u{7f}".to_string(),
    ];
    for range in &ranges {
        let r = raw_request(w.stowage.port(), "GET", &target, &[("Range", range)]);
        let shown = &range[..range.len().min(60)];
        match r.status {
            200 => assert!(
                r.body == blob.bytes,
                "Range {shown:?}: 200 with wrong bytes"
            ),
            206 if r
                .header("content-type")
                .is_some_and(|t| t.starts_with("multipart/byteranges")) =>
            {
                // A multi-range answer: each part carries its own Content-Range.
                assert!(!r.body.is_empty(), "Range {shown:?}: empty multipart body");
            }
            206 => {
                let cr = r
                    .header("content-range")
                    .unwrap_or_else(|| panic!("Range {shown:?}: 206 without Content-Range"));
                let (span, total) = cr
                    .trim_start_matches("bytes ")
                    .split_once('/')
                    .expect("Content-Range shape");
                assert_eq!(total, size.to_string(), "Range {shown:?}");
                let (a, b) = span.split_once('-').expect("span");
                let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                assert!(a <= b && b < size, "Range {shown:?}: {cr}");
                assert_eq!(
                    r.body,
                    blob.bytes[a..=b],
                    "Range {shown:?}: 206 with wrong bytes"
                );
            }
            s => assert!(
                (400..500).contains(&s),
                "Range {shown:?}: got {s} {}",
                r.body_text()
            ),
        }
    }
    // The blob was cached whole and right (the commit may trail the last response).
    let cached = wait_until(Duration::from_secs(30), || {
        std::fs::read(w.stowage.blob_path(&blob.digest)).is_ok_and(|b| b == blob.bytes)
    });
    assert!(cached, "the blob was not cached whole and right");
    assert!(wait_until(Duration::from_secs(30), || w
        .stowage
        .tmp_files()
        .is_empty()));
    assert!(!w.stowage.log().contains("panicked"));
}

/// Reads `s` until the server closes it: whether it closed (a clean end or a reset: closing with
/// bytes unread may reset instead of a clean FIN; both are a close) and what it sent before.
fn read_to_close(s: &mut TcpStream) -> (bool, Vec<u8>) {
    let mut out = Vec::new();
    let closed = s.read_to_end(&mut out);
    let reset = closed
        .as_ref()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
    if let Err(e) = &closed {
        eprintln!("read until close: {e}");
    }
    (closed.is_ok() || reset, out)
}

#[test]
fn a_slow_loris_is_cut_off_by_the_header_read_timeout() {
    let w = world_with(|b| b.server_toml("header_read_timeout = \"1s\""));
    let mut s = TcpStream::connect(("127.0.0.1", w.stowage.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let start = Instant::now();
    // Without the timeout this read blocks until the 30 s client timeout and errors.
    let (closed, out) = read_to_close(&mut s);
    assert!(closed, "server kept a half-sent request open");
    let text = String::from_utf8_lossy(&out);
    assert!(
        out.is_empty() || text.starts_with("HTTP/1.1 408"),
        "expected a close or 408, got {text:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    // A connection that sends nothing at all, and one that stalls inside the HTTP/2 preface
    // (hyper-util's own protocol sniffing would wait for it forever), are cut off too.
    for opening in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let mut s = TcpStream::connect(("127.0.0.1", w.stowage.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(opening).unwrap();
        let (closed, out) = read_to_close(&mut s);
        assert!(
            closed && out.is_empty(),
            "idle connection after {opening:?} was not closed: {out:?}"
        );
    }
    // Normal clients are served.
    assert_eq!(
        raw_request(w.stowage.port(), "GET", "/v2/", &[]).status,
        200
    );
}

#[test]
fn connections_over_the_cap_are_closed_on_accept() {
    let w = world_with(|b| b.server_toml("max_connections = 2\nheader_read_timeout = \"60s\""));
    let port = w.stowage.port();
    // Two idle connections hold both permits (a request on each proves it was accepted). The
    // harness's readiness probe may still hold a slot until the server has seen it close, so
    // a refused attempt here is retried.
    let open_and_hold = || -> Option<TcpStream> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).ok()?;
        (&buf == b"HTTP/1.1 200").then_some(s)
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = None;
        wait_until(Duration::from_secs(30), || {
            conn = open_and_hold();
            conn.is_some()
        });
        held.push(conn.expect("a connection within the cap is served"));
    }
    // A third is closed without an answer.
    let mut third = TcpStream::connect(("127.0.0.1", port)).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = third.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = Vec::new();
    let r = third.read_to_end(&mut out);
    assert!(
        out.is_empty()
            && (r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)),
        "third connection should be closed unanswered: {r:?} {:?}",
        String::from_utf8_lossy(&out)
    );
    // Once the held ones go away, new connections are served again.
    drop(held);
    let served = wait_until(Duration::from_secs(30), || {
        http()
            .get(format!("{}/v2/", w.stowage.url()))
            .send()
            .is_ok_and(|r| r.status().as_u16() == 200)
    });
    assert!(
        served,
        "connections were not served after the held ones closed"
    );
}

/// A hostile upstream: answers bigger than they may be are refused, not cached.
#[test]
fn oversized_upstream_answers_are_refused_and_not_cached() {
    use support::fake_upstream::{FakeUpstream, WrongBytes};
    let fake = FakeUpstream::start();
    // A "manifest" of 5 MiB (over the 4 MiB limit), valid JSON so only its size is wrong.
    let mut huge =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","pad":""#
            .to_vec();
    huge.extend(std::iter::repeat_n(b'x', 5 << 20));
    huge.extend_from_slice(b"\"}");
    let oci = "application/vnd.oci.image.manifest.v1+json";
    fake.add_manifest("library/huge", "latest", oci, huge.clone());
    // A blob served with more bytes than it has (announced honestly: Content-Length is larger).
    let real = vec![7u8; 10_000];
    let digest = fake.add_blob("library/huge", real.clone());
    let mut longer = real.clone();
    longer.extend_from_slice(&[0u8; 5_000]);
    fake.serve_wrong_bytes(&digest, WrongBytes::Replaced(longer));
    let stowage = Stowage::for_docker_io(&fake.url());

    let accept = support::manifest_accept();
    let target = "/v2/library/huge/manifests/latest";
    let r = raw_request(stowage.port(), "GET", target, &[("Accept", &accept)]);
    assert!(r.status >= 400, "a 5 MiB manifest was served: {}", r.status);
    assert!(
        r.body.len() < 64 * 1024,
        "the error body carries the manifest"
    );
    let r = raw_request(
        stowage.port(),
        "GET",
        &format!("/v2/library/huge/blobs/{digest}"),
        &[],
    );
    // Without a manifest naming the blob, only its digest can expose the extra bytes. When they
    // fail before the first byte is sent, the answer is an error with an OCI body; once bytes
    // have been sent, the body must end short of its announced length (an aborted, visibly
    // truncated body), never as a complete 200.
    if r.status == 200 {
        let announced: usize = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("a 200 blob answer announces its length");
        assert!(
            r.body.len() < announced,
            "a blob with more bytes than it has was passed on as a complete 200 ({} bytes)",
            r.body.len()
        );
    } else {
        assert!(r.status >= 500, "{}", r.status);
        assert!(r.body_text().contains("\"errors\""), "{}", r.body_text());
    }
    let clean = wait_until(Duration::from_secs(30), || stowage.tmp_files().is_empty());
    assert!(clean, "leftovers in tmp/: {:?}", stowage.tmp_files());
    assert!(
        stowage.blob_files().is_empty(),
        "{:?}",
        stowage.blob_files()
    );
    let catalog = raw_request(stowage.port(), "GET", "/v2/_catalog", &[]);
    assert_eq!(
        catalog.body_text(),
        "{\"repositories\":[]}",
        "nothing indexed"
    );
    assert!(!stowage.log().contains("panicked"));
}
