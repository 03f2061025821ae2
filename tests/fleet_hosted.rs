//! Hosted repositories in a fleet: two stowage nodes sharing one directory store
//! (`storage.shared_path`), skopeo as the client, a real upstream (distribution) as the source
//! of the images pushed. What one node acknowledged (`201`) is in the shared store already, so
//! the other node serves it; a tag moved on either node is what both serve; a store that fails
//! during a push turns it into a `503` that acknowledged nothing. A node that never saw a push
//! lists it in `_catalog`, answers its referrers and exports it; `stowage gc` collects the
//! store's untagged content a grace period after recording it, losing no concurrent push.
//!
//! Each test starts its own upstream, store directory and nodes (own ports, own temp dirs).

mod support;

use std::path::Path;

use support::garage::Garage;
use support::images::{self, Format, Image, Pushed};
use support::nginx::Nginx;
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{error_codes, http, sha256_digest, sha256_hex, skopeo_ok};

const HOSTED: &str = "[hosted]\nrepositories = [\"team/**\"]\nmax_size = \"1GiB\"\ndelete = true\n";

/// A node with hosted repositories on the shared directory `shared`.
fn node(upstream: &Registry, shared: &Path) -> Stowage {
    node_with(
        upstream,
        &format!("shared_path = \"{}\"\n", shared.display()),
        HOSTED,
    )
}

/// A node with these `[storage]` lines and this `[hosted]` table.
fn node_with(upstream: &Registry, storage: &str, hosted: &str) -> Stowage {
    Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .storage_toml(storage)
        .extra_toml(hosted)
        .start()
}

/// `skopeo copy` of an image from the upstream into `node` as `team/app:<tag>`.
fn push_through(upstream: &Registry, source: &Pushed, node: &Stowage, tag: &str) {
    skopeo_ok(
        &[
            "copy",
            "--preserve-digests",
            &format!(
                "docker://{}/{}:{}",
                upstream.host_port(),
                source.name,
                source.tag
            ),
            &format!("docker://{}/team/app:{tag}", node.host_port()),
        ],
        &format!("pushing into {}", node.url()),
    );
}

/// `skopeo copy` of `team/app:<tag>` from `node`, checked byte for byte against `pushed`.
fn pull_exact(node: &Stowage, tag: &str, pushed: &Pushed) {
    let out = tempfile::tempdir().expect("tempdir");
    skopeo_ok(
        &[
            "copy",
            "--preserve-digests",
            &format!("docker://{}/team/app:{tag}", node.host_port()),
            &format!("dir:{}", out.path().display()),
        ],
        &format!("pulling from {}", node.url()),
    );
    let manifest = std::fs::read(out.path().join("manifest.json")).expect("manifest.json");
    assert!(
        manifest == pushed.manifest().bytes,
        "the manifest differs from the one pushed"
    );
    for blob in pushed.blobs() {
        let got = std::fs::read(out.path().join(blob.hex()))
            .unwrap_or_else(|e| panic!("blob {} missing from the copy: {e}", blob.hex()));
        assert_eq!(
            sha256_hex(&got),
            blob.hex(),
            "blob {} corrupted",
            blob.hex()
        );
    }
}

/// The digest `node` serves for `team/app:<tag>` (`None` on a 404).
fn tag_digest(node: &Stowage, tag: &str) -> Option<String> {
    let resp = http()
        .head(format!("{}/v2/team/app/manifests/{tag}", node.url()))
        .header("Accept", support::manifest_accept())
        .send()
        .expect("HEAD manifest");
    match resp.status().as_u16() {
        200 => Some(
            resp.headers()["docker-content-digest"]
                .to_str()
                .ok()?
                .to_string(),
        ),
        404 => None,
        s => panic!("HEAD team/app:{tag} on {}: {s}", node.url()),
    }
}

fn hosted_files(node: &Stowage) -> Vec<std::path::PathBuf> {
    support::files_under(&node.data_dir().join("hosted/blobs"))
}

