//! The HTTP edge (axum): parses requests into typed endpoints ([`route`]), asks the
//! [`Mirror`](crate::mirror::Mirror), and turns answers and [`RegistryError`]s into responses
//! — the one place where errors become OCI error bodies. Also blob `Range` answers ([`range`]),
//! the request log line, the `Docker-Distribution-API-Version` header, `/v1/search`, and graceful
//! shutdown.

pub mod range;
pub mod route;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{header, HeaderValue, Method, StatusCode};
use serde::Deserialize;

use crate::mirror::{BlobAnswer, ManifestAnswer, Mirror, Outcome, TagPage};
use crate::oci::{Accept, Digest, ErrorCode, RegistryError};
use range::RangeRequest;
use route::Endpoint;

/// Shared state of the HTTP edge.
pub type AppState = Arc<Mirror>;

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

/// Builds the router.
pub fn router(mirror: AppState) -> Router {
    Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/v1/search", axum::routing::get(search))
        .fallback(dispatch)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(mirror)
}

/// Serves until `shutdown` resolves, then lets requests in flight finish for up to `grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mirror: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app = router(mirror);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let server = std::pin::pin!(std::future::IntoFuture::into_future(server));
    tokio::select! {
        r = server => r,
        _ = async { let _ = rx.await; tokio::time::sleep(grace).await } => {
            tracing::warn!("requests still in flight after {grace:?}; closing them");
            Ok(())
        }
    }
}

/// Request log line: one per request, with id, cache outcome, bytes and duration.
async fn log_request(req: Request, next: Next) -> Response {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let uri = req.uri().clone();
    let start = Instant::now();
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
    let outcome = resp
        .extensions()
        .get::<Outcome>()
        .map(|o| o.as_str())
        .unwrap_or("-");
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    tracing::info!(
        req = id,
        method = %method,
        path = %uri.path(),
        query = uri.query().unwrap_or(""),
        status = resp.status().as_u16(),
        cache = outcome,
        bytes = %bytes,
        ms = start.elapsed().as_millis() as u64,
        "request"
    );
    resp
}

/// The one mapping from [`RegistryError`] to an HTTP response.
fn error_response(e: &RegistryError, head: bool) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = e.body();
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(s) = e.retry_after {
        resp = resp.header(header::RETRY_AFTER, s);
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from(body)
    };
    resp.body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Deserialize, Default)]
struct Query {
    ns: Option<String>,
}

async fn dispatch(State(mirror): State<AppState>, req: Request) -> Response {
    let head = req.method() == Method::HEAD;
    match handle(&mirror, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e, head),
    }
}

async fn handle(mirror: &Mirror, req: Request) -> Result<Response, RegistryError> {
    // Only the head matters for a pull API; dropping the body keeps the future `Send`.
    let (req, _body) = req.into_parts();
    let path = req.uri.path();
    let rest = if path == "/v2" {
        ""
    } else if let Some(rest) = path.strip_prefix("/v2/") {
        rest
    } else {
        return Err(RegistryError::new(
            ErrorCode::NameUnknown,
            "not found: the registry API is under /v2/",
        )
        .with_status(404));
    };
    let endpoint = route::parse(rest)?;
    let method = req.method.clone();
    if method != Method::GET && method != Method::HEAD {
        return Err(RegistryError::new(
            ErrorCode::Unsupported,
            "this is a pull-through mirror: push and delete are not supported",
        ));
    }
    let head = method == Method::HEAD;
    let query = req.uri.query().unwrap_or("");
    let q: Query = serde_urlencoded_lite(query);
    let ns = q.ns.as_deref();
    match endpoint {
        Endpoint::Base => Ok(json_response(b"{}".to_vec(), head, None)),
        Endpoint::Catalog => catalog(mirror, query, head),
        Endpoint::Upload => Err(RegistryError::new(
            ErrorCode::Unsupported,
            "this is a pull-through mirror: push is not supported",
        )),
        Endpoint::Tags(name) => {
            let route = mirror.route(&name, ns)?;
            let (n, last) = pagination(query)?;
            let page = TagPage { n, last };
            let list = mirror.tags(&route, &name, &page).await?;
            let body = serde_json::to_vec(&list)
                .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
            let mut resp = json_response(body, head, Some(Outcome::Upstream));
            if let (Some(next), Some(n)) = (&list.next, n) {
                let mut q = url::form_urlencoded::Serializer::new(String::new());
                q.append_pair("n", &n.to_string()).append_pair("last", next);
                if let Some(ns) = ns {
                    q.append_pair("ns", ns);
                }
                let link = format!("</v2/{name}/tags/list?{}>; rel=\"next\"", q.finish());
                if let Ok(v) = HeaderValue::from_str(&link) {
                    resp.headers_mut().insert(header::LINK, v);
                }
            }
            Ok(resp)
        }
        Endpoint::Manifest(name, reference) => {
            let route = mirror.route(&name, ns)?;
            let accept = Accept::from_headers(&req.headers);
            let answer = mirror.manifest(&route, &reference, &accept).await?;
            let mut resp = manifest_response(answer, head);
            echo_ns(&mut resp, ns);
            Ok(resp)
        }
        Endpoint::Blob(name, digest) => {
            let route = mirror.route(&name, ns)?;
            let answer = mirror.blob(&route, &digest, head).await?;
            let range = blob_range(&req.headers, &digest);
            let mut resp = blob_response(answer, &digest, head, range)?;
            echo_ns(&mut resp, ns);
            Ok(resp)
        }
    }
}

