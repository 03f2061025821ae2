//! Upstream authentication: `WWW-Authenticate` challenges (RFC 7235, quoted commas included) and
//! Docker Hub-style bearer tokens, cached per (realm, service, scope) until shortly before expiry.
//!
//! Tokens and passwords never reach a log line: [`Secret`] prints as `[redacted]`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

/// A string that must never be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A parsed authentication challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses the first usable challenge out of `WWW-Authenticate` values.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = match value.find(char::is_whitespace) {
        Some(i) => (&value[..i], value[i..].trim_start()),
        None => (value, ""),
    };
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let realm = params.get("realm")?.clone();
    Some(Challenge::Bearer {
        realm,
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `key=value, key="quoted, value"` → map (keys lower-cased).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        chars.next();
        while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_owned();
        }
        out.insert(key.to_ascii_lowercase(), value);
    }
    out
}

/// The token endpoint's answer. Docker Hub sends both `token` and `access_token`.
#[derive(Deserialize)]
pub struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
    /// RFC 3339; the lifetime counts from it when present.
    issued_at: Option<String>,
}

/// Longest lifetime trusted for a token, whatever `expires_in` says (a bogus huge value must not
/// overflow the expiry nor keep a token for years).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl TokenResponse {
    /// The token and how long it may still be used from now.
    pub fn into_token(self) -> Option<(Secret, Duration)> {
        self.into_token_at(SystemTime::now())
    }

    /// [`TokenResponse::into_token`] as seen at `now`: the lifetime (`expires_in`, default and
    /// minimum 60 s, at most [`MAX_TOKEN_LIFETIME`]) counts from `issued_at` when it is present
    /// and parses, else from now. An `issued_at` in our future (clock skew) counts from now.
    pub fn into_token_at(self, now: SystemTime) -> Option<(Secret, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        // The spec's default and minimum lifetime is 60 s.
        let lifetime =
            Duration::from_secs(self.expires_in.unwrap_or(60).max(60)).min(MAX_TOKEN_LIFETIME);
        let age = self
            .issued_at
            .as_deref()
            .and_then(parse_rfc3339)
            .and_then(|issued| now.duration_since(issued).ok())
            .unwrap_or(Duration::ZERO);
        Some((Secret(token), lifetime.saturating_sub(age)))
    }
}

/// An RFC 3339 time (`2024-01-02T03:04:05.123Z`) → the instant; `None` when malformed.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(SystemTime::from)
}

/// Bearer tokens by (realm, service, scope).
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, (Secret, Instant)>>,
}

impl TokenCache {
    pub fn key(realm: &str, service: Option<&str>, scope: Option<&str>) -> String {
        format!(
            "{realm}\n{}\n{}",
            service.unwrap_or(""),
            scope.unwrap_or("")
        )
    }

