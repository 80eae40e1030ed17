//! Issue 25's triggers, end to end: one bad object, a refused list, a deleted
//! own Node and an operator's routes never turn a part of the agent off.

mod support;

use std::time::{Duration, Instant};
use support::*;

fn two_nodes(lab_name: &str, args: &[&str], extra: &[&str]) -> (Lab, String) {
    let mut a = vec!["--nodes", "2"];
    a.extend_from_slice(args);
    let lab = Lab::up(lab_name, &a);
    lab.start_flannel(1, extra);
    lab.start_flannel(2, extra);
    for n in 1..=2 {
        wait_until(Duration::from_secs(30), "peers programmed", || {
            peer_routes(&lab, n).len() == 1
        });
    }
    lab.add_pod(1, "p1");
    let p2 = lab.add_pod(2, "p2");
    assert!(lab.ping("p1", &p2, 2, "0.2"));
    (lab, p2)
}

/// Routes to peers (`via` a gateway) inside the Network, any device.
fn peer_routes(lab: &Lab, n: u32) -> Vec<String> {
    let all = lab.exec(
        &format!("n{n}"),
        &["ip", "route", "show", "root", "10.244.0.0/16"],
    );
    lines(&all)
        .into_iter()
        .filter(|l| l.contains(" via "))
        .collect()
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn flannel_pid(lab: &Lab, n: u32) -> String {
    std::fs::read_to_string(lab.dir.join(format!("n{n}/flanneld.pid")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn an_unreadable_update_keeps_the_peer_working() {
    require_root();
    let health = ["--healthz-ip=0.0.0.0", "--healthz-port=8471"];
    let (lab, p2) = two_nodes("badupd", &[], &health);
    let before = (lab.routes(1), lab.neighs(1), lab.fdb(1));
    lab.kubectl(&[
        "annotate",
        "node",
        "node2",
        "--overwrite",
        "flannel.alpha.coreos.com/backend-data={",
    ]);
    wait_until(
        Duration::from_secs(10),
        "the unreadable update seen",
        || lab.flannel_log(1).contains("peer node2: unreadable update"),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        (lab.routes(1), lab.neighs(1), lab.fdb(1)),
        before,
        "node2's entries changed after an unreadable update"
    );
    assert!(lab.ping("p1", &p2, 5, "0.2"), "p1 lost p2");
    let log = lab.flannel_log(1);
    assert_eq!(
        log.matches("peer node2: unreadable update").count(),
        1,
        "{log}"
    );
    let m = lab.http_get("http://198.18.0.11:8471/metrics");
    assert!(
        m.contains("flannel_peer_leases_refused{reason=\"malformed\"} 1"),
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "flannel_peer_updates_malformed_total"),
        Some(1.0),
        "{m}"
    );
    // Only the Node's deletion removes the peer.
    lab.stop_flannel(2, "TERM");
    lab.kubectl(&["delete", "node", "node2"]);
    wait_until(Duration::from_secs(10), "node2's entries removed", || {
        lab.routes(1).is_empty() && lab.fdb(1).is_empty()
    });
}

/// RBAC that lets the agent read and patch its own Node but not list Nodes.
const NO_LIST: &str = r#"kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  name: flannel
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get]
- apiGroups: [""]
  resources: [nodes/status]
  verbs: [patch]
"#;

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn no_busy_loop_while_the_node_list_is_refused() {
    require_root();
    let lab = Lab::up("nolist", &["--nodes", "1"]);
    let role = lab.dir.join("no-list.yaml");
    std::fs::write(&role, NO_LIST).unwrap();
    lab.kubectl(&["apply", "-f", role.to_str().unwrap()]);
    lab.start_flannel(1, &["--healthz-ip=0.0.0.0", "--healthz-port=8471"]);
    wait_until(Duration::from_secs(30), "the refused node list", || {
        let log = lab.flannel_log(1);
        log.contains("lease acquired") && log.contains("watching nodes:")
    });
    // A drift kick (our device changed) asks for a full pass the list must allow.
    lab.exec("n1", &["ip", "link", "set", "flannel.1", "mtu", "1400"]);
    std::thread::sleep(Duration::from_secs(1));
    let pid = flannel_pid(&lab, 1);
    let (c0, t0) = (cpu_seconds(&pid), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu_seconds(&pid) - c0;
    eprintln!(
        "CPU while the list is refused: {used:.2} s in {:?}",
        t0.elapsed()
    );
    assert!(
        used < 0.5,
        "the agent used {used:.2} s of CPU in 10 s while waiting"
    );
    assert!(lab
        .http_get("http://198.18.0.11:8471/readyz")
        .starts_with("flanneld is not ready yet"));
    // The permission back: the watch lists, the agent gets ready.
    lab.kubectl(&[
        "apply",
        "-f",
        top().join("deploy/kube-flannel.yml").to_str().unwrap(),
    ]);
    wait_until(Duration::from_secs(30), "ready once it may list", || {
        lab.http_get("http://198.18.0.11:8471/readyz") == "flanneld is ready"
    });
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn own_node_deleted_ends_the_agent_with_one_message() {
    require_root();
    let (lab, _p2) = two_nodes("ownnode", &[], &[]);
    lab.kubectl(&["delete", "node", "node1"]);
    // The node's address changes: the lease must be published again, but there
    // is no Node to publish it on.
    lab.exec(
        "n1",
        &[
            "sh",
            "-c",
            "sysctl -qw net.ipv4.conf.eth0.promote_secondaries=1; \
             ip addr add 198.18.0.31/16 dev eth0; ip addr del 198.18.0.11/16 dev eth0",
        ],
    );
    let pid = flannel_pid(&lab, 1);
    wait_until(Duration::from_secs(20), "the agent to exit", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    let log = lab.flannel_log(1);
    assert_eq!(
        log.matches("node node1 no longer exists").count(),
        2, // the error line and the exit line (stderr) say it, once each
        "{log}"
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn routes_the_agent_does_not_own_are_left_alone() {
    require_root();
    let conf = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
    let (lab, p2) = two_nodes("foreign", &["--net-conf", conf], &[]);
    let ours = peer_routes(&lab, 1);
    assert!(ours[0].contains("proto 70"), "{ours:?}");
    // An operator's static route in the Network's range, via the underlay.
    lab.exec(
        "n1",
        &["ip", "route", "add", "10.244.200.0/24", "via", "198.18.0.1"],
    );
    // Deleting ours makes a full pass (which used to take the operator's too).
    lab.exec("n1", &["ip", "route", "del", "10.244.1.0/24"]);
    wait_until(Duration::from_secs(5), "our route back", || {
        peer_routes(&lab, 1)
            .iter()
            .any(|r| r.starts_with("10.244.1.0/24"))
    });
    std::thread::sleep(Duration::from_secs(1));
    let all = lab.exec("n1", &["ip", "route"]);
    assert!(all.contains("10.244.200.0/24 via 198.18.0.1"), "{all}");
    // A peer deleted while the agent is down: its route goes at the restart,
    // the operator's stays.
    lab.stop_flannel(1, "TERM");
    lab.stop_flannel(2, "TERM");
    lab.kubectl(&["delete", "node", "node2"]);
    lab.start_flannel(1, &[]);
    wait_until(
        Duration::from_secs(20),
        "the deleted peer's route removed",
        || !lab.exec("n1", &["ip", "route"]).contains("10.244.1.0/24"),
    );
    let all = lab.exec("n1", &["ip", "route"]);
    assert!(all.contains("10.244.200.0/24 via 198.18.0.1"), "{all}");
    let _ = p2;
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn upstream_routes_are_taken_over_on_migration() {
    require_root();
    let conf = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
    let lab = Lab::up("migrate", &["--nodes", "2", "--net-conf", conf]);
    // What upstream flanneld left on node 1: a live peer's route and a stale one.
    for (dst, via) in [
        ("10.244.1.0/24", "198.18.0.12"),
        ("10.244.9.0/24", "198.18.0.99"),
    ] {
        lab.exec(
            "n1",
            &[
                "ip", "route", "add", dst, "via", via, "dev", "eth0", "proto", "boot",
            ],
        );
    }
    lab.start_flannel(1, &[]);
    lab.start_flannel(2, &[]);
    wait_until(
        Duration::from_secs(30),
        "the stale route removed, the live one ours",
        || {
            let r = lab.exec("n1", &["ip", "route"]);
            !r.contains("10.244.9.0/24")
                && r.lines().any(|l| {
                    l.starts_with("10.244.1.0/24 via 198.18.0.12") && l.contains("proto 70")
                })
        },
    );
    assert!(lab
        .flannel_log(1)
        .contains("taking over 2 routes of upstream's shape"));
}
