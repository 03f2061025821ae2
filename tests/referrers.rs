//! The OCI 1.1 referrers API (`/v2/<name>/referrers/<digest>`) for mirrored names: from an
//! upstream that has the API (the in-process fake, with its pages followed) and from one that
//! has not (distribution 2.8: the `sha256-<hex>` tag schema), in the API's form either way;
//! the `artifactType` filter and `OCI-Filters-Applied`; `n` / `Link` paging (mirrored and
//! hosted); the answer's own `referrers_ttl`, stale serving within `max_stale`, offline
//! answers; cosign's tag-based `.sig` attachments as plain tags; and the air gap:
//! `prefetch --with-referrers` → `export --with-referrers` → `import` → offline, the same
//! answers; `pin` holds the referrers too.
//!
//! TTLs are short and the tests sleep past them; nothing asserts how long anything took.

mod support;

use std::time::{Duration, Instant};

use support::fake_upstream::{FakeUpstream, Gate};
use support::images::{self, Blob, Format, Image, ImageIndex, Manifest, OCI_INDEX, OCI_MANIFEST};
use support::registry::Registry;
use support::stowage::{command_ok, Stowage, UpstreamSpec};
use support::{error_codes, manifest_accept, request, sha256_digest, Resp};

const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const SBOM: &str = "application/spdx+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";

fn get(url: &str) -> Resp {
    request(reqwest::Method::GET, url, &[&manifest_accept()])
}

/// An OCI artifact referring to a manifest: its blobs (the empty config, one layer) and its
/// manifest.
struct Artifact {
    blobs: Vec<Blob>,
    manifest: Manifest,
}

impl Artifact {
    fn new(kind: &str, payload: &[u8], subject: &Manifest) -> Artifact {
        let empty = Blob::new(EMPTY, b"{}".to_vec());
        let layer = Blob::new("application/octet-stream", payload.to_vec());
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": kind,
            "config": {"mediaType": EMPTY, "digest": empty.digest, "size": 2},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size()}],
            "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size()},
            "annotations": {"org.example.kind": kind}
        });
        Artifact {
            blobs: vec![empty, layer],
            manifest: manifest(OCI_MANIFEST, &body),
        }
    }

    /// Registers it with the fake upstream (by digest only, as `oras attach` pushes it).
    fn add_to(&self, fake: &FakeUpstream, repo: &str) -> &Artifact {
        for b in &self.blobs {
            fake.add_blob(repo, b.bytes.clone());
        }
        fake.add_manifest_by_digest(repo, OCI_MANIFEST, self.manifest.bytes.clone());
        self
    }

    /// Pushes it to a real registry by digest.
    fn push(&self, url: &str, repo: &str) {
        for b in &self.blobs {
            images::push_blob(url, repo, b);
        }
        images::push_manifest(url, repo, &self.manifest.digest, &self.manifest);
    }

    /// Its descriptor as a referrers index lists it.
    fn descriptor(&self, kind: &str) -> serde_json::Value {
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.manifest.digest,
            "size": self.manifest.size(),
            "artifactType": kind,
            "annotations": {"org.example.kind": kind},
        })
    }
}

fn manifest(media_type: &str, body: &serde_json::Value) -> Manifest {
    let bytes = serde_json::to_vec(body).unwrap();
    Manifest {
        media_type: media_type.to_owned(),
        digest: sha256_digest(&bytes),
        bytes,
    }
}

/// A cosign tag-scheme signature (`sha256-<hex>.sig`): an OCI manifest whose layer is the
/// signed payload, the signature in an annotation; no `subject`.
fn cosign_sig(signed: &str) -> (Vec<Blob>, Manifest) {
    let config = Blob::new(OCI_CONFIG_COSIGN, b"{\"architecture\":\"\",\"os\":\"\",\"config\":{},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}".to_vec());
    let payload = Blob::new(
        "application/vnd.dev.cosign.simplesigning.v1+json",
        format!("{{\"critical\":{{\"image\":{{\"docker-manifest-digest\":\"{signed}\"}}}}}}")
            .into_bytes(),
    );
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size()},
        "layers": [{
            "mediaType": payload.media_type, "digest": payload.digest, "size": payload.size(),
            "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQDfake"}
        }]
    });
    (vec![config, payload], manifest(OCI_MANIFEST, &body))
}

const OCI_CONFIG_COSIGN: &str = "application/vnd.oci.image.config.v1+json";

