//! Sigstore signatures with real clients: skopeo signs while it copies
//! (`--sign-by-sigstore-private-key`, the key pair made here in the cosign format), and skopeo /
//! podman pull through stowage with a `policy.json` requiring `sigstoreSigned` for that key and
//! a `registries.d` turning on sigstore attachments. Hosted and mirrored images verify, unsigned
//! ones are refused by the client; with `require_signatures = "sigstore"` stowage itself refuses
//! unsigned and foreign-signed manifests (403 DENIED, counted) before caching them. Needs root
//! (podman).

mod support;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use support::clients::{registries_conf, ContainersEnv};
use support::images::{self, Format, Image, ImageIndex};
use support::registry::Registry;
use support::scrape::Scrape;
use support::stowage::{Stowage, UpstreamSpec};
use support::{http, manifest_accept};

/// A sigstore key pair as cosign writes it: `<name>.pub` (SubjectPublicKeyInfo PEM) and
/// `<name>.key` (PKCS#8, encrypted with scrypt + NaCl secretbox under the passphrase in
/// `<name>.pass`), the format skopeo's `--sign-by-sigstore-private-key` reads.
struct KeyPair {
    public: PathBuf,
    private: PathBuf,
    passphrase: PathBuf,
}

fn generate_key_pair(dir: &Path, name: &str) -> KeyPair {
    use crypto_secretbox::aead::{AeadInPlace, KeyInit};
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    use rand::RngCore;

    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let signing = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let public_pem = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let pkcs8 = signing.to_pkcs8_der().unwrap();
    let passphrase = format!("pass-{name}");
    let (mut salt, mut nonce) = ([0u8; 32], [0u8; 24]);
    rand::rngs::OsRng.fill_bytes(&mut salt);
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    // cosign's parameters: N = 2^15, r = 8, p = 1, a 32-byte key.
    let params = scrypt::Params::new(15, 8, 1, 32).unwrap();
    let mut key = [0u8; 32];
    scrypt::scrypt(passphrase.as_bytes(), &salt, &params, &mut key).unwrap();
    let mut sealed = pkcs8.as_bytes().to_vec();
    let tag = crypto_secretbox::XSalsa20Poly1305::new(&key.into())
        .encrypt_in_place_detached(&nonce.into(), b"", &mut sealed)
        .unwrap();
    // NaCl's secretbox layout: the 16-byte tag, then the ciphertext.
    let boxed = [tag.as_slice(), &sealed].concat();
    let envelope = serde_json::json!({
        "kdf": {"name": "scrypt", "params": {"N": 32768, "r": 8, "p": 1}, "salt": b64(&salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": b64(&nonce)},
        "ciphertext": b64(&boxed),
    });
    let private_pem = pem::encode(&pem::Pem::new(
        "ENCRYPTED COSIGN PRIVATE KEY",
        envelope.to_string().into_bytes(),
    ));
    let pair = KeyPair {
        public: dir.join(format!("{name}.pub")),
        private: dir.join(format!("{name}.key")),
        passphrase: dir.join(format!("{name}.pass")),
    };
    std::fs::write(&pair.public, public_pem).unwrap();
    std::fs::write(&pair.private, private_pem).unwrap();
    std::fs::write(&pair.passphrase, passphrase).unwrap();
    pair
}

/// A client environment whose skopeo and podman read and write sigstore attachments, with a
/// policy that accepts anything (for the signing copies) until [`require_key`] is called.
fn clients(registries: &str) -> ContainersEnv {
    let env = ContainersEnv::new(registries);
    let yaml = "default-docker:\n  use-sigstore-attachments: true\n";
    let user = env.dir().join("home/.config/containers");
    std::fs::create_dir_all(user.join("registries.d")).unwrap();
    for dir in [env.dir().join("registries.d"), user.join("registries.d")] {
        std::fs::write(dir.join("sigstore.yaml"), yaml).unwrap();
    }
    env
}

/// `policy.json` (skopeo's `--policy`, podman's user policy): images of the `docker` transport
/// under `scope` need a sigstore signature by `key`; everything else is rejected.
fn require_key(env: &ContainersEnv, scope: &str, key: &Path) {
    let policy = serde_json::json!({
        "default": [{"type": "reject"}],
        "transports": {"docker": {scope: [{
            "type": "sigstoreSigned",
            "keyPath": key,
            "signedIdentity": {"type": "matchRepoDigestOrExact"}
        }]}}
    })
    .to_string();
    std::fs::write(env.dir().join("policy.json"), &policy).unwrap();
    std::fs::write(env.dir().join("home/.config/containers/policy.json"), &policy).unwrap();
}

/// `skopeo copy` from `src` to `dest` signed with `key` (plain http both ways), the signature
/// naming `identity` when given (else the destination).
fn signed_copy(env: &ContainersEnv, key: &KeyPair, src: &str, dest: &str, identity: Option<&str>) {
    let private = key.private.display().to_string();
    let passphrase = key.passphrase.display().to_string();
    let mut args = vec![
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--sign-by-sigstore-private-key",
        &private,
        "--sign-passphrase-file",
        &passphrase,
    ];
    if let Some(id) = identity {
        args.extend(["--sign-identity", id]);
    }
    args.extend([src, dest]);
    env.skopeo_ok(&args);
}

fn plain_copy(env: &ContainersEnv, src: &str, dest: &str) {
    env.skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        src,
        dest,
    ]);
}

