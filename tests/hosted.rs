//! Hosted repositories: pushes into stowage and pulls of what was pushed, through the same
//! endpoint as the mirror, with the real upstream (`docker-registry`) beside them. Every push
//! answer is checked against the OCI distribution spec: statuses, headers, error bodies, and
//! that nothing is left behind when a push fails.

mod support;

use std::time::Duration;

use support::images::{self, Format, Image, ImageIndex};
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{error_codes, files_under, http, raw_request, sha256_digest, skopeo_ok, wait_until};

const HOSTED: &str = "[hosted]\nrepositories = [\"team/**\", \"ci/*\"]\nmax_size = \"1GiB\"\n";

fn start(extra: &str) -> (Registry, Stowage) {
    let upstream = Registry::start();
    let spec = UpstreamSpec::new("docker.io", &upstream.url());
    let stowage = Stowage::builder()
        .upstream(spec)
        .extra_toml(&format!("{HOSTED}{extra}"))
        .start();
    (upstream, stowage)
}

fn hosted_dir(s: &Stowage) -> std::path::PathBuf {
    s.data_dir().join("hosted")
}

fn upload_files(s: &Stowage) -> Vec<std::path::PathBuf> {
    files_under(&hosted_dir(s).join("uploads"))
}

/// `POST /v2/<name>/blobs/uploads/`: the session's absolute URL.
fn open_upload(s: &Stowage, name: &str) -> String {
    let resp = http()
        .post(format!("{}/v2/{name}/blobs/uploads/", s.url()))
        .header("Content-Length", "0")
        .send()
        .expect("POST upload");
    assert_eq!(resp.status().as_u16(), 202, "{:?}", resp.text());
    assert_eq!(resp.headers()["range"], "0-0");
    assert!(resp.headers().contains_key("docker-upload-uuid"));
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&format!("/v2/{name}/blobs/uploads/")),
        "{location}"
    );
    format!("{}{location}", s.url())
}

fn with_digest(location: &str, digest: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}digest={digest}")
}