#[test]
fn a_push_to_one_node_is_pulled_byte_exact_from_another_and_tags_move_fleet_wide() {
    let upstream = Registry::start();
    let v1 = upstream.push("src/app", "v1", Image::build(Format::Oci, &[2048, 3 << 20]));
    let v2 = upstream.push("src/app", "v2", Image::build(Format::Oci, &[4096]));
    let shared = tempfile::tempdir().expect("tempdir");
    let a = node(&upstream, shared.path());
    let b = node(&upstream, shared.path());

    push_through(&upstream, &v1, &a, "1");
    // Acknowledged means shared: every object is there the moment the push returned.
    let store = shared.path().join("hosted");
    for blob in v1.blobs() {
        let object = store.join(format!("blobs/sha256/{}", blob.hex()));
        assert!(object.is_file(), "{} not in the shared store", blob.hex());
    }
    let tag_record = store.join("repos/team/app/_tags/1");
    assert_eq!(
        std::fs::read_to_string(&tag_record).expect("shared tag record"),
        v1.digest()
    );
    assert!(hosted_files(&b).is_empty(), "node B holds nothing yet");
    // A HEAD on B answers from the shared store without copying the blob.
    let big = &v1.blobs()[2];
    let head = http()
        .head(format!("{}/v2/team/app/blobs/{}", b.url(), big.digest))
        .send()
        .expect("HEAD on B");
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(
        head.headers()["content-length"],
        big.size().to_string().as_str()
    );
    assert!(hosted_files(&b).is_empty(), "a HEAD copied the blob to B");

    pull_exact(&b, "1", &v1);
    assert!(
        hosted_files(&b).len() >= v1.blobs().len(),
        "node B keeps local copies of what it served"
    );
    let tags: serde_json::Value = http()
        .get(format!("{}/v2/team/app/tags/list", b.url()))
        .send()
        .and_then(|r| r.json())
        .expect("tags/list on B");
    assert_eq!(tags, serde_json::json!({"name": "team/app", "tags": ["1"]}));
    // Another hosted repository sees none of it on either node.
    let other = http()
        .head(format!(
            "{}/v2/team/other/blobs/{}",
            b.url(),
            v1.blobs()[0].digest
        ))
        .send()
        .expect("HEAD");
    assert_eq!(other.status().as_u16(), 404);

    // The tag moves on B: A serves the new image, byte-exact.
    push_through(&upstream, &v2, &b, "1");
    assert_eq!(tag_digest(&a, "1").as_deref(), Some(v2.digest()));
    pull_exact(&a, "1", &v2);
    // The old image stays reachable by digest on both nodes.
    for n in [&a, &b] {
        assert_eq!(tag_digest(n, v1.digest()).as_deref(), Some(v1.digest()));
    }
    // A tag deleted on A is gone on B.
    let del = http()
        .delete(format!("{}/v2/team/app/manifests/1", a.url()))
        .send()
        .expect("DELETE tag");
    assert_eq!(del.status().as_u16(), 202);
    assert_eq!(tag_digest(&b, "1"), None);
    // The pushes never reached the upstream under the hosted name.
    assert_eq!(upstream.count_requests("GET", "/v2/team/app"), 0);
}

#[test]
fn a_shared_store_failure_during_a_push_is_503_and_acknowledges_nothing() {
    let upstream = Registry::start();
    let shared = tempfile::tempdir().expect("tempdir");
    let a = node(&upstream, shared.path());
    let b = node(&upstream, shared.path());
    let client = http();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = sha256_digest(config);
    let post = |node: &Stowage, data: &[u8], digest: &str| {
        client
            .post(format!(
                "{}/v2/team/app/blobs/uploads/?digest={digest}",
                node.url()
            ))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .expect("POST blob")
    };
    assert_eq!(post(&a, config, &config_digest).status().as_u16(), 201);

    // Every write to the shared directory now fails (its temp directory is a file).
    let tmp = shared.path().join(".tmp");
    std::fs::remove_dir_all(&tmp).expect("remove .tmp");
    std::fs::write(&tmp, b"in the way").expect("block .tmp");

    let layer = b"a layer pushed while the store is failing".to_vec();
    let layer_digest = sha256_digest(&layer);
    let resp = post(&a, &layer, &layer_digest);
    assert_eq!(resp.status().as_u16(), 503);
    let body = resp.bytes().expect("body");
    assert_eq!(error_codes(&body, "blob push"), vec!["UNAVAILABLE"]);
    for n in [&a, &b] {
        let head = client
            .head(format!("{}/v2/team/app/blobs/{layer_digest}", n.url()))
            .send()
            .expect("HEAD blob");
        assert_eq!(
            head.status().as_u16(),
            404,
            "an unacknowledged blob is visible"
        );
    }
    assert!(
        hosted_files(&a)
            .iter()
            .all(|f| !f.ends_with(&layer_digest[7..])),
        "the refused blob was kept on node A"
    );

    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": images::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": []
    })
    .to_string();
    let put = |node: &Stowage| {
        client
            .put(format!("{}/v2/team/app/manifests/1", node.url()))
            .header("Content-Type", images::OCI_MANIFEST)
            .body(manifest.clone())
            .send()
            .expect("PUT manifest")
    };
    let resp = put(&a);
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        error_codes(&resp.bytes().expect("body"), "manifest push"),
        vec!["UNAVAILABLE"]
    );
    assert_eq!(tag_digest(&a, "1"), None, "a refused tag is served by A");
    assert_eq!(tag_digest(&b, "1"), None, "a refused tag is served by B");

    // The store is back: the same pushes succeed and both nodes serve them.
    std::fs::remove_file(&tmp).expect("unblock .tmp");
    assert_eq!(post(&a, &layer, &layer_digest).status().as_u16(), 201);
    assert_eq!(put(&a).status().as_u16(), 201);
    let digest = sha256_digest(manifest.as_bytes());
    for n in [&a, &b] {
        assert_eq!(tag_digest(n, "1").as_deref(), Some(digest.as_str()));
    }
}

