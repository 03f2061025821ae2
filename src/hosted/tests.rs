use super::*;
use crate::oci::Reference;
use crate::policy::Pattern;
use bytes::Bytes;
use futures_util::Stream;
use std::time::Duration;

fn settings() -> Settings {
    Settings {
        repositories: vec![Pattern::new("team/**").unwrap()],
        max_size: 1 << 20,
        delete: true,
        upload_timeout: Duration::from_secs(60),
    }
}

fn once(bytes: &'static [u8]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::iter(vec![Ok(Bytes::from_static(bytes))])
}

async fn push_blob(h: &Hosted, repo: &RepoName, bytes: &'static [u8]) -> Digest {
    let d = Digest::of(bytes);
    let id = h.start_upload(repo).await.unwrap();
    h.finish_upload(repo, &id, &d, None, once(bytes))
        .await
        .unwrap();
    d
}

fn image(config: &Digest, layer: &Digest, subject: Option<&Digest>) -> Bytes {
    let mut v = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::media::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": 5}]
    });
    if let Some(s) = subject {
        v["subject"] = serde_json::json!({"mediaType": crate::oci::media::OCI_MANIFEST, "digest": s.to_string(), "size": 1});
    }
    Bytes::from(v.to_string())
}

#[tokio::test]
async fn a_push_is_visible_only_in_its_repository_and_checks_its_references() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hosted::open(settings(), dir.path()).unwrap();
    let repo: RepoName = "team/app".parse().unwrap();
    let other: RepoName = "team/other".parse().unwrap();
    assert!(h.holds_name(&repo));
    assert!(!h.holds_name(&"library/alpine".parse().unwrap()));
    let config = push_blob(&h, &repo, b"{}").await;
    let bytes = image(&config, &Digest::of(b"layer"), None);
    let tag = Reference::Tag("1".parse().unwrap());
    let e = h
        .put_manifest(&repo, &tag, None, bytes.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ManifestBlobUnknown);
    let layer = push_blob(&h, &repo, b"layer").await;
    let (digest, _) = h
        .put_manifest(&repo, &tag, None, bytes.clone())
        .await
        .unwrap();
    assert_eq!(h.manifest(&repo, &tag).await.unwrap().bytes, bytes);
    assert_eq!(h.blob(&repo, &layer).await.unwrap().size, 5);
    assert_eq!(
        h.blob(&other, &layer).await.unwrap_err().code,
        ErrorCode::BlobUnknown
    );
    assert_eq!(
        h.manifest(&other, &Reference::Digest(digest))
            .await
            .unwrap_err()
            .code,
        ErrorCode::ManifestUnknown
    );
    assert!(h.mount(&other, &layer, &repo).await.unwrap());
    assert_eq!(h.blob(&other, &layer).await.unwrap().size, 5);
    assert_eq!(h.repositories().await.unwrap(), vec!["team/app"]);
}

/// How long a node of [`shared_pair`] (grace period 60 s) trusts an empty listing of the
/// collector's records.
const TRUSTED_EMPTY: Duration = Duration::from_secs(3);

/// Past the moment a node of [`shared_pair`] trusts an empty listing of the collector's records.
async fn past_trusted_empty_listing() {
    tokio::time::sleep(TRUSTED_EMPTY + Duration::from_millis(200)).await;
}

fn shared_pair(store_dir: &Path) -> (tempfile::TempDir, Hosted, tempfile::TempDir, Hosted) {
    let store: Arc<dyn crate::store::BlobStore> =
        Arc::new(crate::store::fs::FsStore::new(store_dir.to_path_buf()));
    let timeout = Duration::from_secs(5);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Hosted::open(settings(), da.path())
        .unwrap()
        .with_shared_store(store.clone(), timeout);
    let b = Hosted::open(settings(), db.path())
        .unwrap()
        .with_shared_store(store, timeout);
    (da, a, db, b)
}

