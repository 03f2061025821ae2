//! Sigstore signatures through stowage with a real client. Images are signed here as skopeo
//! (`--sign-by-sigstore-private-key`) and cosign sign them: a simple-signing payload signed with
//! an ECDSA P-256 key, attached as the `sha256-<hex>.sig` manifest. (Debian 12's skopeo and podman
//! are built with sigstore signing and `sigstoreSigned` verification disabled — "Debian-local
//! change: sigstore disabled" — but they do read and write the attachments.) skopeo, with
//! `use-sigstore-attachments` in its `registries.d`, carries signatures into a hosted repository
//! and pulls them back, or through the mirror from a real upstream; the signatures it pulled
//! are verified here as its `sigstoreSigned` policy would. With
//! `require_signatures = "sigstore"` stowage itself refuses unsigned, foreign-signed and
//! misnamed manifests (403 DENIED, counted) before caching them; and signatures carried by
//! `prefetch` / `export --with-referrers` → `import` still verify from an offline stowage.

mod support;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use support::clients::{registries_conf, ContainersEnv};
use support::images::{self, Blob, Format, Image, ImageIndex, Manifest};
use support::registry::Registry;
use support::scrape::Scrape;
use support::stowage::{command_ok, Stowage, UpstreamSpec};
use support::{http, manifest_accept, sha256_digest};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// A signing key and its public half as cosign writes it (`cosign.pub`, SubjectPublicKeyInfo PEM).
struct Key {
    signing: p256::ecdsa::SigningKey,
    public: PathBuf,
}

fn new_key(dir: &Path, name: &str) -> Key {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    let signing = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let public = dir.join(format!("{name}.pub"));
    let pem = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    std::fs::write(&public, pem).unwrap();
    Key { signing, public }
}

/// Signs `digest` in `name` on the registry at `url` as skopeo and cosign do: the simple-signing
/// payload naming `identity` and the digest, its ECDSA signature (ASN.1 DER, SHA-256) in the
/// annotation of the one layer of the attachment tagged `sha256-<hex>.sig`.
fn sign(url: &str, name: &str, digest: &str, identity: &str, key: &Key) {
    let payload = serde_json::json!({
        "critical": {
            "identity": {"docker-reference": identity},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature"
        },
        "optional": null
    })
    .to_string()
    .into_bytes();
    let signature: p256::ecdsa::Signature = key.signing.sign(&payload);
    let payload = Blob::new(SIMPLE_SIGNING, payload);
    let config = Blob::new(
        "application/vnd.oci.image.config.v1+json",
        serde_json::json!({"architecture": "", "os": "", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [payload.digest]}})
        .to_string()
        .into_bytes(),
    );
    let attachment = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size()},
        "layers": [{
            "mediaType": SIMPLE_SIGNING,
            "digest": payload.digest,
            "size": payload.size(),
            "annotations": {SIGNATURE_ANNOTATION:
                base64::engine::general_purpose::STANDARD.encode(signature.to_der())}
        }]
    })
    .to_string()
    .into_bytes();
    images::push_blob(url, name, &payload);
    images::push_blob(url, name, &config);
    let manifest = Manifest {
        media_type: OCI_MANIFEST.into(),
        digest: sha256_digest(&attachment),
        bytes: attachment,
    };
    let tag = format!("{}.sig", digest.replace(':', "-"));
    images::push_manifest(url, name, &tag, &manifest);
}

/// A client environment whose skopeo reads and writes sigstore attachments
/// (`registries.d`: `use-sigstore-attachments: true`).
fn clients(registries: &str) -> ContainersEnv {
    let env = ContainersEnv::new(registries);
    std::fs::write(
        env.dir().join("registries.d/sigstore.yaml"),
        "default-docker:\n  use-sigstore-attachments: true\n",
    )
    .unwrap();
    env
}

fn copy(env: &ContainersEnv, src: &str, dest: &str) {
    env.skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        src,
        dest,
    ]);
}

