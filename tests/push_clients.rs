//! Real clients pushing into hosted repositories and pulling back through the same endpoint as
//! the mirror: dockerd (`docker build` FROM an image pulled through stowage, then `docker push`:
//! the base layers are mounted from the cache, not uploaded), podman and buildah pushes, and
//! `podman manifest push --all` of a two-platform index. Needs root (the daemons).

mod support;

use support::clients::{stowage_requests, ContainersEnv, Dockerd};
use support::images::{self, Format, Image, ImageIndex};
use support::registry::Registry;
use support::stowage::{Stowage, UpstreamSpec};
use support::{http, skopeo_ok};

fn world() -> (Registry, Stowage) {
    let upstream = Registry::start();
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml("[hosted]\nrepositories = [\"team/**\"]\n")
        .start();
    (upstream, stowage)
}

/// The digest stowage answers for `name:tag` (a HEAD, as clients ask), as `creds` if given.
fn served_digest(stowage: &Stowage, creds: Option<(&str, &str)>, name: &str, tag: &str) -> String {
    let mut req = http()
        .head(format!("{}/v2/{name}/manifests/{tag}", stowage.url()))
        .header("Accept", support::manifest_accept());
    if let Some((user, pass)) = creds {
        req = req.basic_auth(user, Some(pass));
    }
    let resp = req.send().unwrap();
    assert_eq!(resp.status().as_u16(), 200, "HEAD {name}:{tag}");
    resp.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn docker_push_mounts_cached_base_layers_and_podman_pulls_the_image_back() {
    let (upstream, stowage) = world();
    let base = images::push(
        &upstream.url(),
        "library/base",
        "1",
        Image::build(Format::Docker, &[30_000, 20_000]),
    );
    let hp = stowage.host_port();
    let docker = Dockerd::start(&format!("{{\"insecure-registries\": [\"{hp}\"]}}\n"));
    docker.docker_ok(&["pull", &format!("{hp}/library/base:1")]);

    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {hp}/library/base:1\nCOPY app.txt /app.txt\n"),
    )
    .unwrap();
    std::fs::write(context.path().join("app.txt"), "built by CI\n").unwrap();
    let image = format!("{hp}/team/app:1");
    let built = docker.docker(&["build", "-t", &image, &context.path().display().to_string()]);
    assert!(
        built.status.success(),
        "docker build: {}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    docker.docker_ok(&["push", &image]);

    // The base layers never travelled again: each was mounted (or found present), and no
    // upload was closed with its digest.
    // The log writes query strings as sent (percent-encoded): compare them decoded.
    let mut requests = stowage_requests(&stowage);
    for r in &mut requests {
        r.query = r.query.replace("%3A", ":").replace("%2F", "/");
    }
    for layer in &base.blobs()[1..] {
        let uploaded = requests.iter().any(|r| {
            matches!(r.method.as_str(), "PUT" | "POST")
                && r.query.contains(&format!("digest={}", layer.digest))
        });
        assert!(
            !uploaded,
            "base layer {} was uploaded: {requests:#?}",
            layer.digest
        );
        let mounted = requests.iter().any(|r| {
            r.method == "POST"
                && r.status == 201
                && r.query.contains(&format!("mount={}", layer.digest))
        });
        assert!(
            mounted,
            "base layer {} was not mounted: {requests:#?}",
            layer.digest
        );
    }
    // The new layer was uploaded into the hosted repository.
    assert!(
        requests.iter().any(|r| r.method == "PUT"
            && r.path.starts_with("/v2/team/app/blobs/uploads/")
            && r.status == 201),
        "{requests:#?}"
    );
    let digest = served_digest(&stowage, None, "team/app", "1");

    // A second client pulls it through the same endpoint.
    let podman = ContainersEnv::new("unqualified-search-registries = []\n");
    podman.podman_ok(&["pull", "--tls-verify=false", &image]);
    let got = podman.podman_ok(&["image", "inspect", "--format", "{{.Digest}}", &image]);
    assert_eq!(got.trim(), digest);
    // And nothing of team/app ever reached the upstream.
    assert_eq!(upstream.count_requests("GET", "/v2/team/"), 0);
    assert_eq!(upstream.count_requests("POST", "/v2/team/"), 0);
}

#[test]
fn podman_buildah_and_manifest_push_all_land_in_hosted() {
    let (upstream, stowage) = world();
    let hp = stowage.host_port();
    images::push(
        &upstream.url(),
        "library/tool",
        "1",
        Image::build(Format::Oci, &[8000]),
    );
    let multi = images::push(
        &upstream.url(),
        "test/multi",
        "1",
        ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[6000]),
    );
    let podman = ContainersEnv::new("unqualified-search-registries = []\n");

    // podman: pull through the mirror path, retag, push into hosted.
    podman.podman_ok(&[
        "pull",
        "--tls-verify=false",
        &format!("{hp}/library/tool:1"),
    ]);
    podman.podman_ok(&[
        "tag",
        &format!("{hp}/library/tool:1"),
        &format!("{hp}/team/tool:1"),
    ]);
    podman.podman_ok(&["push", "--tls-verify=false", &format!("{hp}/team/tool:1")]);
    // buildah: the same image under another name.
    podman.buildah_ok(&[
        "push",
        "--tls-verify=false",
        &format!("{hp}/team/tool:1"),
        &format!("docker://{hp}/team/buildah:1"),
    ]);
    for name in ["team/tool", "team/buildah"] {
        let out = tempfile::tempdir().unwrap();
        skopeo_ok(
            &[
                "copy",
                &format!("docker://{hp}/{name}:1"),
                &format!("dir:{}", out.path().display()),
            ],
            "pull back a podman / buildah push",
        );
    }

    // A two-platform list: podman manifest push --all.
    podman.podman_ok(&["manifest", "create", "team-list"]);
    podman.podman_ok(&[
        "manifest",
        "add",
        "--all",
        "--tls-verify=false",
        "team-list",
        &format!("docker://{}/test/multi:1", upstream.host_port()),
    ]);
    podman.podman_ok(&[
        "manifest",
        "push",
        "--all",
        "--tls-verify=false",
        "team-list",
        &format!("docker://{hp}/team/multi:1"),
    ]);
    let index: serde_json::Value = http()
        .get(format!("{}/v2/team/multi/manifests/1", stowage.url()))
        .header("Accept", support::manifest_accept())
        .send()
        .unwrap()
        .json()
        .unwrap();
    let children = index["manifests"].as_array().expect("an index");
    assert_eq!(children.len(), 2, "{index}");
    for child in children {
        let d = child["digest"].as_str().unwrap();
        let resp = http()
            .get(format!("{}/v2/team/multi/manifests/{d}", stowage.url()))
            .header("Accept", support::manifest_accept())
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "child {d}");
    }
    // Each platform's layers are there, byte for byte.
    for blob in multi.blobs() {
        if blob.media_type.contains("layer") {
            let got = http()
                .get(format!(
                    "{}/v2/team/multi/blobs/{}",
                    stowage.url(),
                    blob.digest
                ))
                .send()
                .unwrap()
                .bytes()
                .unwrap();
            assert_eq!(got.to_vec(), blob.bytes);
        }
    }
}

