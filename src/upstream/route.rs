//! Which upstream a client's repository name goes to, and under which name.
//!
//! Precedence: an explicit path prefix naming a configured host
//! (`/v2/ghcr.io/org/app/...`), then containerd's `?ns=<host>`, then the default (first) upstream.
//! After stripping the prefix, Docker Hub names get `library/` when they have one component.
//!
//! A first component that looks like a registry host (it contains a `.`, or is `localhost`, the
//! rule clients use to split `host/path` references) but names no configured upstream is a
//! `404 NAME_UNKNOWN` listing the configured hosts — never silently sent to the default, where
//! it would be cached under a name that collides with the wrong registry.
//!
//! Cache keys follow the route: tags are keyed by (upstream host, repository, tag); blobs are
//! global by digest.
//!
//! Then the upstream's repository policy ([`crate::policy`]) is checked, so every route handed
//! out is one the operator allows: nothing is looked up, fetched or cached for a denied name.

use std::sync::Arc;

use crate::config::canonical_host;
use crate::oci::{ErrorCode, RegistryError, RepoName};

use super::Upstream;

/// A routed request: the upstream and the repository name as that upstream knows it.
#[derive(Clone, Debug)]
pub struct Route {
    pub upstream: Arc<Upstream>,
    /// The repository on the upstream (prefix stripped, `library/` added for Docker Hub).
    pub repo: RepoName,
    /// The path prefix the client used (`ghcr.io`), if any — to rewrite `Link` headers back.
    pub prefix: Option<String>,
}

impl Route {
    /// Index key namespace for this upstream.
    pub fn host(&self) -> &str {
        self.upstream.host()
    }
}

/// All configured upstreams, the first being the default.
#[derive(Debug)]
pub struct Router {
    upstreams: Vec<Arc<Upstream>>,
}