    /// A token still valid for a few more seconds.
    pub fn get(&self, key: &str) -> Option<Secret> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        match tokens.get(key) {
            Some((t, exp)) if *exp > Instant::now() => Some(t.clone()),
            Some(_) => {
                tokens.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn put(&self, key: String, token: Secret, lifetime: Duration) {
        // Renew a little before expiry so a request never carries a token that lapses in flight.
        let lifetime = lifetime.min(MAX_TOKEN_LIFETIME);
        let margin = Duration::from_secs(10).min(lifetime / 4);
        let now = Instant::now();
        let expiry = now.checked_add(lifetime - margin).unwrap_or(now);
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() > 10_000 {
            let now = Instant::now();
            tokens.retain(|_, (_, exp)| *exp > now);
        }
        tokens.insert(key, (token, expiry));
    }

    pub fn remove(&self, key: &str) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.remove(key);
    }

    /// Drops the token under `key` if `refused` says it is the one a registry just refused; a
    /// newer token another request fetched meanwhile stays.
    pub fn remove_if(&self, key: &str, refused: impl Fn(&Secret) -> bool) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.get(key).is_some_and(|(t, _)| refused(t)) {
            tokens.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
    }

    #[test]
    fn quoted_commas_and_spacing_survive() {
        let c = parse_challenge(
            r#"bearer  realm = "https://a/token" , scope="repository:x:pull,push", error="insufficient_scope""#,
        );
        match c {
            Some(Challenge::Bearer {
                realm,
                scope,
                service,
            }) => {
                assert_eq!(realm, "https://a/token");
                assert_eq!(scope.as_deref(), Some("repository:x:pull,push"));
                assert_eq!(service, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn basic_and_unknown_schemes() {
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(
            parse_challenge("Bearer service=\"x\""),
            None,
            "realm is required"
        );
    }

    #[test]
    fn token_response_accepts_either_field_and_defaults_lifetime() {
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        let (tok, life) = t.into_token().unwrap();
        assert_eq!(tok.0, "a");
        assert_eq!(life, Duration::from_secs(60));
        let t: TokenResponse =
            serde_json::from_str(r#"{"token":"b","access_token":"b","expires_in":300}"#).unwrap();
        assert_eq!(t.into_token().unwrap().1, Duration::from_secs(300));
        let t: TokenResponse = serde_json::from_str(r#"{"expires_in":10}"#).unwrap();
        assert!(t.into_token().is_none());
    }

    #[test]
    fn a_huge_expires_in_is_clamped_and_does_not_panic() {
        let t: TokenResponse =
            serde_json::from_str(&format!(r#"{{"token":"t","expires_in":{}}}"#, u64::MAX)).unwrap();
        let (tok, life) = t.into_token().unwrap();
        assert_eq!(life, MAX_TOKEN_LIFETIME);
        let c = TokenCache::default();
        c.put("k".into(), tok, life);
        assert_eq!(c.get("k").map(|s| s.0), Some("t".into()));
        // Even a caller passing an absurd lifetime directly must not overflow `Instant`.
        c.put("m".into(), Secret("u".into()), Duration::MAX);
        assert_eq!(c.get("m").map(|s| s.0), Some("u".into()));
    }

    #[test]
    fn token_lifetime_counts_from_issued_at() {
        let issued = UNIX_EPOCH + Duration::from_secs(1_700_000_000); // 2023-11-14T22:13:20Z
        let parse = |json: &str, now: SystemTime| {
            let t: TokenResponse = serde_json::from_str(json).unwrap();
            t.into_token_at(now).unwrap().1
        };
        let json = r#"{"token":"t","expires_in":300,"issued_at":"2023-11-14T22:13:20Z"}"#;
        let later = |s| issued + Duration::from_secs(s);
        assert_eq!(parse(json, later(100)), Duration::from_secs(200));
        assert_eq!(parse(json, later(1000)), Duration::ZERO, "expired already");
        // An `issued_at` ahead of our clock counts from receipt.
        assert_eq!(
            parse(json, issued - Duration::from_secs(50)),
            Duration::from_secs(300)
        );
        // Offsets and fractions (counted to the fraction); garbage falls back to receipt.
        let json =
            r#"{"token":"t","expires_in":300,"issued_at":"2023-11-15T00:13:20.123456+02:00"}"#;
        assert_eq!(parse(json, later(60)).as_secs(), 240);
        let json = r#"{"token":"t","expires_in":300,"issued_at":"yesterday"}"#;
        assert_eq!(parse(json, later(60)), Duration::from_secs(300));
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:00Z"),
            Some(UNIX_EPOCH),
            "epoch"
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T12:00:00Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_709_208_000))
        );
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "[redacted]");
    }

    #[test]
    fn token_cache_expires() {
        let c = TokenCache::default();
        c.put("k".into(), Secret("t".into()), Duration::from_secs(60));
        assert_eq!(c.get("k").map(|s| s.0), Some("t".into()));
        c.put("z".into(), Secret("t".into()), Duration::ZERO);
        assert!(c.get("z").is_none());
    }
}
