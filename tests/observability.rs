//! Observability end to end: a real Prometheus (Debian's `prometheus`, started here) scrapes
//! stowage's `server.metrics_listen`, and every PromQL expression of `dashboards/stowage.json` and
//! `dashboards/alerts.yml` is evaluated through Prometheus' HTTP API after traffic; `promtool`
//! checks the rules; `/healthz` and `/readyz` behave as documented; logs carry request ids,
//! parse as JSON with `--log-format json`, and never contain credentials.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::fake_upstream::{FakeUpstream, WrongBytes};
use support::images::{Format, Image};
use support::scrape::Scrape;
use support::stowage::{Stowage, UpstreamSpec};
use support::{free_port, http, manifest_accept, tail, wait_until, READY_TIMEOUT};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A Prometheus child process with its own port, config and TSDB in a temp dir. Killed on drop.
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`) every second and evaluates `rules` every second.
    fn start(target: &str, rules: &Path) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("stowage-prometheus-")
            .tempdir()
            .unwrap();
        let rules_copy = dir.path().join("alerts.yml");
        std::fs::copy(rules, &rules_copy).unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: stowage\n    static_configs:\n      - targets: ['{target}']\n",
                rules = rules_copy.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus (apt-get install prometheus)");
        let mut p = Prometheus { child, dir, port };
        let url = format!("{}/-/ready", p.url());
        let ready = wait_until(
            READY_TIMEOUT,
            || matches!(http().get(&url).send(), Ok(r) if r.status().is_success()),
        );
        assert!(ready, "prometheus did not become ready:\n{}", p.log());
        assert!(p.child.try_wait().unwrap().is_none());
        p
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        tail(
            &std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default(),
            40,
        )
    }

    /// `GET /api/v1/query?query=...`: the parsed answer (any status).
    fn query(&self, expr: &str) -> Value {
        http()
            .get(format!("{}/api/v1/query", self.url()))
            .query(&[("query", expr)])
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// The result vector of a successful instant query (panics on an error answer).
    fn results(&self, expr: &str) -> Vec<Value> {
        let v = self.query(expr);
        assert_eq!(v["status"], "success", "query {expr} failed: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of a scalar-like instant query, if there is one.
    fn scalar(&self, expr: &str) -> Option<f64> {
        let r = self.results(expr);
        r.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log, last 40 lines:\n{}", self.log());
        }
    }
}

/// Every `expr` in a Grafana dashboard (panels, rows' nested panels), with its panel title.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_string()));
                }
            }
            if let Some(nested) = p["panels"].as_array() {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"]
            .as_array()
            .expect("dashboard has panels"),
        &mut out,
    );
    out
}

/// Grafana's variables replaced as Grafana would with the `All` instance selection.
fn grafana_to_promql(expr: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("${instance}", ".*")
        .replace("$instance", ".*");
    assert!(!e.contains('$'), "unreplaced Grafana variable in {expr}");
    e
}

fn load_dashboard() -> Value {
    let text = std::fs::read_to_string(repo_file("dashboards/stowage.json")).unwrap();
    serde_json::from_str(&text).expect("dashboards/stowage.json is JSON")
}

#[test]
fn dashboard_is_importable_with_a_datasource_variable_and_the_issue_panels() {
    let d = load_dashboard();
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "no datasource variable"
    );
    assert!(d["uid"].is_string() && d["title"] == "stowage");
    let mut titles = Vec::new();
    let mut stack: Vec<Value> = d["panels"].as_array().unwrap().clone();
    while let Some(p) = stack.pop() {
        titles.push(p["title"].as_str().unwrap_or("").to_lowercase());
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {} does not use the datasource variable",
                p["title"]
            );
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(t["datasource"]["uid"], "${datasource}");
            }
        }
        stack.extend(p["panels"].as_array().cloned().unwrap_or_default());
    }
    for want in [
        "hit ratio (requests)",
        "hit ratio (bytes)",
        "bytes saved upstream",
        "upstream traffic by upstream",
        "upstream errors by upstream",
        "fills in flight",
        "joins, resumes, failures",
        "cache size vs budget",
        "evictions",
        "stale serves",
        "docker hub rate limit remaining",
        "request latency percentiles",
        "hosted size",
        "pushes by result",
    ] {
        assert!(
            titles.iter().any(|t| t == want),
            "no panel {want:?} in {titles:?}"
        );
    }
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(repo_file("dashboards/alerts.yml"))
        .output()
        .expect("run promtool (apt-get install prometheus)");
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_scrapes_stowage_and_every_dashboard_and_alert_expression_evaluates() {
    let fake = FakeUpstream::start();
    fake.send_ratelimit(77);
    let image = Image::build(Format::Oci, &[2048, 64 * 1024]);
    let name = "library/observed";
    fake.add_manifest(
        name,
        "1",
        &image.manifest.media_type,
        image.manifest.bytes.clone(),
    );
    for b in image.blobs() {
        fake.add_blob(name, b.bytes.clone());
    }
    let bad = fake.add_blob(name, vec![1u8; 4096]);
    fake.serve_wrong_bytes(&bad, WrongBytes::FlippedByte);
    let metrics_port = free_port();
    let stowage = Stowage::builder()
        // Revalidate on every request, so the tag is served stale once the upstream is gone.
        .upstream(UpstreamSpec::new("docker.io", &fake.url()).with_extra("manifest_ttl = \"0\""))
        .server_toml(&format!("metrics_listen = \"127.0.0.1:{metrics_port}\""))
        .start();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let prom = Prometheus::start(
        &format!("127.0.0.1:{metrics_port}"),
        &repo_file("dashboards/alerts.yml"),
    );
    let up = wait_until(Duration::from_secs(60), || {
        prom.scalar("up{job=\"stowage\"}") == Some(1.0)
    });
    assert!(up, "prometheus never scraped stowage: {}", prom.query("up"));

    // Traffic: a cold and a warm pull, a fill that fails, then the upstream goes away and the tag
    // is served stale.
    let client = http();
    let base = stowage.url();
    let tag = || {
        client
            .get(format!("{base}/v2/{name}/manifests/1"))
            .header("Accept", manifest_accept())
            .send()
            .unwrap()
    };
    for _ in 0..2 {
        assert_eq!(tag().status().as_u16(), 200);
        for b in image.blobs() {
            let r = client
                .get(format!("{base}/v2/{name}/blobs/{}", b.digest))
                .send()
                .unwrap();
            assert_eq!(r.bytes().unwrap().as_ref(), b.bytes.as_slice());
        }
        // A blob's last byte goes out before its commit: the warm pass must find every blob
        // committed to count it as a hit rather than a join of the finishing fill.
        stowage.wait_commits();
    }
    let _ = client
        .get(format!("{base}/v2/{name}/blobs/{bad}"))
        .send()
        .map(|r| r.bytes());
    drop(fake);
    let r = tag();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers().get("warning").is_some(),
        "expected a stale answer"
    );

    // The same numbers on both listeners, and in Prometheus once it has scraped them.
    let local = Scrape::get(&metrics_url);
    assert_eq!(
        local.value("stowage_stale_served_total", &[("upstream", "docker.io")]),
        1.0
    );
    assert_eq!(
        local.value(
            "stowage_upstream_ratelimit_remaining",
            &[("upstream", "docker.io")]
        ),
        77.0
    );
    assert_eq!(
        Scrape::get(&base).value("stowage_cache_hits_total", &[("kind", "blob")]),
        local.value("stowage_cache_hits_total", &[("kind", "blob")])
    );
    let blobs = image.blobs().len() as f64;
    let seen = wait_until(Duration::from_secs(60), || {
        prom.scalar("sum(stowage_stale_served_total)") == Some(1.0)
            && prom.scalar("sum(stowage_cache_hits_total{kind=\"blob\"})") == Some(blobs)
    });
    assert!(seen, "prometheus never saw the traffic");

    // Every dashboard expression evaluates and has data.
    let dashboard = load_dashboard();
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 20, "only {} expressions found", exprs.len());
    let mut empty = Vec::new();
    let all_have_data = wait_until(Duration::from_secs(60), || {
        empty = exprs
            .iter()
            .filter(|(_, e)| prom.results(&grafana_to_promql(e)).is_empty())
            .map(|(t, e)| format!("{t}: {e}"))
            .collect();
        empty.is_empty()
    });
    assert!(
        all_have_data,
        "dashboard expressions without data:\n{}",
        empty.join("\n")
    );

    // Every alert rule is loaded, evaluated by Prometheus without error, evaluates through the
    // query API, and names only metrics that exist.
    let rules_text = std::fs::read_to_string(repo_file("dashboards/alerts.yml")).unwrap();
    let in_file = rules_text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("- alert:") || l.starts_with("- record:")
        })
        .count();
    assert!(in_file >= 3, "alert rules file has {in_file} rules");
    let mut rules: Vec<Value> = Vec::new();
    let evaluated = wait_until(Duration::from_secs(60), || {
        let v: Value = http()
            .get(format!("{}/api/v1/rules", prom.url()))
            .send()
            .unwrap()
            .json()
            .unwrap();
        rules = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules.len() == in_file && rules.iter().all(|r| r["health"] == "ok")
    });
    assert!(evaluated, "rules not all loaded and healthy: {rules:#?}");
    for rule in &rules {
        let expr = rule["query"].as_str().unwrap();
        prom.results(expr);
        let mut rest = expr;
        while let Some(i) = rest.find("stowage_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                !prom.results(&format!("count({name})")).is_empty(),
                "rule {} uses {name}, which has no data",
                rule["name"]
            );
            rest = &rest[i + name.len()..];
        }
    }
}

#[test]
fn healthz_is_liveness_and_readyz_needs_a_writable_cache_but_not_the_upstream() {
    // An upstream that accepts connections (kernel backlog) but never answers: unreachable, and
    // not fatal for readiness. Holding the socket keeps anyone else from taking the port.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", silent.local_addr().unwrap());
    let live = FakeUpstream::start();
    let stowage = Stowage::start(&[
        UpstreamSpec::new("docker.io", &dead),
        UpstreamSpec::new("live.example", &live.url()),
    ]);
    let base = stowage.url();
    let client = http();
    let r = client.get(format!("{base}/healthz")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().unwrap(), "ok\n");

    let readyz = || {
        let r = client.get(format!("{base}/readyz")).send().unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap();
        (status, body)
    };
    let (status, body) = readyz();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["cache"]["writable"], true);
    assert_eq!(body["index"]["open"], true);
    let upstream = |body: &Value, host: &str| {
        body["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["host"] == host)
            .cloned()
            .unwrap_or_else(|| panic!("{host} not in {body}"))
    };
    assert_eq!(upstream(&body, "docker.io")["reachable"], false);
    assert_eq!(upstream(&body, "live.example")["reachable"], true);
    assert_eq!(upstream(&body, "live.example")["status"], 200);

    // The cache directory stops being writable (its tmp/ is replaced by a file; root ignores
    // permission bits, so chmod would prove nothing): not ready, but still alive.
    let tmp = stowage.data_dir().join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let (status, body) = readyz();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_eq!(body["cache"]["writable"], false);
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let (status, body) = readyz();
    assert_eq!(status, 200, "{body}");
    assert!(
        stowage.tmp_files().is_empty(),
        "the probe left a file behind"
    );
}

#[test]
fn json_logs_parse_carry_request_ids_and_never_show_credentials() {
    const UPSTREAM_PASSWORD: &str = "upstream-pass-5f1d";
    const CLIENT_SECRET: &str = "client-secret-9c2e";
    const QUERY_SECRET: &str = "query-token-77ab";
    let fake = FakeUpstream::builder()
        .token_credentials("mirror-user", UPSTREAM_PASSWORD)
        .start();
    let digest = fake.add_blob("library/logged", vec![3u8; 10_000]);
    let stowage = Stowage::builder()
        .upstream(
            UpstreamSpec::new("docker.io", &fake.url())
                .with_credentials("mirror-user", UPSTREAM_PASSWORD),
        )
        .arg("--log-format")
        .arg("json")
        .start();
    let client = http();
    let base = stowage.url();
    let r = client
        .get(format!(
            "{base}/v2/library/logged/blobs/{digest}?token={QUERY_SECRET}"
        ))
        .header("Authorization", format!("Bearer {CLIENT_SECRET}"))
        .header("X-Request-Id", "pull-42.a")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["x-request-id"], "pull-42.a");
    assert_eq!(r.bytes().unwrap().len(), 10_000);
    // An unusable id (too long, odd characters) is replaced by one of our own.
    let r = client
        .get(format!("{base}/v2/"))
        .header("X-Request-Id", "bad id\twith spaces")
        .send()
        .unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!generated.is_empty() && generated != "bad id\twith spaces");
    assert!(fake.token_requests().iter().any(|t| t.has_authorization()));

    let mut request_lines = Vec::new();
    let logged = wait_until(Duration::from_secs(30), || {
        let log = std::fs::read_to_string(stowage.stderr_path()).unwrap_or_default();
        request_lines = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
            })
            .filter(|v| v["message"] == "request")
            .collect();
        request_lines.iter().any(|v| v["req"] == generated.as_str())
    });
    assert!(logged, "request lines: {request_lines:#?}");
    for line in &request_lines {
        assert!(
            line["req"].as_str().is_some_and(|s| !s.is_empty()),
            "request line without id: {line}"
        );
    }
    let blob_line = request_lines
        .iter()
        .find(|v| v["req"] == "pull-42.a")
        .expect("the blob request's line carries the client's id");
    assert_eq!(blob_line["route"], "blobs");
    assert_eq!(blob_line["status"], 200);
    assert_eq!(blob_line["cache"], "miss");

    let log = stowage.log();
    for secret in [UPSTREAM_PASSWORD, CLIENT_SECRET, QUERY_SECRET] {
        assert!(!log.contains(secret), "{secret} appears in the log");
    }
    for token in fake.issued_tokens() {
        assert!(
            !log.contains(&token),
            "an upstream token appears in the log"
        );
    }
    assert!(!log.to_ascii_lowercase().contains("authorization"), "{log}");
}

#[test]
fn text_logs_carry_the_request_id_returned_to_the_client() {
    let fake = FakeUpstream::start();
    let stowage = Stowage::for_docker_io(&fake.url());
    let r = http()
        .get(format!("{}/v2/_catalog", stowage.url()))
        .send()
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let found = wait_until(Duration::from_secs(30), || {
        stowage
            .log()
            .lines()
            .any(|l| l.contains(&format!("req={id}")) && l.contains("path=/v2/_catalog"))
    });
    assert!(
        found,
        "no text line with req={id}:\n{}",
        tail(&stowage.log(), 20)
    );
    assert!(
        serde_json::from_str::<Value>(stowage.log().lines().next().unwrap()).is_err(),
        "text is the default format"
    );
}
