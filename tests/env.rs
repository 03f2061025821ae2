//! Every key of the shipped `config.toml` set from the environment, one at a time, as
//! `STOWAGE_<TABLE>_<KEY>` (the first upstream as `STOWAGE_UPSTREAM_<KEY>`, the first access
//! rule as `STOWAGE_AUTH_ACCESS_0_<KEY>`), checked through `stowage config`; wrong values name
//! the variable and exit 2, from `stowage config` and from `stowage serve` alike.

use std::path::Path;
use std::process::{Command, Output};

fn stowage(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stowage"));
    cmd.current_dir(dir);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STOWAGE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// One documented key: its table (`""` top level, `storage.s3`, `upstreams`), name, and the
/// value `config.toml` shows for it.
#[derive(Debug)]
struct Key {
    table: String,
    name: String,
    sample: toml::Value,
}

/// `text` read as the right-hand side of a TOML assignment that may be followed by prose.
fn leading_value(text: &str) -> Option<toml::Value> {
    let cuts = text
        .char_indices()
        .filter(|(_, c)| *c == '#' || *c == ';')
        .map(|(i, _)| i)
        .chain([text.len()]);
    for cut in cuts {
        let doc = format!("v = {}", text[..cut].trim());
        if let Ok(t) = toml::from_str::<toml::Table>(&doc) {
            return t.get("v").cloned();
        }
    }
    None
}

/// Every `key = value` of `config.toml`, commented out or not, including the alternatives a
/// comment offers (`# or password_env = "HUB_TOKEN"`).
fn documented_keys() -> Vec<Key> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .expect("config.toml");
    let header = regex::Regex::new(r"^#?\s*\[\[?([a-z0-9_.]+)\]\]?(\s|#|$)").unwrap();
    let assignment = regex::Regex::new(r"(^#?\s*|\bor:?\s+)([a-z_][a-z0-9_]*)\s*=\s*").unwrap();
    let mut table = String::new();
    let mut keys: Vec<Key> = Vec::new();
    let mut seen_table = false;
    for line in text.lines() {
        if let Some(c) = header.captures(line) {
            table = c[1].to_string();
            seen_table = true;
            continue;
        }
        // Before the first table only `offline` is a key; the rest is the header's prose.
        if !seen_table && !line.starts_with("# offline") {
            continue;
        }
        for c in assignment.captures_iter(line) {
            let name = c[2].to_string();
            let Some(sample) = leading_value(&line[c.get(0).unwrap().end()..]) else {
                continue;
            };
            if !keys.iter().any(|k| k.table == table && k.name == name) {
                keys.push(Key {
                    table: table.clone(),
                    name,
                    sample,
                });
            }
        }
    }
    keys
}

/// The variable for a key, by the documented rule.
fn variable(k: &Key) -> String {
    let table = match k.table.as_str() {
        "upstreams" => "UPSTREAM".to_string(),
        "auth.access" => "AUTH_ACCESS_0".to_string(),
        t => t.replace('.', "_").to_ascii_uppercase(),
    };
    let key = k.name.to_ascii_uppercase();
    if table.is_empty() {
        format!("STOWAGE_{key}")
    } else {
        format!("STOWAGE_{table}_{key}")
    }
}