#[test]
fn pushed_images_are_pulled_back_byte_exact_through_the_same_endpoint() {
    let (_upstream, stowage) = start("");
    let image = Image::build(Format::Oci, &[3000, 70_000]);
    let pushed = images::push(&stowage.url(), "team/app", "1", image);

    let client = http();
    for reference in ["1", pushed.digest()] {
        let resp = client
            .get(format!(
                "{}/v2/team/app/manifests/{reference}",
                stowage.url()
            ))
            .header("Accept", support::manifest_accept())
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-type"], images::OCI_MANIFEST);
        assert_eq!(resp.headers()["docker-content-digest"], pushed.digest());
        assert_eq!(resp.bytes().unwrap().to_vec(), pushed.manifest().bytes);
    }
    for blob in pushed.blobs() {
        let resp = client
            .get(format!(
                "{}/v2/team/app/blobs/{}",
                stowage.url(),
                blob.digest
            ))
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.bytes().unwrap().to_vec(), blob.bytes);
        // A ranged read, as a resuming client sends.
        let resp = client
            .get(format!(
                "{}/v2/team/app/blobs/{}",
                stowage.url(),
                blob.digest
            ))
            .header("Range", "bytes=10-19")
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 206);
        assert_eq!(resp.bytes().unwrap().to_vec(), blob.bytes[10..20].to_vec());
    }
    // Another hosted repository does not see these blobs (no cross-repository oracle).
    let other = client
        .head(format!(
            "{}/v2/team/other/blobs/{}",
            stowage.url(),
            pushed.blobs()[0].digest
        ))
        .send()
        .unwrap();
    assert_eq!(other.status().as_u16(), 404);

    let tags: serde_json::Value = client
        .get(format!("{}/v2/team/app/tags/list", stowage.url()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(tags, serde_json::json!({"name": "team/app", "tags": ["1"]}));
    let catalog: serde_json::Value = client
        .get(format!("{}/v2/_catalog", stowage.url()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let repos = catalog["repositories"].as_array().unwrap();
    assert!(repos.iter().any(|r| r == "team/app"), "{catalog}");

    // And a real client reads it all back.
    let out = tempfile::tempdir().unwrap();
    skopeo_ok(
        &[
            "copy",
            &format!("docker://{}/team/app:1", stowage.host_port()),
            &format!("dir:{}", out.path().display()),
        ],
        "skopeo pull of a pushed image",
    );
    assert_eq!(
        std::fs::read(out.path().join("manifest.json")).unwrap(),
        pushed.manifest().bytes
    );
}

#[test]
fn skopeo_pushes_into_hosted_and_a_second_skopeo_pulls_it() {
    let (upstream, stowage) = start("");
    // Source image in the upstream registry; skopeo copies it into hosted storage (its own
    // push path: POST, streamed PATCH, PUT ?digest=).
    let pushed = images::push(
        &upstream.url(),
        "test/src",
        "1",
        ImageIndex::build(Format::Docker, &["amd64", "arm64"], &[5000]),
    );
    skopeo_ok(
        &[
            "copy",
            "--all",
            &format!("docker://{}/test/src:1", upstream.host_port()),
            &format!("docker://{}/ci/app:1", stowage.host_port()),
        ],
        "skopeo push of a two-platform list into hosted",
    );
    let out = tempfile::tempdir().unwrap();
    skopeo_ok(
        &[
            "copy",
            "--all",
            &format!("docker://{}/ci/app:1", stowage.host_port()),
            &format!("dir:{}", out.path().display()),
        ],
        "skopeo pull back from hosted",
    );
    assert_eq!(
        std::fs::read(out.path().join("manifest.json")).unwrap(),
        pushed.manifest().bytes,
        "the list is stored byte-exact"
    );
    // The push never reached the upstream.
    assert_eq!(upstream.count_requests("GET", "/v2/ci/app"), 0);
}

#[test]
fn chunked_upload_follows_the_spec() {
    let (_upstream, stowage) = start("");
    let client = http();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let digest = sha256_digest(&data);
    let location = open_upload(&stowage, "team/chunked");

    let patch = |start: usize, end: usize| {
        client
            .patch(&location)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{start}-{}", end - 1))
            .body(data[start..end].to_vec())
            .send()
            .unwrap()
    };
    let r = patch(0, 40_000);
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(r.headers()["range"], "0-39999");
    // Out of order, and overlapping: 416 with the current range.
    for (s, e) in [(50_000, 60_000), (30_000, 45_000)] {
        let r = patch(s, e);
        assert_eq!(r.status().as_u16(), 416);
        assert_eq!(r.headers()["range"], "0-39999");
    }
    let status = client.get(&location).send().unwrap();
    assert_eq!(status.status().as_u16(), 204);
    assert_eq!(status.headers()["range"], "0-39999");
    // The rest streamed without Content-Range, then closed with an empty PUT.
    let r = client
        .patch(&location)
        .body(data[40_000..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let r = client.put(with_digest(&location, &digest)).send().unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text());
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(
        r.headers()["location"],
        format!("/v2/team/chunked/blobs/{digest}").as_str()
    );
    let got = client
        .get(format!("{}/v2/team/chunked/blobs/{digest}", stowage.url()))
        .send()
        .unwrap();
    assert_eq!(got.bytes().unwrap().to_vec(), data);
    // The session is over: reusing it is BLOB_UPLOAD_UNKNOWN.
    let again = client.put(with_digest(&location, &digest)).send().unwrap();
    assert_eq!(again.status().as_u16(), 404);
    assert_eq!(
        error_codes(&again.bytes().unwrap(), "reused session"),
        ["BLOB_UPLOAD_UNKNOWN"]
    );
    assert!(upload_files(&stowage).is_empty());
}

#[test]
fn monolithic_post_and_mount_answer_201() {
    let (_upstream, stowage) = start("");
    let client = http();
    let data = b"monolithic blob".to_vec();
    let digest = sha256_digest(&data);
    let r = client
        .post(format!(
            "{}/v2/team/a/blobs/uploads/?digest={digest}",
            stowage.url()
        ))
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text());
    // Mounted into another repository without a byte sent.
    let r = client
        .post(format!(
            "{}/v2/team/b/blobs/uploads/?mount={digest}&from=team/a",
            stowage.url()
        ))
        .header("Content-Length", "0")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(
        r.headers()["location"],
        format!("/v2/team/b/blobs/{digest}").as_str()
    );
    let head = client
        .head(format!("{}/v2/team/b/blobs/{digest}", stowage.url()))
        .send()
        .unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(
        head.headers()["content-length"],
        data.len().to_string().as_str()
    );
    // A mount from a repository that does not hold it is a normal upload session.
    let r = client
        .post(format!(
            "{}/v2/team/c/blobs/uploads/?mount={digest}&from=team/nothing",
            stowage.url()
        ))
        .header("Content-Length", "0")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
}

#[test]
fn cached_upstream_layers_are_mounted_into_hosted_without_an_upload() {
    let (upstream, stowage) = start("");
    let base = images::push(
        &upstream.url(),
        "library/alpine",
        "3",
        Image::build(Format::Docker, &[20_000]),
    );
    support::stowage::pull_image(&stowage, &base);
    stowage.wait_commits();
    let layer = &base.blobs()[1];
    let r = http()
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?mount={}&from=library/alpine",
            stowage.url(),
            layer.digest
        ))
        .header("Content-Length", "0")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text());
    let got = http()
        .get(format!(
            "{}/v2/team/app/blobs/{}",
            stowage.url(),
            layer.digest
        ))
        .send()
        .unwrap();
    assert_eq!(got.bytes().unwrap().to_vec(), layer.bytes);
}

