//! The console's API against a real upstream: the numbers are checked against what the test
//! pulled (bytes, pulls, last pulled), the eviction preview against an eviction forced by a
//! fill, pins set through the API against `stowage ls`, purges against the blob files, and the
//! rules: actions need `X-Requested-With: stowage`, `[auth]` users with `delete` or
//! `console.admins`, and are off without `[auth]` unless allowed.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::images::{push_test, Format, Image, Pushed};
use support::registry::Registry;
use support::stowage::{ls_line, pull_image, Stowage, UpstreamSpec};
use support::{http, wait_until, write_htpasswd};

const ALLOW: &str = "[console]\nallow_actions_without_auth = true\n";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// GET `path` of the API as `user` (`None`: anonymous): (status, JSON body or null).
fn get(stowage: &Stowage, path: &str, user: Option<(&str, &str)>) -> (u16, Value) {
    let mut req = http().get(format!("{}{path}", stowage.url()));
    if let Some((u, p)) = user {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().expect("GET");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn get_ok(stowage: &Stowage, path: &str) -> Value {
    let (status, body) = get(stowage, path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// An action: `marked` sends `X-Requested-With: stowage`; `body` is sent as JSON.
fn act(
    stowage: &Stowage,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    marked: bool,
    user: Option<(&str, &str)>,
) -> (u16, Value) {
    let mut req = http().request(method, format!("{}{path}", stowage.url()));
    if marked {
        req = req.header("X-Requested-With", "stowage");
    }
    if let Some((u, p)) = user {
        req = req.basic_auth(u, Some(p));
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().expect("action");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn pin(stowage: &Stowage, reference: &str) -> (u16, Value) {
    act(
        stowage,
        reqwest::Method::POST,
        "/api/v1/pins",
        Some(json!({ "reference": reference })),
        true,
        None,
    )
}

fn row<'a>(listing: &'a Value, name: &str) -> Option<&'a Value> {
    listing["repositories"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
}

fn blob_bytes(p: &Pushed) -> u64 {
    p.blobs().iter().map(|b| b.size() as u64).sum()
}

#[test]
fn numbers_match_what_was_pulled_and_survive_a_restart() {
    let upstream = Registry::start();
    let image = Image::build(Format::Oci, &[200 * 1024, 300 * 1024]);
    let app = upstream.push("library/app", "1", image.clone());
    let copy = upstream.push("library/copy", "1", image);
    let mut stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml(ALLOW)
        .start();
    let before = now();
    pull_image(&stowage, &app);
    pull_image(&stowage, &app);
    pull_image(&stowage, &copy);
    let after = now();

    let manifest = app.manifest().size() as u64;
    let blobs = blob_bytes(&app);
    let listing = get_ok(&stowage, "/api/v1/repositories?sort=pulls");
    let r = row(&listing, "docker.io/library/app").expect("app listed");
    assert_eq!(r["kind"], "mirrored");
    assert_eq!(r["pulls"], 2, "{r}");
    assert_eq!(r["bytes_served"], 2 * blobs, "{r}");
    assert_eq!(r["bytes_fetched"], blobs + manifest, "{r}");
    assert_eq!(r["size_bytes"], blobs + manifest, "{r}");
    assert_eq!(
        r["shared_bytes"], blobs,
        "every blob is shared with library/copy"
    );
    let last = r["last_pulled"].as_u64().expect("last pulled");
    assert!(
        (before..=after).contains(&last),
        "{last} in {before}..={after}"
    );
    assert_eq!(
        listing["repositories"][0]["name"], "docker.io/library/app",
        "sorted by pulls"
    );
    let c = row(&listing, "docker.io/library/copy").expect("copy listed");
    assert_eq!(
        c["bytes_fetched"], 0,
        "its manifest and blobs were already cached"
    );
    let searched = get_ok(&stowage, "/api/v1/repositories?q=COPY");
    assert_eq!(searched["total"], 1);

    let detail = get_ok(&stowage, "/api/v1/repositories/docker.io/library/app");
    let tag = &detail["tags"][0];
    assert_eq!(tag["tag"], "1");
    assert_eq!(tag["digest"], app.digest());
    assert_eq!(tag["media_type"], app.media_type());
    assert_eq!(tag["platforms"], json!(["linux/amd64"]));
    assert_eq!(tag["size_bytes"], blobs + manifest);
    assert_eq!(tag["counters"]["pulls"], 2);
    assert_eq!(tag["freshness"]["state"], "fresh");
    assert_eq!(detail["pull"], "library/app");

    let summary = get_ok(&stowage, "/api/v1/summary");
    let cache = &summary["cache"];
    assert_eq!(
        cache["blob_bytes"], blobs,
        "shared blobs once in the totals"
    );
    assert_eq!(cache["repositories"], 2);
    let traffic = &summary["traffic"]["since_start"];
    assert_eq!(traffic["bytes_served"], 3 * blobs);
    assert_eq!(traffic["bytes_fetched"], blobs + manifest);
    assert_eq!(traffic["bytes_saved"], 2 * blobs - manifest);
    // Manifests: a miss, then hits (library/copy's manifest is the same one); blobs: misses on
    // the first pull, hits after.
    let n = app.blobs().len() as u64;
    assert_eq!(traffic["requests"], 3 + 3 * n);
    assert_eq!(traffic["hits"], 2 + 2 * n);
    assert_eq!(summary["traffic"]["last_hour"]["requests"], 3 + 3 * n);
    assert!(summary["history"]["buckets"]
        .as_array()
        .is_some_and(|b| !b.is_empty()));
    assert!(wait_until(Duration::from_secs(30), || {
        get_ok(&stowage, "/api/v1/summary")["upstreams"][0]["reachable"] == true
    }));

    stowage.terminate(Duration::from_secs(60));
    stowage.restart();
    let listing = get_ok(&stowage, "/api/v1/repositories");
    let r = row(&listing, "docker.io/library/app").expect("app listed after a restart");
    assert_eq!(
        (r["pulls"].clone(), r["last_pulled"].as_u64()),
        (json!(2), Some(last))
    );
    assert_eq!(r["bytes_served"], 2 * blobs);
}

#[test]
fn hosted_pulls_and_bytes_are_counted_for_the_repository_not_the_cache() {
    let upstream = Registry::start();
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml("[hosted]\nrepositories = [\"team/**\"]\n")
        .start();
    let pushed = support::images::push(
        &stowage.url(),
        "team/app",
        "1",
        Image::build(Format::Oci, &[100 * 1024, 50 * 1024]),
    );
    pull_image(&stowage, &pushed);
    pull_image(&stowage, &pushed);
    let blobs = blob_bytes(&pushed);
    let listing = get_ok(&stowage, "/api/v1/repositories?sort=pulls");
    let r = row(&listing, "team/app").expect("hosted repository listed");
    assert_eq!(r["kind"], "hosted", "{r}");
    assert_eq!(r["pulls"], 2, "{r}");
    assert_eq!(r["bytes_served"], 2 * blobs, "{r}");
    let summary = get_ok(&stowage, "/api/v1/summary");
    let totals = &summary["traffic"]["since_start"];
    assert_eq!(
        (&totals["requests"], &totals["bytes_served"]),
        (&json!(0), &json!(0)),
        "pushed content is not counted as the cache's: {summary}"
    );
}

#[test]
fn pins_and_purges_through_the_api() {
    let upstream = Registry::start();
    let image = Image::build(Format::Oci, &[100 * 1024]);
    let app = upstream.push("library/app", "1", image.clone());
    let copy = upstream.push("library/copy", "1", image);
    let own = upstream.push("library/app", "2", Image::build(Format::Oci, &[64 * 1024]));
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml(ALLOW)
        .start();
    for p in [&app, &copy, &own] {
        pull_image(&stowage, p);
    }

    // Without the header, or with a body that is not JSON: refused, nothing changes.
    let body = Some(json!({ "reference": "library/app:1" }));
    let (s, _) = act(
        &stowage,
        reqwest::Method::POST,
        "/api/v1/pins",
        body.clone(),
        false,
        None,
    );
    assert_eq!(s, 403);
    let r = http()
        .post(format!("{}/api/v1/pins", stowage.url()))
        .header("X-Requested-With", "stowage")
        .header("content-type", "text/plain")
        .body(json!({ "reference": "library/app:1" }).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let purge_path = "/api/v1/repositories/docker.io/library/app/tags/1";
    assert_eq!(
        act(
            &stowage,
            reqwest::Method::DELETE,
            purge_path,
            None,
            false,
            None
        )
        .0,
        403
    );
    assert_eq!(get(&stowage, "/api/v1/pins", None).0, 405, "GET never acts");
    assert!(ls_line(&stowage, "docker.io/library/app:1")
        .unwrap()
        .ends_with(" no"));

    // Pin through the API: `stowage ls` shows it; unpin: gone again.
    let (s, b) = pin(&stowage, "library/app:1");
    assert_eq!(s, 200, "{b}");
    let line = ls_line(&stowage, "docker.io/library/app:1").unwrap();
    assert!(line.ends_with(" yes"), "{line}");
    let detail = get_ok(&stowage, "/api/v1/repositories/docker.io/library/app");
    assert!(
        detail["pinned"] == true && detail["tags"][0]["pinned"] == true,
        "{detail}"
    );
    // A pinned tag is not purged.
    let (s, b) = act(
        &stowage,
        reqwest::Method::DELETE,
        purge_path,
        None,
        true,
        None,
    );
    assert_eq!(s, 409, "{b}");
    let unpin = "/api/v1/pins/docker.io/library/app:1";
    let (s, b) = act(&stowage, reqwest::Method::DELETE, unpin, None, true, None);
    assert_eq!(s, 200, "{b}");
    assert!(ls_line(&stowage, "docker.io/library/app:1")
        .unwrap()
        .ends_with(" no"));
    assert_eq!(
        act(&stowage, reqwest::Method::DELETE, unpin, None, true, None).0,
        404
    );
    assert_eq!(pin(&stowage, "library/nothing:1").0, 404);

    // Purge a tag: its own blobs go, the ones library/copy shares stay.
    let (s, b) = act(
        &stowage,
        reqwest::Method::DELETE,
        purge_path,
        None,
        true,
        None,
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["removed"]["tags"], 1);
    assert!(ls_line(&stowage, "docker.io/library/app:1").is_none());
    assert!(ls_line(&stowage, "docker.io/library/app:2").is_some());
    assert!(app
        .blobs()
        .iter()
        .all(|b| stowage.blob_path(&b.digest).exists()));
    // Purge the whole repository: tag 2's blobs go; the repository leaves the table.
    let (s, b) = act(
        &stowage,
        reqwest::Method::DELETE,
        "/api/v1/repositories/docker.io/library/app",
        None,
        true,
        None,
    );
    assert_eq!(s, 200, "{b}");
    assert!(own
        .blobs()
        .iter()
        .all(|b| !stowage.blob_path(&b.digest).exists()));
    let listing = get_ok(&stowage, "/api/v1/repositories");
    assert!(
        row(&listing, "docker.io/library/app").is_none(),
        "{listing}"
    );
    assert_eq!(
        get(&stowage, "/api/v1/repositories/docker.io/library/app", None).0,
        404
    );
    // The last repository referencing the shared blobs goes: so do they.
    let path = "/api/v1/repositories/docker.io/library/copy";
    assert_eq!(
        act(&stowage, reqwest::Method::DELETE, path, None, true, None).0,
        200
    );
    assert!(copy
        .blobs()
        .iter()
        .all(|b| !stowage.blob_path(&b.digest).exists()));
    assert_eq!(
        get_ok(&stowage, "/api/v1/summary")["cache"]["blob_bytes"],
        0
    );
    // And pulling again works: the purge left nothing half-done.
    pull_image(&stowage, &app);
}

#[test]
fn the_eviction_preview_names_what_a_forced_eviction_removes() {
    let upstream = Registry::start();
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .max_size("4MiB")
        .storage_toml("high_watermark = 0.9\nlow_watermark = 0.5")
        .start();
    let images: Vec<Pushed> = ["a", "b", "c"]
        .iter()
        .map(|n| push_test(&upstream, n, &[1000 * 1024]))
        .collect();
    for p in &images {
        pull_image(&stowage, p);
    }
    let held: Vec<String> = images
        .iter()
        .flat_map(|p| p.blobs().into_iter().map(|b| b.digest.clone()))
        .collect();
    let preview = get_ok(&stowage, "/api/v1/evictions/preview?bytes=100000000");
    let order: Vec<String> = preview["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["digest"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        order.len(),
        held.len(),
        "everything is evictable: {preview}"
    );
    assert_eq!(preview["enough"], false);
    assert_eq!(
        preview["blobs"][0]["repositories"],
        json!(["docker.io/test/a"])
    );
    let first = get_ok(
        &stowage,
        &format!("/api/v1/evictions/preview?bytes={}", 900 * 1024),
    );
    assert_eq!(first["enough"], true);
    assert_eq!(
        first["blobs"].as_array().unwrap().len() as u64,
        first["count"].as_u64().unwrap()
    );

    // A fourth image forces an eviction: what went is the preview's head, in its order.
    let d = push_test(&upstream, "d", &[1000 * 1024]);
    pull_image(&stowage, &d);
    let gone: HashSet<String> = held
        .iter()
        .filter(|h| !stowage.blob_path(h).exists())
        .cloned()
        .collect();
    assert!(!gone.is_empty(), "the fill had to evict");
    let head: HashSet<String> = order[..gone.len()].iter().cloned().collect();
    assert_eq!(gone, head, "evicted vs the preview's order {order:?}");
    assert_eq!(
        get(&stowage, "/api/v1/evictions/preview", None).0,
        400,
        "bytes is required"
    );
}

#[test]
fn auth_rules_decide_who_reads_and_who_acts() {
    let upstream = Registry::start();
    let app = upstream.push("library/app", "1", Image::build(Format::Oci, &[64 * 1024]));
    let files = tempfile::tempdir().unwrap();
    let htpasswd = write_htpasswd(
        files.path(),
        &[("alice", "a-pass"), ("bob", "b-pass"), ("carol", "c-pass")],
    );
    let toml = format!(
        "[auth]\nhtpasswd = {:?}\n\
         [[auth.access]]\nusers = [\"anonymous\", \"*\"]\nrepositories = [\"**\"]\nactions = [\"pull\"]\n\
         [[auth.access]]\nusers = [\"carol\"]\nrepositories = [\"library/**\"]\nactions = [\"delete\"]\n\
         [console]\nadmins = [\"alice\"]\n",
        htpasswd.display().to_string()
    );
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml(&toml)
        .auth_required()
        .start();
    pull_image(&stowage, &app);
    let (alice, bob, carol) = (("alice", "a-pass"), ("bob", "b-pass"), ("carol", "c-pass"));

    // Reads need a user: an anonymous caller that the pull rule lets through still gets 401.
    let r = http()
        .get(format!("{}/api/v1/summary", stowage.url()))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = http().get(format!("{}/ui/", stowage.url())).send().unwrap();
    assert_eq!(r.status().as_u16(), 401, "the page asks for credentials");
    let (s, b) = get(&stowage, "/api/v1/summary", Some(bob));
    assert_eq!(s, 200);
    assert_eq!(
        b["you"],
        json!({ "user": "bob", "may_act": false, "auth": true })
    );
    assert_eq!(
        get(&stowage, "/api/v1/summary", Some(alice)).1["you"]["may_act"],
        true
    );

    let body = || Some(json!({ "reference": "library/app:1" }));
    let post = reqwest::Method::POST;
    assert_eq!(
        act(&stowage, post.clone(), "/api/v1/pins", body(), true, None).0,
        401
    );
    assert_eq!(
        act(
            &stowage,
            post.clone(),
            "/api/v1/pins",
            body(),
            true,
            Some(bob)
        )
        .0,
        403
    );
    assert_eq!(
        act(
            &stowage,
            post.clone(),
            "/api/v1/pins",
            body(),
            false,
            Some(carol)
        )
        .0,
        403
    );
    let (s, b) = act(
        &stowage,
        post.clone(),
        "/api/v1/pins",
        body(),
        true,
        Some(carol),
    );
    assert_eq!(s, 200, "carol may delete library/**: {b}");
    let detail = get(
        &stowage,
        "/api/v1/repositories/docker.io/library/app",
        Some(bob),
    )
    .1;
    assert_eq!(detail["may_act"], false);
    let detail = get(
        &stowage,
        "/api/v1/repositories/docker.io/library/app",
        Some(carol),
    )
    .1;
    assert_eq!(detail["may_act"], true);
    let unpin = "/api/v1/pins/library/app:1";
    let del = reqwest::Method::DELETE;
    assert_eq!(
        act(&stowage, del.clone(), unpin, None, true, Some(bob)).0,
        403
    );
    assert_eq!(
        act(&stowage, del.clone(), unpin, None, true, Some(alice)).0,
        200,
        "an admin"
    );
}

#[test]
fn actions_are_off_without_auth_unless_allowed() {
    let upstream = Registry::start();
    let app = upstream.push("library/app", "1", Image::build(Format::Oci, &[64 * 1024]));
    let stowage = Stowage::for_docker_io(&upstream.url());
    pull_image(&stowage, &app);
    assert_eq!(get_ok(&stowage, "/api/v1/summary")["you"]["may_act"], false);
    let (s, b) = pin(&stowage, "library/app:1");
    assert_eq!(s, 403, "{b}");
    assert!(b["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("allow_actions_without_auth"));
    assert!(ls_line(&stowage, "docker.io/library/app:1")
        .unwrap()
        .ends_with(" no"));
    let r = http().get(format!("{}/ui/", stowage.url())).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().unwrap().contains("stowage"));
}

#[test]
fn fills_in_flight_show_their_progress() {
    use rand::RngCore;
    use support::fake_upstream::{FakeUpstream, Fault};
    use support::reader::{assert_whole, wait_for_bytes, Reader};

    let fake = FakeUpstream::start();
    let mut blob = vec![0u8; 4 << 20];
    rand::thread_rng().fill_bytes(&mut blob);
    let digest = fake.add_blob("library/fill", blob.clone());
    // The upstream sends the first MiB, then holds the rest until the test has looked.
    fake.push_faults(&digest, [Fault::HoldAt(1 << 20)]);
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &fake.url()))
        .start();
    let url = format!("{}/v2/library/fill/blobs/{digest}", stowage.url());
    let reader = Reader::start(&url, &[], false, None);
    wait_for_bytes(&reader, 1, "the client");
    let mut seen = Value::Null;
    let shown = wait_until(Duration::from_secs(120), || {
        seen = get_ok(&stowage, "/api/v1/summary")["fills"].clone();
        seen[0]["written"].as_u64().is_some_and(|w| w >= 1 << 20)
    });
    assert!(shown, "the fill never showed its progress: {seen}");
    assert_eq!(seen.as_array().map(Vec::len), Some(1), "{seen}");
    assert_eq!(seen[0]["digest"], digest.as_str());
    assert_eq!(seen[0]["total"], 4 << 20);
    assert_eq!(seen[0]["repository"], "docker.io/library/fill");
    assert_eq!(seen[0]["phase"], "streaming");
    assert!(
        seen[0]["written"].as_u64().unwrap() < 4 << 20,
        "held back: {seen}"
    );
    fake.release_holds();
    assert_whole(&reader.finish(), &blob, "the client");
    assert!(wait_until(Duration::from_secs(120), || {
        get_ok(&stowage, "/api/v1/summary")["fills"] == json!([])
    }));
    let traffic = &get_ok(&stowage, "/api/v1/summary")["traffic"]["since_start"];
    assert_eq!(traffic["bytes_fetched"], 4 << 20);
    assert_eq!(traffic["bytes_served"], 4 << 20);
    assert_eq!(
        traffic["bytes_from_cache"], 0,
        "tailed from the fill, not a committed file"
    );
}