/// Tiny query parser for the one parameter we read (`ns`); unknown parameters are ignored.
fn serde_urlencoded_lite(query: &str) -> Query {
    let mut q = Query::default();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k == "ns" {
            q.ns = Some(v.into_owned());
        }
    }
    q
}

fn echo_ns(resp: &mut Response, ns: Option<&str>) {
    if let Some(v) = ns.and_then(|n| HeaderValue::from_str(n).ok()) {
        resp.headers_mut().insert("oci-namespace", v);
    }
}

fn json_response(body: Vec<u8>, head: bool, outcome: Option<Outcome>) -> Response {
    let len = body.len();
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, len)
        .body(if head {
            Body::empty()
        } else {
            Body::from(body)
        })
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    if let Some(o) = outcome {
        resp.extensions_mut().insert(o);
    }
    resp
}

fn digest_value(d: &Digest) -> HeaderValue {
    HeaderValue::from_str(&d.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn manifest_response(answer: ManifestAnswer, head: bool) -> Response {
    let m = &answer.manifest;
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, m.media_type.as_str())
        .header(header::CONTENT_LENGTH, m.bytes.len())
        .header("docker-content-digest", digest_value(&m.digest))
        .header(header::ETAG, format!("\"{}\"", m.digest));
    if let Some(w) = &answer.warning {
        builder = builder.header(
            header::WARNING,
            format!("299 - \"{}\"", w.replace('"', "'")),
        );
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from(m.bytes.clone())
    };
    let mut resp = builder
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    resp.extensions_mut().insert(answer.outcome);
    resp
}

/// The blob answer as a response: 200 with the whole blob, 206 for a satisfiable single `Range`
/// (also while the blob is still being filled: the range streams as its bytes arrive), 416 with
/// `Content-Range: bytes */<size>` for an unsatisfiable or malformed one. A multi-range request
/// gets the whole blob; so does any range while the size is still unknown.
fn blob_response(
    answer: BlobAnswer,
    digest: &Digest,
    head: bool,
    range: RangeRequest,
) -> Result<Response, RegistryError> {
    let (size, outcome) = match &answer {
        BlobAnswer::Cached(b) => (Some(b.size), Outcome::Hit),
        BlobAnswer::Filling { total, joined, .. } => (
            *total,
            if *joined {
                Outcome::Joined
            } else {
                Outcome::Miss
            },
        ),
        BlobAnswer::Head { size } => (*size, Outcome::Upstream),
    };
    // `None`: the whole blob; `Some(Ok(span))`: a 206; `Some(Err(size))`: a 416.
    let part = match (range, size, head) {
        (_, _, true) | (_, None, _) | (RangeRequest::Whole | RangeRequest::Multiple, _, _) => None,
        (RangeRequest::Single(r), Some(size), false) => Some(r.resolve(size).ok_or(size)),
        (RangeRequest::Invalid, Some(size), false) => Some(Err(size)),
    };
    if let Some(Err(size)) = part {
        let e = RegistryError::new(
            ErrorCode::RangeInvalid,
            format!("requested range not satisfiable for {digest} ({size} bytes)"),
        );
        let mut resp = error_response(&e, head);
        if let Ok(v) = HeaderValue::from_str(&range::unsatisfied_content_range(size)) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        resp.headers_mut()
            .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        resp.extensions_mut().insert(outcome);
        return Ok(resp);
    }
    let span = part.and_then(Result::ok);
    let mut builder = Response::builder()
        .status(if span.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", digest_value(digest))
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::CACHE_CONTROL, "max-age=31536000");
    let length = match (span, size) {
        (Some(span), Some(size)) => {
            builder = builder.header(header::CONTENT_RANGE, span.content_range(size));
            Some(span.len())
        }
        _ => size,
    };
    if let Some(l) = length {
        builder = builder.header(header::CONTENT_LENGTH, l);
    }
    let body = match answer {
        _ if head => Body::empty(),
        BlobAnswer::Cached(b) => {
            let (start, len) = span.map_or((0, b.size), |s| (s.start, s.len()));
            Body::from_stream(crate::cache::fill::file_stream(b.file, start, len))
        }
        BlobAnswer::Filling { fill, .. } => Body::from_stream(match span {
            Some(s) => fill.reader_range(s.start, Some(s.end + 1)),
            None => fill.reader(),
        }),
        BlobAnswer::Head { .. } => Body::empty(),
    };
    let mut resp = builder
        .body(body)
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    resp.extensions_mut().insert(outcome);
    Ok(resp)
}

/// The client's `Range`, unless an `If-Range` names another version than this blob's ETag.
fn blob_range(headers: &http::HeaderMap, digest: &Digest) -> RangeRequest {
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        if if_range.as_bytes() != format!("\"{digest}\"").as_bytes() {
            return RangeRequest::Whole;
        }
    }
    RangeRequest::parse(
        headers
            .get(header::RANGE)
            .map(|v| v.to_str().unwrap_or("invalid")),
    )
}