#[test]
fn pushes_and_pulls_through_the_documented_nginx_setup_reach_every_node() {
    let upstream = Registry::start();
    let v1 = upstream.push(
        "src/app",
        "v1",
        Image::build(Format::Docker, &[1024, 2048, 512 * 1024, 2 << 20]),
    );
    let shared = tempfile::tempdir().expect("tempdir");
    let a = node(&upstream, shared.path());
    let b = node(&upstream, shared.path());
    let lb = Nginx::start_fleet(&[a.host_port(), b.host_port()]);

    // skopeo's push: HEAD per blob (hashed on the digest), POST/PATCH/PUT of each upload (one
    // node per repository), the manifest PUT (hashed on its path): spread over both nodes.
    skopeo_ok(
        &[
            "copy",
            "--preserve-digests",
            &format!("docker://{}/src/app:v1", upstream.host_port()),
            &format!("docker://{}/team/app:1", lb.host_port()),
        ],
        "pushing through nginx",
    );
    let out = tempfile::tempdir().expect("tempdir");
    skopeo_ok(
        &[
            "copy",
            "--preserve-digests",
            &format!("docker://{}/team/app:1", lb.host_port()),
            &format!("dir:{}", out.path().display()),
        ],
        "pulling through nginx",
    );
    for blob in v1.blobs() {
        let got = std::fs::read(out.path().join(blob.hex())).expect("blob in the copy");
        assert_eq!(sha256_hex(&got), blob.hex());
    }
    for n in [&a, &b] {
        pull_exact(n, "1", &v1);
    }
}

/// The same through an S3 bucket (a real 3-node Garage cluster): multipart uploads of pushed
/// layers, listed tag records, last writer wins; the catalog and referrers of a node that never
/// saw the push, and the collector's two runs over the bucket's listings.
#[test]
fn a_garage_bucket_carries_hosted_images_between_nodes() {
    let upstream = Registry::start();
    let v1 = upstream.push(
        "src/app",
        "v1",
        Image::build(Format::Docker, &[1024, 9 << 20]),
    );
    let v2 = upstream.push("src/app", "v2", Image::build(Format::Docker, &[2048]));
    let garage = Garage::start(3);
    let storage = garage.storage_toml("fleet-hosted/");
    let a = node_with(&upstream, &storage, HOSTED_SHORT_GRACE);
    let b = node_with(&upstream, &storage, HOSTED_SHORT_GRACE);

    push_through(&upstream, &v1, &a, "1");
    pull_exact(&b, "1", &v1);
    push_through(&upstream, &v2, &b, "1");
    assert_eq!(tag_digest(&a, "1").as_deref(), Some(v2.digest()));
    pull_exact(&a, "1", &v2);
    let tags: serde_json::Value = http()
        .get(format!("{}/v2/team/app/tags/list", a.url()))
        .send()
        .and_then(|r| r.json())
        .expect("tags/list on A");
    assert_eq!(tags, serde_json::json!({"name": "team/app", "tags": ["1"]}));

    // A third node, which never saw either push: the bucket's listings answer.
    let signature = push_referrer(&a, v2.digest(), v2.manifest().bytes.len());
    let c = node_with(&upstream, &storage, HOSTED_SHORT_GRACE);
    let catalog = get_json(&format!("{}/v2/_catalog", c.url()));
    assert_eq!(catalog["repositories"], serde_json::json!(["team/app"]));
    let referrers = get_json(&format!(
        "{}/v2/team/app/referrers/{}",
        c.url(),
        v2.digest()
    ));
    assert_eq!(referrers["manifests"][0]["digest"], signature.as_str());

    // v1 lost its tag: two runs a grace period apart remove it from the bucket.
    past_grace();
    support::stowage::command_ok(&c, &["gc"]);
    past_grace();
    let gc = support::stowage::command_ok(&c, &["gc"]);
    let line = format!("removed untagged manifest team/app@{}", v1.digest());
    assert!(gc.contains(&line), "{gc}");
    let d = node_with(&upstream, &storage, HOSTED_SHORT_GRACE);
    assert_eq!(tag_digest(&d, v1.digest()), None);
    let big = &v1.blobs()[2];
    let head = http()
        .head(format!("{}/v2/team/app/blobs/{}", d.url(), big.digest))
        .send()
        .expect("HEAD on D");
    assert_eq!(head.status().as_u16(), 404, "v1's layer is still shared");
    pull_exact(&d, "1", &v2);
    let referrers = get_json(&format!(
        "{}/v2/team/app/referrers/{}",
        d.url(),
        v2.digest()
    ));
    assert_eq!(referrers["manifests"][0]["digest"], signature.as_str());
}

