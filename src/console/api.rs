//! `/api/v1/`: the console's JSON API.
//!
//! - `GET summary`: sizes and budgets, hit ratios and bytes saved (since start, last hour, last
//!   day), the 24-hour history, fills in flight, upstreams.
//! - `GET repositories?sort=size|pulls|last_pulled|name&order=asc|desc&q=&n=&last=`: a page of
//!   the repositories (`next` names the `last` of the next page).
//! - `GET repositories/<name>`: one repository with its tags.
//! - `GET evictions/preview?bytes=N`: what eviction would remove next to free N bytes.
//! - `POST pins` `{"reference": ...}`, `DELETE pins/<reference>`: `stowage pin` / `unpin`.
//! - `DELETE repositories/<name>[/tags/<tag>]`: purges cached content of a mirrored repository.
//!
//! Repository names are `<upstream host>/<repository>` for mirrored ones (as `stowage ls` shows
//! them) and the repository itself for hosted ones.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{forbidden, ApiError, Console, Viewer, ACTION_HEADER, ACTION_HEADER_VALUE};
use crate::cache::index::unix_now;
use crate::cache::stats::{Bucket, Footprint, Totals, BUCKET_SECS};
use crate::oci::{ErrorCode, RegistryError, RepoName, Tag};

use super::model::{api_name, bad_request, internal, not_found, pull_name, Target};
use super::rows::{list, ListParams};
use super::{detail, rows};

type Api = Result<Json<Value>, ApiError>;
type Caller = Option<Extension<Viewer>>;

pub(super) fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/api/v1/summary", get(summary))
        .route("/api/v1/repositories", get(repositories))
        .route(
            "/api/v1/repositories/{*name}",
            get(repository).delete(purge),
        )
        .route("/api/v1/evictions/preview", get(preview))
        .route("/api/v1/pins", post(pin))
        .route("/api/v1/pins/{*reference}", axum::routing::delete(unpin))
}

fn viewer(c: &Caller) -> Option<&Viewer> {
    c.as_ref().map(|Extension(v)| v)
}

/// Runs blocking index work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

/// An action must say it comes from a script or the page (`X-Requested-With: stowage`) and,
/// with a body, that the body is JSON: a cross-site form or link can do neither.
fn check_action_headers(headers: &HeaderMap, body: bool) -> Result<(), ApiError> {
    let marked = headers
        .get(ACTION_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(ACTION_HEADER_VALUE));
    if !marked {
        return Err(forbidden(format!(
            "actions need the header `X-Requested-With: {ACTION_HEADER_VALUE}`"
        )));
    }
    let json = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if body && !json {
        return Err(forbidden(
            "actions with a body need `Content-Type: application/json`",
        ));
    }
    Ok(())
}

/// Hit ratios and bytes saved of some totals.
fn ratios(t: &Totals) -> Value {
    let ratio = |a: u64, b: u64| {
        if b == 0 {
            Value::Null
        } else {
            json!(a as f64 / b as f64)
        }
    };
    json!({
        "requests": t.requests,
        "hits": t.hits,
        "hit_ratio": ratio(t.hits, t.requests),
        "bytes_served": t.bytes_served,
        "bytes_from_cache": t.bytes_from_cache,
        "byte_hit_ratio": ratio(t.bytes_from_cache, t.bytes_served),
        "bytes_fetched": t.bytes_fetched,
        "bytes_saved": t.bytes_served.saturating_sub(t.bytes_fetched),
    })
}

/// The totals of the buckets of the last `secs` seconds.
fn window(history: &[Bucket], now: u64, secs: u64) -> Totals {
    let from = now.saturating_sub(secs);
    history
        .iter()
        .filter(|b| b.start + BUCKET_SECS > from)
        .fold(Totals::default(), |acc, b| Totals {
            requests: acc.requests + b.totals.requests,
            hits: acc.hits + b.totals.hits,
            bytes_served: acc.bytes_served + b.totals.bytes_served,
            bytes_from_cache: acc.bytes_from_cache + b.totals.bytes_from_cache,
            bytes_fetched: acc.bytes_fetched + b.totals.bytes_fetched,
        })
}

