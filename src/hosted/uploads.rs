//! Blob upload sessions: files, not memory. A session is `uploads/<id>` (the bytes received so
//! far) and `uploads/<id>.repo` (the repository it was opened for); the body of every request is
//! appended as it streams and hashed as it goes. A request whose body breaks off is undone to the
//! offset it started at, so a session's file is always the bytes acknowledged so far. After a
//! restart a session resumes: its hash is recomputed from its file on first use (sha2's state
//! cannot be saved). Sessions idle past `upload_timeout` are purged with their files.
//!
//! Every byte held by a session counts in the hosted budget ([`Quota`]) while it is held; a
//! request that would pass the budget is refused before its bytes are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::oci::{Digest, ErrorCode, RegistryError, RepoName};

/// How much of an upload body is gathered before it is written to the session's file.
const WRITE_BUFFER: usize = 1 << 20;

/// The bytes hosted content may take: committed blobs and manifests plus open uploads.
#[derive(Debug)]
pub struct Quota {
    max: u64,
    used: AtomicU64,
}

impl Quota {
    pub fn new(max: u64) -> Quota {
        Quota {
            max,
            used: AtomicU64::new(0),
        }
    }

    /// Takes `n` bytes, or refuses (nothing taken) when they do not fit.
    pub fn take(&self, n: u64) -> Result<(), RegistryError> {
        let mut current = self.used.load(Ordering::Relaxed);
        loop {
            let next = current.saturating_add(n);
            if next > self.max {
                return Err(full(self.max));
            }
            match self
                .used
                .compare_exchange(current, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    /// Refuses, taking nothing, when `n` more bytes would not fit now.
    pub fn check(&self, n: u64) -> Result<(), RegistryError> {
        if self.used().saturating_add(n) > self.max {
            return Err(full(self.max));
        }
        Ok(())
    }

    /// The bytes that still fit.
    pub fn room(&self) -> u64 {
        self.max.saturating_sub(self.used())
    }

    /// Gives `n` bytes back.
    pub fn give(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Counts bytes already on disk (at open), without a limit check.
    pub fn add(&self, n: u64) {
        self.used.fetch_add(n, Ordering::AcqRel);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn max(&self) -> u64 {
        self.max
    }
}

fn full(max: u64) -> RegistryError {
    RegistryError::new(
        ErrorCode::Denied,
        format!("hosted storage is full (hosted.max_size = {max} bytes): delete images or raise the limit"),
    )
    .with_status(507)
}

fn unknown(id: &str) -> RegistryError {
    RegistryError::new(
        ErrorCode::BlobUploadUnknown,
        format!(
            "upload {} is unknown (finished, cancelled or expired)",
            crate::oci::digest::truncate(id)
        ),
    )
}

fn internal(what: &str, e: impl std::fmt::Display) -> RegistryError {
    tracing::error!(error = %e, "hosted upload: {what}");
    RegistryError::new(ErrorCode::Unknown, format!("{what}: {e}"))
}

/// One open upload.
#[derive(Debug)]
pub struct Session {
    pub id: String,
    pub repo: RepoName,
    path: PathBuf,
    /// Bytes held (the file's length).
    pub offset: u64,
    /// The hash of the first `offset` bytes; `None` until recomputed after a restart or an
    /// undone request.
    hasher: Option<Sha256>,
    touched: Instant,
    /// Set once finished or cancelled: a request that waited for the lock finds it gone.
    closed: bool,
}

/// A finished upload: the verified file, ready to be moved into the blob layout.
#[derive(Debug)]
pub struct Finished {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
}

/// The open sessions.
pub struct Uploads {
    dir: PathBuf,
    quota: Arc<Quota>,
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
    count: AtomicU64,
}

impl Uploads {
    /// Opens `dir`, resuming the sessions it holds (their bytes counted in `quota`).
    pub fn open(dir: &Path, quota: Arc<Quota>) -> std::io::Result<Uploads> {
        std::fs::create_dir_all(dir)?;
        let uploads = Uploads {
            dir: dir.to_path_buf(),
            quota,
            sessions: Mutex::new(HashMap::new()),
            count: AtomicU64::new(0),
        };
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".repo"))
            else {
                continue;
            };
            let data = dir.join(id);
            let repo = std::fs::read_to_string(&path)
                .ok()
                .and_then(|r| r.trim().parse::<RepoName>().ok());
            let (Some(repo), Ok(meta)) = (repo, std::fs::metadata(&data)) else {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(&data);
                continue;
            };
            uploads.quota.add(meta.len());
            uploads.insert(Session {
                id: id.to_string(),
                repo,
                path: data,
                offset: meta.len(),
                hasher: None,
                touched: Instant::now(),
                closed: false,
            });
        }
        // Data files without a `.repo` record were never acknowledged.
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !name.ends_with(".repo") && !uploads.lock().contains_key(name) {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(uploads)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<Session>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, s: Session) {
        self.lock()
            .insert(s.id.clone(), Arc::new(tokio::sync::Mutex::new(s)));
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Open sessions.
    pub fn in_progress(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Opens a session for `repo`.
    pub async fn create(&self, repo: &RepoName) -> Result<String, RegistryError> {
        let id = new_id();
        let data = self.dir.join(&id);
        tokio::fs::File::create(&data)
            .await
            .map_err(|e| internal("creating an upload file", e))?;
        tokio::fs::write(self.dir.join(format!("{id}.repo")), repo.as_str())
            .await
            .map_err(|e| internal("recording an upload", e))?;
        self.insert(Session {
            id: id.clone(),
            repo: repo.clone(),
            path: data,
            offset: 0,
            hasher: Some(Sha256::new()),
            touched: Instant::now(),
            closed: false,
        });
        Ok(id)
    }

    /// The session `id` of `repo`, locked. Another repository's id is unknown here.
    pub async fn get(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<Session>, RegistryError> {
        let session = self.lock().get(id).cloned().ok_or_else(|| unknown(id))?;
        let guard = session.lock_owned().await;
        if guard.closed || &guard.repo != repo {
            return Err(unknown(id));
        }
        Ok(guard)
    }

    /// Appends a request body at `start` (the `Content-Range` start, if the client sent one).
    /// `length` is the body's announced length: checked against the budget up front and against
    /// what arrived. A body that breaks off, is not as long as announced, or passes the budget
    /// is undone to where it started.
    pub async fn append<S, E>(
        &self,
        s: &mut Session,
        start: Option<u64>,
        length: Option<u64>,
        body: S,
    ) -> Result<(), RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        if let Some(start) = start {
            if start != s.offset {
                return Err(RegistryError::new(
                    ErrorCode::RangeInvalid,
                    format!(
                        "chunk starts at {start}, but the upload holds {} bytes",
                        s.offset
                    ),
                ));
            }
        }
        if let Some(n) = length {
            // Checked, not taken: bytes are taken as they arrive.
            self.quota.check(n)?;
        }
        s.touched = Instant::now();
        let before = s.offset;
        let written = self.write_body(s, body).await.and_then(|()| {
            let got = s.offset - before;
            match length {
                Some(n) if n != got => Err(RegistryError::new(
                    ErrorCode::BlobUploadInvalid,
                    format!("the request announced {n} bytes but carried {got}"),
                )),
                _ => Ok(()),
            }
        });
        if written.is_err() {
            self.undo(s, before).await;
        }
        written
    }

    async fn write_body<S, E>(&self, s: &mut Session, body: S) -> Result<(), RegistryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        ensure_hashed(s).await?;
        let file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&s.path)
            .await
            .map_err(|e| internal("opening an upload file", e))?;
        // Bodies arrive in chunks of a few KiB: coalesce them into large writes, each one a
        // round trip to the blocking pool. Bytes still buffered when the body breaks off are
        // dropped with the writer; the caller cuts the file back to where the request began.
        let mut file = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                RegistryError::new(
                    ErrorCode::BlobUploadInvalid,
                    format!("the request body broke off: {e}"),
                )
            })?;
            self.quota.take(chunk.len() as u64)?;
            file.write_all(&chunk)
                .await
                .map_err(|e| internal("writing an upload file", e))?;
            if let Some(h) = s.hasher.as_mut() {
                h.update(&chunk);
            }
            s.offset += chunk.len() as u64;
        }
        file.flush()
            .await
            .map_err(|e| internal("writing an upload file", e))?;
        s.touched = Instant::now();
        Ok(())
    }