/// What `skopeo copy <image> dir:` brought: the manifest's digest and the sigstore signatures
/// (`signature-N` files: `\0sigstore-json\n` and a JSON object with the base64 payload and the
/// layer annotations).
struct Pulled {
    digest: String,
    signatures: Vec<(Vec<u8>, String)>,
}

fn pull(env: &ContainersEnv, image: &str) -> Pulled {
    let out = tempfile::tempdir().unwrap();
    copy(env, image, &format!("dir:{}", out.path().display()));
    let manifest = std::fs::read(out.path().join("manifest.json")).unwrap();
    let mut signatures = Vec::new();
    for n in 1.. {
        let Ok(file) = std::fs::read(out.path().join(format!("signature-{n}"))) else {
            break;
        };
        let json = file
            .strip_prefix(b"\0sigstore-json\n".as_slice())
            .unwrap_or_else(|| panic!("signature-{n} is not a sigstore signature"));
        let v: serde_json::Value = serde_json::from_slice(json).unwrap();
        assert_eq!(v["mimeType"], SIMPLE_SIGNING, "{v}");
        let payload = base64::engine::general_purpose::STANDARD
            .decode(v["payload"].as_str().unwrap())
            .unwrap();
        let sig = v["annotations"][SIGNATURE_ANNOTATION]
            .as_str()
            .unwrap()
            .to_owned();
        signatures.push((payload, sig));
    }
    Pulled {
        digest: sha256_digest(&manifest),
        signatures,
    }
}

/// The identities of the pulled signatures that pass a `sigstoreSigned` check with `key`: the
/// signature verifies and the payload names the pulled manifest.
fn verified_identities(pulled: &Pulled, key: &Key) -> Vec<String> {
    let vk = key.signing.verifying_key();
    pulled
        .signatures
        .iter()
        .filter_map(|(payload, sig)| {
            let der = base64::engine::general_purpose::STANDARD.decode(sig).ok()?;
            let sig = p256::ecdsa::Signature::from_der(&der).ok()?;
            vk.verify(payload, &sig).ok()?;
            let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
            let critical = &v["critical"];
            (critical["image"]["docker-manifest-digest"] == pulled.digest.as_str()
                && critical["type"] == "cosign container image signature")
                .then(|| critical["identity"]["docker-reference"].as_str())
                .flatten()
                .map(str::to_owned)
        })
        .collect()
}

/// The digest the registry at `url` answers for `name:reference`.
fn head_digest(url: &str, name: &str, reference: &str) -> String {
    let resp = http()
        .head(format!("{url}/v2/{name}/manifests/{reference}"))
        .header("Accept", manifest_accept())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "HEAD {name}:{reference}");
    resp.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn skopeo_carries_signatures_into_hosted_repositories_and_pulls_them_back_verifiable() {
    let upstream = Registry::start();
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml("[hosted]\nrepositories = [\"team/**\"]\n")
        .start();
    let keys = tempfile::tempdir().unwrap();
    let key = new_key(keys.path(), "cosign");
    let (up, hp) = (upstream.host_port(), stowage.host_port());
    let signed = images::push(
        &upstream.url(),
        "src/a",
        "1",
        Image::build(Format::Oci, &[5000]),
    );
    let identity = format!("{hp}/team/signed:1");
    sign(&upstream.url(), "src/a", signed.digest(), &identity, &key);
    images::push(
        &upstream.url(),
        "src/b",
        "1",
        Image::build(Format::Docker, &[4000]),
    );
    let env = clients("unqualified-search-registries = []\n");

    // skopeo copies the image and its attachment into hosted storage.
    copy(
        &env,
        &format!("docker://{up}/src/a:1"),
        &format!("docker://{hp}/team/signed:1"),
    );
    copy(
        &env,
        &format!("docker://{up}/src/b:1"),
        &format!("docker://{hp}/team/unsigned:1"),
    );
    let digest = head_digest(&stowage.url(), "team/signed", "1");
    assert_eq!(
        digest,
        signed.digest(),
        "the signed manifest is kept byte for byte"
    );
    head_digest(
        &stowage.url(),
        "team/signed",
        &format!("{}.sig", digest.replace(':', "-")),
    );

    let pulled = pull(&env, &format!("docker://{hp}/team/signed:1"));
    assert_eq!(verified_identities(&pulled, &key), [identity]);
    let other = new_key(keys.path(), "other");
    assert!(verified_identities(&pulled, &other).is_empty());
    let pulled = pull(&env, &format!("docker://{hp}/team/unsigned:1"));
    assert!(
        pulled.signatures.is_empty(),
        "an unsigned image has no signature"
    );
}

