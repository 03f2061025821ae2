//! `/v2/` for hosted names: the whole OCI distribution API (pull, push, content management)
//! answered from [`crate::hosted`], never from an upstream. The mirror's edge hands a request
//! here when its name matches `hosted.repositories`; everything about statuses and headers of
//! the push side lives in this file.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use serde::Deserialize;

use crate::cache::Cache;
use crate::hosted::Hosted;
use crate::metrics::metrics;
use crate::oci::{Digest, ErrorCode, Reference, RegistryError, RepoName};

use super::range::RangeRequest;

/// The query parameters of the push side.
#[derive(Debug, Default, Deserialize)]
struct PushQuery {
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
}

/// A hosted request, as the edge parsed it.
pub(super) enum HostedEndpoint {
    Tags(RepoName),
    Manifest(RepoName, Reference),
    Blob(RepoName, Digest),
    Uploads(RepoName),
    Session(RepoName, String),
    Referrers(RepoName, Digest),
}

fn query(uri: &http::Uri) -> Result<PushQuery, RegistryError> {
    axum::extract::Query::<PushQuery>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| {
            RegistryError::new(ErrorCode::Unsupported, format!("bad query string: {e}"))
                .with_status(400)
        })
}

fn parse_digest(s: &str) -> Result<Digest, RegistryError> {
    s.parse().map_err(|e: crate::oci::DigestError| {
        RegistryError::new(ErrorCode::DigestInvalid, e.to_string())
    })
}

