//! `stowage config`: the configuration in effect as a TOML document, every key of the
//! [`schema`](super::schema) with where its value came from (`default`, `file`, `env VAR`),
//! secrets masked.
//!
//! A key neither the file nor the environment sets shows its built-in default when the shipped
//! `config.toml` names one: the value written there (commented out or not) counts as the
//! default only if setting it leaves the validated configuration unchanged, so an example
//! value (`tls_cert = "/etc/…"`) is never passed off as a default.

use std::collections::BTreeMap;

use super::env::{display_path, place, toml_value, Step};
use super::schema::{Field, Kind};

/// The shipped, commented configuration: the source of the defaults shown.
const SHIPPED: &str = include_str!("../../config.toml");

/// What [`render`] needs besides the schema.
pub(super) struct View<'a> {
    /// The file's table (empty without a file) and the file's name, if any.
    pub(super) file: &'a toml::Table,
    pub(super) file_name: Option<String>,
    /// File and environment together.
    pub(super) effective: &'a toml::Table,
    /// Key path → the variable that set it.
    pub(super) from_env: &'a BTreeMap<String, String>,
    /// The validated configuration of a table (its `Debug` text), `None` if it is invalid.
    pub(super) check: &'a dyn Fn(&toml::Table) -> Option<String>,
}

/// The effective configuration, one line a key.
pub(super) fn render(schema: &[Field], view: &View<'_>) -> String {
    let mut effective = view.effective.clone();
    if !effective.contains_key("upstreams") {
        // What the raw config falls back to, made visible: the built-in Docker Hub entry.
        place(
            &mut effective,
            &[Step::Key("upstreams"), Step::Index(0)],
            None,
        );
    }
    let mut r = Renderer {
        view,
        samples: samples(SHIPPED),
        base: (view.check)(&effective),
        effective: &effective,
        out: String::new(),
    };
    let source = match &view.file_name {
        Some(f) => format!("{f}, then"),
        None => "built-in defaults (no file), then".into(),
    };
    r.out.push_str(&format!(
        "# stowage configuration in effect: {source} STOWAGE_* variables.\n\
         # After each value: where it came from (default, file, env VARIABLE). Secrets are masked.\n"
    ));
    r.table(schema, Some(&effective), &mut Vec::new());
    r.out
}

struct Renderer<'a> {
    view: &'a View<'a>,
    samples: BTreeMap<(String, String), toml::Value>,
    base: Option<String>,
    effective: &'a toml::Table,
    out: String,
}

impl Renderer<'_> {
    /// The keys of one table, then its sub-tables, then its lists of tables.
    fn table(&mut self, fields: &[Field], t: Option<&toml::Table>, path: &mut Vec<Step>) {
        let is_table = |f: &&Field| matches!(&f.kind, Kind::Table(_));
        let is_list =
            |f: &&Field| matches!(&f.kind, Kind::List(i) if matches!(**i, Kind::Table(_)));
        for f in fields.iter().filter(|f| !is_table(f) && !is_list(f)) {
            path.push(Step::Key(f.name));
            self.key(f, t.and_then(|t| t.get(f.name)), path);
            path.pop();
        }
        for f in fields.iter().filter(is_table) {
            let Kind::Table(sub) = &f.kind else { continue };
            path.push(Step::Key(f.name));
            let name = display_path(path);
            match t.and_then(|t| t.get(f.name)).and_then(|v| v.as_table()) {
                None if f.optional => self.out.push_str(&format!("\n# [{name}] (not set)\n")),
                sub_table => {
                    self.out.push_str(&format!("\n[{name}]\n"));
                    self.table(sub, sub_table, path);
                }
            }
            path.pop();
        }
        for f in fields.iter().filter(is_list) {
            let Kind::List(inner) = &f.kind else { continue };
            let Kind::Table(sub) = inner.as_ref() else {
                continue;
            };
            path.push(Step::Key(f.name));
            let name = tables_only(path);
            let entries = t.and_then(|t| t.get(f.name)).and_then(|v| v.as_array());
            match entries {
                Some(entries) if !entries.is_empty() => {
                    for (i, e) in entries.iter().enumerate() {
                        self.out.push_str(&format!("\n[[{name}]]\n"));
                        path.push(Step::Index(i));
                        self.table(sub, e.as_table(), path);
                        path.pop();
                    }
                }
                _ => self.out.push_str(&format!("\n# [[{name}]] (not set)\n")),
            }
            path.pop();
        }
    }

    fn key(&mut self, f: &Field, value: Option<&toml::Value>, path: &[Step]) {
        let key = display_path(path);
        let line = match value {
            Some(v) => {
                let source = match self.view.from_env.get(&key) {
                    Some(var) => format!("env {var}"),
                    None if lookup(self.view.file, path).is_some() => "file".into(),
                    None => "default".into(),
                };
                format!(
                    "{:<48} # {source}",
                    format!("{} = {}", f.name, shown(f.name, v))
                )
            }
            None => match self.default_of(path) {
                Some(v) => format!(
                    "{:<48} # default",
                    format!("{} = {}", f.name, shown(f.name, &v))
                ),
                None => format!("# {} (not set)", f.name),
            },
        };
        self.out.push_str(&line);
        self.out.push('\n');
    }

    /// The shipped config's value for the key at `path`, if it is what the key defaults to.
    fn default_of(&self, path: &[Step]) -> Option<toml::Value> {
        let Some((Step::Key(key), parents)) = path.split_last() else {
            return None;
        };
        let sample = self.samples.get(&(tables_only(parents), key.to_string()))?;
        let mut with = self.effective.clone();
        place(&mut with, path, Some(sample.clone()));
        let base = self.base.as_ref()?;
        ((self.view.check)(&with).as_ref() == Some(base)).then(|| sample.clone())
    }
}

