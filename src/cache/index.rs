//! The durable index, in sled: what blobs exist (size, when added), manifests by digest (exact
//! bytes and media type), tag → digest per (upstream, repository), and the repositories seen.
//!
//! Lifecycle trees: `access` (last use of blobs `b<hex>`, manifests `m<hex>` and tags `t<tag key>`:
//! a logical tick and unix seconds, written in batches, never per request) and `pins` (pinned
//! manifests by hex, with the reference the operator named).
//!
//! Blob *bytes* never live here — only in files under `blobs/`. Keys are built from validated
//! names, separated by `\0`, which no name, tag or host can contain.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::oci::{Digest, RepoName, Tag};

/// Index errors (sled or a corrupt record).
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index: {0}")]
    Sled(#[from] sled::Error),
    #[error("index record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

/// What the index knows of a blob.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobMeta {
    pub size: u64,
    /// Unix seconds when it was committed.
    pub added: u64,
}

/// A manifest, byte-exact, with the media type it was served with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// What a tag pointed to when last checked.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: String,
    pub media_type: String,
    /// Unix seconds of the last successful check upstream.
    pub checked: u64,
}

/// A repository present in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoEntry {
    pub upstream: String,
    pub repo: String,
}

/// The sled database and its trees.
#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    blobs: sled::Tree,
    manifests: sled::Tree,
    tags: sled::Tree,
    repos: sled::Tree,
    access: sled::Tree,
    pins: sled::Tree,
}

/// A tag record with its key parts, for listing.
#[derive(Clone, Debug)]
pub struct TagRecord {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub entry: TagEntry,
}

/// A pinned manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pin {
    /// The reference the operator pinned (`docker.io/library/alpine:3.19`).
    pub reference: String,
    /// Unix seconds.
    pub pinned: u64,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The key of a tag record (and, prefixed with `t`, of its access record).
pub fn tag_key(upstream: &str, repo: &RepoName, tag: &Tag) -> Vec<u8> {
    format!("{upstream}\0{repo}\0{tag}").into_bytes()
}

/// Decodes an access record: (tick, unix seconds).
pub fn decode_access(v: &[u8]) -> Option<(u64, u64)> {
    let tick = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let unix = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    Some((tick, unix))
}

fn repo_key(upstream: &str, repo: &RepoName) -> Vec<u8> {
    format!("{upstream}\0{repo}").into_bytes()
}

