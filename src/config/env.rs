//! `STOWAGE_*` environment variables: one for every key of the [`schema`](super::schema),
//! named `STOWAGE_<TABLE>_<KEY>` (`storage.s3.bucket` → `STOWAGE_STORAGE_S3_BUCKET`), laid over
//! the file's table before it is read into the raw structs.
//!
//! Lists of tables take an index (`STOWAGE_UPSTREAMS_1_URL` is `upstreams[1].url`; one past the
//! file's last entry adds one) or a whole TOML array (`STOWAGE_AUTH_ACCESS`); the first upstream
//! also answers to `STOWAGE_UPSTREAM_<KEY>`, starting from the built-in Docker Hub entry when
//! the file has none. Lists of strings are comma-separated or a TOML array (`["a,b", "c"]`). An
//! empty variable resets its key to the default. A variable that names no key under a known
//! table is refused, so that a typo is an error rather than a silent default.

use std::collections::BTreeMap;

use super::error::ConfigError;
use super::raw::DEFAULT_UPSTREAM;
use super::schema::{Field, Kind};

pub(super) const PREFIX: &str = "STOWAGE_";

/// The names kept from before every key had one: variable → key.
const ALIASES: [(&str, &str); 2] = [
    ("STOWAGE_LISTEN", "server.listen"),
    ("STOWAGE_METRICS_LISTEN", "server.metrics_listen"),
];

/// Lists of tables whose first entry also has a singular prefix, as `registry:2` users expect.
const FIRST_ENTRY: [(&str, &str); 1] = [("upstreams", "UPSTREAM")];

/// One step down a configuration table.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Step {
    Key(&'static str),
    Index(usize),
}

/// A variable and the key it sets.
#[derive(Clone, Debug)]
pub(super) struct Variable {
    pub(super) name: String,
    pub(super) path: Vec<Step>,
    pub(super) kind: Kind,
}