#[test]
fn bad_pushes_get_the_right_error_and_leave_nothing_behind() {
    let (_upstream, stowage) = start("");
    let client = http();
    let data = b"some bytes".to_vec();

    // Wrong digest on close.
    let location = open_upload(&stowage, "team/bad");
    let r = client
        .put(with_digest(&location, &sha256_digest(b"other bytes")))
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        error_codes(&r.bytes().unwrap(), "wrong digest"),
        ["DIGEST_INVALID"]
    );
    assert!(
        upload_files(&stowage).is_empty(),
        "{:?}",
        upload_files(&stowage)
    );
    assert!(files_under(&hosted_dir(&stowage).join("blobs")).is_empty());

    // A truncated PUT: Content-Length promises more than is sent.
    let location = open_upload(&stowage, "team/bad");
    let target = location.trim_start_matches(&stowage.url()).to_string();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", stowage.port())).unwrap();
    use std::io::Write;
    write!(
        conn,
        "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nonly a few bytes",
        with_digest(&target, &sha256_digest(&[0u8; 1000]))
    )
    .unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    drop(conn);
    assert!(
        wait_until(Duration::from_secs(10), || upload_files(&stowage)
            .is_empty()),
        "a truncated PUT leaves nothing: {:?}",
        upload_files(&stowage)
    );

    // A manifest naming blobs that are not there.
    let image = Image::build(Format::Oci, &[1000]);
    let r = client
        .put(format!("{}/v2/team/bad/manifests/1", stowage.url()))
        .header("Content-Type", images::OCI_MANIFEST)
        .body(image.manifest.bytes.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        error_codes(&r.bytes().unwrap(), "missing blobs"),
        ["MANIFEST_BLOB_UNKNOWN"]
    );
    // Not a manifest at all; too big; a digest reference that does not match.
    let r = client
        .put(format!("{}/v2/team/bad/manifests/1", stowage.url()))
        .header("Content-Type", images::OCI_MANIFEST)
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        error_codes(&r.bytes().unwrap(), "garbage"),
        ["MANIFEST_INVALID"]
    );
    // Refused on its Content-Length, before a byte of the body is read.
    let r = raw_request(
        stowage.port(),
        "PUT",
        "/v2/team/bad/manifests/1",
        &[
            ("Content-Type", images::OCI_MANIFEST),
            ("Content-Length", "5242880"),
        ],
    );
    assert_eq!(r.status, 413);
    assert_eq!(error_codes(&r.body, "oversized"), ["SIZE_INVALID"]);
    let r = client
        .put(format!(
            "{}/v2/team/bad/manifests/{}",
            stowage.url(),
            sha256_digest(b"x")
        ))
        .header("Content-Type", images::OCI_MANIFEST)
        .body(image.manifest.bytes.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        error_codes(&r.bytes().unwrap(), "digest ref"),
        ["DIGEST_INVALID"]
    );

    // Names outside hosted.repositories: pushes stay unsupported, as for a plain mirror.
    for path in [
        "/v2/library/alpine/blobs/uploads/",
        "/v2/ci/a/b/blobs/uploads/",
    ] {
        let r = raw_request(stowage.port(), "POST", path, &[]);
        assert_eq!(r.status, 405, "{path}");
        assert_eq!(error_codes(&r.body, path), ["UNSUPPORTED"]);
    }
    // Deletes are off by default.
    let r = client
        .delete(format!("{}/v2/team/bad/manifests/1", stowage.url()))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(error_codes(&r.bytes().unwrap(), "delete"), ["UNSUPPORTED"]);
    // Nothing of the above is visible.
    let r = client
        .get(format!("{}/v2/team/bad/tags/list", stowage.url()))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[test]
