//! Client authentication: HTTP Basic against an htpasswd file of bcrypt entries (`htpasswd -B`).
//!
//! When `[auth] htpasswd` is set, every request except the configured `open_paths` (a subset of
//! `/healthz`, `/readyz`, `/metrics`) needs valid credentials. Missing credentials get
//! `401 UNAUTHORIZED` with `WWW-Authenticate: Basic realm="stowage"` — also on `/v2/`, which is
//! how `docker login` / `skopeo login` discover that they must log in. Wrong credentials get the
//! same 401 whether the user or the password was wrong: an unknown user is checked against a
//! dummy bcrypt hash so the timing does not tell either (bcrypt's comparison is constant-time).
//!
//! Each client IP may fail `failed_login_limit` times per `failed_login_window`; after that it
//! gets `429 TOOMANYREQUESTS` with `Retry-After`, without its credentials being checked, until the
//! window has passed. A successful check is remembered for a few minutes under a keyed hash of
//! the credentials (never the credentials themselves), so a pull of many layers does not pay
//! bcrypt's cost per request. The `Authorization` header is removed before the request goes on,
//! and credentials are never logged. The file is re-read on [`Auth::reload`] (SIGHUP).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use http::{header, HeaderValue};
use sha2::{Digest as _, Sha256};

use crate::config::{AccessRule, Action, AuthConfig, ConfigError};
use crate::oci::{ErrorCode, RegistryError, RepoName};

/// The `WWW-Authenticate` challenge.
pub const CHALLENGE: &str = "Basic realm=\"stowage\"";
/// How long a verified credential is trusted without running bcrypt again.
const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// Bounds on the in-memory tables, so a flood of distinct IPs or passwords cannot grow them.
const MAX_TRACKED: usize = 65_536;

/// The users of an htpasswd file: name → bcrypt hash.
#[derive(Clone, Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes are secrets too: show only how many users there are.
        write!(f, "Htpasswd({} users)", self.users.len())
    }
}

impl Htpasswd {
    /// Parses `user:$2y$..` lines; blank lines and `#` comments are skipped. Only bcrypt entries
    /// are accepted (MD5, SHA1 and crypt entries are too weak, and refused with the line number).
    pub fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {}: expected user:hash", i + 1));
            };
            if user.is_empty() {
                return Err(format!("line {}: empty user name", i + 1));
            }
            let bcrypt = ["$2y$", "$2b$", "$2a$", "$2x$"]
                .iter()
                .any(|p| hash.starts_with(p));
            if !bcrypt || hash.len() != 60 {
                return Err(format!(
                    "line {} (user {user:?}): not a bcrypt entry; create the file with `htpasswd -B`",
                    i + 1
                ));
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(format!("line {}: user {user:?} appears twice", i + 1));
            }
        }
        Ok(Htpasswd { users })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Htpasswd, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Htpasswd::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The highest bcrypt cost in the file (for the dummy hash), 10 if none.
    fn max_cost(&self) -> u32 {
        self.users
            .values()
            .filter_map(|h| h.get(4..6)?.parse::<u32>().ok())
            .max()
            .unwrap_or(10)
    }
}

struct Failures {
    count: u32,
    since: Instant,
}

/// The authentication state shared by all connections.
pub struct Auth {
    path: PathBuf,
    users: RwLock<Arc<Htpasswd>>,
    /// A bcrypt hash of a random password, checked for unknown users.
    dummy: RwLock<String>,
    open_paths: Vec<String>,
    limit: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    verified: Mutex<HashMap<[u8; 32], (String, Instant)>>,
    /// `[[auth.access]]`: who may pull, push and delete what (none: every user everything).
    access: Vec<AccessRule>,
    /// Per-process key for the verified-credentials table.
    key: [u8; 32],
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("path", &self.path)
            .field("open_paths", &self.open_paths)
            .finish_non_exhaustive()
    }
}

/// What a check decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid credentials of this user.
    Allowed(String),
    /// No (usable) credentials: challenge.
    Missing,
    /// Credentials presented and wrong.
    Wrong,
    /// Too many failures from this IP: retry after this many seconds.
    Throttled(u64),
}