/// An upstream holding `library/signed:1` signed by `key` (its identity the name clients use
/// through the mirror, `docker.io/library/signed:1`) and `library/unsigned:1`.
fn signed_upstream(key: &Key) -> Registry {
    let upstream = Registry::start();
    let p = images::push(
        &upstream.url(),
        "library/signed",
        "1",
        Image::build(Format::Oci, &[5000]),
    );
    sign(
        &upstream.url(),
        "library/signed",
        p.digest(),
        "docker.io/library/signed:1",
        key,
    );
    images::push(
        &upstream.url(),
        "library/unsigned",
        "1",
        Image::build(Format::Docker, &[4000]),
    );
    upstream
}

#[test]
fn signatures_of_mirrored_images_reach_skopeo_through_stowage() {
    let keys = tempfile::tempdir().unwrap();
    let key = new_key(keys.path(), "cosign");
    let upstream = signed_upstream(&key);
    let stowage = Stowage::for_docker_io(&upstream.url());
    // docker.io is reachable only through the mirror (Docker Hub itself is not, here).
    let env = clients(&registries_conf(&stowage, &[]));

    let pulled = pull(&env, "docker://docker.io/library/signed:1");
    assert_eq!(
        verified_identities(&pulled, &key),
        ["docker.io/library/signed:1"]
    );
    let pulled = pull(&env, "docker://docker.io/library/unsigned:1");
    assert!(pulled.signatures.is_empty());
    let tag = format!(
        "sha256-{}.sig",
        head_digest(&upstream.url(), "library/signed", "1").trim_start_matches("sha256:")
    );
    // Only stowage knows the upstream's address: the attachment reached skopeo through it.
    upstream.sync_log();
    let asked = upstream.count_requests("HEAD", &tag) + upstream.count_requests("GET", &tag);
    assert!(asked >= 1, "the attachment was fetched through stowage");
}

fn get_manifest(stowage: &Stowage, name: &str, reference: &str) -> (u16, String) {
    let resp = http()
        .get(format!("{}/v2/{name}/manifests/{reference}", stowage.url()))
        .header("Accept", manifest_accept())
        .send()
        .unwrap();
    (resp.status().as_u16(), resp.text().unwrap())
}

fn checks(stowage: &Stowage, result: &str) -> f64 {
    Scrape::get(&stowage.url()).value(
        "stowage_signature_checks_total",
        &[("upstream", "docker.io"), ("result", result)],
    )
}

/// `require_signatures` in front of an upstream holding: `signed` (trusted key), `unsigned`,
/// `forged` (another key), `renamed` (trusted key, another repository's name), `multi` (an
/// index, it and each platform signed) and `partial` (an index, only the index signed).
fn gated_world(key: &Key, other: &Key) -> (Registry, Stowage) {
    let upstream = signed_upstream(key);
    let url = upstream.url();
    let forged = images::push(
        &url,
        "library/forged",
        "1",
        Image::build(Format::Oci, &[3000]),
    );
    sign(
        &url,
        "library/forged",
        forged.digest(),
        "docker.io/library/forged:1",
        other,
    );
    let renamed = images::push(
        &url,
        "library/renamed",
        "1",
        Image::build(Format::Oci, &[3500]),
    );
    sign(
        &url,
        "library/renamed",
        renamed.digest(),
        "docker.io/library/elsewhere:1",
        key,
    );
    signed_index(&url, "library/multi", key, true);
    signed_index(&url, "library/partial", key, false);
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &url).with_extra(&require_signatures(key)))
        .start();
    (upstream, stowage)
}

