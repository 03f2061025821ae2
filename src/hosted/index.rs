//! The durable records of hosted repositories, in a sled database of their own (the cache's
//! index and its eviction never see them):
//!
//! - `blobs`: hex → size, one record per blob file under `hosted/blobs/` (what
//!   `hosted.max_size` counts);
//! - `links`: `repo \0 hex` → size and unix seconds of the link, the blobs pushed into (or mounted into) a repository — a
//!   blob is visible in a repository only through its link;
//! - `manifests`: hex → media type and bytes, stored byte-exact;
//! - `mlinks`: `repo \0 hex` → unix seconds of the push: the manifests a repository holds;
//! - `tags`: `repo \0 tag` → hex.
//!
//! Writers call [`HostedIndex::flush`] before acknowledging: a `201` is only sent for records
//! that are on disk.

use std::path::Path;

use crate::oci::{Digest, RepoName, Tag};

/// A sled failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("hosted index: {0}")]
pub struct IndexError(#[from] sled::Error);

/// A manifest as pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: bytes::Bytes,
}

/// The hosted records. Cheap to clone (sled trees are handles).
#[derive(Clone)]
pub struct HostedIndex {
    db: sled::Db,
    blobs: sled::Tree,
    links: sled::Tree,
    manifests: sled::Tree,
    mlinks: sled::Tree,
    tags: sled::Tree,
}

fn key(repo: &str, rest: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(repo.len() + 1 + rest.len());
    k.extend_from_slice(repo.as_bytes());
    k.push(0);
    k.extend_from_slice(rest.as_bytes());
    k
}

fn prefix(repo: &str) -> Vec<u8> {
    key(repo, "")
}

fn split_key(k: &[u8]) -> Option<(String, String)> {
    let at = k.iter().position(|b| *b == 0)?;
    let repo = std::str::from_utf8(&k[..at]).ok()?.to_string();
    let rest = std::str::from_utf8(&k[at + 1..]).ok()?.to_string();
    Some((repo, rest))
}

fn u64_of(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn encode_manifest(media_type: &str, bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + media_type.len() + bytes.len());
    let len = u16::try_from(media_type.len()).unwrap_or(u16::MAX);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&media_type.as_bytes()[..usize::from(len)]);
    v.extend_from_slice(bytes);
    v
}

fn decode_manifest(digest: Digest, v: &[u8]) -> Option<StoredManifest> {
    let len = usize::from(u16::from_be_bytes(v.get(..2)?.try_into().ok()?));
    let media_type = std::str::from_utf8(v.get(2..2 + len)?).ok()?.to_string();
    let bytes = bytes::Bytes::copy_from_slice(v.get(2 + len..)?);
    Some(StoredManifest {
        digest,
        media_type,
        bytes,
    })
}

