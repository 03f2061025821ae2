//! The shape `config.toml` is read into before validation: every key optional, unknown keys
//! rejected (`deny_unknown_fields`, so a typo is an error naming it, not a silent default).
//!
//! These structs are the one list of keys the configuration accepts; a test checks that the
//! commented `config.toml` mentions every one of them.

use std::path::Path;

use serde::Deserialize;

use super::error::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) storage: RawStorage,
    pub(super) upstreams: Option<Vec<RawUpstream>>,
    #[serde(default)]
    pub(super) auth: RawAuth,
    pub(super) offline: Option<bool>,
    pub(super) hosted: Option<RawHosted>,
    #[serde(default)]
    pub(super) console: RawConsole,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsole {
    pub(super) admins: Option<Vec<String>>,
    pub(super) allow_actions_without_auth: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHosted {
    pub(super) repositories: Option<Vec<String>>,
    pub(super) max_size: Option<String>,
    pub(super) delete: Option<bool>,
    pub(super) upload_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    #[serde(default)]
    pub(super) users: Vec<String>,
    #[serde(default)]
    pub(super) repositories: Vec<String>,
    #[serde(default)]
    pub(super) actions: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) metrics_listen: Option<String>,
    pub(super) tls_cert: Option<String>,
    pub(super) tls_key: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) max_header_size: Option<String>,
    pub(super) max_uri_length: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) htpasswd: Option<String>,
    pub(super) open_paths: Option<Vec<String>>,
    pub(super) failed_login_limit: Option<u32>,
    pub(super) failed_login_window: Option<String>,
    pub(super) access: Option<Vec<RawAccess>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    pub(super) path: Option<String>,
    pub(super) max_size: Option<String>,
    pub(super) high_watermark: Option<f64>,
    pub(super) low_watermark: Option<f64>,
    pub(super) access_flush_interval: Option<String>,
    pub(super) gc_max_age: Option<String>,
    pub(super) max_concurrent_fills: Option<i64>,
    pub(super) fill_retries: Option<i64>,
    pub(super) backend: Option<String>,
    pub(super) shared_path: Option<String>,
    pub(super) object_store_timeout: Option<String>,
    pub(super) fill_lease_ttl: Option<String>,
    pub(super) advertise_url: Option<String>,
    pub(super) s3: Option<RawS3>,
    pub(super) gcs: Option<RawGcs>,
    pub(super) azure: Option<RawAzure>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawS3 {
    pub(super) bucket: Option<String>,
    pub(super) endpoint: Option<String>,
    pub(super) region: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) access_key_id: Option<String>,
    pub(super) secret_access_key: Option<String>,
    pub(super) secret_access_key_env: Option<String>,
    pub(super) path_style: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGcs {
    pub(super) bucket: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) service_account_path: Option<String>,
    pub(super) endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAzure {
    pub(super) account: Option<String>,
    pub(super) container: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) access_key: Option<String>,
    pub(super) access_key_env: Option<String>,
    pub(super) endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) host: String,
    pub(super) url: String,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) read_timeout: Option<String>,
    pub(super) manifest_ttl: Option<String>,
    pub(super) referrers_ttl: Option<String>,
    pub(super) immutable_tags: Option<Vec<String>>,
    pub(super) max_stale: Option<String>,
    pub(super) negative_ttl: Option<String>,
    pub(super) revalidate_timeout: Option<String>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) deny: Option<Vec<String>>,
    pub(super) require_signatures: Option<String>,
    pub(super) signature_public_key: Option<String>,
    pub(super) proxy: Option<String>,
}

/// The upstream used when the file has no `[[upstreams]]`: Docker Hub (`host`, `url`).
pub(super) const DEFAULT_UPSTREAM: (&str, &str) = ("docker.io", "https://registry-1.docker.io");

impl RawUpstream {
    /// The upstream used when the file has no `[[upstreams]]`: Docker Hub.
    pub(super) fn docker_hub() -> RawUpstream {
        RawUpstream {
            host: DEFAULT_UPSTREAM.0.into(),
            url: DEFAULT_UPSTREAM.1.into(),
            username: None,
            password: None,
            password_env: None,
            connect_timeout: None,
            read_timeout: None,
            manifest_ttl: None,
            referrers_ttl: None,
            immutable_tags: None,
            max_stale: None,
            negative_ttl: None,
            revalidate_timeout: None,
            allow: None,
            deny: None,
            require_signatures: None,
            signature_public_key: None,
            proxy: None,
        }
    }
}