fn pagination(query: &str) -> Result<(Option<usize>, Option<String>), RegistryError> {
    let mut n = None;
    let mut last = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "n" => {
                n = Some(v.parse::<usize>().map_err(|_| {
                    RegistryError::new(
                        ErrorCode::PaginationNumberInvalid,
                        "n must be a non-negative integer",
                    )
                })?)
            }
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok((n, last))
}

fn catalog(mirror: &Mirror, query: &str, head: bool) -> Result<Response, RegistryError> {
    let (n, last) = pagination(query)?;
    let all = mirror.catalog()?;
    let after: Vec<String> = all
        .into_iter()
        .filter(|r| last.as_ref().is_none_or(|l| r.as_str() > l.as_str()))
        .collect();
    let (page, more) = match n {
        Some(n) => (
            after.iter().take(n).cloned().collect::<Vec<_>>(),
            after.len() > n && n > 0,
        ),
        None => (after, false),
    };
    let body = serde_json::to_vec(&serde_json::json!({ "repositories": page }))
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    let mut resp = json_response(body, head, Some(Outcome::Hit));
    if more {
        if let (Some(n), Some(l)) = (n, page.last()) {
            let link = format!("</v2/_catalog?n={n}&last={l}>; rel=\"next\"");
            if let Ok(v) = HeaderValue::from_str(&link) {
                resp.headers_mut().insert(header::LINK, v);
            }
        }
    }
    Ok(resp)
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
    n: Option<usize>,
}

/// `GET /v1/search?q=term`: Docker's v1 search over the cached repositories, so
/// `docker search <mirror>/<term>` works.
async fn search(
    State(mirror): State<AppState>,
    query: Result<axum::extract::Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(q)) = query else {
        return error_response(
            &RegistryError::new(ErrorCode::PaginationNumberInvalid, "bad search query"),
            false,
        );
    };
    let term = q.q.unwrap_or_default().to_ascii_lowercase();
    let names = match mirror.catalog() {
        Ok(n) => n,
        Err(e) => return error_response(&e, false),
    };
    let results: Vec<serde_json::Value> = names
        .iter()
        .filter(|n| n.contains(&term))
        .take(q.n.unwrap_or(100).min(1000))
        .map(|n| {
            let display = n.strip_prefix("library/").unwrap_or(n);
            serde_json::json!({
                "name": display,
                "description": "",
                "star_count": 0,
                "is_official": n.starts_with("library/"),
                "is_automated": false,
            })
        })
        .collect();
    let body = serde_json::json!({
        "num_results": results.len(),
        "query": term,
        "page": 1,
        "num_pages": 1,
        "page_size": results.len(),
        "results": results,
    });
    json_response(body.to_string().into_bytes(), false, Some(Outcome::Hit))
}