/// Pushes a two-platform index (amd64, arm64) as `name:1` to the registry at `url` and signs it
/// for `docker.io/<name>:1`, and each platform manifest too when `children`; returns the
/// platform manifests' digests.
fn signed_index(url: &str, name: &str, key: &Key, children: bool) -> Vec<String> {
    let index = ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[2000]);
    let platforms: Vec<String> = index
        .children
        .iter()
        .map(|c| c.manifest.digest.clone())
        .collect();
    let p = images::push(url, name, "1", index);
    let identity = format!("docker.io/{name}:1");
    sign(url, name, p.digest(), &identity, key);
    if children {
        for child in &platforms {
            sign(url, name, child, &identity, key);
        }
    }
    platforms
}

/// The `[[upstreams]]` lines that gate on sigstore signatures by `key`.
fn require_signatures(key: &Key) -> String {
    format!(
        "require_signatures = \"sigstore\"\nsignature_public_key = {:?}\n",
        key.public.display().to_string()
    )
}

#[test]
fn require_signatures_refuses_unsigned_forged_and_misnamed_manifests_before_caching() {
    let keys = tempfile::tempdir().unwrap();
    let (key, other) = (
        new_key(keys.path(), "trusted"),
        new_key(keys.path(), "other"),
    );
    let (upstream, stowage) = gated_world(&key, &other);

    // Unsigned: refused by tag and by digest, and fetched again each time (nothing cached).
    let (status, body) = get_manifest(&stowage, "library/unsigned", "1");
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("DENIED") && body.contains("no sigstore signature"),
        "{body}"
    );
    let unsigned = head_digest(&upstream.url(), "library/unsigned", "1");
    let (status, _) = get_manifest(&stowage, "library/unsigned", &unsigned);
    assert_eq!(status, 403);
    assert_eq!(checks(&stowage, "refused"), 2.0);
    upstream.sync_log();
    let path = format!("/v2/library/unsigned/manifests/{unsigned}");
    assert_eq!(
        upstream.count_requests("GET", &path),
        2,
        "refused, so not cached"
    );

    let (status, body) = get_manifest(&stowage, "library/forged", "1");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("does not verify"), "{body}");
    let (status, body) = get_manifest(&stowage, "library/renamed", "1");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("library/elsewhere"), "{body}");
    assert_eq!(checks(&stowage, "refused"), 4.0);
    assert_eq!(checks(&stowage, "verified"), 0.0);

    // Signed with the trusted key: served; skopeo pulls it and its signature through the gate
    // (the attachment needs no signature of its own).
    let (status, body) = get_manifest(&stowage, "library/signed", "1");
    assert_eq!(status, 200, "{body}");
    assert_eq!(checks(&stowage, "verified"), 1.0);
    let env = clients(&registries_conf(&stowage, &[]));
    let pulled = pull(&env, "docker://docker.io/library/signed:1");
    assert_eq!(
        verified_identities(&pulled, &key),
        ["docker.io/library/signed:1"]
    );

    // An index is checked, and so is each platform manifest on its own signature.
    for (name, children_ok) in [("library/multi", true), ("library/partial", false)] {
        let (status, body) = get_manifest(&stowage, name, "1");
        assert_eq!(status, 200, "{name}: {body}");
        let index: serde_json::Value = serde_json::from_str(&body).unwrap();
        for child in index["manifests"].as_array().expect("an index") {
            let d = child["digest"].as_str().unwrap();
            let (status, body) = get_manifest(&stowage, name, d);
            let want = if children_ok { 200 } else { 403 };
            assert_eq!(status, want, "{name} platform manifest {d}: {body}");
        }
    }
    assert_eq!(checks(&stowage, "verified"), 5.0);
    assert_eq!(checks(&stowage, "refused"), 6.0);
    assert_eq!(checks(&stowage, "error"), 0.0);
}