impl Auth {
    /// Loads `[auth]`: `None` when no htpasswd file is configured. Errors name `auth.htpasswd`.
    pub fn from_config(config: &AuthConfig) -> Result<Option<Arc<Auth>>, ConfigError> {
        let Some(path) = &config.htpasswd else {
            return Ok(None);
        };
        let invalid = |message: String| ConfigError::Invalid {
            key: "auth.htpasswd".into(),
            message,
        };
        let users = Htpasswd::load(path).map_err(invalid)?;
        if users.is_empty() {
            return Err(invalid(format!("{}: no users", path.display())));
        }
        let dummy = dummy_hash(users.max_cost()).map_err(invalid)?;
        Ok(Some(Arc::new(Auth {
            path: path.clone(),
            users: RwLock::new(Arc::new(users)),
            dummy: RwLock::new(dummy),
            open_paths: config.open_paths.clone(),
            limit: config.failed_login_limit,
            window: config.failed_login_window,
            failures: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
            access: config.access.clone(),
            key: rand::random(),
        })))
    }

    /// Re-reads the htpasswd file; on error the current users stay. Returns the user count.
    pub fn reload(&self) -> Result<usize, String> {
        let users = Htpasswd::load(&self.path)?;
        if users.is_empty() {
            return Err(format!("{}: no users", self.path.display()));
        }
        let dummy = dummy_hash(users.max_cost())?;
        let n = users.len();
        if let Ok(mut u) = self.users.write() {
            *u = Arc::new(users);
        }
        if let Ok(mut d) = self.dummy.write() {
            *d = dummy;
        }
        // A removed user or changed password must not live on in the verified table.
        if let Ok(mut v) = self.verified.lock() {
            v.clear();
        }
        Ok(n)
    }

    /// Whether `path` is answered without credentials.
    pub fn is_open(&self, path: &str) -> bool {
        self.open_paths.iter().any(|p| p == path)
    }

    /// Checks an `Authorization` header value from `ip`.
    pub async fn check(&self, ip: IpAddr, authorization: Option<&HeaderValue>) -> Verdict {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return Verdict::Missing;
        };
        if let Some(wait) = self.throttled(ip) {
            return Verdict::Throttled(wait);
        }
        let key = self.credential_key(&user, &password);
        let now = Instant::now();
        if let Ok(v) = self.verified.lock() {
            if let Some((u, at)) = v.get(&key) {
                if now.duration_since(*at) < VERIFIED_TTL {
                    return Verdict::Allowed(u.clone());
                }
            }
        }
        let users = self.users.read().map(|u| u.clone()).unwrap_or_default();
        let (hash, known) = match users.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => (
                self.dummy.read().map(|d| d.clone()).unwrap_or_default(),
                false,
            ),
        };
        // bcrypt is deliberately slow: keep it off the async workers.
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(false);
        if ok && known {
            if let Ok(mut v) = self.verified.lock() {
                if v.len() >= MAX_TRACKED {
                    v.clear();
                }
                v.insert(key, (user.clone(), now));
            }
            Verdict::Allowed(user)
        } else {
            self.record_failure(ip);
            Verdict::Wrong
        }
    }

    fn credential_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update((user.len() as u64).to_be_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Seconds until `ip` may try again, if it is over the limit.
    fn throttled(&self, ip: IpAddr) -> Option<u64> {
        let f = self.failures.lock().ok()?;
        let entry = f.get(&ip)?;
        let elapsed = entry.since.elapsed();
        if entry.count >= self.limit && elapsed < self.window {
            Some((self.window - elapsed).as_secs().max(1))
        } else {
            None
        }
    }

    fn record_failure(&self, ip: IpAddr) {
        let Ok(mut f) = self.failures.lock() else {
            return;
        };
        let now = Instant::now();
        if f.len() >= MAX_TRACKED {
            let window = self.window;
            f.retain(|_, e| now.duration_since(e.since) < window);
        }
        let entry = f.entry(ip).or_insert(Failures {
            count: 0,
            since: now,
        });
        if now.duration_since(entry.since) >= self.window {
            *entry = Failures {
                count: 0,
                since: now,
            };
        }
        entry.count = entry.count.saturating_add(1);
        if entry.count == self.limit {
            tracing::warn!(client = %ip, failures = entry.count, "too many failed logins; throttling this client");
        }
    }
}

fn dummy_hash(cost: u32) -> Result<String, String> {
    let password: [u8; 16] = rand::random();
    bcrypt::hash(password, cost.clamp(4, 31)).map_err(|e| format!("cannot make a bcrypt hash: {e}"))
}

