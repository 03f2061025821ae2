//! [`FsStore`]: the blob store as a plain directory — a local disk for a single node, or a
//! mount every node of the fleet shares (NFS, CephFS, ...).
//!
//! Every write goes to a private temp file under `<root>/.tmp/`, is fsynced, and is then made
//! visible in one step: `rename` (replace) for `put_*`, `link` for `create` (which fails when the
//! name exists, so it is a true conditional create, also on NFS). A reader therefore sees a
//! whole object or none. The parent directory is fsynced after the rename/link. A `put_file`
//! future dropped midway removes its temp file and leaves no object; so does a crash (the temp
//! file stays in `.tmp/`, which [`FsStore::sweep_tmp`] clears). Empty directories left by
//! `delete` are not pruned: removing them could race with a concurrent writer's rename.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    validate_key, validate_prefix, BlobStore, Created, ObjectInfo, StoreError, StoreFuture,
};
use crate::stream::{file_stream, ByteStream};

/// The directory under the root holding in-progress writes; never a key.
pub const TMP_DIR: &str = crate::config::STORE_TMP_DIR;

/// Bytes copied per read while uploading a file.
const COPY_CHUNK: usize = 1 << 20;

/// A directory used as the shared blob store. Cheap to construct; directories are created on
/// first write.
#[derive(Clone, Debug)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: PathBuf) -> FsStore {
        FsStore { root }
    }

    /// The directory holding the objects.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes every temp file in `.tmp/` — leftovers of writers that crashed. Only safe when no
    /// other process is writing to this store, so it is never called implicitly.
    pub async fn sweep_tmp(&self) -> Result<usize, StoreError> {
        let tmp = self.root.join(TMP_DIR);
        blocking(move || {
            let mut removed = 0;
            let entries = match std::fs::read_dir(&tmp) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(e.into()),
            };
            for entry in entries {
                let entry = entry?;
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(removed)
        })
        .await
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// A fresh, unused temp file name under `.tmp/`.
    fn tmp_path(&self) -> PathBuf {
        let name = format!("{}-{:016x}.part", std::process::id(), rand::random::<u64>());
        self.root.join(TMP_DIR).join(name)
    }

    /// Writes `bytes` to a temp file and publishes it, all in one blocking task: small, and
    /// it either happens whole or not at all even if the caller goes away.
    async fn write_small(
        &self,
        key: &str,
        bytes: Bytes,
        exclusive: bool,
    ) -> Result<Created, StoreError> {
        let dest = self.path_of(key)?;
        let tmp_dir = self.root.join(TMP_DIR);
        let tmp_path = self.tmp_path();
        blocking(move || {
            std::fs::create_dir_all(&tmp_dir)?;
            let tmp = TempFile::new(tmp_path);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp.path)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            drop(file);
            if !exclusive {
                publish_by_rename(&tmp.path, &dest)?;
                tmp.disarm();
                return Ok(Created::Created);
            }
            let parent = parent_of(&dest)?;
            std::fs::create_dir_all(parent)?;
            match std::fs::hard_link(&tmp.path, &dest) {
                Ok(()) => {
                    sync_dir(parent)?;
                    Ok(Created::Created)
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(Created::Exists),
                Err(e) => Err(e.into()),
            }
            // `tmp` is dropped here: the temp name goes, the linked object stays.
        })
        .await
    }
}

impl BlobStore for FsStore {
    fn describe(&self) -> String {
        let abs = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
        format!("file://{}", abs.display())
    }

