//! `stowage prefetch REF... [--file] [--platform ...|--all-platforms] [--pin]
//! [--with-referrers]`: images into the cache ahead of their first pull (with their
//! signatures, SBOMs and attestations, see [`super::referrers`]).
//!
//! Each image goes through a [`Mirror`]: the one of a `serve` running on the cache (the command
//! is sent through its admin socket, so fills are shared with live clients), or one opened by
//! the command itself. Per image: the manifest (by tag, verified), the selected platforms of an
//! index, and every blob's fill read to completion (several blobs and images at once). Progress
//! goes out as [`Event`]s that the caller carries and renders. A failing image is reported and
//! the others continue.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::cache::StoredManifest;
use crate::mirror::{BlobAnswer, Mirror};
use crate::oci::media::Accept;
use crate::oci::references;
use crate::oci::{Digest, ErrorCode, Reference, RegistryError};
use crate::ops::{self, Event, OpsError};
use crate::upstream::Route;

use super::usage;

/// Which platforms of an index `prefetch` takes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platforms {
    All,
    /// `os/arch` or `os/arch/variant`.
    Some(Vec<String>),
}

impl Platforms {
    fn wants(&self, platform: Option<&serde_json::Value>) -> bool {
        let Platforms::Some(list) = self else {
            return true;
        };
        let Some(p) = platform else {
            return false;
        };
        let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let (os, arch, variant) = (field("os"), field("architecture"), field("variant"));
        list.iter().any(|want| {
            let mut parts = want.split('/');
            let (wo, wa, wv) = (parts.next(), parts.next(), parts.next());
            wo == Some(os) && wa == Some(arch) && wv.is_none_or(|v| v == variant)
        })
    }
}

/// What `stowage prefetch` asks for; the same value goes over the admin socket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrefetchRequest {
    /// Image references as typed (Docker syntax), `--file` already read.
    pub refs: Vec<String>,
    pub platforms: Platforms,
    /// Pin the images fetched.
    pub pin: bool,
    /// Also each image's referrers, recursively (see [`super::referrers`]).
    #[serde(default)]
    pub with_referrers: bool,
}

/// Images prefetched at once; each fills up to `min(max_concurrent_fills, 8)` blobs at once.
const IMAGES_AT_ONCE: usize = 3;

/// Progress events of one image are sent at most this often (the display throttles further).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Totals of one prefetched image.
#[derive(Default)]
struct Fetched {
    manifests: usize,
    blobs: usize,
    cached: usize,
    bytes: u64,
    /// Blobs this image read from a fill (its own or another's), and how many bytes.
    filled: Vec<(Digest, u64)>,
    /// Blobs that were already cached.
    held: Vec<Digest>,
}

/// Counts one image's fetched bytes and sends (throttled) [`Event::Progress`].
struct Meter<'a> {
    id: usize,
    bytes: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<std::time::Instant>,
    emit: &'a Emit,
}

impl Meter<'_> {
    fn add(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= PROGRESS_EVERY {
            *last = std::time::Instant::now();
            drop(last);
            (self.emit)(Event::Progress {
                id: self.id,
                bytes: total,
            });
        }
    }
}

/// Where prefetch events go: a channel to the display, local or over the admin socket.
pub type Emit = dyn Fn(Event) + Send + Sync;

/// Drives one blob into the cache: `None` if held, else its fill read to the end (counted).
async fn fetch_blob(
    mirror: &Mirror,
    route: &Route,
    digest: &Digest,
    meter: &Meter<'_>,
) -> Result<Option<u64>, RegistryError> {
    use futures_util::StreamExt;
    match mirror.blob(route, digest, false).await? {
        BlobAnswer::Filling { fill, .. } => {
            let mut n = 0u64;
            let mut reader = fill.reader();
            while let Some(chunk) = reader.next().await {
                let chunk = chunk.map_err(|e| {
                    RegistryError::new(ErrorCode::BlobUnknown, format!("blob {digest}: {e}"))
                })?;
                n += chunk.len() as u64;
                meter.add(chunk.len() as u64);
            }
            // In the cache (not only verified) before the image counts as prefetched.
            fill.settled().await?;
            Ok(Some(n))
        }
        _ => Ok(None),
    }
}