/// The variable's text for a value: a string as it is, anything else as TOML.
fn env_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A file that makes the key's table valid on its own (a backend's table needs the backend,
/// a certificate needs its key...), and variables the key's value refers to.
fn prerequisites(k: &Key) -> (&'static str, Vec<(&'static str, &'static str)>) {
    let file = match (k.table.as_str(), k.name.as_str()) {
        ("storage.s3", _) => "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\n",
        ("storage.gcs", _) => "[storage]\nbackend = \"gcs\"\n[storage.gcs]\nbucket = \"b\"\n",
        ("storage.azure", _) => {
            "[storage]\nbackend = \"azure\"\n[storage.azure]\naccount = \"a\"\ncontainer = \"c\"\n"
        }
        ("server", "tls_cert" | "tls_key") => {
            "[server]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n"
        }
        ("auth.access", _) => {
            "[[auth.access]]\nusers = [\"u\"]\nrepositories = [\"r/*\"]\nactions = [\"pull\"]\n"
        }
        ("hosted", _) => "[hosted]\nrepositories = [\"team/**\"]\n",
        _ => "",
    };
    let vars = match (k.table.as_str(), k.name.as_str()) {
        ("upstreams", "password") => vec![("STOWAGE_UPSTREAM_USERNAME", "u")],
        ("upstreams", "password_env") => vec![("STOWAGE_UPSTREAM_USERNAME", "u")],
        ("storage", "advertise_url") => vec![("STOWAGE_STORAGE_SHARED_PATH", "/srv/stowage")],
        ("upstreams", "signature_public_key") => {
            vec![("STOWAGE_UPSTREAM_REQUIRE_SIGNATURES", "sigstore")]
        }
        _ => vec![],
    };
    (file, vars)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `stowage config` with `file` as the config file and `vars` set.
fn config(dir: &Path, file: &str, vars: &[(String, String)]) -> Output {
    let path = dir.join("config.toml");
    std::fs::write(&path, file).expect("write config");
    let mut cmd = stowage(dir);
    cmd.arg("config").arg("--config").arg(&path);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("run stowage config")
}

/// The line `stowage config` prints for `name` inside `table`'s (first) section.
fn line_of<'a>(stdout: &'a str, table: &str, name: &str) -> Option<&'a str> {
    let mut current = String::new();
    for line in stdout.lines() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[') {
            current = h.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        if current == table && t.starts_with(&format!("{name} = ")) {
            return Some(line);
        }
    }
    None
}