#[test]
fn docker_login_then_push_works_for_a_pusher_and_is_denied_to_a_reader() {
    let upstream = Registry::start();
    let files = tempfile::tempdir().unwrap();
    let htpasswd =
        support::write_htpasswd(files.path(), &[("ci", "ci-pass"), ("reader", "read-pass")]);
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .auth_required()
        .extra_toml(&format!(
            "[hosted]\nrepositories = [\"team/**\"]\n[auth]\nhtpasswd = {:?}\n\
             [[auth.access]]\nusers = [\"ci\"]\nrepositories = [\"team/**\", \"library/**\"]\nactions = [\"pull\", \"push\"]\n\
             [[auth.access]]\nusers = [\"reader\"]\nrepositories = [\"team/**\", \"library/**\"]\nactions = [\"pull\"]\n",
            htpasswd.display().to_string()
        ))
        .start();
    images::push(
        &upstream.url(),
        "library/base",
        "1",
        Image::build(Format::Docker, &[5000]),
    );
    let hp = stowage.host_port();
    let docker = Dockerd::start(&format!("{{\"insecure-registries\": [\"{hp}\"]}}\n"));
    // `-p` on the command line is fine for a throwaway test daemon (docker warns about it).
    let login_as = |user: &str, pass: &str| {
        docker.docker_ok(&["login", "-u", user, "-p", pass, &hp]);
    };
    login_as("ci", "ci-pass");
    docker.docker_ok(&["pull", &format!("{hp}/library/base:1")]);
    let image = format!("{hp}/team/app:1");
    docker.docker_ok(&["tag", &format!("{hp}/library/base:1"), &image]);
    docker.docker_ok(&["push", &image]);
    served_digest(&stowage, Some(("ci", "ci-pass")), "team/app", "1");

    login_as("reader", "read-pass");
    let other = format!("{hp}/team/other:1");
    docker.docker_ok(&["tag", &image, &other]);
    let refused = docker.docker(&["push", &other]);
    assert!(!refused.status.success(), "a pull-only user pushed");
    let said = String::from_utf8_lossy(&refused.stderr).to_string()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(said.to_lowercase().contains("denied"), "{said}");
    // The server's answer names the rule (dockerd may shorten what it prints).
    let raw = http()
        .post(format!("{}/v2/team/other/blobs/uploads/", stowage.url()))
        .basic_auth("reader", Some("read-pass"))
        .header("Content-Length", "0")
        .send()
        .unwrap();
    assert_eq!(raw.status().as_u16(), 403);
    assert!(raw
        .text()
        .unwrap()
        .contains("auth.access[1] allows only pull"));
}
