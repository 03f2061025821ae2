//! Accept negotiation through the mirror: a tag that points at a manifest list or index is never
//! handed to a client whose `Accept` excludes lists, whatever the cache already holds; Accept
//! sent as several header lines (dockerd) is read in full.

mod support;

use support::images::{Format, ImageIndex, Pushed, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX};
use support::stowage::MirroredRegistry;

/// A real upstream registry and a stowage in front of it as the `docker.io` upstream.
fn world() -> MirroredRegistry {
    MirroredRegistry::start()
}

fn get(url: &str, accept: &[&str]) -> reqwest::blocking::Response {
    let mut req = support::http().get(url);
    for a in accept {
        req = req.header("Accept", *a);
    }
    req.send().unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

fn header(resp: &reqwest::blocking::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[test]
fn docker_list_is_not_given_to_a_client_that_accepts_only_single_manifests() {
    let w = world();
    let index = ImageIndex::build(Format::Docker, &["amd64", "arm64"], &[512]);
    let pushed = w.upstream.push("library/multi", "1.0", index.clone());
    let url = format!("{}/v2/library/multi/manifests/1.0", w.stowage.url());

    // A full-Accept client first: the list is cached under the tag.
    let full = get(&url, &[&support::manifest_accept()]);
    assert_eq!(full.status(), 200);
    assert_eq!(header(&full, "content-type"), DOCKER_LIST);
    assert_eq!(header(&full, "docker-content-digest"), pushed.digest());

    // A client that accepts only Docker schema2 must get a single manifest, never the list.
    let narrow = get(&url, &[DOCKER_MANIFEST]);
    assert_eq!(
        narrow.status(),
        200,
        "narrow client should get a single manifest"
    );
    assert_eq!(header(&narrow, "content-type"), DOCKER_MANIFEST);
    let digest = header(&narrow, "docker-content-digest");
    let children: Vec<&str> = index
        .children
        .iter()
        .map(|c| c.manifest.digest.as_str())
        .collect();
    assert!(
        children.contains(&digest.as_str()),
        "narrow client got {digest}, expected one of the children {children:?}"
    );
    let body = narrow.bytes().expect("body");
    assert_eq!(
        support::sha256_digest(&body),
        digest,
        "body matches its digest header"
    );

    // The narrow answer did not replace the tag: full clients still get the list.
    let again = get(&url, &[&support::manifest_accept()]);
    assert_eq!(header(&again, "content-type"), DOCKER_LIST);
    assert_eq!(header(&again, "docker-content-digest"), pushed.digest());
}

/// Pushes a two-platform index of `format` as `repo:1.0`; returns it and its manifest URL on
/// stowage.
fn push_index(w: &MirroredRegistry, repo: &str, format: Format) -> (Pushed, String) {
    let index = ImageIndex::build(format, &["amd64", "arm64"], &[512]);
    let pushed = w.upstream.push(repo, "1.0", index);
    let url = format!("{}/v2/{repo}/manifests/1.0", w.stowage.url());
    (pushed, url)
}

#[test]
fn oci_index_is_refused_rather_than_given_to_a_docker_only_client() {
    let w = world();
    let (pushed, url) = push_index(&w, "library/ociidx", Format::Oci);

    let full = get(&url, &[&support::manifest_accept()]);
    assert_eq!(header(&full, "content-type"), OCI_INDEX);
    assert_eq!(header(&full, "docker-content-digest"), pushed.digest());

    let narrow = get(&url, &[DOCKER_MANIFEST]);
    let status = narrow.status().as_u16();
    let ct = header(&narrow, "content-type");
    assert_ne!(
        ct, OCI_INDEX,
        "an OCI index must not reach a client that did not accept it"
    );
    assert_eq!(status, 404, "nothing acceptable exists for this client");
    let body = narrow.bytes().expect("body");
    assert_eq!(
        support::error_codes(&body, "narrow OCI index"),
        ["MANIFEST_UNKNOWN"]
    );
}

#[test]
fn accept_sent_as_one_line_per_type_is_read_in_full() {
    let w = world();
    let (pushed, url) = push_index(&w, "library/lines", Format::Docker);
    // dockerd sends one Accept line per type, the list type not first.
    let resp = get(&url, &[DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST]);
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), DOCKER_LIST);
    assert_eq!(header(&resp, "docker-content-digest"), pushed.digest());
}