/// The cosign tag of the signature of `digest`.
fn sig_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// Registers `image` with the fake as `repo:tag`.
fn add_image(fake: &FakeUpstream, repo: &str, tag: &str, image: &Image) {
    for b in image.blobs() {
        fake.add_blob(repo, b.bytes.clone());
    }
    fake.add_manifest(repo, tag, OCI_MANIFEST, image.manifest.bytes.clone());
}

fn referrers(stowage: &Stowage, repo: &str, subject: &str, query: &str) -> Resp {
    get(&format!(
        "{}/v2/{repo}/referrers/{subject}{query}",
        stowage.url()
    ))
}

fn listed(r: &Resp) -> Vec<serde_json::Value> {
    assert_eq!(
        r.status,
        200,
        "referrers: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), OCI_INDEX);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    v["manifests"].as_array().unwrap().clone()
}

fn digests(list: &[serde_json::Value]) -> Vec<String> {
    list.iter()
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Follows `Link: <...>; rel="next"` from `first` (a path and query), returning every page.
fn pages(stowage: &Stowage, first: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut next = Some(first.to_owned());
    while let Some(path) = next.take() {
        assert!(out.len() < 20, "too many pages");
        let r = get(&format!("{}{path}", stowage.url()));
        out.push(digests(&listed(&r)));
        let link = r.header("link");
        if !link.is_empty() {
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            let target = link.split_once('<').unwrap().1.split_once('>').unwrap().0;
            next = Some(target.to_owned());
        }
    }
    out
}

#[test]
fn an_upstream_referrers_api_is_passed_through_filtered_paged_and_cached() {
    let fake = FakeUpstream::builder().referrers_api().start();
    // Pages of two: the mirror follows the upstream's Link to the end.
    fake.page_referrers(2);
    let repo = "library/app";
    let image = Image::build(Format::Oci, &[512]);
    add_image(&fake, repo, "1", &image);
    let sig = Artifact::new(SIG, b"signature", &image.manifest);
    let sbom = Artifact::new(SBOM, b"{\"spdx\":1}", &image.manifest);
    let vex = Artifact::new("application/vnd.openvex+json", b"{}", &image.manifest);
    for a in [&sig, &sbom, &vex] {
        a.add_to(&fake, repo);
    }
    let stowage = Stowage::start(&[
        UpstreamSpec::new("docker.io", &fake.url()).with_extra("referrers_ttl = \"1h\"")
    ]);
    let subject = &image.manifest.digest;

    let all = listed(&referrers(&stowage, repo, subject, ""));
    let want = sorted(vec![
        sig.manifest.digest.clone(),
        sbom.manifest.digest.clone(),
        vex.manifest.digest.clone(),
    ]);
    assert_eq!(digests(&all), want, "every page of the upstream, by digest");
    let d = all
        .iter()
        .find(|d| d["digest"] == sbom.manifest.digest.as_str())
        .unwrap();
    assert_eq!(*d, sbom.descriptor(SBOM));
    let r = referrers(&stowage, repo, subject, "");
    assert_eq!(
        r.header("oci-filters-applied"),
        "",
        "no filter asked, none said"
    );
    assert_eq!(
        fake.count("GET", "/referrers/"),
        2,
        "two upstream pages, once"
    );

    // The filter is applied here, on the cached answer.
    let r = referrers(
        &stowage,
        repo,
        subject,
        "?artifactType=application/spdx%2Bjson",
    );
    assert_eq!(r.header("oci-filters-applied"), "artifactType");
    assert_eq!(digests(&listed(&r)), vec![sbom.manifest.digest.clone()]);
    let r = referrers(&stowage, repo, subject, "?artifactType=application/none");
    assert_eq!(r.header("oci-filters-applied"), "artifactType");
    assert!(listed(&r).is_empty());
    assert_eq!(
        fake.count("GET", "/referrers/"),
        2,
        "within referrers_ttl: the cache"
    );

    // Paging: n per page, Link to the next while more remain (the filter kept).
    let got = pages(&stowage, &format!("/v2/{repo}/referrers/{subject}?n=2"));
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got.concat(), want);
    let r = referrers(
        &stowage,
        repo,
        subject,
        "?n=1&artifactType=application/spdx%2Bjson",
    );
    assert_eq!(r.header("link"), "", "one match: one page");
    let r = referrers(&stowage, repo, subject, "?n=x");
    assert_eq!(r.status, 400);
    assert_eq!(
        error_codes(&r.body, "n=x"),
        vec!["PAGINATION_NUMBER_INVALID"]
    );

    // The referring manifest and its blobs are ordinary content, cached when fetched.
    let m = get(&format!(
        "{}/v2/{repo}/manifests/{}",
        stowage.url(),
        sig.manifest.digest
    ));
    assert_eq!(m.status, 200);
    assert_eq!(m.body, sig.manifest.bytes);
    let layer = &sig.blobs[1];
    let b = get(&format!(
        "{}/v2/{repo}/blobs/{}",
        stowage.url(),
        layer.digest
    ));
    assert_eq!(b.body, layer.bytes);

    // Nothing refers to a digest: 200 and an empty index. A malformed digest: 400.
    let none = sha256_digest(b"nothing refers to this");
    assert!(listed(&referrers(&stowage, repo, &none, "")).is_empty());
    let r = referrers(&stowage, repo, "sha256:not-hex", "");
    assert_eq!(r.status, 400);
    assert_eq!(error_codes(&r.body, "bad digest"), vec!["DIGEST_INVALID"]);
}

/// Sleeps until `ttl` (plus a margin) has passed since `since`.
fn sleep_past(since: Instant, ttl: Duration) {
    let until = since + ttl + Duration::from_millis(700);
    let now = Instant::now();
    if until > now {
        std::thread::sleep(until - now);
    }
}

#[test]
fn referrers_are_revalidated_after_their_ttl_served_stale_within_max_stale_and_offline() {
    let fake = FakeUpstream::builder().referrers_api().start();
    let gate = Gate::start(&fake.url());
    let repo = "library/ttl";
    let image = Image::build(Format::Oci, &[256]);
    add_image(&fake, repo, "1", &image);
    let sig = Artifact::new(SIG, b"signature", &image.manifest);
    sig.add_to(&fake, repo);
    let mut stowage = Stowage::start(&[UpstreamSpec::new("docker.io", &gate.url())
        .with_extra("manifest_ttl = \"1h\"\nreferrers_ttl = \"2s\"\nmax_stale = \"8s\"")]);
    let subject = &image.manifest.digest;

    let first = listed(&referrers(&stowage, repo, subject, ""));
    let checked = Instant::now();
    assert_eq!(digests(&first), vec![sig.manifest.digest.clone()]);
    // A new SBOM upstream: within referrers_ttl the cached answer, no upstream request.
    let sbom = Artifact::new(SBOM, b"{}", &image.manifest);
    sbom.add_to(&fake, repo);
    assert_eq!(listed(&referrers(&stowage, repo, subject, "")).len(), 1);
    assert_eq!(fake.count("GET", "/referrers/"), 1);
    // After it: asked again, the new answer.
    sleep_past(checked, Duration::from_secs(2));
    let r = referrers(&stowage, repo, subject, "");
    let revalidated = Instant::now();
    assert_eq!(
        digests(&listed(&r)),
        sorted(vec![
            sig.manifest.digest.clone(),
            sbom.manifest.digest.clone()
        ])
    );
    assert_eq!(fake.count("GET", "/referrers/"), 2);
    assert_eq!(r.header("warning"), "");

    // The upstream fails: the cached answer, marked stale; an uncached subject is an error.
    gate.fail_with(503, None);
    sleep_past(revalidated, Duration::from_secs(2));
    let r = referrers(&stowage, repo, subject, "");
    assert_eq!(listed(&r).len(), 2);
    assert!(r.header("warning").contains("stale"), "{:?}", r.headers);
    let other = sha256_digest(b"never asked");
    assert_eq!(referrers(&stowage, repo, &other, "").status, 503);
    // Past max_stale: the upstream's failure.
    sleep_past(revalidated, Duration::from_secs(8));
    assert_eq!(referrers(&stowage, repo, subject, "").status, 503);

    // Offline: the cached answer whatever its age, and never the upstream.
    gate.pass();
    stowage.stop();
    stowage.push_arg("--offline");
    stowage.restart();
    let before = fake.count("GET", "/referrers/");
    assert_eq!(listed(&referrers(&stowage, repo, subject, "")).len(), 2);
    let r = referrers(&stowage, repo, &other, "");
    assert_eq!(r.status, 404);
    assert!(String::from_utf8_lossy(&r.body).contains("offline"));
    assert_eq!(fake.count("GET", "/referrers/"), before);
}

#[test]
fn an_upstream_without_the_api_is_read_through_the_tag_schema_and_cosign_tags_pass() {
    let upstream = Registry::start();
    let repo = "library/signed";
    let pushed = upstream.push(repo, "1", Image::build(Format::Oci, &[1024]));
    let image = pushed.manifest().clone();
    // An SBOM attached the way oras does against a registry without the API: the artifact by
    // digest, then the `sha256-<hex>` tag holding an index of the subject's referrers.
    let sbom = Artifact::new(SBOM, b"{\"spdx\":2}", &image);
    sbom.push(&upstream.url(), repo);
    let index = manifest(
        OCI_INDEX,
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [sbom.descriptor(SBOM)],
        }),
    );
    let schema_tag = image.digest.replacen(':', "-", 1);
    images::push_manifest(&upstream.url(), repo, &schema_tag, &index);
    // A cosign signature as a plain tag.
    let (sig_blobs, sig) = cosign_sig(&image.digest);
    for b in &sig_blobs {
        images::push_blob(&upstream.url(), repo, b);
    }
    images::push_manifest(&upstream.url(), repo, &sig_tag(&image.digest), &sig);
    let stowage = Stowage::for_docker_io(&upstream.url());

    let all = listed(&referrers(&stowage, repo, &image.digest, ""));
    assert_eq!(all, vec![sbom.descriptor(SBOM)]);
    upstream.sync_log();
    let log = upstream.access_log_lines().join("\n");
    assert!(
        log.contains("/referrers/"),
        "the API was asked first:\n{log}"
    );
    assert!(log.contains(&format!("/manifests/{schema_tag}")), "{log}");
    let r = referrers(
        &stowage,
        repo,
        &image.digest,
        "?artifactType=application/spdx%2Bjson",
    );
    assert_eq!(r.header("oci-filters-applied"), "artifactType");
    assert_eq!(listed(&r).len(), 1);
    let r = referrers(&stowage, repo, &image.digest, "?artifactType=text/plain");
    assert_eq!(r.header("oci-filters-applied"), "artifactType");
    assert!(listed(&r).is_empty());
    // Nothing attached to the SBOM: no tag upstream, an empty answer.
    assert!(listed(&referrers(&stowage, repo, &sbom.manifest.digest, "")).is_empty());

    // cosign's `.sig` tag: pulled through the mirror like any tag, with its blobs.
    let r = get(&format!(
        "{}/v2/{repo}/manifests/{}",
        stowage.url(),
        sig_tag(&image.digest)
    ));
    assert_eq!(r.status, 200);
    assert_eq!(r.digest(), sig.digest);
    assert_eq!(r.body, sig.bytes);
    for b in &sig_blobs {
        let r = get(&format!("{}/v2/{repo}/blobs/{}", stowage.url(), b.digest));
        assert_eq!(r.body, b.bytes);
    }
}