impl Index {
    /// Opens (or creates) the index at `dir`.
    pub fn open(dir: &Path) -> Result<Index, IndexError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 << 20)
            .flush_every_ms(Some(500))
            .open()?;
        Ok(Index {
            blobs: db.open_tree("blobs")?,
            manifests: db.open_tree("manifests")?,
            tags: db.open_tree("tags")?,
            repos: db.open_tree("repos")?,
            access: db.open_tree("access")?,
            pins: db.open_tree("pins")?,
            db,
        })
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<(), IndexError> {
        self.db.flush()?;
        Ok(())
    }

    /// Makes every write so far durable (an fsync of sled's log). Called after writes that a
    /// crash must not lose: committed blobs, new manifests, moved tags. Failures are logged —
    /// sled's own periodic flush still runs.
    pub async fn durable(&self) {
        if let Err(e) = self.db.flush_async().await {
            tracing::warn!(error = %e, "index flush failed");
        }
    }

    pub fn blob(&self, digest: &Digest) -> Result<Option<BlobMeta>, IndexError> {
        match self.blobs.get(digest.hex())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| IndexError::Corrupt {
                    key: digest.to_string(),
                    message: e.to_string(),
                }),
        }
    }

    /// Records a committed blob. Flushed before returning: the file is already durable.
    pub fn put_blob(&self, digest: &Digest, meta: &BlobMeta) -> Result<(), IndexError> {
        let v = serde_json::to_vec(meta).map_err(|e| IndexError::Corrupt {
            key: digest.to_string(),
            message: e.to_string(),
        })?;
        self.blobs.insert(digest.hex(), v)?;
        Ok(())
    }

    pub fn remove_blob(&self, digest: &Digest) -> Result<(), IndexError> {
        self.blobs.remove(digest.hex())?;
        Ok(())
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// Every blob record as (hex, meta); corrupt records are reported as `None` meta.
    pub fn blobs(&self) -> impl Iterator<Item = Result<(String, Option<BlobMeta>), IndexError>> {
        self.blobs.iter().map(|item| {
            let (k, v) = item?;
            Ok((
                String::from_utf8_lossy(&k).into_owned(),
                serde_json::from_slice(&v).ok(),
            ))
        })
    }

    /// Removes a blob record by hex (startup reconcile, repair).
    pub fn remove_blob_hex(&self, hex: &str) -> Result<(), IndexError> {
        self.blobs.remove(hex.as_bytes())?;
        Ok(())
    }

    /// Every access record as (key, tick, unix).
    pub fn access_records(&self) -> impl Iterator<Item = Result<(Vec<u8>, u64, u64), IndexError>> {
        self.access.iter().filter_map(|item| match item {
            Err(e) => Some(Err(e.into())),
            Ok((k, v)) => decode_access(&v).map(|(t, u)| Ok((k.to_vec(), t, u))),
        })
    }

    /// One access record.
    pub fn access(&self, key: &[u8]) -> Result<Option<(u64, u64)>, IndexError> {
        Ok(self.access.get(key)?.and_then(|v| decode_access(&v)))
    }

    /// Writes a batch of access updates (`None` deletes) in one sled batch.
    pub fn write_access<'a>(
        &self,
        updates: impl IntoIterator<Item = (&'a Vec<u8>, &'a Option<(u64, u64)>)>,
    ) -> Result<(), IndexError> {
        let mut batch = sled::Batch::default();
        for (k, v) in updates {
            match v {
                Some((tick, unix)) => {
                    let mut val = [0u8; 16];
                    val[..8].copy_from_slice(&tick.to_be_bytes());
                    val[8..].copy_from_slice(&unix.to_be_bytes());
                    batch.insert(k.as_slice(), &val[..]);
                }
                None => batch.remove(k.as_slice()),
            }
        }
        self.access.apply_batch(batch)?;
        Ok(())
    }

    /// Every manifest as (hex, stored length in bytes, media type + bytes record).
    pub fn manifest_sizes(&self) -> impl Iterator<Item = Result<(String, u64), IndexError>> {
        self.manifests.iter().map(|item| {
            let (k, v) = item?;
            let nl = v
                .iter()
                .position(|&b| b == b'\n')
                .map(|p| p + 1)
                .unwrap_or(0);
            Ok((
                String::from_utf8_lossy(&k).into_owned(),
                (v.len() - nl) as u64,
            ))
        })
    }

    /// Removes a manifest; returns the bytes it held.
    pub fn remove_manifest(&self, digest: &Digest) -> Result<u64, IndexError> {
        Ok(self
            .manifests
            .remove(digest.hex())?
            .map(|v| {
                let nl = v
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|p| p + 1)
                    .unwrap_or(0);
                (v.len() - nl) as u64
            })
            .unwrap_or(0))
    }

    /// Every tag record.
    pub fn tags(&self) -> Result<Vec<TagRecord>, IndexError> {
        let mut out = Vec::new();
        for item in self.tags.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let mut parts = key.splitn(3, '\0');
            let (Some(upstream), Some(repo), Some(tag)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(entry) = serde_json::from_slice::<TagEntry>(&v) else {
                continue;
            };
            out.push(TagRecord {
                upstream: upstream.to_owned(),
                repo: repo.to_owned(),
                tag: tag.to_owned(),
                entry,
            });
        }
        Ok(out)
    }

    /// Removes a tag record by its raw key parts.
    pub fn remove_tag_raw(&self, upstream: &str, repo: &str, tag: &str) -> Result<(), IndexError> {
        self.tags
            .remove(format!("{upstream}\0{repo}\0{tag}").as_bytes())?;
        Ok(())
    }

    /// Removes a repository record.
    pub fn remove_repo_raw(&self, upstream: &str, repo: &str) -> Result<(), IndexError> {
        self.repos
            .remove(format!("{upstream}\0{repo}").as_bytes())?;
        Ok(())
    }

    /// Pinned manifests by digest.
    pub fn pins(&self) -> Result<Vec<(Digest, Pin)>, IndexError> {
        let mut out = Vec::new();
        for item in self.pins.iter() {
            let (k, v) = item?;
            let Ok(d) = format!("sha256:{}", String::from_utf8_lossy(&k)).parse::<Digest>() else {
                continue;
            };
            if let Ok(p) = serde_json::from_slice::<Pin>(&v) {
                out.push((d, p));
            }
        }
        Ok(out)
    }

    pub fn put_pin(&self, digest: &Digest, pin: &Pin) -> Result<(), IndexError> {
        let v = serde_json::to_vec(pin).map_err(|e| IndexError::Corrupt {
            key: digest.to_string(),
            message: e.to_string(),
        })?;
        self.pins.insert(digest.hex(), v)?;
        Ok(())
    }

    /// Unpins; returns whether it was pinned.
    pub fn remove_pin(&self, digest: &Digest) -> Result<bool, IndexError> {
        Ok(self.pins.remove(digest.hex())?.is_some())
    }

    /// Manifest record layout: media type, `\n`, then the exact bytes.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, IndexError> {
        let Some(v) = self.manifests.get(digest.hex())? else {
            return Ok(None);
        };
        let corrupt = |m: &str| IndexError::Corrupt {
            key: digest.to_string(),
            message: m.to_owned(),
        };
        let nl = v
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| corrupt("no media type separator"))?;
        let media_type =
            std::str::from_utf8(&v[..nl]).map_err(|_| corrupt("media type is not UTF-8"))?;
        let bytes = Bytes::copy_from_slice(&v[nl + 1..]);
        if Digest::of(&bytes) != *digest {
            return Err(corrupt("bytes do not match the digest"));
        }
        Ok(Some(StoredManifest {
            digest: digest.clone(),
            media_type: media_type.to_owned(),
            bytes,
        }))
    }

    pub fn has_manifest(&self, digest: &Digest) -> Result<bool, IndexError> {
        Ok(self.manifests.contains_key(digest.hex())?)
    }

    pub fn put_manifest(&self, m: &StoredManifest) -> Result<(), IndexError> {
        let mut v = Vec::with_capacity(m.media_type.len() + 1 + m.bytes.len());
        v.extend_from_slice(m.media_type.as_bytes());
        v.push(b'\n');
        v.extend_from_slice(&m.bytes);
        self.manifests.insert(m.digest.hex(), v)?;
        Ok(())
    }

    pub fn tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagEntry>, IndexError> {
        let key = tag_key(upstream, repo, tag);
        match self.tags.get(&key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| IndexError::Corrupt {
                    key: format!("{upstream}/{repo}:{tag}"),
                    message: e.to_string(),
                }),
        }
    }

    pub fn put_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        entry: &TagEntry,
    ) -> Result<(), IndexError> {
        let v = serde_json::to_vec(entry).map_err(|e| IndexError::Corrupt {
            key: format!("{upstream}/{repo}:{tag}"),
            message: e.to_string(),
        })?;
        self.tags.insert(tag_key(upstream, repo, tag), v)?;
        Ok(())
    }

    /// Notes that a repository has content in the cache (no write if already known).
    pub fn touch_repo(&self, upstream: &str, repo: &RepoName) -> Result<(), IndexError> {
        let key = repo_key(upstream, repo);
        if !self.repos.contains_key(&key)? {
            self.repos.insert(key, unix_now().to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Every cached repository, ordered by (upstream, repository).
    pub fn repos(&self) -> Result<Vec<RepoEntry>, IndexError> {
        let mut out = Vec::new();
        for item in self.repos.iter() {
            let (k, _) = item?;
            let key = String::from_utf8_lossy(&k);
            if let Some((upstream, repo)) = key.split_once('\0') {
                out.push(RepoEntry {
                    upstream: upstream.to_owned(),
                    repo: repo.to_owned(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_record_kind() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(&dir.path().join("index")).unwrap();
        let d = Digest::of(b"hello");
        idx.put_blob(&d, &BlobMeta { size: 5, added: 1 }).unwrap();
        assert_eq!(idx.blob(&d).unwrap(), Some(BlobMeta { size: 5, added: 1 }));
        assert_eq!(idx.blob_count(), 1);

        let bytes = Bytes::from_static(b"{ \"schemaVersion\" : 2 }\n");
        let m = StoredManifest {
            digest: Digest::of(&bytes),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes,
        };
        idx.put_manifest(&m).unwrap();
        assert_eq!(idx.manifest(&m.digest).unwrap(), Some(m.clone()));

        let repo: RepoName = "library/alpine".parse().unwrap();
        let tag: Tag = "3.19".parse().unwrap();
        let e = TagEntry {
            digest: m.digest.to_string(),
            media_type: m.media_type.clone(),
            checked: 7,
        };
        idx.put_tag("docker.io", &repo, &tag, &e).unwrap();
        assert_eq!(idx.tag("docker.io", &repo, &tag).unwrap(), Some(e));
        assert_eq!(idx.tag("ghcr.io", &repo, &tag).unwrap(), None);

        idx.touch_repo("docker.io", &repo).unwrap();
        idx.touch_repo("docker.io", &repo).unwrap();
        assert_eq!(
            idx.repos().unwrap(),
            vec![RepoEntry {
                upstream: "docker.io".into(),
                repo: "library/alpine".into()
            }]
        );
    }
}
