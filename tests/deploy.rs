//! The files of `deploy/`: the systemd unit passes `systemd-analyze verify` and its offline
//! security review; the compose file passes `docker compose config` (or `docker-compose`) and
//! its Prometheus config `promtool check config` with the shipped alert rules; the Kubernetes
//! manifests parse and hold what the issue names (StatefulSet with a PVC, Service, ConfigMap
//! whose config.toml stowage accepts, probes on /healthz and /readyz), and the containerd
//! `hosts.toml` the DaemonSet writes makes a real containerd pull through stowage.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use support::clients::Containerd;
use support::images::{Format, Image};
use support::stowage::MirroredRegistry;

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn found(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn output_text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every YAML document of `path`, as JSON (through python3's yaml module).
fn yaml_documents(path: &str) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(repo_file(path))
        .output()
        .expect("python3 (with python3-yaml) is needed to read the YAML");
    assert!(out.status.success(), "{path}: {}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

fn kind<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = read("deploy/stowage.service");
    for line in [
        "DynamicUser=yes",
        "StateDirectory=stowage",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ExecStart=/usr/local/bin/stowage serve --config /etc/stowage/config.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    // The one capability appears only in the commented drop-in for :443.
    for l in unit.lines().filter(|l| l.contains("CAP_NET_BIND_SERVICE")) {
        assert!(l.starts_with('#'), "granted outside the drop-in: {l}");
    }
    if !found("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    // verify wants the binaries to exist: the built one stands in for /usr/local/bin/stowage.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stowage.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/stowage", env!("CARGO_BIN_EXE_stowage")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify: {}",
        output_text(&out)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for stowage.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level: {}", output_text(&out)));
    assert!(exposure <= 2.0, "exposure {exposure}: {text}");
}

#[test]
fn the_compose_file_and_its_prometheus_config_check() {
    let docs = yaml_documents("deploy/compose.yaml");
    let services = &docs[0]["services"];
    let stowage = &services["stowage"];
    let volumes = stowage["volumes"].as_array().expect("volumes");
    assert!(volumes
        .iter()
        .any(|v| v.as_str().is_some_and(|v| v.ends_with(":/var/lib/stowage"))));
    assert_eq!(stowage["ports"][0], "5000:5000");
    assert_eq!(
        stowage["healthcheck"]["test"],
        serde_json::json!(["CMD", "stowage", "health"])
    );
    assert!(stowage["stop_grace_period"].is_string());
    let prometheus = &services["prometheus"];
    assert_eq!(prometheus["profiles"], serde_json::json!(["monitoring"]));
    let mounts = prometheus["volumes"].to_string();
    assert!(
        mounts.contains("../dashboards/alerts.yml:/etc/prometheus/alerts.yml"),
        "{mounts}"
    );
    let compose = if found("docker-compose") {
        Some(vec!["docker-compose"])
    } else if Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Some(vec!["docker", "compose"])
    } else {
        None
    };
    match compose {
        Some(cmd) => {
            let out = Command::new(cmd[0])
                .args(&cmd[1..])
                .args(["-f"])
                .arg(repo_file("deploy/compose.yaml"))
                .args(["--profile", "monitoring", "config"])
                .output()
                .expect("compose");
            assert!(
                out.status.success(),
                "compose config: {}",
                output_text(&out)
            );
        }
        None => eprintln!("SKIPPED compose config: neither docker-compose nor docker compose"),
    }
    // Prometheus as compose mounts it: its config with the shipped alert rules beside it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo_file("deploy/prometheus.yml"),
        dir.path().join("prometheus.yml"),
    )
    .unwrap();
    std::fs::copy(
        repo_file("dashboards/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output()
        .expect("promtool (Debian's prometheus package)");
    assert!(out.status.success(), "promtool: {}", output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS: 1 rule files found"), "{text}");
    let scrape = read("deploy/prometheus.yml");
    let metrics_port = stowage["environment"]["STOWAGE_SERVER_METRICS_LISTEN"]
        .as_str()
        .and_then(|l| l.rsplit(':').next())
        .expect("metrics listener");
    assert!(
        scrape.contains(&format!("stowage:{metrics_port}")),
        "{scrape}"
    );
}

/// `stowage config --config <file>`: the ConfigMap's file is a valid configuration.
fn assert_stowage_accepts(config_toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("config")
        .arg("--config")
        .arg(&path)
        .env_remove("STOWAGE_CONFIG")
        .output()
        .expect("stowage config");
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_kubernetes_manifests_hold_a_stateful_mirror_with_probes() {
    let docs = yaml_documents("deploy/kubernetes/stowage.yaml");
    let config = kind(&docs, "ConfigMap", "stowage-config");
    let toml = config["data"]["config.toml"].as_str().expect("config.toml");
    let effective = assert_stowage_accepts(toml);
    assert!(
        effective.contains("path = \"/var/lib/stowage\""),
        "{effective}"
    );

    let set = kind(&docs, "StatefulSet", "stowage");
    let spec = &set["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let claim = &set["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "data");
    assert!(claim["spec"]["resources"]["requests"]["storage"].is_string());
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    let mount = |name: &str| mounts.iter().find(|m| m["name"] == name).expect(name);
    assert_eq!(mount("data")["mountPath"], "/var/lib/stowage");
    assert_eq!(mount("config")["mountPath"], "/etc/stowage");
    assert_eq!(spec["securityContext"]["runAsUser"], 65532);
    assert_eq!(spec["securityContext"]["fsGroup"], 65532);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(spec["terminationGracePeriodSeconds"].as_u64() >= Some(30));

    let service = kind(&docs, "Service", "stowage");
    assert_eq!(service["spec"]["ports"][0]["port"], 5000);
    let node_port = kind(&docs, "Service", "stowage-nodeport")["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("nodePort");

    // The DaemonSet writes the ConfigMap's hosts.toml into the node's containerd certs.d.
    let hosts = yaml_documents("deploy/kubernetes/containerd-hosts.yaml");
    let daemon = kind(&hosts, "DaemonSet", "stowage-containerd-hosts");
    let volumes = daemon["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(volumes.contains("/etc/containerd/certs.d"), "{volumes}");
    let hosts_toml = kind(&hosts, "ConfigMap", "stowage-containerd-hosts")["data"]["docker.io"]
        .as_str()
        .expect("docker.io hosts.toml")
        .to_string();
    let parsed: toml::Table = toml::from_str(&hosts_toml).expect("hosts.toml is TOML");
    let mirror = format!("http://127.0.0.1:{node_port}");
    assert_eq!(
        parsed["host"][&mirror]["capabilities"],
        toml::Value::Array(vec!["pull".into(), "resolve".into()]),
        "{hosts_toml}"
    );
    pull_with_hosts_toml(&hosts_toml, &mirror);
}

/// A real containerd with the DaemonSet's `hosts.toml` (its mirror address swapped for a test
/// stowage's) pulls through stowage.
fn pull_with_hosts_toml(hosts_toml: &str, shipped_mirror: &str) {
    let w = MirroredRegistry::start();
    w.upstream.push(
        "library/k8s-node",
        "1",
        Image::build(Format::Docker, &[1024]),
    );
    let containerd = Containerd::start();
    containerd.write_hosts_toml(
        "docker.io",
        &hosts_toml.replace(shipped_mirror, &w.stowage.url()),
    );
    containerd.pull("docker.io/library/k8s-node:1");
    let reached = w
        .upstream
        .count_requests("GET", "/v2/library/k8s-node/manifests/");
    let served = std::fs::read_to_string(w.stowage.stderr_path()).unwrap_or_default();
    assert!(
        reached >= 1,
        "the pull went through stowage to its upstream"
    );
    assert!(
        served.contains("k8s-node"),
        "stowage logged the pull: {served}"
    );
}
