//! Upstream authentication: `WWW-Authenticate` challenges (RFC 7235, quoted commas included) and
//! Docker Hub-style bearer tokens, cached per (realm, service, scope) until shortly before expiry.
//!
//! Tokens and passwords never reach a log line: [`Secret`] prints as `[redacted]`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
}

impl TokenResponse {
    /// The token and how long it may be used.
    pub fn into_token(self) -> Option<(Secret, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        // The spec's default and minimum lifetime is 60 s.
        let lifetime = self.expires_in.unwrap_or(60).max(60);
        Some((Secret(token), Duration::from_secs(lifetime)))
    }
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
        let margin = Duration::from_secs(10).min(lifetime / 4);
        let expiry = Instant::now() + lifetime - margin;
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