#[test]
fn hosted_referrers_are_paged_with_link() {
    let upstream = Registry::start();
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml("[hosted]\nrepositories = [\"team/**\"]\nmax_size = \"1GiB\"\n")
        .start();
    let pushed = images::push(
        &stowage.url(),
        "team/app",
        "1",
        Image::build(Format::Oci, &[256]),
    );
    let mut want = Vec::new();
    for i in 0..5 {
        let a = Artifact::new(SIG, format!("sig {i}").as_bytes(), pushed.manifest());
        a.push(&stowage.url(), "team/app");
        want.push(a.manifest.digest.clone());
    }
    let want = sorted(want);
    let subject = pushed.digest();
    let got = pages(&stowage, &format!("/v2/team/app/referrers/{subject}?n=2"));
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got.concat(), want);
    let r = referrers(&stowage, "team/app", subject, "?n=2");
    assert_eq!(
        r.header("link"),
        format!(
            "</v2/team/app/referrers/{subject}?n=2&last={}>; rel=\"next\"",
            want[1].replace(':', "%3A")
        )
    );
    let got = pages(
        &stowage,
        &format!("/v2/team/app/referrers/{subject}?n=4&artifactType=application/none"),
    );
    assert_eq!(got, vec![Vec::<String>::new()]);
}