fn unsupported(method: &Method) -> RegistryError {
    RegistryError::new(
        ErrorCode::Unsupported,
        format!("{method} is not supported on this endpoint"),
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn body_stream(
    body: Body,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, axum::Error>> + Send {
    body.into_data_stream()
}

/// Answers a request for a hosted name.
pub(super) async fn handle(
    hosted: &Hosted,
    cache: &Cache,
    caller: Option<&super::auth::Caller>,
    endpoint: HostedEndpoint,
    parts: http::request::Parts,
    body: Body,
) -> Result<Response, RegistryError> {
    let q = query(&parts.uri)?;
    let method = &parts.method;
    let head = method == Method::HEAD;
    match endpoint {
        HostedEndpoint::Tags(name) if method == Method::GET || head => {
            tags(hosted, &name, &parts.uri, head).await
        }
        HostedEndpoint::Manifest(name, reference) => match *method {
            Method::GET | Method::HEAD => {
                let m = hosted.manifest(&name, &reference).await?;
                Ok(manifest_response(m, head))
            }
            Method::PUT => put_manifest(hosted, &name, &reference, &parts.headers, body).await,
            Method::DELETE => {
                hosted.delete_manifest(&name, &reference).await?;
                Ok(accepted())
            }
            _ => Err(unsupported(method)),
        },
        HostedEndpoint::Blob(name, digest) => match *method {
            Method::GET | Method::HEAD => {
                let (file, size) = if head {
                    (None, hosted.blob_size(&name, &digest).await?)
                } else {
                    let blob = hosted.blob(&name, &digest).await?;
                    (Some(blob.file), blob.size)
                };
                blob_response(
                    file,
                    size,
                    &digest,
                    super::blob_range(&parts.headers, &digest),
                )
            }
            Method::DELETE => {
                hosted.delete_blob(&name, &digest).await?;
                Ok(accepted())
            }
            _ => Err(unsupported(method)),
        },
        HostedEndpoint::Uploads(name) if method == Method::POST => {
            post_upload(hosted, cache, caller, &name, &q, &parts.headers, body).await
        }
        HostedEndpoint::Session(name, id) => session(hosted, &name, &id, &q, &parts, body).await,
        HostedEndpoint::Referrers(name, digest) if method == Method::GET || head => {
            let artifact_type = q.artifact_type.as_deref().filter(|t| !t.is_empty());
            referrers(hosted, &name, &digest, artifact_type, &parts.uri, head).await
        }
        _ => Err(unsupported(method)),
    }
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response()
}

/// `tags/list` of a hosted repository: lexical order, `n` and `last`, `Link` while more remain
/// (the same window and pagination as the mirror's lists).
async fn tags(
    hosted: &Hosted,
    name: &RepoName,
    uri: &http::Uri,
    head: bool,
) -> Result<Response, RegistryError> {
    let (n, last) = super::pagination(uri)?;
    let asked = crate::mirror::TagPage { n, last };
    let mut all = hosted.tags(name).await?;
    let (page, more) = crate::mirror::window_tags(&mut all, &asked);
    let body = serde_json::to_vec(&serde_json::json!({"name": name.as_str(), "tags": page}))
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    let mut resp = super::json_response(body, head, None);
    if more {
        super::link_next(
            &mut resp,
            &format!("/v2/{name}/tags/list"),
            n,
            page.last().map(String::as_str),
            &[],
        );
    }
    Ok(resp)
}

/// `GET /v2/<name>/referrers/<digest>`: an OCI index of the manifests whose subject is
/// `<digest>` (empty when none), filtered by `artifactType` when asked (and then said in
/// `OCI-Filters-Applied`), paged like tag lists.
async fn referrers(
    hosted: &Hosted,
    name: &RepoName,
    subject: &Digest,
    artifact_type: Option<&str>,
    uri: &http::Uri,
    head: bool,
) -> Result<Response, RegistryError> {
    let manifests = hosted.referrers(name, subject, artifact_type).await?;
    super::referrers_page(name, subject, manifests, artifact_type, uri, None, head)
}

fn manifest_response(m: crate::hosted::StoredManifest, head: bool) -> Response {
    let len = m.bytes.len();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, m.media_type.as_str())
        .header(header::CONTENT_LENGTH, len)
        .header("docker-content-digest", super::digest_value(&m.digest))
        .header(header::ETAG, format!("\"{}\"", m.digest))
        .body(if head {
            Body::empty()
        } else {
            Body::from(m.bytes)
        })
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A hosted blob, whole or one range (206 / 416 as for cached blobs); without a file, the
/// answer to a `HEAD`.
fn blob_response(
    file: Option<std::fs::File>,
    size: u64,
    digest: &Digest,
    range: RangeRequest,
) -> Result<Response, RegistryError> {
    let head = file.is_none();
    let span = match (range, head) {
        (RangeRequest::Single(r), false) => Some(r.resolve(size).ok_or(size)),
        (RangeRequest::Invalid, false) => Some(Err(size)),
        _ => None,
    };
    if let Some(Err(size)) = span {
        let e = RegistryError::new(
            ErrorCode::RangeInvalid,
            format!("requested range not satisfiable for {digest} ({size} bytes)"),
        );
        let mut resp = super::error_response(&e, head);
        if let Ok(v) = HeaderValue::from_str(&super::range::unsatisfied_content_range(size)) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return Ok(resp);
    }
    let span = span.and_then(Result::ok);
    let (start, len) = span.map_or((0, size), |s| (s.start, s.len()));
    let mut builder = Response::builder()
        .status(if span.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", super::digest_value(digest))
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::CONTENT_LENGTH, len);
    if let Some(s) = span {
        builder = builder.header(header::CONTENT_RANGE, s.content_range(size));
    }
    let body = match file {
        None => Body::empty(),
        Some(file) => {
            Body::from_stream(crate::cache::serve::immutable_file_stream(file, start, len))
        }
    };
    builder
        .body(body)
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))
}

async fn put_manifest(
    hosted: &Hosted,
    name: &RepoName,
    reference: &Reference,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, RegistryError> {
    let limit = crate::hosted::MAX_MANIFEST_SIZE;
    if content_length(headers).is_some_and(|n| n > limit as u64) {
        return Err(too_big(limit));
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_big(limit))?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let result = hosted
        .put_manifest(name, reference, content_type, bytes)
        .await;
    let (digest, parsed) = counted(result)?;
    let mut resp = created(&format!("/v2/{name}/manifests/{digest}"), &digest);
    if let Some(subject) = parsed.subject {
        if let Ok(v) = HeaderValue::from_str(&subject.to_string()) {
            resp.headers_mut().insert("oci-subject", v);
        }
    }
    Ok(resp)
}

fn too_big(limit: usize) -> RegistryError {
    RegistryError::new(
        ErrorCode::SizeInvalid,
        format!("manifest is over the {limit}-byte limit"),
    )
    .with_status(413)
}

/// Counts a finished push (`stowage_pushes_total{result}`).
fn counted<T>(result: Result<T, RegistryError>) -> Result<T, RegistryError> {
    let label = match &result {
        Ok(_) => "ok",
        Err(e) if e.status() == 507 => "full",
        Err(e) if e.status() < 500 => "rejected",
        Err(_) => "error",
    };
    metrics().pushes.with_label_values(&[label]).inc();
    result
}

fn created(location: &str, digest: &Digest) -> Response {
    let mut resp = (StatusCode::CREATED, [(header::CONTENT_LENGTH, "0")]).into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut()
        .insert("docker-content-digest", super::digest_value(digest));
    resp
}

/// `202` for an open session: where to send the rest and what is held.
fn session_answer(status: StatusCode, name: &RepoName, id: &str, offset: u64) -> Response {
    let mut resp = (status, [(header::CONTENT_LENGTH, "0")]).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{name}/blobs/uploads/{id}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("docker-upload-uuid", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("0-{}", offset.saturating_sub(1))) {
        h.insert(header::RANGE, v);
    }
    resp
}

/// `POST .../blobs/uploads/`: a mount, a monolithic upload (`?digest=`), or a new session.
async fn post_upload(
    hosted: &Hosted,
    cache: &Cache,
    caller: Option<&super::auth::Caller>,
    name: &RepoName,
    q: &PushQuery,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, RegistryError> {
    if let Some(mount) = &q.mount {
        let digest = parse_digest(mount)?;
        let from = q.from.as_deref().and_then(|f| f.parse::<RepoName>().ok());
        // A mount reads `from`: without the right to pull it, the client uploads instead.
        let may_read = match (caller, &from) {
            (Some(c), Some(f)) => c.check(f, crate::config::Action::Pull).is_ok(),
            // Under access rules a mount names what it reads.
            (Some(c), None) => !c.restricted(),
            (None, _) => true,
        };
        if may_read && mount_blob(hosted, cache, name, &digest, from.as_ref()).await? {
            counted(Ok(()))?;
            return Ok(created(&format!("/v2/{name}/blobs/{digest}"), &digest));
        }
    }
    let id = hosted.start_upload(name).await?;
    if let Some(d) = &q.digest {
        let digest = parse_digest(d)?;
        let done = hosted
            .finish_upload(
                name,
                &id,
                &digest,
                content_length(headers),
                body_stream(body),
            )
            .await;
        counted(done)?;
        return Ok(created(&format!("/v2/{name}/blobs/{digest}"), &digest));
    }
    Ok(session_answer(StatusCode::ACCEPTED, name, &id, 0))
}

/// Mounts `digest` into `name`: from the hosted repository `from` when it links it, else from
/// the cache (content pulled through the mirror, e.g. the base image's layers). False when
/// neither holds it: the client then uploads.
async fn mount_blob(
    hosted: &Hosted,
    cache: &Cache,
    name: &RepoName,
    digest: &Digest,
    from: Option<&RepoName>,
) -> Result<bool, RegistryError> {
    if let Some(from) = from.filter(|f| hosted.holds_name(f)) {
        return hosted.mount(name, digest, from).await;
    }
    let cached = cache
        .open_blob(digest)
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))?;
    let Some(cached) = cached else {
        return Ok(false);
    };
    // The open blob's lease keeps the cache from evicting it while it is adopted.
    hosted.adopt(name, digest, &cache.blob_path(digest)).await?;
    drop(cached);
    Ok(true)
}

/// `GET` / `PATCH` / `PUT` / `DELETE` of an upload session.
async fn session(
    hosted: &Hosted,
    name: &RepoName,
    id: &str,
    q: &PushQuery,
    parts: &http::request::Parts,
    body: Body,
) -> Result<Response, RegistryError> {
    let length = content_length(&parts.headers);
    match parts.method {
        Method::GET => {
            let offset = hosted.upload_offset(name, id).await?;
            Ok(session_answer(StatusCode::NO_CONTENT, name, id, offset))
        }
        Method::PATCH => {
            let range = content_range(&parts.headers)?;
            let (start, length) = match range {
                Some((start, end)) => {
                    let n = end - start + 1;
                    if length.is_some_and(|l| l != n) {
                        return Err(RegistryError::new(
                            ErrorCode::BlobUploadInvalid,
                            format!("Content-Range {start}-{end} and Content-Length {length:?} disagree"),
                        ));
                    }
                    (Some(start), Some(n))
                }
                None => (None, length),
            };
            match hosted
                .patch(name, id, start, length, body_stream(body))
                .await
            {
                Ok(offset) => Ok(session_answer(StatusCode::ACCEPTED, name, id, offset)),
                Err(e) if e.code == ErrorCode::RangeInvalid => {
                    // 416 with the range held, so the client can resume from there.
                    let offset = hosted.upload_offset(name, id).await?;
                    let mut resp = super::error_response(&e, false);
                    if let Ok(v) = HeaderValue::from_str(&format!("0-{}", offset.saturating_sub(1)))
                    {
                        resp.headers_mut().insert(header::RANGE, v);
                    }
                    Ok(resp)
                }
                Err(e) => Err(e),
            }
        }
        Method::PUT => {
            let digest = q.digest.as_deref().ok_or_else(|| {
                RegistryError::new(
                    ErrorCode::DigestInvalid,
                    "PUT closing an upload needs ?digest=",
                )
            })?;
            let digest = parse_digest(digest)?;
            let done = hosted
                .finish_upload(name, id, &digest, length, body_stream(body))
                .await;
            counted(done)?;
            Ok(created(&format!("/v2/{name}/blobs/{digest}"), &digest))
        }
        Method::DELETE => {
            hosted.cancel_upload(name, id).await?;
            Ok((StatusCode::NO_CONTENT, [(header::CONTENT_LENGTH, "0")]).into_response())
        }
        ref m => Err(unsupported(m)),
    }
}

/// `Content-Range: <first>-<last>` (inclusive; a `bytes ` or `bytes=` prefix is tolerated).
fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>, RegistryError> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        RegistryError::new(
            ErrorCode::BlobUploadInvalid,
            "Content-Range must be <first>-<last>",
        )
    };
    let text = v.to_str().map_err(|_| bad())?.trim();
    let text = text
        .strip_prefix("bytes=")
        .or_else(|| text.strip_prefix("bytes "))
        .unwrap_or(text);
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if b < a {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_first_dash_last() {
        let mut h = HeaderMap::new();
        assert_eq!(content_range(&h).unwrap(), None);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("0-9"));
        assert_eq!(content_range(&h).unwrap(), Some((0, 9)));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes=10-19"),
        );
        assert_eq!(content_range(&h).unwrap(), Some((10, 19)));
        for bad in ["9-0", "x-1", "10", "-"] {
            h.insert(header::CONTENT_RANGE, HeaderValue::from_static(bad));
            assert_eq!(
                content_range(&h).unwrap_err().code,
                ErrorCode::BlobUploadInvalid,
                "{bad}"
            );
        }
    }
}
