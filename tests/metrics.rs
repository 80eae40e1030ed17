//! /metrics as a real Prometheus (Debian's 2.42) scrapes it: the server scrapes
//! an agent in a node namespace, PromQL over the event → kernel histogram
//! returns data, and `promtool check metrics` passes on the exposition.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

/// A process started in a lab namespace (nsenter execs it, so the pid is its
/// own), ended by pid when dropped.
struct InNs(Child);

impl Drop for InNs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus(lab_name: &str, dir: &std::path::Path, target: &str) -> InNs {
    let conf = dir.join("prometheus.yml");
    std::fs::write(
        &conf,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: flannel\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/fl{lab_name}-cp"))
        .arg("prometheus")
        .arg(format!("--config.file={}", conf.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package prometheus, installed by scripts/install-deps.sh)");
    InNs(child)
}

/// One PromQL instant query from the control-plane namespace; the JSON result.
fn query(lab: &Lab, promql: &str) -> serde_json::Value {
    let o = lab.try_sh(
        "exec",
        &[
            "cp",
            "curl",
            "-s",
            "-m",
            "5",
            "--data-urlencode",
            &format!("query={promql}"),
            "http://127.0.0.1:9090/api/v1/query",
        ],
    );
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

/// The first sample's value of an instant query.
fn value(lab: &Lab, promql: &str) -> Option<f64> {
    results(&query(lab, promql))
        .first()
        .and_then(|r| r["value"][1].as_str().and_then(|v| v.parse().ok()))
}

fn results(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn prometheus_scrapes_the_agent() {
    require_root();
    let lab = Lab::up("prom", &["--nodes", "2"]);
    let health = ["--healthz-ip=0.0.0.0", "--healthz-port=8471"];
    lab.start_flannel(1, &health);
    lab.start_flannel(2, &health);
    let dir = tempfile::tempdir().unwrap();
    let _prom = prometheus(&lab.name, dir.path(), "198.18.0.11:8471");
    // Peer changes after start: each one is an event → kernel observation.
    wait_until(Duration::from_secs(30), "node 1 ready", || {
        lab.http_get("http://198.18.0.11:8471/readyz") == "flanneld is ready"
    });
    for i in 0..5 {
        lab.fake_node(
            &format!("ghost{i}"),
            &format!("10.244.{}.0/24", 100 + i),
            &[
                ("backend-type", "vxlan"),
                (
                    "backend-data",
                    &format!("{{\"VNI\":1,\"VtepMAC\":\"52:54:00:00:10:{i:02x}\"}}"),
                ),
                ("public-ip", &format!("198.18.1.{}", 10 + i)),
                ("kube-subnet-manager", "true"),
            ],
        );
    }
    // A hostile peer: its refusal is counted by reason.
    lab.fake_node(
        "hostile",
        "10.99.0.0/24",
        &[
            ("backend-type", "vxlan"),
            (
                "backend-data",
                "{\"VNI\":1,\"VtepMAC\":\"52:54:00:00:11:01\"}",
            ),
            ("public-ip", "198.18.1.99"),
            ("kube-subnet-manager", "true"),
        ],
    );
    let p90 = "histogram_quantile(0.9, sum by (le) (flannel_event_to_kernel_seconds_bucket))";
    wait_until(
        Duration::from_secs(60),
        "Prometheus to hold the latency histogram",
        || value(&lab, "flannel_event_to_kernel_seconds_count").is_some_and(|n| n >= 5.0),
    );
    let v = value(&lab, p90).unwrap_or_else(|| panic!("{p90}: {}", query(&lab, p90)));
    assert!(v > 0.0 && v < 1.0, "p90 event → kernel {v} s");
    eprintln!(
        "Prometheus: p90 event → kernel latency {:.2} ms",
        v * 1000.0
    );
    wait_until(
        Duration::from_secs(10),
        "the refused peer in Prometheus",
        || value(&lab, "flannel_peer_leases_refused{reason=\"invalid\"}") == Some(1.0),
    );
    assert_eq!(
        value(&lab, "up{job=\"flannel\"}"),
        Some(1.0),
        "scrape target up"
    );

    // The text exposition passes promtool's checks.
    let text = lab.http_get("http://198.18.0.11:8471/metrics");

    // Every query of the shipped Grafana dashboard is valid PromQL over series the agent has.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(top().join("deploy/monitoring/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    assert!(exprs.len() >= 12, "{exprs:?}");
    for e in &exprs {
        let r = query(&lab, e);
        assert_eq!(r["status"], "success", "{e}: {r}");
        for name in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            // The lease expiry exists in etcd mode only (Node leases do not expire).
            if name.starts_with("flannel_") && name != "flannel_lease_expiry_timestamp_seconds" {
                let family = ["_bucket", "_total"]
                    .iter()
                    .fold(name, |n, sfx| n.strip_suffix(sfx).unwrap_or(n));
                assert!(
                    text.contains(&format!("# TYPE {family}")),
                    "{e}: no {family} in /metrics"
                );
            }
        }
    }
    assert!(text.contains("flannel_build_info{"), "{text}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = check.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