/// Prefetches one image: its manifest, the selected platforms' manifests, all their blobs (at
/// most `parallel` at once). Sends [`Event::Start`] once the blobs are known.
async fn prefetch_one(
    mirror: &Mirror,
    id: usize,
    r: &ops::ImageRef,
    req: &PrefetchRequest,
    parallel: usize,
    emit: &Emit,
) -> Result<Fetched, RegistryError> {
    let route = route_to(mirror, r)?;
    let (top, mut images, mut manifests) =
        fetch_manifests(mirror, &route, &r.reference, &req.platforms).await?;
    if req.with_referrers {
        let mut roots = vec![top];
        roots.extend(images.iter().map(|m| m.digest.clone()));
        for d in super::referrers::referrers_upstream(mirror, &route, &roots).await? {
            let reference = Reference::Digest(d);
            let (_, more, n) = fetch_manifests(mirror, &route, &reference, &Platforms::All).await?;
            images.extend(more);
            manifests += n;
        }
    }
    let mut blobs: Vec<(Digest, u64)> = images
        .iter()
        .flat_map(|m| references(&m.bytes).blobs)
        .collect();
    blobs.sort();
    blobs.dedup_by(|a, b| a.0 == b.0);
    let held = blobs
        .iter()
        .filter(|(d, _)| mirror.cache.budget().contains(d.hex()))
        .count();
    emit(Event::Start {
        id,
        image: r.to_string(),
        blobs: blobs.len(),
        cached: held,
        bytes: blobs
            .iter()
            .filter(|(d, _)| !mirror.cache.budget().contains(d.hex()))
            .map(|(_, s)| s)
            .sum(),
    });
    let mut done = Fetched {
        manifests,
        blobs: blobs.len(),
        ..Fetched::default()
    };
    let meter = Meter {
        id,
        bytes: Default::default(),
        last: std::sync::Mutex::new(std::time::Instant::now()),
        emit,
    };
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
    for (d, r) in fetch_blobs(mirror, &route, digests, &meter, parallel).await {
        match r? {
            Some(n) => {
                done.bytes += n;
                done.filled.push((d, n));
            }
            None => {
                done.cached += 1;
                done.held.push(d);
            }
        }
    }
    Ok(done)
}

/// The upstream route of image `r`.
fn route_to(mirror: &Mirror, r: &ops::ImageRef) -> Result<Route, RegistryError> {
    let upstream = mirror
        .router
        .upstreams()
        .iter()
        .find(|u| u.host() == r.host)
        .cloned()
        .ok_or_else(|| {
            RegistryError::new(ErrorCode::NameUnknown, format!("no upstream {}", r.host))
        })?;
    Ok(Route {
        upstream,
        repo: r.repo.clone(),
        prefix: None,
    })
}

/// Fetches the top manifest `reference` names and, for an index, the manifests of the
/// platforms wanted. Returns the top manifest's digest, the image manifests whose blobs to
/// fetch (the top one, or the platforms'), and how many manifests were fetched in all.
async fn fetch_manifests(
    mirror: &Mirror,
    route: &Route,
    reference: &Reference,
    platforms: &Platforms,
) -> Result<(Digest, Vec<Arc<StoredManifest>>, usize), RegistryError> {
    let accept = Accept::parse(&crate::oci::media::upstream_manifest_accept());
    let top = mirror.manifest(route, reference, &accept).await?.manifest;
    let v: serde_json::Value = serde_json::from_slice(&top.bytes).unwrap_or_default();
    let Some(children) = v.get("manifests").and_then(|m| m.as_array()) else {
        return Ok((top.digest.clone(), vec![top], 1));
    };
    let mut images = Vec::new();
    for c in children {
        if !platforms.wants(c.get("platform")) {
            continue;
        }
        let Some(d) = c
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse().ok())
        else {
            continue;
        };
        let m = mirror
            .manifest(route, &Reference::Digest(d), &accept)
            .await?
            .manifest;
        images.push(m);
    }
    if images.is_empty() {
        return Err(RegistryError::new(
            ErrorCode::ManifestUnknown,
            "the index has no manifest for the requested platform(s)",
        ));
    }
    let fetched = 1 + images.len();
    Ok((top.digest.clone(), images, fetched))
}