#[test]
fn referrers_cross_the_air_gap_and_pin_holds_them() {
    let fake = FakeUpstream::builder().referrers_api().start();
    let repo = "library/gapped";
    let index = ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[512]);
    for child in &index.children {
        for b in child.blobs() {
            fake.add_blob(repo, b.bytes.clone());
        }
        fake.add_manifest_by_digest(repo, OCI_MANIFEST, child.manifest.bytes.clone());
    }
    fake.add_manifest(repo, "1", OCI_INDEX, index.manifest.bytes.clone());
    // An SBOM of the index, a signature of the SBOM (API referrers), and a cosign `.sig` of
    // the amd64 child (a tag).
    let sbom = Artifact::new(SBOM, b"{\"spdx\":3}", &index.manifest);
    sbom.add_to(&fake, repo);
    let sbom_sig = Artifact::new(SIG, b"sbom signature", &sbom.manifest);
    sbom_sig.add_to(&fake, repo);
    let amd64 = &index.children[0].manifest;
    let (sig_blobs, sig) = cosign_sig(&amd64.digest);
    for b in &sig_blobs {
        fake.add_blob(repo, b.bytes.clone());
    }
    fake.add_manifest(
        repo,
        &sig_tag(&amd64.digest),
        OCI_MANIFEST,
        sig.bytes.clone(),
    );

    let online = Stowage::start(&[UpstreamSpec::new("docker.io", &fake.url())]);
    let image = format!("docker.io/{repo}:1");
    command_ok(
        &online,
        &[
            "prefetch",
            "--with-referrers",
            "--platform",
            "linux/amd64",
            &image,
        ],
    );
    let out = command_ok(&online, &["pin", &image]);
    for d in [
        &sbom.manifest.digest,
        &sbom_sig.manifest.digest,
        &sig.digest,
    ] {
        assert!(out.contains(&format!("pinned its referrer {d}")), "{out}");
    }
    let bundle = online.dir().join("bundle.tar");
    let out = command_ok(
        &online,
        &[
            "export",
            "--with-referrers",
            "-o",
            bundle.to_str().unwrap(),
            &image,
        ],
    );
    assert!(!out.contains("skipped"), "{out}");

    let mut offline = Stowage::start(&[UpstreamSpec::new("docker.io", &fake.url())]);
    offline.stop();
    offline.push_arg("--offline");
    offline.restart();
    command_ok(&offline, &["import", bundle.to_str().unwrap()]);
    fake.clear_requests();
    let listed_at = |subject: &str| digests(&listed(&referrers(&offline, repo, subject, "")));
    assert_eq!(
        listed_at(&index.manifest.digest),
        vec![sbom.manifest.digest.clone()]
    );
    assert_eq!(
        listed_at(&sbom.manifest.digest),
        vec![sbom_sig.manifest.digest.clone()]
    );
    let d = &listed(&referrers(&offline, repo, &index.manifest.digest, ""))[0];
    assert_eq!(
        *d,
        sbom.descriptor(SBOM),
        "the same descriptor as upstream's"
    );
    let r = get(&format!(
        "{}/v2/{repo}/manifests/{}",
        offline.url(),
        sig_tag(&amd64.digest)
    ));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, sig.bytes);
    for b in sig_blobs.iter().chain(&sbom_sig.blobs) {
        let r = get(&format!("{}/v2/{repo}/blobs/{}", offline.url(), b.digest));
        assert_eq!(r.body, b.bytes, "blob {}", b.digest);
    }
    assert!(
        fake.requests().is_empty(),
        "offline: the upstream is never asked"
    );
}