    /// Cuts the file back to `offset` and gives back the bytes past it.
    async fn undo(&self, s: &mut Session, offset: u64) {
        if s.offset > offset {
            self.quota.give(s.offset - offset);
        }
        let cut = async {
            let f = tokio::fs::OpenOptions::new()
                .write(true)
                .open(&s.path)
                .await?;
            f.set_len(offset).await
        };
        if let Err(e) = cut.await {
            tracing::warn!(error = %e, upload = %s.id, "could not undo a broken upload request");
        }
        s.offset = offset;
        s.hasher = None;
    }

    /// Closes the session and checks its bytes against `digest`: the file is fsynced and handed
    /// over (its bytes stay counted in the budget). On a mismatch nothing is kept.
    pub async fn finish(
        &self,
        mut s: tokio::sync::OwnedMutexGuard<Session>,
        digest: &Digest,
    ) -> Result<Finished, RegistryError> {
        let result = self.verify(&mut s, digest).await;
        s.closed = true;
        self.forget(&s.id).await;
        match result {
            Ok(()) => Ok(Finished {
                path: s.path.clone(),
                digest: digest.clone(),
                size: s.offset,
            }),
            Err(e) => {
                self.quota.give(s.offset);
                let _ = tokio::fs::remove_file(&s.path).await;
                Err(e)
            }
        }
    }