/// `Basic base64(user:password)` → (user, password). Anything else is "no credentials".
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let text = value.to_str().ok()?;
    let (scheme, rest) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let rest = rest.trim();
    if rest.len() > 4096 {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The middleware: with auth off, or for an open path, the request goes straight on;
/// everything else needs valid credentials.
/// Who is asking, set on the request by [`require`] when `[auth]` is on: an htpasswd user, or
/// `None` for an anonymous request that some rule may allow.
#[derive(Clone)]
pub struct Caller {
    auth: Arc<Auth>,
    pub user: Option<String>,
}

impl Caller {
    /// Whether `[[auth.access]]` rules restrict this server (else every user may do anything).
    pub fn restricted(&self) -> bool {
        !self.auth.access.is_empty()
    }

    /// Whether the caller may do `action` to `repo`, by `[[auth.access]]`. Refused: `401` with
    /// the challenge for an anonymous caller, `403 DENIED` naming the rules that match for a
    /// user.
    pub fn check(&self, repo: &RepoName, action: Action) -> Result<(), RegistryError> {
        let rules = &self.auth.access;
        if rules.is_empty() {
            // No rules: every authenticated user may do everything (anonymous never got here).
            return Ok(());
        }
        let mine: Vec<(usize, &AccessRule)> = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.users.iter().any(|u| match &self.user {
                    None => u == "anonymous",
                    Some(name) => u == "*" || u == name,
                }) && r.repositories.iter().any(|p| p.matches(repo.as_str()))
            })
            .collect();
        // Whoever may push a repository may read it (clients check blobs before uploading).
        let grants = |r: &AccessRule| {
            r.actions.contains(&action)
                || (action == Action::Pull && r.actions.contains(&Action::Push))
        };
        if mine.iter().any(|(_, r)| grants(r)) {
            return Ok(());
        }
        let Some(user) = &self.user else {
            return Err(RegistryError::new(
                ErrorCode::Unauthorized,
                format!("authentication required to {} {repo}", action.as_str()),
            ));
        };
        let why = if mine.is_empty() {
            "no [[auth.access]] rule names this user and repository".to_string()
        } else {
            let named: Vec<String> = mine
                .iter()
                .map(|(i, r)| {
                    let actions: Vec<&str> = r.actions.iter().map(|a| a.as_str()).collect();
                    format!("auth.access[{i}] allows only {}", actions.join(", "))
                })
                .collect();
            named.join("; ")
        };
        Err(RegistryError::new(
            ErrorCode::Denied,
            format!("user {user} may not {} {repo}: {why}", action.as_str()),
        ))
    }
}

impl Auth {
    /// Whether any `[[auth.access]]` rule names `anonymous`.
    fn grants_anonymous(&self) -> bool {
        self.access
            .iter()
            .any(|r| r.users.iter().any(|u| u == "anonymous"))
    }
}

