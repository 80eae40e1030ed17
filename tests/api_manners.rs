//! Good manners towards the API server (issue 26), counted on the API server's
//! side: its audit log records every request of the agent's service account.
//! The agent reaches the API server through `examples/apiproxy` (which drops
//! connections and plays an overloaded server) and `kubectl proxy` (plain HTTP
//! in, the flannel service account's token out).
//! - the one list of Nodes is served from the watch cache (`resourceVersion=0`);
//! - dropped connections resume the watch: no list, and nothing is missed;
//! - while every request is answered 429 (Retry-After: 1 s), no two requests
//!   come closer than the Retry-After, and the agent is back once they end.

mod support;

use std::path::PathBuf;
use std::time::Duration;
use support::*;

/// Our own helper processes in the control-plane namespace (pid files, and
/// the bounded `timeout` wrappers), ended by pid.
struct Helpers(Vec<PathBuf>, Vec<std::process::Child>);

impl Helpers {
    fn signal(&self, i: usize, sig: &str) {
        let pid = std::fs::read_to_string(&self.0[i]).unwrap_or_default();
        let pid = pid.trim();
        assert!(!pid.is_empty(), "no pid in {:?}", self.0[i]);
        let _ = std::process::Command::new("kill")
            .args([&format!("-{sig}"), pid])
            .status();
        if sig == "TERM" {
            let _ = std::fs::remove_file(&self.0[i]);
        }
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        for i in 0..self.0.len() {
            if self.0[i].exists() {
                self.signal(i, "TERM");
            }
        }
        for c in &mut self.1 {
            let _ = c.wait(); // each ends with its helper (or its 300 s bound)
        }
    }
}

fn vx(lab: &Lab, name: &str, i: u32) {
    lab.fake_node(
        name,
        &format!("10.244.{i}.0/24"),
        &[
            ("kube-subnet-manager", "true"),
            ("backend-type", "vxlan"),
            (
                "backend-data",
                &format!(r#"{{"VNI":1,"VtepMAC":"52:00:00:00:00:{i:02x}"}}"#),
            ),
            ("public-ip", &format!("198.18.1.{i}")),
        ],
    );
}

fn has_route(lab: &Lab, i: u32) -> bool {
    let want = format!("10.244.{i}.0/24");
    lab.routes(1).iter().any(|l| l.starts_with(&want))
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn lists_from_the_watch_cache_resumes_watches_and_honours_retry_after() {
    require_root();
    let proxy = PathBuf::from(env!("CARGO_BIN_EXE_flanneld"))
        .with_file_name("examples")
        .join("apiproxy");
    assert!(
        proxy.exists(),
        "{proxy:?} missing: cargo test --all-targets (scripts/test.sh) builds it, or cargo build --examples"
    );
    let lab = Lab::up_env("manners", &[("LAB_AUDIT", "1")], &["--nodes", "1"]);
    let d = lab.dir.display().to_string();
    let mut pids = Helpers(
        vec![lab.dir.join("kproxy.pid"), lab.dir.join("aproxy.pid")],
        vec![],
    );
    let kubectl = "/var/cache/flannel-rs/kubectl-1.20.2";
    let k = lab.exec_bg(
        "cp",
        &format!(
            "echo $$ > {d}/kproxy.pid; exec {kubectl} --kubeconfig {d}/flannel.kubeconfig proxy \
             --address 127.0.0.1 --port 8001 --accept-hosts '.*' > {d}/kproxy.log 2>&1"
        ),
    );
    pids.1.push(k);
    let a = lab.exec_bg(
        "cp",
        &format!(
            "echo $$ > {d}/aproxy.pid; exec {} 198.18.0.1:8081 127.0.0.1:8001 1 > {d}/aproxy.log 2>&1",
            proxy.display()
        ),
    );
    pids.1.push(a);
    wait_until(Duration::from_secs(20), "the proxies to answer", || {
        lab.http_get("http://198.18.0.1:8081/version")
            .contains("gitVersion")
    });
    vx(&lab, "peer-a", 50);
    lab.start_flannel(1, &["--kube-api-url", "http://198.18.0.1:8081"]);
    wait_until(Duration::from_secs(30), "peer-a's route", || {
        has_route(&lab, 50)
    });

    // Three dropped connections; a Node created after them still arrives.
    for _ in 0..3 {
        pids.signal(1, "USR1");
        std::thread::sleep(Duration::from_millis(700));
    }
    vx(&lab, "peer-b", 51);
    wait_until(
        Duration::from_secs(10),
        "peer-b's route after the drops",
        || has_route(&lab, 51),
    );

    // 8 s of 429s, a Node created meanwhile; it arrives once they end.
    pids.signal(1, "USR2");
    std::thread::sleep(Duration::from_secs(2));
    vx(&lab, "peer-c", 52);
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        has_route(&lab, 50) && has_route(&lab, 51),
        "routes lost during the 429s"
    );
    pids.signal(1, "USR2");
    // The widest wait after 8 s of overloads: 1 s + a window of at most 8 s.
    wait_until(
        Duration::from_secs(20),
        "peer-c's route after the 429s",
        || has_route(&lab, 52),
    );

    // The agent and kubectl proxy end, so their open watches are audited.
    lab.stop_flannel(1, "TERM");
    pids.signal(0, "TERM");
    std::thread::sleep(Duration::from_secs(2));

    let audit = std::fs::read_to_string(lab.dir.join("audit.log")).unwrap();
    let mine: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| {
            e["user"]["username"] == "system:serviceaccount:kube-flannel:flannel"
                && e["stage"] == "ResponseComplete"
        })
        .collect();
    let uri = |e: &serde_json::Value| e["requestURI"].as_str().unwrap_or("").to_string();
    let all_nodes = |verb: &str| -> Vec<String> {
        mine.iter()
            .filter(|e| e["verb"] == verb)
            .map(uri)
            .filter(|u| u.starts_with("/api/v1/nodes?") && !u.contains("fieldSelector"))
            .collect()
    };
    let lists = all_nodes("list");
    assert_eq!(lists.len(), 1, "one list of all Nodes in all: {lists:?}");
    assert!(lists[0].contains("resourceVersion=0"), "{lists:?}");
    let watches = all_nodes("watch");
    assert!(
        watches.len() >= 4,
        "the watch resumed after each drop: {watches:?}"
    );
    assert!(
        watches
            .iter()
            .all(|u| u.contains("resourceVersion=") && u.contains("allowWatchBookmarks=true")),
        "{watches:?}"
    );
    let ua: Vec<&str> = mine
        .iter()
        .filter_map(|e| e["userAgent"].as_str())
        .collect();
    assert!(ua.iter().all(|u| u.starts_with("flanneld/")), "{ua:?}");

    // The 429s: each request at least Retry-After (1 s) after the one before.
    let log = std::fs::read_to_string(lab.dir.join("aproxy.log")).unwrap();
    let at: Vec<u64> = log
        .lines()
        .filter(|l| l.contains(" 429 "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert!(!at.is_empty(), "no request during the 429s:\n{log}");
    let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= 990),
        "faster than Retry-After: {gaps:?}"
    );
    assert!(
        at.len() <= 8,
        "{} requests in 8 s of 429s: {gaps:?}",
        at.len()
    );
    let flog = lab.flannel_log(1);
    // The drops (resets) were seen and the watch resumed, not re-listed.
    assert!(flog.contains("resuming the watch"), "{flog}");
    assert!(!flog.contains("re-listing"), "{flog}");
}