    async fn verify(&self, s: &mut Session, digest: &Digest) -> Result<(), RegistryError> {
        ensure_hashed(s).await?;
        let path = s.path.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(path)?.sync_all())
            .await
            .map_err(|e| internal("fsync of an upload", e))?
            .map_err(|e| internal("fsync of an upload", e))?;
        let got = Digest::from_hasher(s.hasher.take().unwrap_or_default());
        if &got != digest {
            return Err(RegistryError::new(
                ErrorCode::DigestInvalid,
                format!(
                    "the upload's {} bytes hash to {got}, not {digest}",
                    s.offset
                ),
            ));
        }
        Ok(())
    }

    /// Cancels the session: its file goes, its bytes are given back.
    pub async fn cancel(&self, mut s: tokio::sync::OwnedMutexGuard<Session>) {
        s.closed = true;
        self.forget(&s.id).await;
        self.quota.give(s.offset);
        let _ = tokio::fs::remove_file(&s.path).await;
    }

    /// Drops the session record (the data file is the caller's).
    async fn forget(&self, id: &str) {
        if self.lock().remove(id).is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        let _ = tokio::fs::remove_file(self.dir.join(format!("{id}.repo"))).await;
    }

    /// Purges sessions idle for `timeout` (a session in use is skipped); how many went.
    pub async fn purge_idle(&self, timeout: Duration) -> usize {
        let sessions: Vec<_> = self.lock().values().cloned().collect();
        let mut purged = 0;
        for session in sessions {
            let Ok(guard) = session.try_lock_owned() else {
                continue;
            };
            if !guard.closed && guard.touched.elapsed() >= timeout {
                self.cancel(guard).await;
                purged += 1;
            }
        }
        purged
    }
}

/// Recomputes the hash of a session's file when it is not known (after a restart or an undo).
async fn ensure_hashed(s: &mut Session) -> Result<(), RegistryError> {
    if s.hasher.is_some() {
        return Ok(());
    }
    let path = s.path.clone();
    let len = s.offset;
    let hasher = tokio::task::spawn_blocking(move || -> std::io::Result<Sha256> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?.take(len);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(h);
            }
            h.update(&buf[..n]);
        }
    })
    .await
    .map_err(|e| internal("hashing an upload", e))?
    .map_err(|e| internal("hashing an upload", e))?;
    s.hasher = Some(hasher);
    Ok(())
}