pub async fn require(
    State(auth): State<Option<Arc<Auth>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(auth) = auth.filter(|a| !a.is_open(req.uri().path())) else {
        return next.run(req).await;
    };
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let head = req.method() == http::Method::HEAD;
    let verdict = auth
        .check(ip, req.headers().get(header::AUTHORIZATION))
        .await;
    let error = match verdict {
        Verdict::Allowed(user) => {
            req.headers_mut().remove(header::AUTHORIZATION);
            tracing::debug!(user = %user, "authenticated");
            req.extensions_mut().insert(Caller {
                auth: auth.clone(),
                user: Some(user),
            });
            return next.run(req).await;
        }
        // Anonymous requests go on only where a rule names "anonymous", and never for the
        // `/v2/` probe, whose 401 is how clients learn to send their credentials.
        Verdict::Missing
            if auth.grants_anonymous() && req.uri().path().trim_end_matches('/') != "/v2" =>
        {
            req.extensions_mut().insert(Caller {
                auth: auth.clone(),
                user: None,
            });
            return next.run(req).await;
        }
        Verdict::Missing => RegistryError::new(ErrorCode::Unauthorized, "authentication required"),
        Verdict::Wrong => {
            tracing::info!(client = %ip, "failed login");
            RegistryError::new(ErrorCode::Unauthorized, "invalid username or password")
        }
        Verdict::Throttled(secs) => {
            let mut e = RegistryError::new(
                ErrorCode::TooManyRequests,
                "too many failed logins from this address; try again later",
            );
            e.retry_after = Some(secs);
            e
        }
    };
    let mut resp = super::error_response(&error, head);
    if error.code == ErrorCode::Unauthorized {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(CHALLENGE),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> HeaderValue {
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {v}")).unwrap()
    }

    fn auth_with(limit: u32, window: Duration) -> (Arc<Auth>, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().unwrap();
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        std::fs::write(file.path(), format!("# users\nalice:{hash}\n\n")).unwrap();
        let config = AuthConfig {
            htpasswd: Some(file.path().to_owned()),
            open_paths: vec!["/healthz".into()],
            failed_login_limit: limit,
            failed_login_window: window,
            access: Vec::new(),
        };
        (Auth::from_config(&config).unwrap().unwrap(), file)
    }

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn htpasswd_accepts_only_bcrypt() {
        let h = bcrypt::hash("x", 4).unwrap();
        assert_eq!(
            Htpasswd::parse(&format!("a:{h}\nb:{h}\n")).unwrap().len(),
            2
        );
        let e = Htpasswd::parse("a:$apr1$abc$def\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("htpasswd -B"), "{e}");
        assert!(Htpasswd::parse("no-colon\n").is_err());
        assert!(Htpasswd::parse(&format!(":{h}")).is_err());
        assert!(Htpasswd::parse(&format!("a:{h}\na:{h}")).is_err());
        assert!(!format!("{:?}", Htpasswd::parse(&format!("a:{h}")).unwrap()).contains("$2"));
    }

    #[test]
    fn basic_header_parsing() {
        assert_eq!(
            parse_basic(&basic("u", "p:with:colons")),
            Some(("u".into(), "p:with:colons".into()))
        );
        assert_eq!(parse_basic(&HeaderValue::from_static("Bearer abc")), None);
        assert_eq!(parse_basic(&HeaderValue::from_static("Basic !!!")), None);
        assert_eq!(parse_basic(&HeaderValue::from_static("Basic")), None);
    }

    #[tokio::test]
    async fn right_wrong_and_missing_credentials() {
        let (auth, _f) = auth_with(10, Duration::from_secs(60));
        assert_eq!(
            auth.check(IP, Some(&basic("alice", "s3cret"))).await,
            Verdict::Allowed("alice".into())
        );
        // Second time from the verified table.
        assert_eq!(
            auth.check(IP, Some(&basic("alice", "s3cret"))).await,
            Verdict::Allowed("alice".into())
        );
        assert_eq!(
            auth.check(IP, Some(&basic("alice", "nope"))).await,
            Verdict::Wrong
        );
        assert_eq!(
            auth.check(IP, Some(&basic("bob", "s3cret"))).await,
            Verdict::Wrong
        );
        assert_eq!(auth.check(IP, Some(&basic("", ""))).await, Verdict::Wrong);
        assert_eq!(auth.check(IP, None).await, Verdict::Missing);
        assert!(auth.is_open("/healthz") && !auth.is_open("/v2/"));
    }

    #[tokio::test]
    async fn failures_are_limited_per_ip() {
        let (auth, _f) = auth_with(3, Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(
                auth.check(IP, Some(&basic("alice", "x"))).await,
                Verdict::Wrong
            );
        }
        // Over the limit: even the right password is not checked.
        assert!(matches!(
            auth.check(IP, Some(&basic("alice", "s3cret"))).await,
            Verdict::Throttled(s) if s > 0 && s <= 3600
        ));
        // Another client is unaffected.
        assert_eq!(
            auth.check(OTHER, Some(&basic("alice", "s3cret"))).await,
            Verdict::Allowed("alice".into())
        );
    }

    #[tokio::test]
    async fn the_window_resets_the_count() {
        let (auth, _f) = auth_with(1, Duration::from_millis(1));
        assert_eq!(
            auth.check(IP, Some(&basic("alice", "x"))).await,
            Verdict::Wrong
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            auth.check(IP, Some(&basic("alice", "s3cret"))).await,
            Verdict::Allowed("alice".into())
        );
    }

    #[tokio::test]
    async fn reload_replaces_users_and_forgets_verified_credentials() {
        let (auth, f) = auth_with(10, Duration::from_secs(60));
        assert!(matches!(
            auth.check(IP, Some(&basic("alice", "s3cret"))).await,
            Verdict::Allowed(_)
        ));
        let hash = bcrypt::hash("other", 4).unwrap();
        std::fs::write(f.path(), format!("bob:{hash}\n")).unwrap();
        assert_eq!(auth.reload().unwrap(), 1);
        assert_eq!(
            auth.check(IP, Some(&basic("alice", "s3cret"))).await,
            Verdict::Wrong
        );
        assert_eq!(
            auth.check(IP, Some(&basic("bob", "other"))).await,
            Verdict::Allowed("bob".into())
        );
        // A broken file keeps the current users.
        std::fs::write(f.path(), "bob:plaintext\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(matches!(
            auth.check(IP, Some(&basic("bob", "other"))).await,
            Verdict::Allowed(_)
        ));
    }

    #[test]
    fn config_errors_name_the_key() {
        let config = AuthConfig {
            htpasswd: Some("/nonexistent/htpasswd".into()),
            open_paths: vec![],
            failed_login_limit: 1,
            failed_login_window: Duration::from_secs(1),
            access: Vec::new(),
        };
        let e = Auth::from_config(&config).unwrap_err().to_string();
        assert!(e.contains("auth.htpasswd"), "{e}");
    }
}