/// `upstreams[0].url`, `storage.s3.bucket`: a key path the way errors name it.
pub(super) fn display_path(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Every variable `table` (the file's) can be overridden with, aliases last (so that the
/// canonical name wins when both are set).
pub(super) fn variables(schema: &[Field], table: &toml::Table) -> Vec<Variable> {
    let mut out = Vec::new();
    collect(schema, Some(table), PREFIX, &mut Vec::new(), &mut out);
    for (name, key) in ALIASES {
        if let Some(v) = out.iter().find(|v| display_path(&v.path) == key) {
            out.push(Variable {
                name: name.to_string(),
                ..v.clone()
            });
        }
    }
    out
}

fn collect(
    fields: &[Field],
    table: Option<&toml::Table>,
    prefix: &str,
    path: &mut Vec<Step>,
    out: &mut Vec<Variable>,
) {
    for f in fields {
        let name = format!("{prefix}{}", f.name.to_ascii_uppercase());
        path.push(Step::Key(f.name));
        let value = table.and_then(|t| t.get(f.name));
        match &f.kind {
            Kind::Table(sub) => collect(
                sub,
                value.and_then(|v| v.as_table()),
                &format!("{name}_"),
                path,
                out,
            ),
            Kind::List(inner) if matches!(**inner, Kind::Table(_)) => {
                out.push(Variable {
                    name: name.clone(),
                    path: path.clone(),
                    kind: f.kind.clone(),
                });
                if let Kind::Table(sub) = inner.as_ref() {
                    let entries = value.and_then(|v| v.as_array());
                    let len = entries.map_or(0, Vec::len);
                    let first = FIRST_ENTRY
                        .iter()
                        .find(|(list, _)| path.len() == 1 && *list == f.name);
                    for i in 0..=len.max(usize::from(first.is_some())) {
                        let entry = entries.and_then(|e| e.get(i)).and_then(|v| v.as_table());
                        path.push(Step::Index(i));
                        collect(sub, entry, &format!("{name}_{i}_"), path, out);
                        if let (0, Some((_, singular))) = (i, first) {
                            collect(sub, entry, &format!("{PREFIX}{singular}_"), path, out);
                        }
                        path.pop();
                    }
                }
            }
            kind => out.push(Variable {
                name,
                path: path.clone(),
                kind: kind.clone(),
            }),
        }
        path.pop();
    }
}

/// Lays the variables `env` sets over `table`; returns key path → variable for each key set.
pub(super) fn overlay(
    schema: &[Field],
    table: &mut toml::Table,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut set = BTreeMap::new();
    for var in variables(schema, table) {
        let Some(text) = env(&var.name) else {
            continue;
        };
        let key = display_path(&var.path);
        if set.contains_key(&key) {
            continue;
        }
        let value = if text.trim().is_empty() {
            None
        } else {
            Some(
                parse_value(&text, &var.kind).map_err(|message| ConfigError::Env {
                    var: var.name.clone(),
                    key: key.clone(),
                    message,
                })?,
            )
        };
        place(table, &var.path, value);
        set.insert(key, var.name);
    }
    Ok(set)
}

/// Variables that start like a key of `schema` (`STOWAGE_SERVER_…`) but name none, leaving out
/// those the configuration itself names (`password_env = "STOWAGE_…"`).
pub(super) fn unknown<'a>(
    schema: &[Field],
    table: &toml::Table,
    names: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let known = variables(schema, table);
    let mut referenced = Vec::new();
    env_references(table, &mut referenced);
    let heads: Vec<String> = schema
        .iter()
        .map(|f| f.name.to_ascii_uppercase())
        .chain(FIRST_ENTRY.iter().map(|(_, s)| s.to_string()))
        .collect();
    names
        .filter(|n| {
            let Some(rest) = n.strip_prefix(PREFIX) else {
                return false;
            };
            heads
                .iter()
                .any(|h| rest == h || rest.starts_with(&format!("{h}_")))
                && !known.iter().any(|v| v.name == *n)
                && !referenced.iter().any(|r| r == n)
        })
        .map(str::to_string)
        .collect()
}

/// The values of `*_env` keys anywhere in `table`: names of variables holding secrets.
fn env_references(table: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in table {
        match v {
            toml::Value::String(s) if k.ends_with("_env") => out.push(s.clone()),
            toml::Value::Table(t) => env_references(t, out),
            toml::Value::Array(a) => a
                .iter()
                .filter_map(|e| e.as_table())
                .for_each(|t| env_references(t, out)),
            _ => {}
        }
    }
}

/// `text` as a value of `kind`, or what is wrong with it.
fn parse_value(text: &str, kind: &Kind) -> Result<toml::Value, String> {
    let t = text.trim();
    match kind {
        Kind::Str => Ok(toml::Value::String(text.to_string())),
        Kind::Int => t
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("{t:?} is not an integer")),
        Kind::Float => t
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| format!("{t:?} is not a number")),
        Kind::Bool => match t.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("{t:?} is not true or false")),
        },
        Kind::List(inner) if !t.starts_with('[') && !matches!(**inner, Kind::Table(_)) => t
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| parse_value(s, inner))
            .collect::<Result<Vec<_>, _>>()
            .map(toml::Value::Array),
        Kind::Any => Ok(toml_value(t).unwrap_or_else(|_| toml::Value::String(text.to_string()))),
        Kind::List(_) | Kind::Table(_) => {
            toml_value(t).map_err(|e| format!("not a TOML value of the key's type: {e}"))
        }
    }
}

/// `text` read as the right-hand side of a TOML assignment.
pub(super) fn toml_value(text: &str) -> Result<toml::Value, String> {
    let doc: toml::Table =
        toml::from_str(&format!("v = {text}")).map_err(|e| e.message().to_string())?;
    doc.get("v").cloned().ok_or_else(|| "no value".to_string())
}

/// Sets (or, with `None`, removes) the key at `path`, creating the tables and the list entry on
/// the way; a list entry created for the first upstream starts as the built-in Docker Hub.
pub(super) fn place(table: &mut toml::Table, path: &[Step], value: Option<toml::Value>) {
    let Some((Step::Key(first), rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match value {
            Some(v) => table.insert(first.to_string(), v),
            None => table.remove(*first),
        };
        return;
    }
    let default_entry = FIRST_ENTRY.iter().any(|(list, _)| list == first);
    let slot = table
        .entry(first.to_string())
        .or_insert_with(|| match rest[0] {
            Step::Index(_) => toml::Value::Array(Vec::new()),
            Step::Key(_) => toml::Value::Table(toml::Table::new()),
        });
    match (slot, &rest[0]) {
        (toml::Value::Table(t), Step::Key(_)) => place(t, rest, value),
        (toml::Value::Array(a), Step::Index(i)) => {
            while a.len() <= *i {
                let mut entry = toml::Table::new();
                if default_entry && a.is_empty() {
                    entry.insert("host".into(), DEFAULT_UPSTREAM.0.into());
                    entry.insert("url".into(), DEFAULT_UPSTREAM.1.into());
                }
                a.push(toml::Value::Table(entry));
            }
            if let (Some(toml::Value::Table(t)), Some(below)) = (a.get_mut(*i), rest.get(1..)) {
                place(t, below, value);
            }
        }
        _ => {}
    }
}