#[test]
fn a_key_file_without_a_usable_key_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pub");
    std::fs::write(
        &bad,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = {:?}\n[[upstreams]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n\
             require_signatures = \"sigstore\"\nsignature_public_key = {:?}\n",
            dir.path().join("data").display().to_string(),
            bad.display().to_string()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"));
    cmd.args(["serve", "--config"]).arg(&config);
    // Bounded: a server that started anyway is killed and fails the test below.
    let out = support::clients::run(&mut cmd, std::time::Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("signature_public_key"), "{stderr}");
}

/// The air gap: a signed image and a signed two-platform index, prefetched and exported with
/// their signatures from a mirror that requires them, imported into a fresh stowage and served
/// offline — skopeo pulls them with signatures that still verify. `library/bare`, signed
/// upstream but exported without `--with-referrers`, comes across with no signature. The far
/// side is served once as a plain offline mirror and once with `require_signatures` configured
/// too: imported content is served as it is, never checked (the gate is on the way in from an
/// upstream, and an offline mirror has none).
#[test]
fn signatures_cross_the_air_gap_and_still_verify() {
    let keys = tempfile::tempdir().unwrap();
    let key = new_key(keys.path(), "cosign");
    let mut upstream = signed_upstream(&key);
    let url = upstream.url();
    let platforms = signed_index(&url, "library/multi", &key, true);
    let bare = images::push(
        &url,
        "library/bare",
        "1",
        Image::build(Format::Oci, &[2500]),
    );
    sign(
        &url,
        "library/bare",
        bare.digest(),
        "docker.io/library/bare:1",
        &key,
    );
    let gate = require_signatures(&key);
    let connected = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &url).with_extra(&gate))
        .start();
    let (signed, multi) = ("docker.io/library/signed:1", "docker.io/library/multi:1");
    let bare_ref = "docker.io/library/bare:1";
    command_ok(
        &connected,
        &["prefetch", "--with-referrers", signed, multi, bare_ref],
    );
    let carried = connected.dir().join("signed.tar");
    let out = command_ok(
        &connected,
        &[
            "export",
            "--with-referrers",
            "-o",
            carried.to_str().unwrap(),
            signed,
            multi,
        ],
    );
    assert!(!out.contains("skipped"), "{out}");
    let dropped = connected.dir().join("bare.tar");
    command_ok(
        &connected,
        &["export", "-o", dropped.to_str().unwrap(), bare_ref],
    );
    // Nothing on the far side can reach the upstream.
    upstream.stop();

    for far_gate in ["", gate.as_str()] {
        let offline = Stowage::builder()
            .upstream(UpstreamSpec::new("docker.io", &url).with_extra(far_gate))
            .arg("--offline")
            .start();
        for bundle in [&carried, &dropped] {
            command_ok(&offline, &["import", bundle.to_str().unwrap()]);
        }
        let env = clients(&registries_conf(&offline, &[]));
        let case = if far_gate.is_empty() {
            "offline"
        } else {
            "offline with require_signatures"
        };

        let pulled = pull(&env, &format!("docker://{signed}"));
        assert_eq!(verified_identities(&pulled, &key), [signed], "{case}");
        // skopeo picks the host's platform (linux/amd64, prefetch's default) and checks its
        // own signature.
        let pulled = pull(&env, &format!("docker://{multi}"));
        assert_eq!(pulled.digest, platforms[0], "{case}");
        assert_eq!(verified_identities(&pulled, &key), [multi], "{case}");
        let other = new_key(keys.path(), "other");
        assert!(verified_identities(&pulled, &other).is_empty(), "{case}");

        let pulled = pull(&env, &format!("docker://{bare_ref}"));
        assert_eq!(pulled.digest, bare.digest(), "{case}");
        assert!(
            pulled.signatures.is_empty(),
            "{case}: exported without --with-referrers, so no signature came across"
        );
        if !far_gate.is_empty() {
            for result in ["verified", "refused", "error"] {
                assert_eq!(checks(&offline, result), 0.0, "{case}: {result}");
            }
        }
    }
}