fn acknowledged_pushes_survive_kill_9_and_are_never_evicted() {
    // A cache budget far below what is pushed: hosted content is not in it.
    let upstream = Registry::start();
    let mut stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .max_size("1MiB")
        .extra_toml(HOSTED)
        .start();
    let pushed = images::push(
        &stowage.url(),
        "team/durable",
        "1",
        Image::build(Format::Docker, &[600_000, 600_000]),
    );
    // Half an upload in flight when the process dies.
    let location = open_upload(&stowage, "team/durable");
    let r = http()
        .patch(&location)
        .header("Content-Range", "0-9")
        .body(vec![7u8; 10])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // Mirrored pulls that need eviction in the cache.
    let cached = images::push(
        &upstream.url(),
        "library/big",
        "1",
        Image::build(Format::Oci, &[700_000]),
    );
    support::stowage::pull_image(&stowage, &cached);

    stowage.restart(); // SIGKILL, then start again
    let out = tempfile::tempdir().unwrap();
    skopeo_ok(
        &[
            "copy",
            &format!("docker://{}/team/durable:1", stowage.host_port()),
            &format!("dir:{}", out.path().display()),
        ],
        "pull after kill -9",
    );
    for blob in pushed.blobs() {
        let p = out.path().join(blob.hex());
        assert_eq!(std::fs::read(&p).unwrap(), blob.bytes, "{}", p.display());
    }
    // The interrupted session resumes where it was.
    let status = http().get(&location).send().unwrap();
    assert_eq!(status.status().as_u16(), 204);
    assert_eq!(status.headers()["range"], "0-9");
}