#[tokio::test]
async fn with_a_shared_store_every_node_serves_what_one_acknowledged() {
    let shared = tempfile::tempdir().unwrap();
    let (da, a, _db, b) = shared_pair(shared.path());
    let repo: RepoName = "team/app".parse().unwrap();
    let config = push_blob(&a, &repo, b"{}").await;
    let layer = push_blob(&a, &repo, b"layer").await;
    let v1 = image(&config, &layer, None);
    let tag = Reference::Tag("1".parse().unwrap());
    let (d1, _) = a.put_manifest(&repo, &tag, None, v1.clone()).await.unwrap();

    // Node B has nothing locally, and serves all of it from the shared store.
    assert!(b.index.link(&repo, &layer).unwrap().is_none());
    assert_eq!(b.manifest(&repo, &tag).await.unwrap().bytes, v1);
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut b.blob(&repo, &layer).await.unwrap().file, &mut got).unwrap();
    assert_eq!(got, b"layer");
    assert!(b.blob_path(&layer).exists(), "B keeps a local copy");
    assert_eq!(b.tags(&repo).await.unwrap(), vec!["1"]);
    let other: RepoName = "team/other".parse().unwrap();
    assert_eq!(
        b.blob(&other, &layer).await.unwrap_err().code,
        ErrorCode::BlobUnknown
    );

    // An imported blob is shared like a pushed one.
    let source = da.path().join("imported");
    std::fs::write(&source, b"imported").unwrap();
    let imported = Digest::of(b"imported");
    assert!(a.import_blob(&repo, &imported, &source).await.unwrap());
    assert_eq!(b.blob(&repo, &imported).await.unwrap().size, 8);

    // A tag moved on B (a manifest whose blobs were pushed to A) is what A serves.
    let layer2 = push_blob(&a, &repo, b"layer-2").await;
    let v2 = image(&config, &layer2, None);
    let (d2, _) = b.put_manifest(&repo, &tag, None, v2.clone()).await.unwrap();
    assert_ne!(d1, d2);
    assert_eq!(a.manifest(&repo, &tag).await.unwrap().bytes, v2);
    // A tag deleted on B is gone on A; so is a manifest deleted by digest.
    b.delete_manifest(&repo, &tag).await.unwrap();
    assert_eq!(
        a.manifest(&repo, &tag).await.unwrap_err().code,
        ErrorCode::ManifestUnknown
    );
    let by_digest = Reference::Digest(d1);
    assert!(a.manifest(&repo, &by_digest).await.is_ok());
    b.delete_manifest(&repo, &by_digest).await.unwrap();
    assert_eq!(
        a.manifest(&repo, &by_digest).await.unwrap_err().code,
        ErrorCode::ManifestUnknown
    );

    // The store failing: the push is 503 and nothing is acknowledged or linked.
    std::fs::remove_dir_all(shared.path().join(".tmp")).unwrap();
    std::fs::write(shared.path().join(".tmp"), b"not a directory").unwrap();
    let bytes: &'static [u8] = b"after the store broke";
    let d = Digest::of(bytes);
    let id = a.start_upload(&repo).await.unwrap();
    let e = a
        .finish_upload(&repo, &id, &d, None, once(bytes))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503, "{e:?}");
    assert!(a.index.link(&repo, &d).unwrap().is_none());
    assert!(!a.blob_path(&d).exists());
    let e = a
        .put_manifest(&repo, &Reference::Tag("2".parse().unwrap()), None, v1)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 503, "{e:?}");
    assert!(a.index.tag(&repo, &"2".parse().unwrap()).unwrap().is_none());
}