impl Router {
    pub fn new(upstreams: Vec<Arc<Upstream>>) -> Router {
        Router { upstreams }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    fn find(&self, host: &str) -> Option<&Arc<Upstream>> {
        let want = canonical_host(host);
        self.upstreams
            .iter()
            .find(|u| canonical_host(u.host()) == want)
    }

    fn known_hosts(&self) -> String {
        self.upstreams
            .iter()
            .map(|u| u.host())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The upstream with this configured host (canonicalised), if any.
    pub fn by_host(&self, host: &str) -> Option<&Arc<Upstream>> {
        self.find(host)
    }

    /// Routes a client's repository name (and `ns` query parameter, if any).
    pub fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Route, RegistryError> {
        let first = name.components().next().unwrap_or("");
        let looks_like_host = first.contains('.') || first == "localhost";
        if name.depth() > 1 && looks_like_host {
            if let Some(up) = self.find(first) {
                let rest = name.strip_components(1).ok_or_else(|| {
                    RegistryError::new(
                        ErrorCode::NameInvalid,
                        "repository name is missing after the host prefix",
                    )
                })?;
                return self.finish(up.clone(), rest, Some(first.to_owned()));
            }
        }
        if let Some(ns) = ns.filter(|n| !n.is_empty()) {
            return match self.find(ns) {
                Some(up) => self.finish(up.clone(), name.clone(), None),
                None => Err(RegistryError::new(
                    ErrorCode::NameUnknown,
                    format!(
                        "upstream {:?} (from ns=) is not configured on this mirror; configured: {}",
                        crate::oci::digest::truncate(ns),
                        self.known_hosts()
                    ),
                )),
            };
        }
        let default = self.upstreams.first().ok_or_else(|| {
            RegistryError::new(ErrorCode::NameUnknown, "no upstream is configured")
        })?;
        if name.depth() > 1 && looks_like_host {
            // A path prefix naming a registry we don't mirror.
            return Err(RegistryError::new(
                ErrorCode::NameUnknown,
                format!(
                    "upstream {first:?} (from the path prefix) is not configured on this mirror; configured: {}",
                    self.known_hosts()
                ),
            ));
        }
        self.finish(default.clone(), name.clone(), None)
    }

    fn finish(
        &self,
        upstream: Arc<Upstream>,
        repo: RepoName,
        prefix: Option<String>,
    ) -> Result<Route, RegistryError> {
        let repo = if upstream.config.is_docker_hub() {
            repo.with_library_prefix()
        } else {
            repo
        };
        upstream.config.policy.check(upstream.host(), &repo)?;
        Ok(Route {
            upstream,
            repo,
            prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router() -> Router {
        router_from(
            r#"
            [[upstreams]]
            host = "docker.io"
            url = "http://127.0.0.1:1"
            [[upstreams]]
            host = "ghcr.io"
            url = "http://127.0.0.1:2"
            "#,
        )
    }

    fn router_from(toml: &str) -> Router {
        let c = Config::from_toml(toml).unwrap();
        Router::new(
            c.upstreams
                .into_iter()
                .map(|u| Arc::new(Upstream::new(u).unwrap()))
                .collect(),
        )
    }

    fn name(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    #[test]
    fn bare_names_go_to_the_default_with_library() {
        let r = router().route(&name("alpine"), None).unwrap();
        assert_eq!((r.host(), r.repo.as_str()), ("docker.io", "library/alpine"));
        let r = router().route(&name("org/app"), None).unwrap();
        assert_eq!(r.repo.as_str(), "org/app");
    }

    #[test]
    fn ns_selects_an_upstream() {
        let r = router().route(&name("org/app"), Some("ghcr.io")).unwrap();
        assert_eq!((r.host(), r.repo.as_str()), ("ghcr.io", "org/app"));
        let r = router()
            .route(&name("alpine"), Some("registry-1.docker.io"))
            .unwrap();
        assert_eq!((r.host(), r.repo.as_str()), ("docker.io", "library/alpine"));
        let e = router().route(&name("x/y"), Some("quay.io")).unwrap_err();
        assert_eq!(e.code, ErrorCode::NameUnknown);
        assert!(e.message.contains("ghcr.io"), "{}", e.message);
    }

    #[test]
    fn path_prefix_selects_an_upstream_and_is_stripped() {
        let r = router().route(&name("ghcr.io/org/app"), None).unwrap();
        assert_eq!((r.host(), r.repo.as_str()), ("ghcr.io", "org/app"));
        assert_eq!(r.prefix.as_deref(), Some("ghcr.io"));
        let r = router()
            .route(&name("docker.io/alpine"), Some("ghcr.io"))
            .unwrap();
        assert_eq!((r.host(), r.repo.as_str()), ("docker.io", "library/alpine"));
        let e = router().route(&name("quay.io/org/app"), None).unwrap_err();
        assert_eq!(e.code, ErrorCode::NameUnknown);
        assert!(
            e.message.contains("docker.io, ghcr.io") && e.message.contains("quay.io"),
            "{}",
            e.message
        );
    }

    #[test]
    fn unknown_prefix_is_refused_even_when_the_default_is_not_docker_hub() {
        let c =
            Config::from_toml("[[upstreams]]\nhost = \"ghcr.io\"\nurl = \"http://127.0.0.1:2\"")
                .unwrap();
        let r = Router::new(
            c.upstreams
                .into_iter()
                .map(|u| Arc::new(Upstream::new(u).unwrap()))
                .collect(),
        );
        let e = r.route(&name("quay.io/org/app"), None).unwrap_err();
        assert_eq!(e.code, ErrorCode::NameUnknown);
        assert!(e.message.contains("ghcr.io"), "{}", e.message);
        // No library/ for other registries; a one-component name stays as it is.
        assert_eq!(r.route(&name("app"), None).unwrap().repo.as_str(), "app");
        // The host prefix beats ns.
        let r2 = router();
        let r = r2
            .route(&name("ghcr.io/org/app"), Some("docker.io"))
            .unwrap();
        assert_eq!((r.host(), r.repo.as_str()), ("ghcr.io", "org/app"));
    }

    #[test]
    fn every_docker_hub_host_name_gets_library_and_answers_to_docker_io() {
        for host in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "registry.hub.docker.com",
            "Registry.Hub.Docker.com",
        ] {
            let r = router_from(&format!(
                "[[upstreams]]\nhost = \"{host}\"\nurl = \"http://127.0.0.1:1\""
            ));
            let up = &r.upstreams()[0];
            assert!(up.config.is_docker_hub(), "{host}");
            let routed = r.route(&name("alpine"), None).unwrap();
            assert_eq!(routed.repo.as_str(), "library/alpine", "{host}");
            // Routing and `library/` agree: any Hub name selects it, and gets `library/`.
            for alias in ["docker.io", "registry.hub.docker.com", "index.docker.io"] {
                let routed = r.route(&name("alpine"), Some(alias)).unwrap();
                assert_eq!(routed.repo.as_str(), "library/alpine", "{host} ns={alias}");
            }
        }
        assert!(!router().upstreams()[1].config.is_docker_hub());
    }

    #[test]
    fn policy_is_checked_on_the_normalised_name() {
        let r = router_from(
            r#"
            [[upstreams]]
            host = "docker.io"
            url = "http://127.0.0.1:1"
            allow = ["library/*", "myorg/**"]
            deny = ["myorg/private/**"]
            [[upstreams]]
            host = "ghcr.io"
            url = "http://127.0.0.1:2"
            deny = ["**"]
            "#,
        );
        // `alpine` is `library/alpine` once normalised, whichever way it arrives.
        assert!(r.route(&name("alpine"), None).is_ok());
        assert!(r.route(&name("docker.io/alpine"), None).is_ok());
        assert!(r.route(&name("alpine"), Some("docker.io")).is_ok());
        assert!(r.route(&name("myorg/team/app"), None).is_ok());
        for (n, ns) in [
            ("evil/miner", None),
            ("myorg/private/x", None),
            ("docker.io/evil/miner", None),
            ("ghcr.io/org/app", None),
            ("org/app", Some("ghcr.io")),
        ] {
            let e = r.route(&name(n), ns).unwrap_err();
            assert_eq!((e.code, e.status()), (ErrorCode::Denied, 403), "{n} {ns:?}");
        }
    }
}