#[test]
fn deletes_when_enabled_and_idle_uploads_are_purged() {
    let (_upstream, stowage) = start("delete = true\nupload_timeout = \"1s\"\n");
    let pushed = images::push(
        &stowage.url(),
        "team/del",
        "1",
        Image::build(Format::Oci, &[1000]),
    );
    let client = http();
    // Delete the tag only: the manifest stays reachable by digest.
    let r = client
        .delete(format!("{}/v2/team/del/manifests/1", stowage.url()))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let by_digest = format!(
        "{}/v2/team/del/manifests/{}",
        stowage.url(),
        pushed.digest()
    );
    assert_eq!(
        client.head(&by_digest).send().unwrap().status().as_u16(),
        200
    );
    let r = client.delete(&by_digest).send().unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(
        client.head(&by_digest).send().unwrap().status().as_u16(),
        404
    );
    let blob = &pushed.blobs()[0];
    let blob_url = format!("{}/v2/team/del/blobs/{}", stowage.url(), blob.digest);
    assert_eq!(
        client.delete(&blob_url).send().unwrap().status().as_u16(),
        202
    );
    assert_eq!(
        client.head(&blob_url).send().unwrap().status().as_u16(),
        404
    );
    // Mirrored names never take deletes.
    let r = client
        .delete(format!("{}/v2/library/x/manifests/1", stowage.url()))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);

    // Abandoned sessions are purged after upload_timeout, with their files.
    for _ in 0..1000 {
        let location = open_upload(&stowage, "team/abandoned");
        let r = client
            .patch(&location)
            .body(vec![1u8; 1000])
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    assert!(!upload_files(&stowage).is_empty());
    assert!(
        wait_until(Duration::from_secs(60), || upload_files(&stowage)
            .is_empty()),
        "idle sessions still on disk: {}",
        upload_files(&stowage).len()
    );
    let metric = |name: &str| -> f64 {
        let text = client
            .get(format!("{}/metrics", stowage.url()))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(metric("stowage_uploads_in_progress"), 0.0);
    assert!(metric("stowage_pushes_total{result=\"ok\"}") >= 2.0);
    // What is left is the one image's blobs, counted in the hosted budget.
    assert_eq!(metric("stowage_hosted_blobs"), 2.0);
}

#[test]
fn a_push_over_hosted_max_size_is_refused_with_507_and_keeps_nothing() {
    let upstream = Registry::start();
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml("[hosted]\nrepositories = [\"team/**\"]\nmax_size = \"100KiB\"\n")
        .start();
    let location = open_upload(&stowage, "team/big");
    let data = vec![3u8; 200_000];
    let r = http()
        .put(with_digest(&location, &sha256_digest(&data)))
        .body(data)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 507);
    assert!(upload_files(&stowage).is_empty());
    assert!(files_under(&hosted_dir(&stowage).join("blobs")).is_empty());
    // A blob that fits is still taken.
    let small = vec![4u8; 1000];
    let location = open_upload(&stowage, "team/big");
    let r = http()
        .put(with_digest(&location, &sha256_digest(&small)))
        .body(small)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
}