#[test]
fn hosted_referrers_cross_the_air_gap() {
    let upstream = Registry::start();
    let start = || {
        Stowage::builder()
            .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
            .extra_toml("[hosted]\nrepositories = [\"team/**\"]\nmax_size = \"1GiB\"\n")
            .start()
    };
    let connected = start();
    let pushed = images::push(
        &connected.url(),
        "team/app",
        "1",
        Image::build(Format::Oci, &[256]),
    );
    let sbom = Artifact::new(SBOM, b"{\"spdx\":4}", pushed.manifest());
    sbom.push(&connected.url(), "team/app");
    let sbom_sig = Artifact::new(SIG, b"sbom signature", &sbom.manifest);
    sbom_sig.push(&connected.url(), "team/app");
    let bundle = connected.dir().join("hosted.tar");
    let bundle = bundle.to_str().unwrap();
    command_ok(
        &connected,
        &["export", "--with-referrers", "-o", bundle, "team/app:1"],
    );

    let gapped = start();
    command_ok(&gapped, &["import", bundle]);
    let at = |subject: &str| digests(&listed(&referrers(&gapped, "team/app", subject, "")));
    assert_eq!(at(pushed.digest()), vec![sbom.manifest.digest.clone()]);
    assert_eq!(
        at(&sbom.manifest.digest),
        vec![sbom_sig.manifest.digest.clone()]
    );
}
