//! The page at `/ui/`: plain HTML, CSS and JavaScript, embedded in the binary (no build step, no
//! CDN). The page uses only the API under `/api/v1/`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Extension, Router};
use http::header;

use super::{ApiError, Console, Viewer};

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

pub(super) fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/app.js", get(script))
        .route("/ui/style.css", get(style))
}

type Caller = Option<Extension<Viewer>>;

/// With `[auth]`, the page itself needs a user: the browser asks for credentials here.
fn guarded(
    c: &Console,
    v: &Caller,
    content_type: &'static str,
    body: &'static str,
) -> Result<Response, ApiError> {
    c.check_read(v.as_ref().map(|Extension(v)| v))?;
    Ok(asset(content_type, body))
}

async fn index(State(c): State<Arc<Console>>, v: Caller) -> Result<Response, ApiError> {
    guarded(&c, &v, "text/html; charset=utf-8", INDEX)
}

async fn script(State(c): State<Arc<Console>>, v: Caller) -> Result<Response, ApiError> {
    guarded(&c, &v, "text/javascript; charset=utf-8", SCRIPT)
}

async fn style(State(c): State<Arc<Console>>, v: Caller) -> Result<Response, ApiError> {
    guarded(&c, &v, "text/css; charset=utf-8", STYLE)
}

/// An embedded file. Never framed by another site; scripts and styles only from here.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