#[test]
fn access_rules_decide_who_may_push_pull_and_delete() {
    let upstream = Registry::start();
    let files = tempfile::tempdir().unwrap();
    let htpasswd =
        support::write_htpasswd(files.path(), &[("ci", "ci-pass"), ("reader", "read-pass")]);
    let rules = "[[auth.access]]\nusers = [\"ci\"]\nrepositories = [\"team/**\"]\nactions = [\"pull\", \"push\", \"delete\"]\n\
                 [[auth.access]]\nusers = [\"reader\"]\nrepositories = [\"team/**\", \"library/**\"]\nactions = [\"pull\"]\n\
                 [[auth.access]]\nusers = [\"anonymous\"]\nrepositories = [\"team/public\"]\nactions = [\"pull\"]\n";
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .auth_required()
        .extra_toml(&format!(
            "{HOSTED}delete = true\n[auth]\nhtpasswd = {:?}\n{rules}",
            htpasswd.display().to_string()
        ))
        .start();
    images::push(
        &upstream.url(),
        "test/src",
        "1",
        Image::build(Format::Oci, &[4000]),
    );
    for dest in ["team/app:1", "team/public:1"] {
        skopeo_ok(
            &[
                "copy",
                "--dest-creds",
                "ci:ci-pass",
                &format!("docker://{}/test/src:1", upstream.host_port()),
                &format!("docker://{}/{dest}", stowage.host_port()),
            ],
            "push by a user with push",
        );
    }
    let client = http();
    let url = |path: &str| format!("{}{path}", stowage.url());

    // A pull-only user: pulls, but a push is 403 naming the rule that matched.
    let ok = client
        .get(url("/v2/team/app/manifests/1"))
        .basic_auth("reader", Some("read-pass"))
        .header("Accept", support::manifest_accept())
        .send()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let denied = client
        .post(url("/v2/team/app/blobs/uploads/"))
        .basic_auth("reader", Some("read-pass"))
        .header("Content-Length", "0")
        .send()
        .unwrap();
    assert_eq!(denied.status().as_u16(), 403);
    let body = denied.text().unwrap();
    assert!(
        body.contains("DENIED") && body.contains("auth.access[1] allows only pull"),
        "{body}"
    );
    let denied = client
        .delete(url("/v2/team/app/manifests/1"))
        .basic_auth("reader", Some("read-pass"))
        .send()
        .unwrap();
    assert_eq!(denied.status().as_u16(), 403);

    // Anonymous: the one public repository, nothing else; a 401 asks it to log in.
    let anon = client.get(url("/v2/team/app/manifests/1")).send().unwrap();
    assert_eq!(anon.status().as_u16(), 401);
    assert_eq!(
        anon.headers()["www-authenticate"],
        "Basic realm=\"stowage\""
    );
    assert_eq!(
        client.get(url("/v2/")).send().unwrap().status().as_u16(),
        401
    );
    let public = client
        .get(url("/v2/team/public/manifests/1"))
        .header("Accept", support::manifest_accept())
        .send()
        .unwrap();
    assert_eq!(public.status().as_u16(), 200);
    let catalog: serde_json::Value = client
        .get(url("/v2/_catalog"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["team/public"]));
    let anon_push = client
        .post(url("/v2/team/public/blobs/uploads/"))
        .header("Content-Length", "0")
        .send()
        .unwrap();
    assert_eq!(anon_push.status().as_u16(), 401);

    // The pusher deletes.
    let del = client
        .delete(url("/v2/team/app/manifests/1"))
        .basic_auth("ci", Some("ci-pass"))
        .send()
        .unwrap();
    assert_eq!(del.status().as_u16(), 202);
}