/// `skopeo copy <image> dir:` under the environment's policy: its output, or its error text.
fn skopeo_pull(env: &ContainersEnv, image: &str) -> Result<String, String> {
    let out = tempfile::tempdir().unwrap();
    let dest = format!("dir:{}", out.path().display());
    let o = env.skopeo(&["copy", "--src-tls-verify=false", image, &dest]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn podman_pull(env: &ContainersEnv, image: &str, tls_verify: bool) -> Result<String, String> {
    let policy = env.dir().join("policy.json").display().to_string();
    let tls = format!("--tls-verify={tls_verify}");
    let o = env.podman(&["pull", &tls, "--signature-policy", &policy, image]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The client said no because of the signature policy, not for another reason.
fn assert_refused_for_signature(result: Result<String, String>, what: &str) {
    let text = result.expect_err(&format!("{what} must be refused by the client's policy"));
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains("signature") || lower.contains("rejected"),
        "{what}: refused, but not for its signature:\n{text}"
    );
}

#[test]
fn hosted_images_signed_by_skopeo_verify_through_stowage_and_unsigned_ones_do_not() {
    let upstream = Registry::start();
    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()))
        .extra_toml("[hosted]\nrepositories = [\"team/**\"]\n")
        .start();
    let keys = tempfile::tempdir().unwrap();
    let key = generate_key_pair(keys.path(), "cosign");
    let (up, hp) = (upstream.host_port(), stowage.host_port());
    images::push(&upstream.url(), "src/a", "1", Image::build(Format::Oci, &[5000]));
    images::push(&upstream.url(), "src/b", "1", Image::build(Format::Docker, &[4000]));
    let env = clients("unqualified-search-registries = []\n");

    signed_copy(
        &env,
        &key,
        &format!("docker://{up}/src/a:1"),
        &format!("docker://{hp}/team/signed:1"),
        None,
    );
    plain_copy(
        &env,
        &format!("docker://{up}/src/b:1"),
        &format!("docker://{hp}/team/unsigned:1"),
    );
    // The attachment landed in hosted storage beside the image.
    let digest = head_digest(&stowage.url(), "team/signed", "1");
    let sig_tag = format!("{}.sig", digest.replace(':', "-"));
    let resp = http()
        .get(format!("{}/v2/team/signed/manifests/{sig_tag}", stowage.url()))
        .header("Accept", manifest_accept())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the signature attachment");

    require_key(&env, &hp, &key.public);
    skopeo_pull(&env, &format!("docker://{hp}/team/signed:1"))
        .unwrap_or_else(|e| panic!("skopeo: a signed hosted image must verify:\n{e}"));
    assert_refused_for_signature(
        skopeo_pull(&env, &format!("docker://{hp}/team/unsigned:1")),
        "skopeo: an unsigned hosted image",
    );
    podman_pull(&env, &format!("{hp}/team/signed:1"), false)
        .unwrap_or_else(|e| panic!("podman: a signed hosted image must verify:\n{e}"));
    assert_refused_for_signature(
        podman_pull(&env, &format!("{hp}/team/unsigned:1"), false),
        "podman: an unsigned hosted image",
    );
}

/// An upstream holding `library/signed:1` signed by `key` (its identity the name clients use
/// through the mirror, `docker.io/library/signed:1`) and `library/unsigned:1`.
fn signed_upstream(env: &ContainersEnv, key: &KeyPair) -> Registry {
    let upstream = Registry::start();
    let up = upstream.host_port();
    images::push(&upstream.url(), "src/a", "1", Image::build(Format::Oci, &[5000]));
    images::push(
        &upstream.url(),
        "library/unsigned",
        "1",
        Image::build(Format::Docker, &[4000]),
    );
    signed_copy(
        env,
        key,
        &format!("docker://{up}/src/a:1"),
        &format!("docker://{up}/library/signed:1"),
        Some("docker.io/library/signed:1"),
    );
    upstream
}

#[test]
fn mirrored_images_signed_upstream_verify_through_stowage_and_unsigned_ones_do_not() {
    let keys = tempfile::tempdir().unwrap();
    let key = generate_key_pair(keys.path(), "cosign");
    let signer = clients("unqualified-search-registries = []\n");
    let upstream = signed_upstream(&signer, &key);
    let stowage = Stowage::for_docker_io(&upstream.url());
    // docker.io is reachable only through the mirror (Docker Hub itself is not, here).
    let env = clients(&registries_conf(&stowage, &[]));
    require_key(&env, "docker.io", &key.public);

    skopeo_pull(&env, "docker://docker.io/library/signed:1")
        .unwrap_or_else(|e| panic!("skopeo: a signed mirrored image must verify:\n{e}"));
    assert_refused_for_signature(
        skopeo_pull(&env, "docker://docker.io/library/unsigned:1"),
        "skopeo: an unsigned mirrored image",
    );
    podman_pull(&env, "docker.io/library/signed:1", true)
        .unwrap_or_else(|e| panic!("podman: a signed mirrored image must verify:\n{e}"));
    assert_refused_for_signature(
        podman_pull(&env, "docker.io/library/unsigned:1", true),
        "podman: an unsigned mirrored image",
    );
    // The attachment was served by the mirror (the clients asked stowage for it).
    assert!(
        stowage.log().contains(".sig"),
        "the signature attachment was fetched through stowage:\n{}",
        stowage.log()
    );
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

#[test]
fn require_signatures_refuses_unsigned_and_foreign_signed_manifests_before_caching() {
    let keys = tempfile::tempdir().unwrap();
    let key = generate_key_pair(keys.path(), "trusted");
    let other = generate_key_pair(keys.path(), "other");
    let signer = clients("unqualified-search-registries = []\n");
    let upstream = signed_upstream(&signer, &key);
    let up = upstream.host_port();
    // Signed, but by a key stowage does not trust.
    images::push(&upstream.url(), "src/c", "1", Image::build(Format::Oci, &[3000]));
    signed_copy(
        &signer,
        &other,
        &format!("docker://{up}/src/c:1"),
        &format!("docker://{up}/library/forged:1"),
        Some("docker.io/library/forged:1"),
    );
    // Signed by the trusted key, under another repository's name.
    images::push(&upstream.url(), "src/d", "1", Image::build(Format::Oci, &[3500]));
    signed_copy(
        &signer,
        &key,
        &format!("docker://{up}/src/d:1"),
        &format!("docker://{up}/library/renamed:1"),
        Some("docker.io/library/elsewhere:1"),
    );
    // A two-platform index copied with --all: skopeo signs the index and each platform.
    images::push(
        &upstream.url(),
        "src/multi",
        "1",
        ImageIndex::build(Format::Oci, &["amd64", "arm64"], &[2000]),
    );
    let key_path = key.private.display().to_string();
    let pass_path = key.passphrase.display().to_string();
    signer.skopeo_ok(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--sign-by-sigstore-private-key",
        &key_path,
        "--sign-passphrase-file",
        &pass_path,
        "--sign-identity",
        "docker.io/library/multi:1",
        &format!("docker://{up}/src/multi:1"),
        &format!("docker://{up}/library/multi:1"),
    ]);

    let stowage = Stowage::builder()
        .upstream(UpstreamSpec::new("docker.io", &upstream.url()).with_extra(&format!(
            "require_signatures = \"sigstore\"\nsignature_public_key = {:?}\n",
            key.public.display().to_string()
        )))
        .start();

    // Unsigned: refused by tag and by digest, each time fetched again (nothing was cached).
    let (status, body) = get_manifest(&stowage, "library/unsigned", "1");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("DENIED") && body.contains("no sigstore signature"), "{body}");
    let unsigned = head_digest(&upstream.url(), "library/unsigned", "1");
    let (status, body) = get_manifest(&stowage, "library/unsigned", &unsigned);
    assert_eq!(status, 403, "{body}");
    assert_eq!(checks(&stowage, "refused"), 2.0);
    upstream.sync_log();
    assert_eq!(
        upstream.count_requests("GET", &format!("/v2/library/unsigned/manifests/{unsigned}")),
        2,
        "a refused manifest is not cached"
    );

    // Signed by another key; signed for another repository.
    let (status, body) = get_manifest(&stowage, "library/forged", "1");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("does not verify"), "{body}");
    let (status, body) = get_manifest(&stowage, "library/renamed", "1");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("library/elsewhere"), "{body}");
    assert_eq!(checks(&stowage, "refused"), 4.0);
    assert_eq!(checks(&stowage, "verified"), 0.0);

    // Signed by the trusted key: served, and a real client verifies it through the gate (the
    // attachment itself passes without a signature of its own).
    let (status, body) = get_manifest(&stowage, "library/signed", "1");
    assert_eq!(status, 200, "{body}");
    assert_eq!(checks(&stowage, "verified"), 1.0);
    let env = clients(&registries_conf(&stowage, &[]));
    require_key(&env, "docker.io", &key.public);
    skopeo_pull(&env, "docker://docker.io/library/signed:1")
        .unwrap_or_else(|e| panic!("skopeo through require_signatures:\n{e}"));

    // The index and each of its platform manifests verify.
    let (status, body) = get_manifest(&stowage, "library/multi", "1");
    assert_eq!(status, 200, "{body}");
    let index: serde_json::Value = serde_json::from_str(&body).unwrap();
    for child in index["manifests"].as_array().expect("an index") {
        let d = child["digest"].as_str().unwrap();
        let (status, body) = get_manifest(&stowage, "library/multi", d);
        assert_eq!(status, 200, "platform manifest {d}: {body}");
    }
    assert_eq!(checks(&stowage, "verified"), 4.0);
    assert_eq!(checks(&stowage, "refused"), 4.0);
}

/// The digest the registry at `url` answers for `name:tag`.
fn head_digest(url: &str, name: &str, tag: &str) -> String {
    let resp = http()
        .head(format!("{url}/v2/{name}/manifests/{tag}"))
        .header("Accept", manifest_accept())
        .send()
        .unwrap();
    resp.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string()
}