#[tokio::test]
async fn gc_keeps_what_tags_reach_and_their_referrers_and_removes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hosted::open(settings(), dir.path()).unwrap();
    let repo: RepoName = "team/app".parse().unwrap();
    let config = push_blob(&h, &repo, b"{}").await;
    let kept_layer = push_blob(&h, &repo, b"layer").await;
    let old_layer = push_blob(&h, &repo, b"old-layer").await;
    let stray = push_blob(&h, &repo, b"never referenced").await;
    let tagged = image(&config, &kept_layer, None);
    let (tagged_digest, _) = h
        .put_manifest(&repo, &Reference::Tag("1".parse().unwrap()), None, tagged)
        .await
        .unwrap();
    let untagged = image(&config, &old_layer, None);
    let (untagged_digest, _) = h
        .put_manifest(&repo, &Reference::Tag("2".parse().unwrap()), None, untagged)
        .await
        .unwrap();
    // Tag 2 moves away: its old manifest is reached by nothing.
    let signature = image(&config, &kept_layer, Some(&tagged_digest));
    let (sig_digest, _) = h
        .put_manifest(
            &repo,
            &Reference::Digest(Digest::of(&signature)),
            None,
            signature,
        )
        .await
        .unwrap();
    h.index.remove_tag(&repo, "2").unwrap();

    // gc blocks: run it on a thread of its own, as `stowage gc` does.
    let gc = |grace: Duration, dry: bool| {
        std::thread::scope(|s| s.spawn(|| h.gc(grace, dry)).join().unwrap()).unwrap()
    };
    // Within the grace period nothing goes.
    let report = gc(Duration::from_secs(3600), false);
    assert_eq!(report, gc::GcReport::default());
    let dry = gc(Duration::ZERO, true);
    assert_eq!(
        dry.manifests,
        vec![("team/app".to_string(), untagged_digest.hex().to_string())]
    );
    assert!(
        h.blob(&repo, &old_layer).await.is_ok(),
        "a dry run removes nothing"
    );
    let report = gc(Duration::ZERO, false);
    assert_eq!(report, dry);
    assert_eq!(report.blobs.len(), 2, "{report:?}");
    assert!(h
        .manifest(&repo, &Reference::Digest(tagged_digest))
        .await
        .is_ok());
    assert!(h
        .manifest(&repo, &Reference::Digest(sig_digest))
        .await
        .is_ok());
    assert!(h
        .manifest(&repo, &Reference::Digest(untagged_digest))
        .await
        .is_err());
    assert!(h.blob(&repo, &kept_layer).await.is_ok());
    for gone in [&old_layer, &stray] {
        assert!(h.blob(&repo, gone).await.is_err());
        assert!(!h.blob_path(gone).exists());
    }
    assert!(h.blob_path(&config).exists());
}

#[tokio::test]
async fn an_import_verifies_its_blobs_fits_the_budget_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let h = Hosted::open(settings(), dir.path()).unwrap();
    let repo: RepoName = "team/app".parse().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let put = |name: &str, bytes: &[u8]| {
        let p = src.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let (config, layer) = (put("c", b"{}"), put("l", b"layer"));
    let (cd, ld) = (Digest::of(b"{}"), Digest::of(b"layer"));

    // A file that does not hash to its digest is refused, and nothing stays.
    let e = h.import_blob(&repo, &ld, &config).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DigestInvalid);
    assert!(!h.blob_path(&ld).exists() && h.blob(&repo, &ld).await.is_err());
    assert_eq!(h.usage(), (0, 0));
    assert_eq!(
        std::fs::read_dir(dir.path().join("hosted/uploads"))
            .unwrap()
            .count(),
        0
    );

    assert!(h.import_blob(&repo, &cd, &config).await.unwrap());
    assert!(h.import_blob(&repo, &ld, &layer).await.unwrap());
    assert!(!h.import_blob(&repo, &ld, &layer).await.unwrap(), "held");
    let bytes = image(&cd, &ld, None);
    let tag = Reference::Tag("1".parse().unwrap());
    let t = crate::oci::media::OCI_MANIFEST;
    assert!(h
        .import_manifest(&repo, &tag, t, bytes.clone())
        .await
        .unwrap());
    assert!(!h
        .import_manifest(&repo, &tag, t, bytes.clone())
        .await
        .unwrap());
    assert_eq!(h.manifest(&repo, &tag).await.unwrap().bytes, bytes);
    assert_eq!(h.blob(&repo, &ld).await.unwrap().size, 5);
    let used = 2 + 5 + bytes.len() as u64;
    assert_eq!(h.usage(), (used, 2));
    assert_eq!(h.room(), (1 << 20) - used);

    // Past hosted.max_size: refused, nothing kept.
    let big = put("big", &vec![7u8; 1 << 20]);
    let bd = Digest::of(&vec![7u8; 1 << 20]);
    let e = h.import_blob(&repo, &bd, &big).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Denied, "{e}");
    assert!(!h.blob_path(&bd).exists());
    assert_eq!(h.usage(), (used, 2));
}