#[test]
fn gc_ls_and_verify_cover_hosted_content_inside_a_running_serve() {
    let (_upstream, stowage) = start("upload_timeout = \"1s\"\n");
    let keep = images::push(
        &stowage.url(),
        "team/gc",
        "1",
        Image::build(Format::Oci, &[3000]),
    );
    let old = images::push(
        &stowage.url(),
        "team/gc",
        "2",
        Image::build(Format::Oci, &[5000]),
    );
    // Tag 2 moves to the kept image: the old manifest is reached by no tag any more.
    images::push_manifest(&stowage.url(), "team/gc", "2", keep.manifest());
    // A blob pushed and never referenced.
    let stray = images::Blob::new("application/octet-stream", b"stray bytes".to_vec());
    images::push_blob(&stowage.url(), "team/gc", &stray);
    let blob_files = || files_under(&hosted_dir(&stowage).join("blobs"));
    let before = blob_files().len();
    std::thread::sleep(Duration::from_millis(2100)); // past the grace period (upload_timeout)

    let ls = support::stowage::command_ok(&stowage, &["ls"]);
    assert!(
        ls.contains("hosted repositories") && ls.contains("team/gc:1"),
        "{ls}"
    );
    let gc = support::stowage::command_ok(&stowage, &["gc"]);
    assert!(gc.contains("hosted: removed 1 manifests"), "{gc}");
    let old_layer = &old.blobs()[1];
    let client = http();
    let status = |url: String| client.head(url).send().unwrap().status().as_u16();
    assert_eq!(
        status(format!(
            "{}/v2/team/gc/manifests/{}",
            stowage.url(),
            old.digest()
        )),
        404
    );
    assert_eq!(
        status(format!(
            "{}/v2/team/gc/blobs/{}",
            stowage.url(),
            old_layer.digest
        )),
        404
    );
    assert_eq!(
        status(format!(
            "{}/v2/team/gc/blobs/{}",
            stowage.url(),
            stray.digest
        )),
        404
    );
    // Old config, old layer and the stray blob are gone; the kept image is whole.
    assert_eq!(blob_files().len(), before - 3, "{:?}", blob_files());
    for blob in keep.blobs() {
        assert_eq!(
            status(format!(
                "{}/v2/team/gc/blobs/{}",
                stowage.url(),
                blob.digest
            )),
            200
        );
    }
    let verify = support::stowage::command_ok(&stowage, &["verify"]);
    assert!(
        verify.contains("hosted: verified 2 blobs, 0 problem(s)"),
        "{verify}"
    );
    // A damaged hosted blob is reported, and verify fails.
    let victim = &keep.blobs()[1];
    std::fs::write(
        hosted_dir(&stowage)
            .join("blobs/sha256")
            .join(&victim.hex()[..2])
            .join(victim.hex()),
        b"bit rot",
    )
    .unwrap();
    let verify = support::stowage::command(&stowage, &["verify"]);
    assert!(!verify.status.success());
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("corrupt"),
        "{}",
        support::stowage::text(&verify)
    );
}