/// `GET /api/v1/summary`.
async fn summary(State(c): State<Arc<Console>>, v: Caller) -> Api {
    c.check_read(viewer(&v))?;
    let cache = &c.mirror.cache;
    let now = unix_now();
    let activity = cache.activity();
    let history = activity.history(now);
    let stats = cache.stats();
    let limits = cache.budget().limits();
    let hosted = c.hosted.as_ref().map(|h| {
        let (used, blobs) = h.usage();
        json!({ "budget_bytes": h.settings().max_size, "size_bytes": used, "blobs": blobs })
    });
    let upstreams = upstreams(&c);
    let fills = fills(&c);
    let repositories = {
        let cache_c = c.clone();
        blocking(move || {
            let f = cache_c.mirror.cache.footprint().map_err(internal)?;
            Ok(f.repos.len())
        })
        .await?
    };
    Ok(Json(json!({
        "now": now,
        "started": activity.started(),
        "version": env!("CARGO_PKG_VERSION"),
        "offline": c.mirror.config.offline,
        "cache": {
            "budget_bytes": stats.budget_bytes,
            "high_watermark_bytes": limits.high,
            "low_watermark_bytes": limits.low,
            "size_bytes": stats.size_bytes,
            "blob_bytes": stats.blob_bytes,
            "manifest_bytes": stats.manifest_bytes,
            "reserved_bytes": stats.reserved_bytes,
            "blobs": stats.blob_count,
            "pinned_bytes": stats.pinned_blob_bytes,
            "evictions": stats.evictions,
            "evicted_bytes": stats.evicted_bytes,
            "repositories": repositories,
        },
        "hosted": hosted,
        "traffic": {
            "since_start": ratios(&activity.totals()),
            "last_hour": ratios(&window(&history, now, 3600)),
            "last_day": ratios(&window(&history, now, 86_400)),
        },
        "history": {
            "bucket_secs": crate::cache::stats::BUCKET_SECS,
            "buckets": history,
        },
        "fills": fills,
        "upstreams": upstreams,
        "you": {
            "user": viewer(&v).and_then(|x| x.0.user().map(str::to_owned)),
            "may_act": c.may_act(viewer(&v), None),
            "auth": c.mirror.config.auth.htpasswd.is_some(),
        },
    })))
}

/// The fills in flight with their progress and the repository they run for.
fn fills(c: &Console) -> Vec<Value> {
    let cache = &c.mirror.cache;
    let snapshot = cache.fills_snapshot();
    let live = snapshot.iter().map(|(d, _)| d.hex().to_owned()).collect();
    let owners = cache.activity().fill_owners(&live);
    let mut out: Vec<Value> = snapshot
        .into_iter()
        .map(|(d, s)| {
            let phase = match s.phase {
                crate::cache::fill::Phase::Starting => "starting",
                crate::cache::fill::Phase::Streaming => "streaming",
                crate::cache::fill::Phase::Committed => "committed",
                crate::cache::fill::Phase::Failed(_) => "failed",
            };
            json!({
                "digest": d.to_string(),
                "repository": owners.get(d.hex()).map(|(u, r)| format!("{u}/{r}")),
                "written": s.written,
                "total": s.total,
                "phase": phase,
            })
        })
        .collect();
    out.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    out
}

/// Each upstream: last probe, Docker Hub's rate limit as last seen, backoff after a 429.
fn upstreams(c: &Arc<Console>) -> Vec<Value> {
    let probes = c.probes();
    c.mirror
        .router
        .upstreams()
        .iter()
        .map(|u| {
            let probe = probes.iter().find(|p| p.host == u.host());
            let rl = u.ratelimit().map(|r| {
                json!({
                    "limit": r.limit,
                    "remaining": r.remaining,
                    "window_secs": r.window_secs,
                    "observed": r.observed.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                })
            });
            json!({
                "host": u.host(),
                "url": u.config.url.as_str(),
                "reachable": probe.map(|p| p.reachable),
                "status": probe.and_then(|p| p.status),
                "checked": probe.map(|p| p.at),
                "ratelimit": rl,
                "backing_off_secs": u.backing_off().map(|d| d.as_secs()),
            })
        })
        .collect()
}