#[tokio::test]
async fn shared_gc_records_first_removes_later_and_a_push_saves_a_candidate() {
    let store = tempfile::tempdir().unwrap();
    let (_da, a, _db, b) = shared_pair(store.path());
    let repo: RepoName = "team/app".parse().unwrap();
    let config = push_blob(&a, &repo, b"{}").await;
    let kept = push_blob(&a, &repo, b"layer").await;
    let old = push_blob(&a, &repo, b"old-layer").await;
    let saved = push_blob(&a, &repo, b"saved-layer").await;
    let tag = Reference::Tag("1".parse().unwrap());
    let (tagged, _) = a
        .put_manifest(&repo, &tag, None, image(&config, &kept, None))
        .await
        .unwrap();
    let sig = image(&config, &kept, Some(&tagged));
    let sig_ref = Reference::Digest(Digest::of(&sig));
    a.put_manifest(&repo, &sig_ref, None, sig).await.unwrap();
    let untagged = image(&config, &old, None);
    let (untagged_digest, _) = a
        .put_manifest(
            &repo,
            &Reference::Digest(Digest::of(&untagged)),
            None,
            untagged,
        )
        .await
        .unwrap();
    let object = |d: &Digest| {
        store
            .path()
            .join(format!("hosted/blobs/sha256/{}", d.hex()))
    };

    let first = b.gc_shared(Duration::ZERO, false).await.unwrap();
    // The untagged manifest (link, object) and the two unreferenced blobs (links, objects).
    assert_eq!(first.recorded, 6, "{first:?}");
    assert!(
        first.manifests.is_empty() && first.objects == 0,
        "{first:?}"
    );
    // A push naming a candidate takes it back before the next run. Node A listed no records
    // when it pushed, and trusts that for a moment: the collector here runs with no grace
    // (which no configuration allows), so the push comes after that moment.
    past_trusted_empty_listing().await;
    let again = a.mount(&repo, &saved, &repo).await.unwrap();
    assert!(again);
    let dry = b.gc_shared(Duration::ZERO, true).await.unwrap();
    assert!(object(&old).exists(), "a dry run removes nothing");
    let second = b.gc_shared(Duration::ZERO, false).await.unwrap();
    assert_eq!(second, dry);
    assert_eq!(
        second.manifests,
        vec![("team/app".to_string(), untagged_digest.hex().to_string())]
    );
    assert!(!object(&old).exists());
    assert!(object(&kept).exists() && object(&config).exists());
    let by_digest = Reference::Digest(untagged_digest);
    assert!(b.manifest(&repo, &by_digest).await.is_err());
    assert_eq!(b.referrers(&repo, &tagged, None).await.unwrap().len(), 1);
    assert_eq!(b.manifest(&repo, &tag).await.unwrap().digest, tagged);
    assert!(b.blob(&repo, &kept).await.is_ok());
    // The saved blob became a candidate again (still unreferenced), recorded anew.
    assert!(object(&saved).exists());

    // A referrer record lost (or never written, by an older version): gc writes it again.
    let sig_digest = match &sig_ref {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(_) => unreachable!(),
    };
    let record = store.path().join(format!(
        "hosted/repos/team/app/_referrers/{}/{}",
        tagged.hex(),
        sig_digest.hex()
    ));
    std::fs::remove_file(&record).unwrap();
    assert!(b.referrers(&repo, &tagged, None).await.unwrap().is_empty());
    let third = b.gc_shared(Duration::ZERO, false).await.unwrap();
    assert_eq!(third.referrers, 1, "{third:?}");
    let found = b.referrers(&repo, &tagged, None).await.unwrap();
    assert_eq!(found[0]["digest"], sig_digest.to_string());
}