/// A random session id in UUID form (what `Docker-Upload-UUID` usually carries).
fn new_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Whether `id` looks like one of ours (anything else is unknown without a lookup).
pub fn is_session_id(id: &str) -> bool {
    id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn chunks_append_in_order_and_the_digest_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let quota = Arc::new(Quota::new(1 << 20));
        let up = Uploads::open(dir.path(), quota.clone()).unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let id = up.create(&repo).await.unwrap();
        assert!(is_session_id(&id));
        let mut s = up.get(&repo, &id).await.unwrap();
        up.append(&mut s, Some(0), Some(5), body(&[b"hel", b"lo"]))
            .await
            .unwrap();
        let err = up
            .append(&mut s, Some(3), None, body(&[b"x"]))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::RangeInvalid);
        up.append(&mut s, Some(5), None, body(&[b" world"]))
            .await
            .unwrap();
        assert_eq!(s.offset, 11);
        drop(s);
        let other: RepoName = "team/other".parse().unwrap();
        assert_eq!(
            up.get(&other, &id).await.unwrap_err().code,
            ErrorCode::BlobUploadUnknown
        );
        let s = up.get(&repo, &id).await.unwrap();
        let f = up.finish(s, &Digest::of(b"hello world")).await.unwrap();
        assert_eq!(std::fs::read(&f.path).unwrap(), b"hello world");
        assert_eq!(quota.used(), 11);
        assert_eq!(
            up.get(&repo, &id).await.unwrap_err().code,
            ErrorCode::BlobUploadUnknown
        );
    }

    #[tokio::test]
    async fn a_wrong_digest_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let quota = Arc::new(Quota::new(1 << 20));
        let up = Uploads::open(dir.path(), quota.clone()).unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let id = up.create(&repo).await.unwrap();
        let mut s = up.get(&repo, &id).await.unwrap();
        up.append(&mut s, None, None, body(&[b"abc"]))
            .await
            .unwrap();
        let e = up.finish(s, &Digest::of(b"abd")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::DigestInvalid);
        assert_eq!(quota.used(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_broken_body_is_undone_and_a_restart_resumes_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let quota = Arc::new(Quota::new(1 << 20));
        let repo: RepoName = "team/app".parse().unwrap();
        let id = {
            let up = Uploads::open(dir.path(), quota.clone()).unwrap();
            let id = up.create(&repo).await.unwrap();
            let mut s = up.get(&repo, &id).await.unwrap();
            up.append(&mut s, None, None, body(&[b"abc"]))
                .await
                .unwrap();
            let broken = futures_util::stream::iter(vec![
                Ok(Bytes::from_static(b"def")),
                Err(std::io::Error::other("reset")),
            ]);
            let e = up.append(&mut s, None, None, broken).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::BlobUploadInvalid);
            assert_eq!(s.offset, 3);
            id
        };
        let quota = Arc::new(Quota::new(1 << 20));
        let up = Uploads::open(dir.path(), quota.clone()).unwrap();
        assert_eq!(quota.used(), 3);
        let mut s = up.get(&repo, &id).await.unwrap();
        up.append(&mut s, Some(3), None, body(&[b"def"]))
            .await
            .unwrap();
        up.finish(s, &Digest::of(b"abcdef")).await.unwrap();
    }

    #[tokio::test]
    async fn the_budget_refuses_before_keeping_and_idle_sessions_are_purged() {
        let dir = tempfile::tempdir().unwrap();
        let quota = Arc::new(Quota::new(4));
        let up = Uploads::open(dir.path(), quota.clone()).unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let id = up.create(&repo).await.unwrap();
        let mut s = up.get(&repo, &id).await.unwrap();
        let e = up
            .append(&mut s, None, Some(5), body(&[b"12345"]))
            .await
            .unwrap_err();
        assert_eq!(e.status(), 507);
        let e = up
            .append(&mut s, None, None, body(&[b"123", b"45"]))
            .await
            .unwrap_err();
        assert_eq!(e.status(), 507);
        assert_eq!((s.offset, quota.used()), (0, 0));
        drop(s);
        assert_eq!(up.purge_idle(Duration::from_secs(3600)).await, 0);
        assert_eq!(up.purge_idle(Duration::ZERO).await, 1);
        assert_eq!(up.in_progress(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
