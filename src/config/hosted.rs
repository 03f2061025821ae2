//! `[hosted]` (repositories that live in stowage: pushed to, never forwarded upstream) and
//! `[[auth.access]]` (who may pull, push and delete what).

use std::time::Duration;

use crate::policy::Pattern;

use super::error::{invalid, ConfigError};
use super::raw::{RawAccess, RawHosted};
use super::units::{parse_byte_size, parse_duration};
use super::UpstreamConfig;

/// `[hosted]`: names matching `repositories` are hosted.
#[derive(Clone, Debug)]
pub struct HostedConfig {
    /// Globs (as `allow` / `deny`) over repository names.
    pub repositories: Vec<Pattern>,
    /// Budget for pushed content, apart from `storage.max_size`.
    pub max_size: u64,
    /// Whether `DELETE` of manifests, tags and blobs is allowed.
    pub delete: bool,
    /// An upload session idle this long is purged with its bytes.
    pub upload_timeout: Duration,
}

pub const DEFAULT_HOSTED_MAX_SIZE: &str = "50GiB";
pub const DEFAULT_UPLOAD_TIMEOUT: &str = "1h";

/// What a user may do to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }
}

/// One `[[auth.access]]` rule: `users` may do `actions` to `repositories`.
#[derive(Clone, Debug)]
pub struct AccessRule {
    /// htpasswd user names; `"*"` = any authenticated user; `"anonymous"` = no credentials.
    pub users: Vec<String>,
    pub repositories: Vec<Pattern>,
    pub actions: Vec<Action>,
}

/// `[hosted]`, validated: a pattern may not capture an upstream's path prefix (`ghcr.io/**`)
/// nor Docker Hub's namespace (`**`, `*/*`: official images would never be mirrored again).
pub(super) fn hosted_config(
    raw: Option<RawHosted>,
    upstreams: &[UpstreamConfig],
) -> Result<Option<HostedConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let mut repositories = Vec::new();
    for (i, text) in raw.repositories.unwrap_or_default().iter().enumerate() {
        let key = format!("hosted.repositories[{i}]");
        let p = Pattern::new(text).map_err(|m| invalid(&key, m))?;
        for u in upstreams {
            if p.matches(&format!("{}/probe", u.host)) || p.matches(&format!("{}/probe/x", u.host))
            {
                return Err(invalid(
                    &key,
                    format!(
                        "{text:?} would capture the path prefix of upstream {}: its names would never be mirrored",
                        u.host
                    ),
                ));
            }
        }
        if p.matches("library/probe") {
            return Err(invalid(
                &key,
                format!(
                    "{text:?} would capture the default upstream's whole namespace (library/...)"
                ),
            ));
        }
        repositories.push(p);
    }
    if repositories.is_empty() {
        return Err(invalid(
            "hosted.repositories",
            "name at least one pattern, e.g. [\"team/**\"]",
        ));
    }
    let max_size = parse_byte_size(raw.max_size.as_deref().unwrap_or(DEFAULT_HOSTED_MAX_SIZE))
        .map_err(|m| invalid("hosted.max_size", m))?;
    let upload_timeout = parse_duration(
        raw.upload_timeout
            .as_deref()
            .unwrap_or(DEFAULT_UPLOAD_TIMEOUT),
    )
    .map_err(|m| invalid("hosted.upload_timeout", m))?;
    if upload_timeout.is_zero() {
        return Err(invalid("hosted.upload_timeout", "must be above 0"));
    }
    Ok(Some(HostedConfig {
        repositories,
        max_size,
        delete: raw.delete.unwrap_or(false),
        upload_timeout,
    }))
}

/// `[[auth.access]]`, validated.
pub(super) fn access_rules(raw: Option<Vec<RawAccess>>) -> Result<Vec<AccessRule>, ConfigError> {
    let mut rules = Vec::new();
    for (i, r) in raw.unwrap_or_default().into_iter().enumerate() {
        let key = |field: &str| format!("auth.access[{i}].{field}");
        if r.users.is_empty() {
            return Err(invalid(key("users"), "name at least one user (or \"*\")"));
        }
        let mut repositories = Vec::new();
        for text in &r.repositories {
            repositories.push(Pattern::new(text).map_err(|m| invalid(key("repositories"), m))?);
        }
        if repositories.is_empty() {
            return Err(invalid(key("repositories"), "name at least one pattern"));
        }
        let mut actions = Vec::new();
        for a in &r.actions {
            actions.push(match a.as_str() {
                "pull" => Action::Pull,
                "push" => Action::Push,
                "delete" => Action::Delete,
                other => {
                    return Err(invalid(
                        key("actions"),
                        format!("{other:?} is not one of \"pull\", \"push\", \"delete\""),
                    ))
                }
            });
        }
        rules.push(AccessRule {
            users: r.users,
            repositories,
            actions,
        });
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn hosted_is_off_unless_configured_and_defaults_apply() {
        assert!(Config::from_toml("").unwrap().hosted.is_none());
        let c = Config::from_toml("[hosted]\nrepositories = [\"team/**\"]\n").unwrap();
        let h = c.hosted.unwrap();
        assert!(h.repositories[0].matches("team/a/b"));
        assert_eq!(h.max_size, 50 << 30);
        assert!(!h.delete);
        assert_eq!(h.upload_timeout, std::time::Duration::from_secs(3600));
    }

    #[test]
    fn hosted_patterns_may_not_capture_mirrored_names() {
        let up = "[[upstreams]]\nhost = \"docker.io\"\nurl = \"http://a\"\n[[upstreams]]\nhost = \"ghcr.io\"\nurl = \"http://b\"\n";
        for bad in ["**", "*/*", "ghcr.io/**", "*/**"] {
            let e = err(&format!(
                "{up}[hosted]\nrepositories = [\"team/*\", \"{bad}\"]\n"
            ));
            assert!(e.contains("hosted.repositories[1]"), "{bad}: {e}");
        }
        assert!(err("[hosted]\nrepositories = []\n").contains("hosted.repositories"));
        assert!(
            err("[hosted]\nrepositories = [\"t/*\"]\nupload_timeout = \"0s\"\n")
                .contains("hosted.upload_timeout")
        );
        assert!(
            err("[hosted]\nrepositories = [\"t/*\"]\nmax_size = \"lots\"\n")
                .contains("hosted.max_size")
        );
    }

    #[test]
    fn access_rules_name_users_patterns_and_known_actions() {
        let c = Config::from_toml(
            "[auth]\n[[auth.access]]\nusers = [\"ci\"]\nrepositories = [\"team/**\"]\nactions = [\"pull\", \"push\"]\n",
        )
        .unwrap();
        assert_eq!(c.auth.access.len(), 1);
        assert_eq!(c.auth.access[0].actions.len(), 2);
        let e = err(
            "[[auth.access]]\nusers = [\"ci\"]\nrepositories = [\"a/*\"]\nactions = [\"write\"]\n",
        );
        assert!(e.contains("auth.access[0].actions"), "{e}");
        let e =
            err("[[auth.access]]\nusers = []\nrepositories = [\"a/*\"]\nactions = [\"pull\"]\n");
        assert!(e.contains("auth.access[0].users"), "{e}");
    }
}