impl HostedIndex {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<HostedIndex, IndexError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 << 20)
            .open()?;
        Ok(HostedIndex {
            blobs: db.open_tree("blobs")?,
            links: db.open_tree("links")?,
            manifests: db.open_tree("manifests")?,
            mlinks: db.open_tree("mlinks")?,
            tags: db.open_tree("tags")?,
            db,
        })
    }

    /// Makes every record written so far durable. The wait runs on a blocking thread of ours,
    /// never on sled's own thread pool (as `flush_async` would), where concurrent waits would
    /// take every thread from the log write they wait for.
    pub async fn flush(&self) -> Result<(), IndexError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| sled::Error::Io(std::io::Error::other(e.to_string())))??;
        Ok(())
    }

    /// [`flush`](Self::flush) for a blocking caller.
    pub fn flush_blocking(&self) -> Result<(), IndexError> {
        self.db.flush()?;
        Ok(())
    }

    /// The size of a hosted blob file's record.
    pub fn blob(&self, digest: &Digest) -> Result<Option<u64>, IndexError> {
        Ok(self.blobs.get(digest.hex())?.map(|v| u64_of(&v)))
    }

    /// Records a blob file; true when it was new.
    pub fn put_blob(&self, digest: &Digest, size: u64) -> Result<bool, IndexError> {
        Ok(self
            .blobs
            .insert(digest.hex(), &size.to_be_bytes())?
            .is_none())
    }

    /// Forgets a blob file's record.
    pub fn remove_blob(&self, digest: &Digest) -> Result<(), IndexError> {
        self.blobs.remove(digest.hex())?;
        Ok(())
    }

    /// Every blob record: (digest, size).
    pub fn blobs(&self) -> Result<Vec<(Digest, u64)>, IndexError> {
        let mut out = Vec::new();
        for kv in self.blobs.iter() {
            let (k, v) = kv?;
            let Some(d) = std::str::from_utf8(&k)
                .ok()
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
            else {
                continue;
            };
            out.push((d, u64_of(&v)));
        }
        Ok(out)
    }

    /// Whether `repo` links `digest` (a blob pushed or mounted there), with its size.
    pub fn link(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, IndexError> {
        Ok(self
            .links
            .get(key(repo.as_str(), digest.hex()))?
            .map(|v| u64_of(v.get(..8).unwrap_or(&[]))))
    }

    /// Links `digest` into `repo` (linked now: young links survive `gc`'s grace period).
    pub fn put_link(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<(), IndexError> {
        let mut v = size.to_be_bytes().to_vec();
        v.extend_from_slice(&super::now_secs().to_be_bytes());
        self.links.insert(key(repo.as_str(), digest.hex()), v)?;
        Ok(())
    }

    /// Removes a blob link; true when there was one.
    pub fn remove_link(&self, repo: &RepoName, digest: &Digest) -> Result<bool, IndexError> {
        Ok(self
            .links
            .remove(key(repo.as_str(), digest.hex()))?
            .is_some())
    }

    /// Every blob link: (repository, hex, linked at).
    pub fn all_links(&self) -> Result<Vec<(String, String, u64)>, IndexError> {
        let mut out = Vec::new();
        for kv in self.links.iter() {
            let (k, v) = kv?;
            if let Some((repo, hex)) = split_key(&k) {
                out.push((repo, hex, u64_of(v.get(8..16).unwrap_or(&[]))));
            }
        }
        Ok(out)
    }

    /// Removes a link given as raw names (for `gc`).
    pub fn remove_link_raw(&self, repo: &str, hex: &str) -> Result<(), IndexError> {
        self.links.remove(key(repo, hex))?;
        Ok(())
    }

    /// Removes a manifest link given as raw names (for `gc`).
    pub fn remove_mlink_raw(&self, repo: &str, hex: &str) -> Result<(), IndexError> {
        self.mlinks.remove(key(repo, hex))?;
        Ok(())
    }

    /// The manifest with `digest`, wherever it was pushed.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, IndexError> {
        Ok(self
            .manifests
            .get(digest.hex())?
            .and_then(|v| decode_manifest(digest.clone(), &v)))
    }

    /// Stores a manifest's bytes (idempotent: same digest, same bytes); true when it was new.
    pub fn put_manifest(&self, m: &StoredManifest) -> Result<bool, IndexError> {
        Ok(self
            .manifests
            .insert(m.digest.hex(), encode_manifest(&m.media_type, &m.bytes))?
            .is_none())
    }

    /// Removes a manifest's bytes; the size it had.
    pub fn remove_manifest(&self, digest: &Digest) -> Result<u64, IndexError> {
        Ok(self
            .manifests
            .remove(digest.hex())?
            .map_or(0, |v| v.len().saturating_sub(2) as u64))
    }

    /// Every stored manifest's hex and stored size.
    pub fn manifest_sizes(&self) -> Result<Vec<(String, u64)>, IndexError> {
        let mut out = Vec::new();
        for kv in self.manifests.iter() {
            let (k, v) = kv?;
            if let Ok(hex) = std::str::from_utf8(&k) {
                out.push((hex.to_string(), v.len().saturating_sub(2) as u64));
            }
        }
        Ok(out)
    }

    /// Whether `repo` holds the manifest `digest`.
    pub fn has_mlink(&self, repo: &RepoName, digest: &Digest) -> Result<bool, IndexError> {
        Ok(self.mlinks.contains_key(key(repo.as_str(), digest.hex()))?)
    }

    pub fn put_mlink(&self, repo: &RepoName, digest: &Digest, at: u64) -> Result<(), IndexError> {
        self.mlinks
            .insert(key(repo.as_str(), digest.hex()), &at.to_be_bytes())?;
        Ok(())
    }

    pub fn remove_mlink(&self, repo: &RepoName, digest: &Digest) -> Result<bool, IndexError> {
        Ok(self
            .mlinks
            .remove(key(repo.as_str(), digest.hex()))?
            .is_some())
    }

    /// The manifests `repo` holds, by hex.
    pub fn mlinks_of(&self, repo: &RepoName) -> Result<Vec<String>, IndexError> {
        let mut out = Vec::new();
        for kv in self.mlinks.scan_prefix(prefix(repo.as_str())) {
            let (k, _) = kv?;
            if let Some((_, hex)) = split_key(&k) {
                out.push(hex);
            }
        }
        Ok(out)
    }

    /// Every manifest link: (repository, hex, pushed at).
    pub fn all_mlinks(&self) -> Result<Vec<(String, String, u64)>, IndexError> {
        let mut out = Vec::new();
        for kv in self.mlinks.iter() {
            let (k, v) = kv?;
            if let Some((repo, hex)) = split_key(&k) {
                out.push((repo, hex, u64_of(&v)));
            }
        }
        Ok(out)
    }

    /// The digest `repo:tag` points to.
    pub fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>, IndexError> {
        Ok(self
            .tags
            .get(key(repo.as_str(), tag.as_str()))?
            .and_then(|v| {
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|hex| format!("sha256:{hex}").parse().ok())
            }))
    }

    pub fn put_tag(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<(), IndexError> {
        self.tags
            .insert(key(repo.as_str(), tag.as_str()), digest.hex())?;
        Ok(())
    }

    pub fn remove_tag(&self, repo: &RepoName, tag: &str) -> Result<bool, IndexError> {
        Ok(self.tags.remove(key(repo.as_str(), tag))?.is_some())
    }

    /// The tags of `repo` with their digests' hex, in lexical order.
    pub fn tags_of(&self, repo: &RepoName) -> Result<Vec<(String, String)>, IndexError> {
        let mut out = Vec::new();
        for kv in self.tags.scan_prefix(prefix(repo.as_str())) {
            let (k, v) = kv?;
            if let (Some((_, tag)), Ok(hex)) = (split_key(&k), std::str::from_utf8(&v)) {
                out.push((tag, hex.to_string()));
            }
        }
        Ok(out)
    }

    /// Every tag: (repository, tag, hex).
    pub fn all_tags(&self) -> Result<Vec<(String, String, String)>, IndexError> {
        let mut out = Vec::new();
        for kv in self.tags.iter() {
            let (k, v) = kv?;
            if let (Some((repo, tag)), Ok(hex)) = (split_key(&k), std::str::from_utf8(&v)) {
                out.push((repo, tag, hex.to_string()));
            }
        }
        Ok(out)
    }

    /// Repositories holding at least one manifest, sorted.
    pub fn repositories(&self) -> Result<Vec<String>, IndexError> {
        let mut out: Vec<String> = Vec::new();
        for kv in self.mlinks.iter() {
            let (k, _) = kv?;
            if let Some((repo, _)) = split_key(&k) {
                if out.last() != Some(&repo) {
                    out.push(repo);
                }
            }
        }
        out.dedup();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        format!("sha256:{}", hex::encode([n; 32])).parse().unwrap()
    }

    #[test]
    fn records_round_trip_and_stay_per_repository() {
        let dir = tempfile::tempdir().unwrap();
        let idx = HostedIndex::open(dir.path()).unwrap();
        let a: RepoName = "team/a".parse().unwrap();
        let b: RepoName = "team/ab".parse().unwrap();
        assert!(idx.put_blob(&d(1), 5).unwrap());
        assert!(!idx.put_blob(&d(1), 5).unwrap());
        idx.put_link(&a, &d(1), 5).unwrap();
        assert_eq!(idx.link(&a, &d(1)).unwrap(), Some(5));
        assert_eq!(idx.link(&b, &d(1)).unwrap(), None);
        let m = StoredManifest {
            digest: d(2),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: bytes::Bytes::from_static(b"{}"),
        };
        idx.put_manifest(&m).unwrap();
        assert_eq!(idx.manifest(&d(2)).unwrap(), Some(m));
        idx.put_mlink(&a, &d(2), 7).unwrap();
        let latest: Tag = "latest".parse().unwrap();
        idx.put_tag(&a, &latest, &d(2)).unwrap();
        idx.put_tag(&b, &latest, &d(2)).unwrap();
        idx.put_mlink(&b, &d(2), 7).unwrap();
        assert_eq!(
            idx.tags_of(&a).unwrap(),
            vec![("latest".into(), d(2).hex().to_string())]
        );
        assert_eq!(idx.repositories().unwrap(), vec!["team/a", "team/ab"]);
        assert_eq!(idx.tag(&b, &latest).unwrap(), Some(d(2)));
    }
}