/// `upstreams[0].tls` → `upstreams.tls`: a path as a table header names it.
fn tables_only(path: &[Step]) -> String {
    let keys: Vec<&str> = path
        .iter()
        .filter_map(|s| match s {
            Step::Key(k) => Some(*k),
            Step::Index(_) => None,
        })
        .collect();
    keys.join(".")
}

fn lookup<'a>(table: &'a toml::Table, path: &[Step]) -> Option<&'a toml::Value> {
    let mut value: Option<&toml::Value> = None;
    for step in path {
        value = match (value, step) {
            (None, Step::Key(k)) => table.get(*k),
            (Some(toml::Value::Table(t)), Step::Key(k)) => t.get(*k),
            (Some(toml::Value::Array(a)), Step::Index(i)) => a.get(*i),
            _ => return None,
        };
        value?;
    }
    value
}

/// A value as `stowage config` prints it: secrets and URL passwords masked.
fn shown(name: &str, value: &toml::Value) -> String {
    let secret = !name.ends_with("_env")
        && (["password", "secret", "token"]
            .iter()
            .any(|w| name.contains(w))
            || name == "access_key");
    match value {
        toml::Value::String(s) if secret && !s.is_empty() => "\"********\"".into(),
        toml::Value::String(s) => toml::Value::String(mask_url(s)).to_string(),
        toml::Value::Array(a) => toml::Value::Array(
            a.iter()
                .map(|v| match v {
                    toml::Value::String(s) => toml::Value::String(mask_url(s)),
                    other => other.clone(),
                })
                .collect(),
        )
        .to_string(),
        other => other.to_string(),
    }
}

/// `http://user:pass@host` → `http://user:********@host`; anything else unchanged.
pub fn mask_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("********"));
            u.to_string()
        }
        _ => text.to_string(),
    }
}

/// The `key = value` lines of a commented `config.toml`, commented-out ones included: (table,
/// key) → value, the first one of each.
fn samples(text: &str) -> BTreeMap<(String, String), toml::Value> {
    let mut out = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim_start_matches(['#', ' ']);
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[');
            if let Some(end) = name.find(']') {
                table = name[..end].to_string();
            }
            continue;
        }
        let Some((key, rest)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        // The value ends where a comment starts; try each `#` from the left.
        let cuts = rest.match_indices('#').map(|(i, _)| i).chain([rest.len()]);
        if let Some(v) = cuts
            .filter_map(|i| toml_value(rest[..i].trim()).ok())
            .next()
        {
            out.entry((table.clone(), key.to_string())).or_insert(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_read_commented_and_plain_lines() {
        let s = samples(SHIPPED);
        let get = |t: &str, k: &str| s.get(&(t.to_string(), k.to_string())).cloned();
        assert_eq!(get("server", "listen"), Some("0.0.0.0:5000".into()));
        assert_eq!(get("server", "max_connections"), Some(1024.into()));
        assert_eq!(get("storage.s3", "bucket"), Some("stowage".into()));
        assert_eq!(
            get("upstreams", "url"),
            Some("https://registry-1.docker.io".into())
        );
        assert!(matches!(
            get("upstreams", "immutable_tags"),
            Some(toml::Value::Array(_))
        ));
    }

    #[test]
    fn secrets_and_url_passwords_are_masked() {
        assert_eq!(shown("password", &"hunter2".into()), "\"********\"");
        assert_eq!(shown("secret_access_key", &"k".into()), "\"********\"");
        assert_eq!(shown("password_env", &"HUB".into()), "\"HUB\"");
        assert_eq!(
            shown("proxy", &"http://u:pw@proxy:3128".into()),
            "\"http://u:********@proxy:3128/\""
        );
        assert_eq!(shown("url", &"https://r.io".into()), "\"https://r.io\"");
    }
}