/// Fills `digests` through `mirror`, at most `parallel` at once: each digest with
/// [`fetch_blob`]'s outcome, in completion order.
async fn fetch_blobs(
    mirror: &Mirror,
    route: &Route,
    digests: Vec<Digest>,
    meter: &Meter<'_>,
    parallel: usize,
) -> Vec<(Digest, Result<Option<u64>, RegistryError>)> {
    use futures_util::StreamExt;
    // Owned items and `async move`: borrowed ones trip the compiler's higher-ranked lifetime
    // check once the future is spawned.
    futures_util::stream::iter(digests)
        .map(move |d| async move {
            let r = fetch_blob(mirror, route, &d, meter).await;
            (d, r)
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await
}

/// One reference of a prefetch, start to end: `Some(reference as typed)` if it was fetched.
async fn prefetch_ref(
    mirror: Arc<Mirror>,
    id: usize,
    text: &str,
    req: &PrefetchRequest,
    parallel: usize,
    emit: &Emit,
) -> (Option<String>, Fetched) {
    let r = match ops::parse_image_ref(text, &mirror.config) {
        Ok(r) => r,
        Err(e) => {
            emit(Event::Failed {
                id,
                image: text.to_owned(),
                error: e.to_string(),
            });
            return (None, Fetched::default());
        }
    };
    let started = std::time::Instant::now();
    let f = match prefetch_one(&mirror, id, &r, req, parallel, emit).await {
        Ok(f) => f,
        Err(e) => {
            emit(Event::Failed {
                id,
                image: r.to_string(),
                error: e.message,
            });
            return (None, Fetched::default());
        }
    };
    emit(Event::Done {
        id,
        image: r.to_string(),
        manifests: f.manifests,
        blobs: f.blobs,
        cached: f.cached,
        bytes: f.bytes,
        secs: started.elapsed().as_secs_f64(),
    });
    if req.pin {
        if let Err(e) = pin_fetched(&mirror, text, emit).await {
            emit(Event::Failed {
                id,
                image: r.to_string(),
                error: format!("fetched, but pinning failed: {e}"),
            });
            return (None, f);
        }
    }
    (Some(text.to_owned()), f)
}

/// Pins the image `text` names as soon as it is in, so that the next images' fills cannot evict
/// it; `pin`'s report goes out as [`Event::Out`].
async fn pin_fetched(mirror: &Arc<Mirror>, text: &str, emit: &Emit) -> Result<(), String> {
    // sled work: off the runtime threads.
    let (m, refs) = (mirror.clone(), vec![text.to_owned()]);
    let pinned = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        ops::pin(&m.cache, &m.config, &refs, &mut out).map(|()| out)
    })
    .await;
    match pinned {
        Ok(Ok(out)) => {
            emit(Event::Out {
                text: String::from_utf8_lossy(&out).into_owned(),
            });
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// `stowage prefetch`, wherever it runs (the command itself, or `serve` for the admin socket):
/// each image through `mirror`'s fill engine (several images at once, each with its blobs
/// filling concurrently) and, with `--pin`, pinned as soon as it is in; events to `emit`, then
/// [`Event::Summary`]. Returns
/// whether every image was fetched: an unknown image fails alone.
pub async fn prefetch(
    mirror: Arc<Mirror>,
    req: &PrefetchRequest,
    emit: &Emit,
) -> Result<bool, OpsError> {
    use futures_util::StreamExt;
    if mirror.config.offline {
        return Err(usage(
            "prefetch needs an upstream; the config says offline = true",
        ));
    }
    let started = std::time::Instant::now();
    let parallel = mirror.config.storage.max_concurrent_fills.min(8);
    let results: Vec<(Option<String>, Fetched)> =
        futures_util::stream::iter(req.refs.clone().into_iter().enumerate())
            .map(|(id, text)| {
                let m = mirror.clone();
                async move { prefetch_ref(m, id, &text, req, parallel, emit).await }
            })
            .buffered(IMAGES_AT_ONCE)
            .collect()
            .await;
    mirror.cache.index().durable().await;
    let ok: Vec<String> = results.iter().filter_map(|(t, _)| t.clone()).collect();
    let failed = results.len() - ok.len();
    // The flush is sled work: off the runtime threads.
    let m = mirror.clone();
    tokio::task::spawn_blocking(move || m.cache.flush())
        .await
        .map_err(|e| usage(format!("prefetch: {e}")))??;
    // Distinct blobs: images that share one both read its (single) fill.
    let filled: HashMap<&Digest, u64> = results
        .iter()
        .flat_map(|(_, f)| f.filled.iter().map(|(d, n)| (d, *n)))
        .collect();
    let held: HashSet<&Digest> = results
        .iter()
        .flat_map(|(_, f)| f.held.iter())
        .filter(|d| !filled.contains_key(d))
        .collect();
    emit(Event::Summary {
        ok: ok.len(),
        failed,
        fetched: filled.len(),
        cached: held.len(),
        bytes: filled.values().sum(),
        secs: started.elapsed().as_secs_f64(),
    });
    Ok(failed == 0)
}