/// `GET /api/v1/repositories`.
async fn repositories(
    State(c): State<Arc<Console>>,
    v: Caller,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Api {
    c.check_read(viewer(&v))?;
    let Query(params) = q.map_err(|e| bad_request(e.body_text()))?;
    let cc = c.clone();
    let page = blocking(move || {
        let rows = rows::all(&cc)?;
        list(rows, &params).map_err(bad_request)
    })
    .await?;
    Ok(Json(serde_json::to_value(page).map_err(internal)?))
}

/// `GET /api/v1/repositories/<name>`.
async fn repository(State(c): State<Arc<Console>>, v: Caller, Path(name): Path<String>) -> Api {
    c.check_read(viewer(&v))?;
    let target = Target::parse(&c, &name)?;
    let pull = pull_name(&c, &target.key());
    let may_act = matches!(target, Target::Mirrored { .. })
        && pull
            .parse::<RepoName>()
            .is_ok_and(|r| c.may_act(viewer(&v), Some(&r)));
    let cc = c.clone();
    let mut body = blocking(move || detail::repository(&cc, &target)).await?;
    body["may_act"] = json!(may_act);
    Ok(Json(body))
}

#[derive(Deserialize)]
struct PreviewParams {
    bytes: u64,
}

/// `GET /api/v1/evictions/preview?bytes=N`.
async fn preview(
    State(c): State<Arc<Console>>,
    v: Caller,
    q: Result<Query<PreviewParams>, QueryRejection>,
) -> Api {
    c.check_read(viewer(&v))?;
    let Query(p) = q.map_err(|e| bad_request(e.body_text()))?;
    let cc = c.clone();
    blocking(move || {
        let cache = &cc.mirror.cache;
        let victims = cache.eviction_preview(p.bytes);
        let f = cache.footprint().map_err(internal)?;
        Ok(Json(preview_body(&f, p.bytes, &victims)))
    })
    .await
}

/// Eviction candidates listed at most.
const PREVIEW_MAX: usize = 1000;

fn preview_body(f: &Footprint, bytes: u64, victims: &[crate::cache::budget::Victim]) -> Value {
    let freed: u64 = victims.iter().map(|v| v.size).sum();
    let blobs: Vec<Value> = victims
        .iter()
        .take(PREVIEW_MAX)
        .map(|v| {
            let repos: Vec<String> = f
                .blob_repos
                .get(&v.hex)
                .map(|r| r.iter().map(api_name).collect())
                .unwrap_or_default();
            json!({ "digest": format!("sha256:{}", v.hex), "size": v.size, "repositories": repos })
        })
        .collect();
    json!({
        "bytes": bytes,
        "freed": freed,
        "enough": freed >= bytes,
        "count": victims.len(),
        "truncated": victims.len() > PREVIEW_MAX,
        "blobs": blobs,
    })
}

#[derive(Deserialize)]
struct PinBody {
    reference: String,
}

/// The repository (as clients name it) of an image reference, for the permission check.
fn reference_repo(c: &Console, text: &str) -> Result<RepoName, ApiError> {
    let r = crate::ops::parse_image_ref(text, &c.mirror.config)
        .map_err(|e| bad_request(e.to_string()))?;
    let key = (r.host.clone(), r.repo.to_string());
    pull_name(c, &key)
        .parse()
        .map_err(|e: crate::oci::NameError| bad_request(e.to_string()))
}

/// `POST /api/v1/pins` `{"reference": ...}`.
async fn pin(
    State(c): State<Arc<Console>>,
    v: Caller,
    headers: HeaderMap,
    body: Result<Json<PinBody>, JsonRejection>,
) -> Api {
    check_action_headers(&headers, true)?;
    let Json(body) = body.map_err(|e| bad_request(e.body_text()))?;
    let repo = reference_repo(&c, &body.reference)?;
    c.check_act(viewer(&v), &repo)?;
    let cc = c.clone();
    let text = body.reference.clone();
    let out = blocking(move || {
        let mut out = Vec::new();
        crate::ops::pin(&cc.mirror.cache, &cc.mirror.config, &[text], &mut out).map_err(
            |e| match e {
                // What is not cached (the parse was checked above).
                crate::ops::OpsError::Usage(m) => not_found(m),
                other => internal(other),
            },
        )?;
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    })
    .await?;
    tracing::info!(reference = %body.reference, user = ?viewer(&v).and_then(|x| x.0.user().map(str::to_owned)), "console: pinned");
    Ok(Json(
        json!({ "reference": body.reference, "pinned": true, "message": out }),
    ))
}

/// `DELETE /api/v1/pins/<reference>`.
async fn unpin(
    State(c): State<Arc<Console>>,
    v: Caller,
    headers: HeaderMap,
    Path(reference): Path<String>,
) -> Api {
    check_action_headers(&headers, false)?;
    let repo = reference_repo(&c, &reference)?;
    c.check_act(viewer(&v), &repo)?;
    let cc = c.clone();
    let text = reference.clone();
    let out = blocking(move || {
        let mut out = Vec::new();
        crate::ops::unpin(&cc.mirror.cache, &cc.mirror.config, &[text], &mut out).map_err(|e| {
            match e {
                crate::ops::OpsError::Usage(m) => bad_request(m),
                other => internal(other),
            }
        })?;
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    })
    .await?;
    let removed = out.lines().any(|l| l.starts_with("unpinned "));
    if !removed {
        return Err(not_found(out));
    }
    tracing::info!(%reference, "console: unpinned");
    Ok(Json(
        json!({ "reference": reference, "pinned": false, "message": out }),
    ))
}

/// `DELETE /api/v1/repositories/<name>[/tags/<tag>]`.
async fn purge(
    State(c): State<Arc<Console>>,
    v: Caller,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Api {
    check_action_headers(&headers, false)?;
    let (name, tag) = match path.rsplit_once("/tags/") {
        Some((n, t)) => (
            n.to_owned(),
            Some(t.parse::<Tag>().map_err(|e| bad_request(e.to_string()))?),
        ),
        None => (path.clone(), None),
    };
    let target = Target::parse(&c, &name)?;
    let Target::Mirrored { host, repo } = target else {
        return Err(ApiError(
            RegistryError::new(
                ErrorCode::Unsupported,
                "hosted content is data, not cache: delete it through the registry API \
                 (DELETE /v2/<name>/manifests/<reference>, with hosted.delete = true)",
            )
            .with_status(405),
        ));
    };
    let pull: RepoName = pull_name(&c, &(host.clone(), repo.to_string()))
        .parse()
        .map_err(|e: crate::oci::NameError| bad_request(e.to_string()))?;
    c.check_act(viewer(&v), &pull)?;
    let cc = c.clone();
    let (h, r, t) = (host.clone(), repo.clone(), tag.clone());
    let outcome =
        blocking(move || crate::ops::purge(&cc.mirror.cache, &h, &r, t.as_ref()).map_err(internal))
            .await?;
    let what = match &tag {
        Some(t) => format!("{host}/{repo}:{t}"),
        None => format!("{host}/{repo}"),
    };
    match outcome {
        Ok(report) => {
            tracing::info!(what = %what, ?report, "console: purged");
            Ok(Json(json!({ "purged": what, "removed": report })))
        }
        Err(crate::ops::PurgeRefused::NotCached) => {
            Err(not_found(format!("{what} is not in the cache")))
        }
        Err(crate::ops::PurgeRefused::Pinned(tags)) => Err(ApiError(
            RegistryError::new(
                ErrorCode::Denied,
                format!(
                    "{what}: pinned tag(s) {}; unpin them first",
                    tags.join(", ")
                ),
            )
            .with_status(409),
        )),
    }
}