pub(super) fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fmt;

    use serde::de::{self, Visitor};

    use super::*;

    /// A deserializer that answers a struct's request with the struct's field names (the keys
    /// serde accepts for it; with `deny_unknown_fields`, the only ones).
    struct FieldNames;

    #[derive(Debug)]
    struct Fields(&'static [&'static str]);

    impl fmt::Display for Fields {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "fields {:?}", self.0)
        }
    }

    impl std::error::Error for Fields {}

    impl de::Error for Fields {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Fields(&[])
        }
    }

    impl<'de> de::Deserializer<'de> for FieldNames {
        type Error = Fields;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    fn fields<T: Deserialize<'static>>() -> &'static [&'static str] {
        match T::deserialize(FieldNames) {
            Err(Fields(f)) if !f.is_empty() => f,
            _ => panic!("not a struct"),
        }
    }

    /// Every table `config.toml` may hold (`""`: the top level), with the keys it accepts.
    fn tables() -> Vec<(&'static str, &'static [&'static str])> {
        vec![
            ("", fields::<RawConfig>()),
            ("server", fields::<RawServer>()),
            ("storage", fields::<RawStorage>()),
            ("storage.s3", fields::<RawS3>()),
            ("storage.gcs", fields::<RawGcs>()),
            ("storage.azure", fields::<RawAzure>()),
            ("upstreams", fields::<RawUpstream>()),
            ("auth", fields::<RawAuth>()),
            ("auth.access", fields::<RawAccess>()),
            ("hosted", fields::<RawHosted>()),
            ("console", fields::<RawConsole>()),
        ]
    }

    /// `config.toml`'s text split at its table headers, commented-out ones included
    /// (`# [storage.s3]`): table name (`""` for the header before the first table) -> text.
    fn sections(text: &str) -> Vec<(String, String)> {
        let header = regex::Regex::new(r"^#?\s*\[\[?([a-z0-9_.]+)\]\]?(\s|#|$)").unwrap();
        let mut sections = vec![(String::new(), String::new())];
        for line in text.lines() {
            if let Some(c) = header.captures(line) {
                sections.push((c[1].to_string(), String::new()));
            } else if let Some((_, body)) = sections.last_mut() {
                body.push_str(line);
                body.push('\n');
            }
        }
        sections
    }

    /// The `STOWAGE_*` environment variables named in `src/` outside tests.
    fn env_vars_read() -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let source = std::fs::read_to_string(&path).unwrap();
                // The code's own variables, not the ones its tests make up.
                let source = source.split("#[cfg(test)]").next().unwrap_or_default();
                for (at, _) in source.match_indices("\"STOWAGE_") {
                    let name: String = source[at + 1..]
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if name.len() > "STOWAGE_".len() {
                        found.insert(name);
                    }
                }
            }
        }
        found
    }

    /// What `text` (a `config.toml`) fails to mention: keys as `table.key`, variables by name.
    fn undocumented(text: &str, env_vars: &BTreeSet<String>) -> Vec<String> {
        let sections = sections(text);
        let section = |table: &str| {
            sections
                .iter()
                .find(|(name, _)| name == table)
                .map(|(_, body)| body.as_str())
        };
        let tables = tables();
        let mut missing = Vec::new();
        for (table, keys) in &tables {
            for key in *keys {
                let path = if table.is_empty() {
                    key.to_string()
                } else {
                    format!("{table}.{key}")
                };
                let documented = if tables.iter().any(|(t, _)| *t == path) {
                    section(&path).is_some()
                } else {
                    let assignment = format!(r"(^|[^a-z0-9_]){key}\s*=");
                    let assignment = regex::Regex::new(&assignment).unwrap();
                    section(table).is_some_and(|body| assignment.is_match(body))
                };
                if !documented {
                    missing.push(path);
                }
            }
        }
        let header = section("").unwrap_or_default();
        missing.extend(
            env_vars
                .iter()
                .filter(|v| !header.contains(v.as_str()))
                .cloned(),
        );
        missing
    }

    const CONFIG_TOML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");

    #[test]
    fn config_toml_documents_every_key_and_variable() {
        let text = std::fs::read_to_string(CONFIG_TOML).unwrap();
        let env_vars = env_vars_read();
        assert!(env_vars.contains("STOWAGE_METRICS_LISTEN"), "{env_vars:?}");
        let missing = undocumented(&text, &env_vars);
        assert!(
            missing.is_empty(),
            "config.toml does not mention {missing:?}"
        );
    }

    #[test]
    fn the_documentation_check_notices_a_missing_key() {
        let text = std::fs::read_to_string(CONFIG_TOML).unwrap();
        let env_vars = env_vars_read();
        let cut = |needle: &str| {
            text.lines()
                .filter(|line| !line.contains(needle))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let missing = undocumented(&cut("metrics_listen"), &env_vars);
        assert!(
            missing.contains(&"server.metrics_listen".to_string()),
            "{missing:?}"
        );
        assert!(
            missing.contains(&"STOWAGE_METRICS_LISTEN".to_string()),
            "{missing:?}"
        );
        let missing = undocumented(&cut("[storage.gcs]"), &env_vars);
        assert!(missing.contains(&"storage.gcs".to_string()), "{missing:?}");
        let missing = undocumented(&cut("revalidate_timeout"), &env_vars);
        assert_eq!(missing, ["upstreams.revalidate_timeout"]);
    }

    #[test]
    fn every_raw_struct_rejects_unknown_keys() {
        for (table, keys) in tables() {
            let doc = match table {
                "" => "bogus_key = 1".to_string(),
                "upstreams" => {
                    "[[upstreams]]\nhost = \"a\"\nurl = \"http://a\"\nbogus_key = 1".into()
                }
                "auth.access" => "[[auth.access]]\nbogus_key = 1".into(),
                t => format!("[{t}]\nbogus_key = 1"),
            };
            let e = parse_raw(&doc, Path::new("x")).unwrap_err().to_string();
            assert!(e.contains("bogus_key"), "{table}: {e}");
            assert!(!keys.contains(&"bogus_key"));
        }
    }
}