#[tokio::test]
async fn a_push_waits_out_a_removal_in_progress_then_sees_what_is_left() {
    let store = tempfile::tempdir().unwrap();
    let (_da, a, _db, b) = shared_pair(store.path());
    let repo: RepoName = "team/app".parse().unwrap();
    let blob = push_blob(&a, &repo, b"layer").await;
    // The collector is between its removal record and its delete of the blob.
    let removing = store
        .path()
        .join(format!("hosted/_gc/removing/blobs/sha256/{}", blob.hex()));
    std::fs::create_dir_all(removing.parent().unwrap()).unwrap();
    std::fs::write(&removing, "0").unwrap();
    let asked = blob.clone();
    let head = tokio::spawn(async move {
        let size = b.blob_size(&repo, &asked).await;
        (b, size)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!head.is_finished(), "the HEAD did not wait for the removal");
    // The collector deletes the blob, then its record: the HEAD then finds it gone.
    let object = store
        .path()
        .join(format!("hosted/blobs/sha256/{}", blob.hex()));
    std::fs::remove_file(&object).unwrap();
    std::fs::remove_file(&removing).unwrap();
    let (_b, size) = tokio::time::timeout(Duration::from_secs(30), head)
        .await
        .expect("the HEAD stops waiting once the record is gone")
        .unwrap();
    assert_eq!(size.unwrap_err().code, ErrorCode::BlobUnknown);
}

#[tokio::test]
async fn an_empty_listing_of_the_collector_records_is_trusted_for_a_moment_only() {
    let store = tempfile::tempdir().unwrap();
    let (_da, a, _db, b) = shared_pair(store.path());
    let repo: RepoName = "team/app".parse().unwrap();
    let blob = push_blob(&a, &repo, b"layer").await;
    let record = store
        .path()
        .join(format!("hosted/_gc/candidates/blobs/sha256/{}", blob.hex()));
    // Node B answers a HEAD from the store, listing the collector's records: none.
    let listed = std::time::Instant::now();
    assert_eq!(b.blob_size(&repo, &blob).await.unwrap(), 5);
    // Another node's collector records the blob just after: node B does not list again yet
    // (checked only if this machine was quick enough to ask within the moment).
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    std::fs::write(&record, now_secs().to_string()).unwrap();
    assert_eq!(b.blob_size(&repo, &blob).await.unwrap(), 5);
    if listed.elapsed() < TRUSTED_EMPTY {
        assert!(record.exists(), "the empty listing was not trusted");
    }
    // A moment later it lists again, and takes the blob back.
    past_trusted_empty_listing().await;
    assert_eq!(b.blob_size(&repo, &blob).await.unwrap(), 5);
    assert!(!record.exists(), "the empty listing was trusted too long");

    // A node that collects forgets its empty listing at once: its own records are listed.
    assert!(a.mount(&repo, &blob, &repo).await.unwrap());
    let collected = a.gc_shared(Duration::from_secs(3600), false).await.unwrap();
    assert_eq!(collected.recorded, 2, "{collected:?}");
    assert!(record.exists());
    assert!(a.mount(&repo, &blob, &repo).await.unwrap());
    assert!(
        !record.exists(),
        "the collector's node trusted its old empty listing"
    );
}
