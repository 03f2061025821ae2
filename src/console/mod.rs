//! The console: a JSON API under `/api/v1/` ([`api`]) and the page at `/ui/` that uses only it
//! (`assets`: plain HTML, CSS and JavaScript embedded in the binary).
//!
//! What it shows comes from the cache's statistics (`cache::stats`), the budget (sizes, the
//! eviction order), the fills in flight, the upstreams (reachability probed at most every
//! [`PROBE_EVERY`], Docker Hub's rate limit as last seen) and the hosted index. GETs never
//! change anything.
//!
//! Who may do what:
//! - With `[auth]`, the HTTP edge has authenticated the request before it gets here; reads
//!   need an authenticated user (an anonymous caller some `[[auth.access]]` rule lets through
//!   gets `401` with the challenge). Actions (pin, unpin, purge) need a user whom
//!   `[[auth.access]]` grants `delete` on the repository (every user when there are no rules) or
//!   one named in `console.admins`.
//! - Without `[auth]`, reads are open and actions are refused unless
//!   `console.allow_actions_without_auth = true`.
//! - Every action must carry `X-Requested-With: stowage` (and a JSON `Content-Type` when it has
//!   a body), which a cross-site form or link cannot send without a CORS preflight the console
//!   never grants: else `403`.
//!
//! The edge hands the caller over as a [`Viewer`] (the console does not know how callers are
//! authenticated).

pub mod api;
mod assets;
mod detail;
mod model;
pub mod rows;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{header, HeaderValue, StatusCode};

use crate::hosted::Hosted;
use crate::mirror::Mirror;
use crate::oci::{ErrorCode, RegistryError, RepoName};

/// The header every action must carry, and its value.
pub const ACTION_HEADER: &str = "x-requested-with";
pub const ACTION_HEADER_VALUE: &str = "stowage";

/// How often the upstreams are probed for the summary, at most.
pub const PROBE_EVERY: Duration = Duration::from_secs(30);

/// What the console needs to know of an authenticated caller.
pub trait Permissions: Send + Sync {
    /// The htpasswd user, `None` when anonymous.
    fn user(&self) -> Option<&str>;
    /// Whether `[[auth.access]]` grants the caller `delete` on `repo` (as clients name it).
    fn may_delete(&self, repo: &RepoName) -> bool;
}

/// The caller of a console request, set by the HTTP edge when `[auth]` is on.
#[derive(Clone)]
pub struct Viewer(pub Arc<dyn Permissions>);

/// One upstream's last probe.
#[derive(Clone, Debug)]
pub(crate) struct Probe {
    pub host: String,
    pub reachable: bool,
    pub status: Option<u16>,
    pub at: u64,
}

/// The console's state.
pub struct Console {
    pub(crate) mirror: Arc<Mirror>,
    pub(crate) hosted: Option<Arc<Hosted>>,
    probes: Mutex<(Option<Instant>, Vec<Probe>)>,
}

/// An API error: the status and an OCI error body, with the challenge on a `401`.
pub struct ApiError(pub RegistryError);

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            self.0.body(),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"stowage\""),
            );
        }
        resp
    }
}

pub(crate) fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError(RegistryError::new(ErrorCode::Denied, message).with_status(403))
}

fn unauthorized() -> ApiError {
    ApiError(RegistryError::new(
        ErrorCode::Unauthorized,
        "authentication required",
    ))
}

/// The console's routes (`/api/v1/...`, `/ui/...`), for the edge to merge into its router.
pub fn router<S: Clone + Send + Sync + 'static>(
    mirror: Arc<Mirror>,
    hosted: Option<Arc<Hosted>>,
) -> Router<S> {
    let console = Arc::new(Console {
        mirror,
        hosted,
        probes: Mutex::new((None, Vec::new())),
    });
    api::routes().merge(assets::routes()).with_state(console)
}

impl Console {
    fn auth_on(&self) -> bool {
        self.mirror.config.auth.htpasswd.is_some()
    }

    /// Reads need an authenticated user when `[auth]` is on.
    pub(crate) fn check_read(&self, viewer: Option<&Viewer>) -> Result<(), ApiError> {
        if !self.auth_on() {
            return Ok(());
        }
        match viewer.and_then(|v| v.0.user().map(str::to_owned)) {
            Some(_) => Ok(()),
            None => Err(unauthorized()),
        }
    }

    /// Whether the caller may pin, unpin and purge `repo` (as clients name it); `None`: any
    /// repository (what the page shows as the caller's general right).
    pub(crate) fn may_act(&self, viewer: Option<&Viewer>, repo: Option<&RepoName>) -> bool {
        let c = &self.mirror.config.console;
        if !self.auth_on() {
            return c.allow_actions_without_auth;
        }
        let Some(v) = viewer else {
            return false;
        };
        let Some(user) = v.0.user() else {
            return false;
        };
        if c.admins.iter().any(|a| a == user) {
            return true;
        }
        match repo {
            Some(r) => v.0.may_delete(r),
            None => false,
        }
    }

    /// Checks an action on `repo`: the caller must be allowed to act (`401` anonymous with
    /// `[auth]`, else `403`).
    pub(crate) fn check_act(
        &self,
        viewer: Option<&Viewer>,
        repo: &RepoName,
    ) -> Result<(), ApiError> {
        if self.may_act(viewer, Some(repo)) {
            return Ok(());
        }
        if self.auth_on() && viewer.and_then(|v| v.0.user()).is_none() {
            return Err(unauthorized());
        }
        Err(forbidden(if self.auth_on() {
            format!(
                "this user may not change {repo}: it needs `delete` on it in [[auth.access]] \
                 or a place in console.admins"
            )
        } else {
            "actions are off without [auth]; set console.allow_actions_without_auth = true \
             to allow them"
                .to_string()
        }))
    }

    /// The last upstream probes, probing again in the background when they are older than
    /// [`PROBE_EVERY`]. Offline: none.
    pub(crate) fn probes(self: &Arc<Console>) -> Vec<Probe> {
        if self.mirror.config.offline {
            return Vec::new();
        }
        let mut p = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        if p.0.is_none_or(|at| at.elapsed() >= PROBE_EVERY) {
            p.0 = Some(Instant::now());
            let me = self.clone();
            tokio::spawn(async move {
                let fresh = me.probe().await;
                me.probes.lock().unwrap_or_else(|p| p.into_inner()).1 = fresh;
            });
        }
        p.1.clone()
    }

    async fn probe(&self) -> Vec<Probe> {
        let probes = self.mirror.router.upstreams().iter().map(|u| async move {
            let answer = u.ping(Duration::from_secs(2)).await;
            Probe {
                host: u.host().to_owned(),
                reachable: answer.is_ok(),
                status: answer.ok(),
                at: crate::cache::index::unix_now(),
            }
        });
        futures_util::future::join_all(probes).await
    }
}