/// Pushes an OCI artifact (empty config, no layers) whose subject is `subject` to `node`'s
/// `team/app`, by digest; its digest.
fn push_referrer(node: &Stowage, subject: &str, subject_size: usize) -> String {
    let client = http();
    let config = b"{}";
    let config_digest = sha256_digest(config);
    let post = client
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?digest={config_digest}",
            node.url()
        ))
        .body(config.to_vec())
        .send()
        .expect("POST config");
    assert_eq!(post.status().as_u16(), 201);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": images::OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config_digest, "size": 2},
        "layers": [],
        "subject": {"mediaType": images::OCI_MANIFEST, "digest": subject, "size": subject_size},
    })
    .to_string();
    let digest = sha256_digest(manifest.as_bytes());
    let put = client
        .put(format!("{}/v2/team/app/manifests/{digest}", node.url()))
        .header("Content-Type", images::OCI_MANIFEST)
        .body(manifest)
        .send()
        .expect("PUT referrer");
    assert_eq!(put.status().as_u16(), 201);
    digest
}

fn get_json(url: &str) -> serde_json::Value {
    let resp = http().get(url).send().expect("GET");
    assert_eq!(resp.status().as_u16(), 200, "GET {url}");
    resp.json().expect("JSON body")
}

#[test]
fn a_node_that_never_saw_a_push_lists_it_answers_its_referrers_and_exports_it() {
    let upstream = Registry::start();
    let v1 = upstream.push(
        "src/app",
        "v1",
        Image::build(Format::Oci, &[2048, 64 << 10]),
    );
    let shared = tempfile::tempdir().expect("tempdir");
    let a = node(&upstream, shared.path());
    let b = node(&upstream, shared.path());
    push_through(&upstream, &v1, &a, "1");
    let signature = push_referrer(&a, v1.digest(), v1.manifest().bytes.len());

    // B was never pushed to and never pulled: everything below comes from the shared store.
    assert!(hosted_files(&b).is_empty());
    let catalog = get_json(&format!("{}/v2/_catalog", b.url()));
    let repos = catalog["repositories"].as_array().expect("repositories");
    assert!(repos.iter().any(|r| r == "team/app"), "{catalog}");
    let referrers = get_json(&format!(
        "{}/v2/team/app/referrers/{}",
        b.url(),
        v1.digest()
    ));
    let found = referrers["manifests"].as_array().expect("manifests");
    assert_eq!(found.len(), 1, "{referrers}");
    assert_eq!(found[0]["digest"], signature.as_str());
    assert_eq!(
        found[0]["artifactType"],
        "application/vnd.example.signature"
    );
    let ls = support::stowage::command_ok(&b, &["ls"]);
    assert!(ls.contains("team/app:1"), "{ls}");

    // Export on B (through its admin socket), read back by skopeo byte-exact.
    let work = tempfile::tempdir().expect("tempdir");
    let layout = format!("{}/layout/", work.path().display());
    let out = support::stowage::command_ok(&b, &["export", "team/app:1", "-o", &layout]);
    assert!(out.contains("export hosted team/app:1"), "{out}");
    let copy = work.path().join("copy");
    skopeo_ok(
        &[
            "copy",
            "--preserve-digests",
            &format!("oci:{layout}:team/app:1"),
            &format!("dir:{}", copy.display()),
        ],
        "reading the exported layout",
    );
    let manifest = std::fs::read(copy.join("manifest.json")).expect("manifest.json");
    assert!(
        manifest == v1.manifest().bytes,
        "the exported manifest differs"
    );
    for blob in v1.blobs() {
        let got = std::fs::read(copy.join(blob.hex())).expect("blob in the copy");
        assert_eq!(sha256_hex(&got), blob.hex());
    }
}