    fn head<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<u64>> {
        async move {
            let path = self.path_of(key)?;
            match tokio::fs::metadata(&path).await {
                Ok(m) if m.is_file() => Ok(Some(m.len())),
                Ok(_) => Ok(None),
                Err(e) if is_absent(&e) => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
        .boxed()
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: Option<u64>,
    ) -> StoreFuture<'a, Option<(u64, ByteStream)>> {
        async move {
            let path = self.path_of(key)?;
            let opened = blocking(move || {
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if is_absent(&e) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                let meta = file.metadata()?;
                if !meta.is_file() {
                    return Ok(None);
                }
                Ok(Some((file, meta.len())))
            })
            .await?;
            let Some((file, size)) = opened else {
                return Ok(None);
            };
            if offset > size {
                return Err(StoreError::Refused(format!(
                    "{key}: offset {offset} is beyond the end ({size} bytes)"
                )));
            }
            let available = size - offset;
            let n = len.map_or(available, |l| l.min(available));
            Ok(Some((size, file_stream(file, offset, n))))
        }
        .boxed()
    }

    fn get_bytes<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        async move {
            let path = self.path_of(key)?;
            match tokio::fs::read(&path).await {
                Ok(v) => Ok(Some(Bytes::from(v))),
                Err(e) if is_absent(&e) || e.kind() == ErrorKind::IsADirectory => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
        .boxed()
    }

    /// Copies `src` into a temp file chunk by chunk on the runtime (so that dropping the future
    /// stops the copy), fsyncs it and renames it into place.
    fn put_file<'a>(&'a self, key: &'a str, src: &'a Path) -> StoreFuture<'a, ()> {
        async move {
            let dest = self.path_of(key)?;
            let mut input = tokio::fs::File::open(src).await?;
            tokio::fs::create_dir_all(self.root.join(TMP_DIR)).await?;
            let tmp = TempFile::new(self.tmp_path());
            let mut output = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp.path)
                .await?;
            let mut buf = BytesMut::with_capacity(COPY_CHUNK);
            loop {
                buf.clear();
                if input.read_buf(&mut buf).await? == 0 {
                    break;
                }
                output.write_all(&buf).await?;
            }
            output.flush().await?;
            output.sync_all().await?;
            drop(output);
            let tmp_path = tmp.path.clone();
            blocking(move || {
                publish_by_rename(&tmp_path, &dest)?;
                Ok(())
            })
            .await?;
            tmp.disarm();
            Ok(())
        }
        .boxed()
    }

    fn put_bytes<'a>(&'a self, key: &'a str, bytes: Bytes) -> StoreFuture<'a, ()> {
        async move { self.write_small(key, bytes, false).await.map(|_| ()) }.boxed()
    }

    fn create<'a>(&'a self, key: &'a str, bytes: Bytes) -> StoreFuture<'a, Created> {
        self.write_small(key, bytes, true).boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        async move {
            let path = self.path_of(key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => Ok(()),
                Err(e) if is_absent(&e) => Ok(()),
                Err(e) => match tokio::fs::metadata(&path).await {
                    // A directory is not an object: nothing to delete under this key.
                    Ok(m) if m.is_dir() => Ok(()),
                    _ => Err(e.into()),
                },
            }
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectInfo>> {
        async move {
            validate_prefix(prefix)?;
            let root = self.root.clone();
            let prefix = prefix.to_owned();
            blocking(move || {
                // Only the directory the prefix names for sure needs walking.
                let base = match prefix.rfind('/') {
                    Some(i) => &prefix[..i],
                    None => "",
                };
                let mut out = Vec::new();
                let mut stack = vec![(root.join(base), base.to_owned())];
                while let Some((dir, rel)) = stack.pop() {
                    let entries = match std::fs::read_dir(&dir) {
                        Ok(e) => e,
                        Err(e) if is_absent(&e) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    for entry in entries {
                        let entry = entry?;
                        let Ok(name) = entry.file_name().into_string() else {
                            continue; // not a key this store could have written
                        };
                        if rel.is_empty() && name == TMP_DIR {
                            continue;
                        }
                        let key = if rel.is_empty() {
                            name
                        } else {
                            format!("{rel}/{name}")
                        };
                        let meta = match std::fs::metadata(entry.path()) {
                            Ok(m) => m,
                            Err(e) if is_absent(&e) => continue, // deleted meanwhile
                            Err(e) => return Err(e.into()),
                        };
                        if meta.is_dir() {
                            if key.starts_with(&prefix) || prefix.starts_with(&format!("{key}/")) {
                                stack.push((entry.path(), key));
                            }
                        } else if meta.is_file() && key.starts_with(&prefix) {
                            out.push(ObjectInfo {
                                key,
                                size: meta.len(),
                            });
                        }
                    }
                }
                out.sort_by(|a, b| a.key.cmp(&b.key));
                Ok(out)
            })
            .await
        }
        .boxed()
    }
}

/// A temp file removed on drop unless [`disarm`](Self::disarm)ed after being published.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    fn new(path: PathBuf) -> TempFile {
        TempFile { path, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Renames the (fsynced) temp file over `dest` and fsyncs `dest`'s directory.
fn publish_by_rename(tmp: &Path, dest: &Path) -> std::io::Result<()> {
    let parent = parent_of(dest)?;
    std::fs::create_dir_all(parent)?;
    std::fs::rename(tmp, dest)?;
    sync_dir(parent)
}

fn parent_of(path: &Path) -> std::io::Result<&Path> {
    path.parent()
        .ok_or_else(|| std::io::Error::other("object path has no parent directory"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Not there: missing, or a path component is a file (`a` exists, `a/b` was asked for).
fn is_absent(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(format!("blocking task failed: {e}"))))?
}

#[cfg(test)]
mod tests {
    use futures_util::TryStreamExt;

    use super::*;

    async fn read_all(stream: ByteStream) -> Vec<u8> {
        let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
        chunks.concat()
    }

    #[tokio::test]
    async fn writes_are_published_whole_and_temp_files_do_not_linger() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().join("shared"));
        store
            .put_bytes("tags/docker.io/library/alpine/3", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, vec![7u8; 3 * COPY_CHUNK + 5]).unwrap();
        store.put_file("blobs/sha256/aa", &src).await.unwrap();
        assert_eq!(
            store.head("blobs/sha256/aa").await.unwrap(),
            Some(3 * COPY_CHUNK as u64 + 5)
        );
        let (size, stream) = store
            .get("blobs/sha256/aa", 5, Some(3))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(size, 3 * COPY_CHUNK as u64 + 5);
        assert_eq!(read_all(stream).await, vec![7u8; 3]);
        assert_eq!(
            store
                .create("leases/x", Bytes::from_static(b"a"))
                .await
                .unwrap(),
            Created::Created
        );
        assert_eq!(
            store
                .create("leases/x", Bytes::from_static(b"b"))
                .await
                .unwrap(),
            Created::Exists
        );
        assert_eq!(
            store.get_bytes("leases/x").await.unwrap().unwrap(),
            Bytes::from_static(b"a")
        );
        let tmp = dir.path().join("shared").join(TMP_DIR);
        assert_eq!(
            std::fs::read_dir(&tmp).unwrap().count(),
            0,
            "temp files left"
        );
        let keys: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(
            keys,
            [
                "blobs/sha256/aa",
                "leases/x",
                "tags/docker.io/library/alpine/3"
            ]
        );
        assert!(
            store.describe().starts_with("file:///"),
            "{}",
            store.describe()
        );
    }

    #[tokio::test]
    async fn a_failed_upload_leaves_neither_object_nor_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().to_path_buf());
        let missing = dir.path().join("no-such-file");
        assert!(matches!(
            store.put_file("blobs/x", &missing).await,
            Err(StoreError::Io(_))
        ));
        // A directory as the source fails while reading, after the temp file exists.
        let src_dir = dir.path().join("a-dir");
        std::fs::create_dir(&src_dir).unwrap();
        assert!(store.put_file("blobs/x", &src_dir).await.is_err());
        assert_eq!(store.head("blobs/x").await.unwrap(), None);
        let tmp = dir.path().join(TMP_DIR);
        let left = std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "temp files left");
        assert!(store
            .list("")
            .await
            .unwrap()
            .iter()
            .all(|o| o.key != "blobs/x"));
    }

    #[tokio::test]
    async fn keys_outside_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().join("root"));
        for key in ["../escape", "/abs", "a//b", ".tmp/x", ""] {
            assert!(
                matches!(
                    store.put_bytes(key, Bytes::new()).await,
                    Err(StoreError::Refused(_))
                ),
                "{key:?}"
            );
            assert!(matches!(store.head(key).await, Err(StoreError::Refused(_))));
        }
        assert!(!dir.path().join("escape").exists());
        assert!(matches!(
            store.list("../").await,
            Err(StoreError::Refused(_))
        ));
    }

    #[tokio::test]
    async fn a_key_under_a_file_is_absent_and_sweep_clears_crash_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().to_path_buf());
        store
            .put_bytes("a", Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert_eq!(store.head("a/b").await.unwrap(), None);
        assert_eq!(store.get_bytes("a/b").await.unwrap(), None);
        assert!(store.get("a/b", 0, None).await.unwrap().is_none());
        store.delete("a/b").await.unwrap();
        std::fs::write(dir.path().join(TMP_DIR).join("1-dead.part"), b"half").unwrap();
        assert_eq!(store.sweep_tmp().await.unwrap(), 1);
        assert_eq!(store.list("").await.unwrap().len(), 1);
    }
}
