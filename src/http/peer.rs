//! The fleet's internal blob endpoint, `GET /_stowage/fleet/blobs/<digest>`
//! ([`crate::fleet::PEER_PATH`]): another node of the fleet, waiting on this node's fill lease,
//! streams the blob from here while this node fills it.
//!
//! It sits outside client authentication: the caller must present the token of this node's
//! live lease on the blob (`Authorization: Bearer <token>`), which only a party that can read
//! the shared store has seen. It answers from the fill in flight (joined like any reader: bytes
//! as they arrive, the last one only once the blob verified, an error that aborts the body if
//! the fill fails) or from the committed file, never from the upstream. `Range: bytes=<n>-` is
//! honoured (a follower resuming); any other range is ignored and the whole blob sent.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, StatusCode};

use super::{error_response, AppState};
use crate::oci::{Digest, ErrorCode, RegistryError};
use crate::stream::ByteStream;

/// `GET /_stowage/fleet/blobs/<digest>`.
pub(super) async fn fleet_blob(
    State(mirror): State<AppState>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Response {
    match answer(&mirror, &digest, &headers).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e, false),
    }
}

async fn answer(
    mirror: &crate::mirror::Mirror,
    digest: &str,
    headers: &HeaderMap,
) -> Result<Response, RegistryError> {
    let Some(fleet) = &mirror.fleet else {
        return Err(RegistryError::new(
            ErrorCode::Unsupported,
            "this node is not part of a fleet (no shared store)",
        )
        .with_status(404));
    };
    let digest: Digest = digest.parse().map_err(|_| {
        RegistryError::new(
            ErrorCode::DigestInvalid,
            format!("{digest:?} is not a digest"),
        )
    })?;
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    fleet.authorize_peer(&digest, authorization)?;
    let offset = resume_offset(headers);
    let (stream, total, start) = match mirror.cache.fill_in_flight(&digest) {
        Some(fill) => match fill.started().await? {
            Some(total) if offset > 0 && offset < total => {
                (fill.reader_range(offset, None), Some(total), offset)
            }
            // Of unknown size, or asked past it: from 0 (the follower re-reads its prefix).
            total => (fill.reader(), total, 0),
        },
        None => match mirror.cache.open_blob(&digest)? {
            Some(b) => {
                let (size, start) = (b.size, if offset < b.size { offset } else { 0 });
                (b.into_stream(start, size - start), Some(size), start)
            }
            None => {
                return Err(RegistryError::new(
                    ErrorCode::BlobUnknown,
                    format!("this node is not filling {digest} and does not hold it"),
                ))
            }
        },
    };
    respond(&digest, stream, total, start)
}

/// `bytes=<n>-`, the only range a follower sends; anything else means the whole blob.
fn resume_offset(headers: &HeaderMap) -> u64 {
    headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 200 from the start, or 206 from `start` with its `Content-Range`.
fn respond(
    digest: &Digest,
    stream: ByteStream,
    total: Option<u64>,
    start: u64,
) -> Result<Response, RegistryError> {
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.to_string());
    builder = match (start, total) {
        (0, Some(t)) => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, t),
        (0, None) => builder.status(StatusCode::OK),
        (s, Some(t)) => builder
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {s}-{}/{t}", t - 1))
            .header(header::CONTENT_LENGTH, t - s),
        (_, None) => return Ok(StatusCode::INTERNAL_SERVER_ERROR.into_response()),
    };
    builder
        .body(Body::from_stream(stream))
        .map_err(|e| RegistryError::new(ErrorCode::Unknown, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_open_ended_ranges_resume() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::RANGE, v.parse().unwrap());
            resume_offset(&h)
        };
        assert_eq!(with("bytes=100-"), 100);
        assert_eq!(with("bytes=100-200"), 0);
        assert_eq!(with("bytes=-5"), 0);
        assert_eq!(resume_offset(&HeaderMap::new()), 0);
    }
}
