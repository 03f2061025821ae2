//! One repository with its tags: digest, media type, platforms, size, pulls, pin and (mirrored)
//! freshness. Reads never mark anything used: the console's look is not a pull.

use serde_json::{json, Value};

use super::model::{
    counters, freshness, internal, not_found, platforms, pull_name, read_small, Target,
};
use super::rows::{mirrored_rows, RepoRow};
use super::{ApiError, Console};
use crate::cache::stats::HOSTED;
use crate::oci::{references, Digest, RepoName};

/// The repository `target` as JSON. Blocking.
pub(crate) fn repository(c: &Console, target: &Target) -> Result<Value, ApiError> {
    match target {
        Target::Mirrored { host, repo } => mirrored(c, host, repo),
        Target::Hosted(repo) => hosted(c, repo),
    }
}

fn mirrored(c: &Console, host: &str, repo: &RepoName) -> Result<Value, ApiError> {
    let cache = &c.mirror.cache;
    let f = cache.footprint().map_err(internal)?;
    let key = (host.to_owned(), repo.to_string());
    let records = cache
        .index()
        .tags_of(host, repo.as_str())
        .map_err(internal)?;
    let Some(size) = f.repos.get(&key) else {
        return Err(not_found(format!("{host}/{repo} is not in the cache")));
    };
    let activity = cache.activity();
    let mut one = crate::cache::stats::Footprint::default();
    one.repos.insert(key.clone(), size.clone());
    let row = mirrored_rows(&one, &activity.repos(), |k| pull_name(c, k))
        .pop()
        .unwrap_or_default();
    let mut tags = Vec::new();
    for t in records {
        let tkey = (key.0.clone(), key.1.clone(), t.tag.clone());
        let tsize = f.tags.get(&tkey).copied().unwrap_or_default();
        let manifest = t
            .entry
            .digest
            .parse::<Digest>()
            .ok()
            .and_then(|d| cache.manifest_untouched(&d).ok().flatten());
        let plats = manifest
            .as_ref()
            .map(|m| platforms(&m.bytes, |d| read_small(cache.blob_path(d))))
            .unwrap_or_default();
        tags.push(json!({
            "tag": t.tag,
            "digest": t.entry.digest,
            "media_type": t.entry.media_type,
            "platforms": plats,
            "size_bytes": tsize.bytes,
            "blobs": tsize.blobs,
            "pinned": tsize.pinned,
            "reference": format!("{host}/{repo}:{}", t.tag),
            "counters": counters(&activity.tag(&tkey)),
            "freshness": freshness(c, host, &t.tag, t.entry.checked),
        }));
    }
    Ok(body(row, tags))
}

fn body(row: RepoRow, tags: Vec<Value>) -> Value {
    let count = row.tags;
    let mut v = serde_json::to_value(row).unwrap_or_else(|_| json!({}));
    v["tag_count"] = json!(count);
    v["tags"] = Value::Array(tags);
    v
}

fn hosted(c: &Console, repo: &RepoName) -> Result<Value, ApiError> {
    let Some(h) = &c.hosted else {
        return Err(not_found(format!("{repo} is not hosted here")));
    };
    let idx = h.index();
    let records = idx.tags_of(repo).map_err(internal)?;
    let rows = super::rows::all(c)?;
    let Some(row) = rows
        .into_iter()
        .find(|r| r.kind == "hosted" && r.repository == repo.as_str())
    else {
        return Err(not_found(format!("{repo} holds no manifest")));
    };
    let activity = c.mirror.cache.activity();
    let mut tags = Vec::new();
    for (tag, hex) in records {
        let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
            continue;
        };
        let Some(m) = idx.manifest(&digest).map_err(internal)? else {
            continue;
        };
        let size = hosted_size(h, &m.bytes)?;
        let tkey = (HOSTED.to_owned(), repo.to_string(), tag.clone());
        tags.push(json!({
            "tag": tag,
            "digest": digest.to_string(),
            "media_type": m.media_type,
            "platforms": platforms(&m.bytes, |d| read_small(h.blob_path(d))),
            "size_bytes": size,
            "pinned": false,
            "reference": format!("{repo}:{tag}"),
            "counters": counters(&activity.tag(&tkey)),
            "freshness": { "state": "hosted" },
        }));
    }
    Ok(body(row, tags))
}

/// Bytes of a hosted manifest, its children and the blobs they reference.
fn hosted_size(h: &crate::hosted::Hosted, bytes: &[u8]) -> Result<u64, ApiError> {
    let idx = h.index();
    let mut total = bytes.len() as u64;
    let refs = references(bytes);
    for (b, _) in &refs.blobs {
        total += idx.blob(b).map_err(internal)?.unwrap_or(0);
    }
    for child in &refs.children {
        if let Some(m) = idx.manifest(child).map_err(internal)? {
            total += m.bytes.len() as u64;
            for (b, _) in references(&m.bytes).blobs {
                total += idx.blob(&b).map_err(internal)?.unwrap_or(0);
            }
        }
    }
    Ok(total)
}