#[test]
fn every_documented_key_is_set_by_its_variable() {
    let keys = documented_keys();
    assert!(
        keys.len() >= 50,
        "config.toml documents {} keys: {keys:?}",
        keys.len()
    );
    let dir = tempfile::tempdir().unwrap();
    for k in &keys {
        let var = variable(k);
        let (file, extra) = prerequisites(k);
        let mut vars = vec![(var.clone(), env_text(&k.sample))];
        vars.extend(extra.iter().map(|(a, b)| (a.to_string(), b.to_string())));
        // A key naming a variable (`password_env = "HUB_TOKEN"`): that variable must exist.
        if k.name.ends_with("_env") {
            vars.push((env_text(&k.sample), "from-the-environment".into()));
        }
        let out = config(dir.path(), file, &vars);
        let all = text(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{var} for {}.{}: {all}",
            k.table,
            k.name
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = line_of(&stdout, &k.table, &k.name)
            .unwrap_or_else(|| panic!("no line for {}.{}: {all}", k.table, k.name));
        assert!(line.ends_with(&format!("# env {var}")), "{var}: {line}");
        let shown = line[k.name.len() + 3..].split(" #").next().unwrap().trim();
        let secret = ["password", "secret"].iter().any(|w| k.name.contains(w))
            && !k.name.ends_with("_env")
            || k.name == "access_key";
        let url_password = match &k.sample {
            toml::Value::String(s) => url::Url::parse(s)
                .ok()
                .and_then(|u| u.password().map(str::to_string)),
            _ => None,
        };
        if secret {
            assert_eq!(shown, "\"********\"", "{var} is masked");
        } else if let Some(password) = url_password {
            assert!(
                !shown.contains(&password) && shown.contains(":********@"),
                "{var}: {line}"
            );
        } else {
            let shown: toml::Value = toml::from_str::<toml::Table>(&format!("v = {shown}"))
                .unwrap_or_else(|e| panic!("{line}: {e}"))["v"]
                .clone();
            let shown = match (&shown, &k.sample) {
                // URLs come back normalised (`http://h:1` → `http://h:1/`).
                (toml::Value::String(s), toml::Value::String(x))
                    if s.trim_end_matches('/') == x =>
                {
                    k.sample.clone()
                }
                _ => shown,
            };
            assert_eq!(shown, k.sample, "{var}: {line}");
        }
    }
}

#[test]
fn the_config_file_is_named_and_file_values_are_marked() {
    let dir = tempfile::tempdir().unwrap();
    let out = config(
        dir.path(),
        "[server]\nlisten = \"127.0.0.1:5001\"\n[storage]\nmax_size = \"1GiB\"\n",
        &[("STOWAGE_STORAGE_MAX_SIZE".into(), "2GiB".into())],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout.contains("config.toml"), "{stdout}");
    let listen = line_of(&stdout, "server", "listen").unwrap();
    assert!(listen.ends_with("# file"), "{listen}");
    let size = line_of(&stdout, "storage", "max_size").unwrap();
    assert!(
        size.starts_with("max_size = \"2GiB\"") && size.ends_with("# env STOWAGE_STORAGE_MAX_SIZE"),
        "{size}"
    );
    let conns = line_of(&stdout, "server", "max_connections").unwrap();
    assert!(
        conns.starts_with("max_connections = 1024") && conns.ends_with("# default"),
        "{conns}"
    );
    assert!(
        stdout.contains("# tls_cert (not set)"),
        "an example is not a default: {stdout}"
    );
}

#[test]
fn secrets_never_show() {
    let dir = tempfile::tempdir().unwrap();
    let out = config(
        dir.path(),
        "[[upstreams]]\nhost = \"docker.io\"\nurl = \"https://u:filepass@registry-1.docker.io\"\nusername = \"u\"\npassword = \"filesecret\"\n",
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !stdout.contains("filesecret") && !stdout.contains("filepass"),
        "{stdout}"
    );
    let out = config(
        dir.path(),
        "",
        &[
            ("STOWAGE_UPSTREAM_USERNAME".into(), "u".into()),
            ("STOWAGE_UPSTREAM_PASSWORD".into(), "envsecret".into()),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("envsecret"),
        "{stdout}"
    );
}

/// `stowage config` and `stowage serve` (which must not start) with `var` = `value`.
fn refused(var: &str, value: &str) {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["config", "serve"] {
        let out = stowage(dir.path())
            .arg(cmd)
            .env(var, value)
            .env("STOWAGE_STORAGE_PATH", dir.path().join("data"))
            .output()
            .expect("run stowage");
        let all = text(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{cmd} with {var}={value:?}: {all}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(var),
            "{cmd}: the message names {var}: {all}"
        );
    }
}

#[test]
fn a_wrong_value_names_the_variable_and_exits_2() {
    refused("STOWAGE_SERVER_LISTEN", "not-an-address");
    refused("STOWAGE_LISTEN", "not-an-address");
    refused("STOWAGE_STORAGE_MAX_SIZE", "twelve parsecs");
    refused("STOWAGE_SERVER_MAX_CONNECTIONS", "many");
    refused("STOWAGE_STORAGE_HIGH_WATERMARK", "high");
    refused("STOWAGE_OFFLINE", "perhaps");
    refused("STOWAGE_UPSTREAM_URL", "ftp://example");
    refused("STOWAGE_UPSTREAM_MANIFEST_TTL", "soon");
    refused("STOWAGE_AUTH_OPEN_PATHS", "/v2/");
    refused("STOWAGE_STORAGE_S3_BUCKET", "b");
    refused("STOWAGE_SERVER_LISTN", "127.0.0.1:1");
}

/// Each documented key's variable with a value no typed key accepts: either it is a free-form
/// string (exit 0), or the error names the variable (exit 2) — never a panic or another code.
#[test]
fn garbage_in_any_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut refused = 0;
    for k in documented_keys() {
        let var = variable(&k);
        let (file, _) = prerequisites(&k);
        let out = config(dir.path(), file, &[(var.clone(), "§garbage§".into())]);
        match out.status.code() {
            Some(0) => {}
            Some(2) => {
                refused += 1;
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(stderr.contains(&var), "{var}: {}", text(&out));
            }
            _ => panic!("{var}: {}", text(&out)),
        }
    }
    assert!(refused >= 25, "only {refused} keys refused garbage");
}