/// `[hosted]` with a two-second grace period (`upload_timeout`), for the collector.
const HOSTED_SHORT_GRACE: &str = "[hosted]\nrepositories = [\"team/**\"]\nmax_size = \"1GiB\"\ndelete = true\nupload_timeout = \"2s\"\n";

fn short_grace_node(upstream: &Registry, shared: &Path) -> Stowage {
    node_with(
        upstream,
        &format!("shared_path = \"{}\"\n", shared.display()),
        HOSTED_SHORT_GRACE,
    )
}

/// Pushes `image` as `team/app:<tag>` through `node`, then deletes the tag: an untagged manifest.
fn push_untagged(upstream: &Registry, image: &Pushed, node: &Stowage, tag: &str) {
    push_through(upstream, image, node, tag);
    let del = http()
        .delete(format!("{}/v2/team/app/manifests/{tag}", node.url()))
        .send()
        .expect("DELETE tag");
    assert_eq!(del.status().as_u16(), 202);
}

/// Past the grace period (2 s) of everything pushed or recorded so far.
fn past_grace() {
    std::thread::sleep(std::time::Duration::from_millis(3500));
}

#[test]
fn shared_gc_removes_untagged_content_after_the_grace_and_loses_no_concurrent_push() {
    let upstream = Registry::start();
    let v1 = upstream.push("src/app", "v1", Image::build(Format::Oci, &[2048, 8192]));
    let v2 = upstream.push("src/app", "v2", Image::build(Format::Oci, &[4096, 16384]));
    let v3 = upstream.push("src/app", "v3", Image::build(Format::Oci, &[3072, 1 << 20]));
    let shared = tempfile::tempdir().expect("tempdir");
    let a = short_grace_node(&upstream, shared.path());
    let b = short_grace_node(&upstream, shared.path());
    push_through(&upstream, &v1, &a, "1");
    push_untagged(&upstream, &v2, &a, "2");
    let object = |hex: &str| shared.path().join(format!("hosted/blobs/sha256/{hex}"));
    let unique: Vec<String> = v2
        .blobs()
        .iter()
        .map(|b| b.hex().to_string())
        .filter(|h| !v1.blobs().iter().any(|k| k.hex() == h.as_str()))
        .collect();
    assert!(!unique.is_empty());

    // First run: the untagged image is only recorded; a dry run later removes nothing.
    past_grace();
    let first = support::stowage::command_ok(&b, &["gc"]);
    assert!(
        first.contains("hosted (shared store): removed 0 manifests"),
        "{first}"
    );
    assert!(
        unique.iter().all(|h| object(h).is_file()),
        "removed before the grace"
    );
    past_grace();
    let dry = support::stowage::command_ok(&b, &["gc", "--dry-run"]);
    let line = format!("would remove untagged manifest team/app@{}", v2.digest());
    assert!(dry.contains(&line), "{dry}");
    assert!(
        unique.iter().all(|h| object(h).is_file()),
        "a dry run removed"
    );

    // Second run, a grace period after the first: gone from the store, for every node.
    let second = support::stowage::command_ok(&b, &["gc"]);
    assert!(
        second.contains(&format!(
            "removed untagged manifest team/app@{}",
            v2.digest()
        )),
        "{second}"
    );
    for h in &unique {
        assert!(!object(h).exists(), "blob {h} of the untagged image kept");
    }
    let manifest_object = shared.path().join(format!(
        "hosted/manifests/sha256/{}",
        &v2.digest()["sha256:".len()..]
    ));
    assert!(!manifest_object.exists());
    let c = short_grace_node(&upstream, shared.path());
    assert_eq!(tag_digest(&c, v2.digest()), None);
    pull_exact(&c, "1", &v1);

    // An untagged image recorded, then pushed again while the collector runs: nothing lost.
    push_untagged(&upstream, &v3, &a, "3");
    past_grace();
    support::stowage::command_ok(&b, &["gc"]);
    past_grace();
    let gc = std::thread::scope(|s| {
        let gc = s.spawn(|| support::stowage::command_ok(&b, &["gc"]));
        push_through(&upstream, &v3, &c, "again");
        gc.join().expect("gc thread")
    });
    assert!(gc.contains("hosted (shared store)"), "{gc}");
    support::stowage::command_ok(&b, &["gc"]);
    let d = short_grace_node(&upstream, shared.path());
    pull_exact(&d, "again", &v3);
    pull_exact(&d, "1", &v1);
}