#[test]
fn kill_9_during_manifest_pushes_loses_no_acknowledged_tag_and_shows_no_half_image() {
    let (_upstream, mut stowage) = start("");
    let image = Image::build(Format::Oci, &[2000]);
    for blob in image.blobs() {
        images::push_blob(&stowage.url(), "team/crash", blob);
    }
    let url = stowage.url();
    let pid = stowage.pid().expect("running");
    let manifest = image.manifest.clone();
    // Tags pushed back to back; each 201 is recorded.
    let pusher = std::thread::spawn(move || {
        let client = http();
        let mut acked = Vec::new();
        for i in 0..100_000 {
            let tag = format!("t{i}");
            let sent = client
                .put(format!("{url}/v2/team/crash/manifests/{tag}"))
                .header("Content-Type", images::OCI_MANIFEST)
                .body(manifest.bytes.clone())
                .send();
            match sent {
                Ok(r) if r.status().as_u16() == 201 => acked.push(tag),
                _ => break,
            }
        }
        acked
    });
    // Let some pushes through, then kill -9 in the middle of the stream.
    assert!(wait_until(Duration::from_secs(30), || {
        support::stowage::command_ok(&stowage, &["ls"])
            .matches("team/crash:t")
            .count()
            >= 20
    }));
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let acked = pusher.join().unwrap();
    assert!(acked.len() >= 20, "{}", acked.len());
    stowage.restart();

    let client = http();
    for tag in &acked {
        let r = client
            .get(format!("{}/v2/team/crash/manifests/{tag}", stowage.url()))
            .header("Accept", support::manifest_accept())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "acknowledged tag {tag} lost");
        assert_eq!(r.bytes().unwrap().to_vec(), image.manifest.bytes);
    }
    // Whatever the tag list holds now is whole: each tag's manifest and blobs are served.
    let tags: serde_json::Value = client
        .get(format!("{}/v2/team/crash/tags/list", stowage.url()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let listed = tags["tags"].as_array().unwrap();
    assert!(listed.len() >= acked.len());
    for blob in image.blobs() {
        let r = client
            .get(format!(
                "{}/v2/team/crash/blobs/{}",
                stowage.url(),
                blob.digest
            ))
            .send()
            .unwrap();
        assert_eq!(r.bytes().unwrap().to_vec(), blob.bytes);
    }
}

#[test]
fn referrers_of_a_hosted_image_are_listed_filtered_and_forgotten_on_delete() {
    let (_upstream, stowage) = start("delete = true\n");
    let client = http();
    let pushed = images::push(
        &stowage.url(),
        "team/signed",
        "1",
        Image::build(Format::Oci, &[1500]),
    );
    let subject = pushed.digest().to_string();
    let url = |path: &str| format!("{}{path}", stowage.url());

    // Nothing refers to it yet: 200 with an empty index.
    let r = client
        .get(url(&format!("/v2/team/signed/referrers/{subject}")))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], images::OCI_INDEX);
    let index: serde_json::Value = r.json().unwrap();
    assert_eq!(index["manifests"], serde_json::json!([]));

    // Two artifacts with the image as subject (as cosign and an SBOM tool push them).
    let empty = images::Blob::new("application/vnd.oci.empty.v1+json", b"{}".to_vec());
    images::push_blob(&stowage.url(), "team/signed", &empty);
    let mut artifacts = Vec::new();
    for (kind, payload) in [
        (
            "application/vnd.dev.cosign.artifact.sig.v1+json",
            b"signature".to_vec(),
        ),
        ("application/spdx+json", b"{\"spdx\":true}".to_vec()),
    ] {
        let layer = images::Blob::new("application/octet-stream", payload);
        images::push_blob(&stowage.url(), "team/signed", &layer);
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": images::OCI_MANIFEST,
            "artifactType": kind,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.digest, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": layer.digest, "size": layer.size()}],
            "subject": {"mediaType": images::OCI_MANIFEST, "digest": subject, "size": pushed.manifest().size()},
            "annotations": {"org.example.kind": kind}
        })
        .to_string();
        let digest = sha256_digest(body.as_bytes());
        let r = client
            .put(url(&format!("/v2/team/signed/manifests/{digest}")))
            .header("Content-Type", images::OCI_MANIFEST)
            .body(body.clone())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "{:?}", r.text());
        assert_eq!(r.headers()["oci-subject"], subject.as_str());
        artifacts.push((kind, digest, body.len()));
    }
    let index: serde_json::Value = client
        .get(url(&format!("/v2/team/signed/referrers/{subject}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let listed = index["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{index}");
    for (kind, digest, size) in &artifacts {
        let d = listed
            .iter()
            .find(|d| d["digest"] == digest.as_str())
            .expect("listed");
        assert_eq!(d["artifactType"], *kind);
        assert_eq!(d["size"], *size);
        assert_eq!(d["mediaType"], images::OCI_MANIFEST);
        assert_eq!(d["annotations"]["org.example.kind"], *kind);
    }
    // Filtered by artifactType, and said so.
    let r = client
        .get(url(&format!(
            "/v2/team/signed/referrers/{subject}?artifactType=application/spdx%2Bjson"
        )))
        .send()
        .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let index: serde_json::Value = r.json().unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        index["manifests"][0]["artifactType"],
        "application/spdx+json"
    );
    // Another repository sees none of them.
    let other: serde_json::Value = client
        .get(url(&format!("/v2/team/other/referrers/{subject}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(other["manifests"], serde_json::json!([]));
    // Deleting a referrer updates the list.
    let r = client
        .delete(url(&format!(
            "/v2/team/signed/manifests/{}",
            artifacts[0].1
        )))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let index: serde_json::Value = client
        .get(url(&format!("/v2/team/signed/referrers/{subject}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    // A mirrored name is answered from its upstream (distribution 2.8: no referrers API and
    // no `sha256-<hex>` tag), in the API's form: nothing refers to the digest there.
    let r = client
        .get(url(&format!("/v2/library/alpine/referrers/{subject}")))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let index: serde_json::Value = r.json().unwrap();
    assert_eq!(index["manifests"], serde_json::json!([]));
}
