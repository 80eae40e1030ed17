//! Faults and hostile input: drift repair, control-plane freezes, hostile Node
//! objects, SIGTERM, /healthz.

mod support;

use std::time::{Duration, Instant};
use support::*;

fn two_nodes(lab_name: &str, extra: &[&str]) -> (Lab, String, String) {
    let lab = Lab::up(lab_name, &["--nodes", "2"]);
    lab.start_flannel(1, extra);
    lab.start_flannel(2, extra);
    for n in 1..=2 {
        wait_until(Duration::from_secs(30), "peers programmed", || {
            lab.fdb(n).len() == 1 && lab.routes(n).len() == 1
        });
    }
    let p1 = lab.add_pod(1, "p1");
    let p2 = lab.add_pod(2, "p2");
    assert!(lab.ping("p1", &p2, 2, "0.2"));
    (lab, p1, p2)
}

fn state(lab: &Lab, n: u32) -> (Vec<String>, Vec<String>, Vec<String>, String) {
    let addr = lab.exec(
        &format!("n{n}"),
        &["ip", "-o", "-4", "addr", "show", "dev", "flannel.1"],
    );
    let addr = addr.split_whitespace().nth(3).unwrap_or("").to_string();
    (lab.routes(n), lab.neighs(n), lab.fdb(n), addr)
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn entries_removed_or_changed_by_hand_come_back() {
    require_root();
    let (lab, _p1, p2) = two_nodes("drift", &[]);
    let good = state(&lab, 1);
    let mac2 = lab
        .exec("n2", &["cat", "/sys/class/net/flannel.1/address"])
        .trim()
        .to_string();
    let breakers: Vec<Vec<&str>> = vec![
        vec!["ip", "route", "del", "10.244.1.0/24"],
        vec![
            "ip",
            "route",
            "replace",
            "10.244.1.0/24",
            "via",
            "10.244.1.99",
            "dev",
            "flannel.1",
            "onlink",
        ],
        vec!["ip", "neigh", "del", "10.244.1.0", "dev", "flannel.1"],
        vec![
            "ip",
            "neigh",
            "replace",
            "10.244.1.0",
            "lladdr",
            "52:00:00:00:00:99",
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
        vec![
            "bridge",
            "fdb",
            "del",
            &mac2,
            "dev",
            "flannel.1",
            "dst",
            "198.18.0.12",
        ],
        vec!["ip", "addr", "del", "10.244.0.0/32", "dev", "flannel.1"],
        vec!["ip", "link", "set", "flannel.1", "down"],
        vec!["ip", "link", "del", "flannel.1"],
    ];
    for b in breakers {
        lab.exec("n1", &b);
        let t = Instant::now();
        wait_until(
            Duration::from_secs(10),
            &format!("repair after {b:?}"),
            || {
                lab.try_sh("exec", &["n1", "ip", "link", "show", "flannel.1"])
                    .status
                    .success()
                    && lab
                        .exec("n1", &["ip", "link", "show", "flannel.1"])
                        .contains(",UP")
                    && state(&lab, 1) == good
            },
        );
        eprintln!("repaired {b:?} in {:?}", t.elapsed());
        assert!(
            lab.ping("p1", &p2, 2, "0.2"),
            "pods disconnected after repairing {b:?}"
        );
    }
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn hostile_nodes_never_hurt_good_ones() {
    require_root();
    let (lab, _p1, p2) = two_nodes("hostile", &[]);
    let good = state(&lab, 1);
    let mac2 = lab
        .exec("n2", &["cat", "/sys/class/net/flannel.1/address"])
        .trim()
        .to_string();
    let ok_data = r#"{"VNI":1,"VtepMAC":"52:00:00:00:00:66"}"#;
    let big = format!(
        r#"{{"VNI":1,"VtepMAC":"52:00:00:00:00:67","pad":"{}"}}"#,
        "x".repeat(5000)
    );
    let dup = format!(r#"{{"VNI":1,"VtepMAC":"{mac2}"}}"#);
    let base = |data: &str, ip: &str, ty: &str| -> Vec<(String, String)> {
        vec![
            ("kube-subnet-manager".into(), "true".into()),
            ("backend-type".into(), ty.into()),
            ("backend-data".into(), data.into()),
            ("public-ip".into(), ip.into()),
        ]
    };
    type Fake<'a> = (&'a str, &'a str, Vec<(String, String)>);
    let hostile: Vec<Fake> = vec![
        (
            "h-outside",
            "10.99.0.0/24",
            base(ok_data, "198.18.0.66", "vxlan"),
        ),
        (
            "a-hijack",
            "10.244.1.0/24",
            base(ok_data, "198.18.0.66", "vxlan"),
        ),
        (
            "h-own",
            "10.244.0.0/24",
            base(ok_data, "198.18.0.66", "vxlan"),
        ),
        (
            "h-wide",
            "10.244.0.0/16",
            base(ok_data, "198.18.0.66", "vxlan"),
        ),
        ("h-all", "0.0.0.0/0", base(ok_data, "198.18.0.66", "vxlan")),
        (
            "h-badjson",
            "10.244.70.0/24",
            base("{not json", "198.18.0.66", "vxlan"),
        ),
        (
            "h-big",
            "10.244.71.0/24",
            base(&big, "198.18.0.66", "vxlan"),
        ),
        (
            "h-badmac",
            "10.244.72.0/24",
            base(
                r#"{"VNI":1,"VtepMAC":"zz:00:00:00:00:00"}"#,
                "198.18.0.66",
                "vxlan",
            ),
        ),
        (
            "h-badip",
            "10.244.73.0/24",
            base(ok_data, "999.1.1.1", "vxlan"),
        ),
        (
            "h-hostgw",
            "10.244.74.0/24",
            base("null", "198.18.0.66", "host-gw"),
        ),
        (
            "h-dupmac",
            "10.244.75.0/24",
            base(&dup, "198.18.0.66", "vxlan"),
        ),
    ];
    for (name, cidr, ann) in &hostile {
        let a: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        lab.fake_node(name, cidr, &a);
    }
    wait_until(
        Duration::from_secs(15),
        "a warning for every hostile node",
        || {
            let log = lab.flannel_log(1);
            hostile
                .iter()
                .all(|(n, _, _)| log.contains(&format!("skipping peer {n}:")))
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = lab.flannel_log(1);
    for (n, _, _) in &hostile {
        assert_eq!(
            log.matches(&format!("skipping peer {n}:")).count(),
            1,
            "not exactly one warning for {n}:\n{log}"
        );
    }
    for n in 1..=2 {
        let routes = lab.exec(&format!("n{n}"), &["ip", "route"]);
        assert!(
            !routes.contains("10.99.")
                && !routes.contains("10.244.7")
                && !routes.contains("0.0.0.0/0"),
            "{routes}"
        );
    }
    assert_eq!(
        state(&lab, 1),
        good,
        "a hostile node changed node1's entries"
    );
    assert!(lab.ping("p1", &p2, 3, "0.2"));
    // When the real holder of a subnet leaves, the next claimant may have it.
    lab.kubectl(&["delete", "node", "h-own", "h-all", "h-wide", "h-outside"]);
    lab.stop_flannel(2, "TERM");
    lab.kubectl(&["delete", "node", "node2"]);
    wait_until(
        Duration::from_secs(10),
        "a-hijack to take over the freed subnet",
        || {
            lab.neighs(1)
                .iter()
                .any(|l| l.contains("52:00:00:00:00:66"))
        },
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn api_server_freeze_loses_no_packet() {
    require_root();
    let (lab, _p1, p2) = two_nodes("freeze", &[]);
    let before = (state(&lab, 1), state(&lab, 2));
    let pinger = lab.ping_bg("p1", &p2, 600, "0.02");
    std::thread::sleep(Duration::from_secs(1));
    lab.sh("signal", &["apiserver", "STOP"]);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        (state(&lab, 1), state(&lab, 2)),
        before,
        "the dataplane changed while the API server was frozen"
    );
    lab.sh("signal", &["apiserver", "CONT"]);
    let o = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let (sent, got) = ping_counts(&text).unwrap();
    assert_eq!((sent, got), (600, 600), "{text}");
    // The watches resume: a node added after the freeze reaches everyone.
    lab.sh("node-add", &["3"]);
    lab.start_flannel(3, &[]);
    for n in 1..=3 {
        wait_until(
            Duration::from_secs(40),
            "node3 learnt after the freeze",
            || lab.routes(n).len() == 2,
        );
    }
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn healthz_metrics_and_sigterm() {
    require_root();
    let (lab, _p1, p2) = two_nodes("health", &["--healthz-ip=0.0.0.0", "--healthz-port=8471"]);
    let get = |path: &str| {
        lab.exec(
            "cp",
            &[
                "curl",
                "-s",
                "-m",
                "5",
                &format!("http://198.18.0.11:8471{path}"),
            ],
        )
    };
    assert_eq!(get("/healthz"), "flanneld is running");
    wait_until(Duration::from_secs(10), "readiness", || {
        get("/readyz") == "flanneld is ready"
    });
    let metrics = get("/metrics");
    assert!(metrics.contains("\nflannel_peer_leases 1\n"), "{metrics}");
    assert!(metrics.contains("\nflannel_ready 1\n"), "{metrics}");
    assert!(
        metrics.contains("# TYPE flannel_netlink_operations_total counter")
            && metric_sum(&metrics, "flannel_netlink_operations_total").unwrap_or(0.0) >= 3.0,
        "{metrics}"
    );
    // Another node joins: the gauge follows the real peer count.
    lab.sh("node-add", &["3"]);
    lab.start_flannel(3, &[]);
    wait_until(Duration::from_secs(30), "2 peers in /metrics", || {
        get("/metrics").contains("\nflannel_peer_leases 2\n")
    });

    let before = state(&lab, 1);
    let t = Instant::now();
    lab.stop_flannel(1, "TERM");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    assert!(lab
        .flannel_log(1)
        .contains("SIGTERM: exiting, leaving the dataplane in place"));
    assert_eq!(
        state(&lab, 1),
        before,
        "the dataplane must stay after SIGTERM"
    );
    assert!(lab.ping("p1", &p2, 2, "0.2"));
}

/// A Node as a running flanneld leaves it, for a large list.
fn peer_node(name: &str, k: u32) -> serde_json::Value {
    let subnet = format!("10.{}.{}.0/24", 128 + k / 256, k % 256);
    let mac = format!("52:54:00:00:{:02x}:{:02x}", k >> 8 & 255, k & 255);
    let p = "flannel.alpha.coreos.com/";
    serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "annotations": {
            format!("{p}kube-subnet-manager"): "true",
            format!("{p}backend-type"): "vxlan",
            format!("{p}backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
            format!("{p}public-ip"): format!("198.19.{}.{}", k >> 8 & 255, k & 255),
        }},
        "spec": { "podCIDR": subnet, "podCIDRs": [subnet] },
    })
}

/// A one-node lab (Network 10.128.0.0/9) whose API server holds `n` peer Nodes
/// peer-0001… as running flanneld agents would have annotated them.
fn lab_with_peers(name: &str, n: u32) -> Lab {
    let lab = Lab::up(
        name,
        &[
            "--nodes",
            "1",
            "--pod-base",
            "10.128",
            "--net-conf",
            r#"{"Network":"10.128.0.0/9","Backend":{"Type":"vxlan"}}"#,
        ],
    );
    let items: Vec<serde_json::Value> = (1..=n)
        .map(|k| peer_node(&format!("peer-{k:04}"), k))
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    let path = lab.dir.join("peers.json");
    std::fs::write(&path, list.to_string()).unwrap();
    lab.kubectl(&["create", "-f", path.to_str().unwrap()]);
    lab
}

/// A large list of Nodes (one response from the watch cache): a newer Node
/// claiming an older one's subnet loses — even when its name comes first in the
/// list — and nothing of it reaches the kernel.
#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn large_list_older_node_wins() {
    require_root();
    const N: u32 = 1100;
    let lab = lab_with_peers("biglist", N);
    // Creation times have one-second resolution: the claimant is clearly newer.
    std::thread::sleep(Duration::from_millis(1500));
    let mut evil = peer_node("aaa-evil", 300);
    evil["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"] =
        r#"{"VNI":1,"VtepMAC":"5e:00:00:00:00:01"}"#.into();
    evil["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"] = "198.18.0.99".into();
    let path = lab.dir.join("evil.json");
    std::fs::write(&path, evil.to_string()).unwrap();
    lab.kubectl(&["create", "-f", path.to_str().unwrap()]);

    lab.start_flannel(1, &[]);
    wait_until(Duration::from_secs(60), "all peers programmed", || {
        lab.routes(1).len() == N as usize && lab.fdb(1).len() == N as usize
    });
    let log = lab.flannel_log(1);
    assert!(
        log.contains("skipping peer aaa-evil"),
        "no warning naming the claimant:\n{log}"
    );
    wait_until(
        Duration::from_secs(10),
        "the older holder's entries",
        || {
            lab.neighs(1)
                .contains(&"10.129.44.0 lladdr 52:54:00:00:01:2c PERMANENT".to_string())
        },
    );
    let fdb = lab.fdb(1).join("\n");
    assert!(!fdb.contains("5e:00:00:00:00:01"), "{fdb}");
    assert!(fdb.contains("52:54:00:00:01:2c dst 198.19.1.44 self permanent"));
    let neighs = lab.neighs(1).join("\n");
    assert!(!neighs.contains("5e:00:00:00:00:01"), "{neighs}");
}

/// One changed peer among thousands costs that peer's entries, not the
/// cluster's: a Node added, re-annotated (new VTEP MAC) and deleted each cost at
/// most its three netlink operations, through the incremental path.
#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn one_changed_peer_among_thousands_costs_its_own_entries() {
    require_root();
    const N: u32 = 3000;
    let lab = lab_with_peers("scoped", N);
    lab.start_flannel(1, &["--healthz-ip=0.0.0.0", "--healthz-port=8471"]);
    wait_until(Duration::from_secs(90), "all peers programmed", || {
        lab.flannel_log(1)
            .contains(&format!("dataplane ready: {N} peers"))
            && lab.routes(1).len() == N as usize
    });
    let ops = || -> u64 {
        let m = lab.http_get("http://198.18.0.11:8471/metrics");
        metric_sum(&m, "flannel_netlink_operations_total")
            .unwrap_or_else(|| panic!("no op count in {m}")) as u64
    };
    // Settled: the count no longer moves.
    let mut before = ops();
    wait_until(Duration::from_secs(10), "a settled op count", || {
        std::thread::sleep(Duration::from_millis(300));
        let now = ops();
        std::mem::replace(&mut before, now) == now
    });

    // Added.
    let path = lab.dir.join("new.json");
    std::fs::write(&path, peer_node("peer-new", N + 1).to_string()).unwrap();
    lab.kubectl(&["create", "-f", path.to_str().unwrap()]);
    wait_until(Duration::from_secs(10), "the new peer", || {
        lab.fdb(1).len() == N as usize + 1
    });
    wait_until(Duration::from_secs(5), "its three entries counted", || {
        ops() == before + 3
    });
    let before = ops();

    // Re-annotated with another VTEP MAC: neighbour replaced, FDB entry moved.
    lab.kubectl(&[
        "annotate",
        "--overwrite",
        "node",
        "peer-0005",
        r#"flannel.alpha.coreos.com/backend-data={"VNI":1,"VtepMAC":"5e:00:00:00:aa:05"}"#,
    ]);
    wait_until(Duration::from_secs(10), "the new MAC", || {
        lab.fdb(1)
            .iter()
            .any(|l| l.starts_with("5e:00:00:00:aa:05"))
    });
    wait_until(Duration::from_secs(5), "three operations", || {
        ops() == before + 3
    });
    let before = ops();

    // Deleted.
    lab.kubectl(&["delete", "node", "peer-0007"]);
    wait_until(Duration::from_secs(10), "the peer gone", || {
        lab.fdb(1).len() == N as usize
    });
    wait_until(Duration::from_secs(5), "three deletions", || {
        ops() == before + 3
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ops(), before + 3, "something else was rewritten");
    let log = lab.flannel_log(1);
    let last = log.lines().rfind(|l| l.contains("programmed")).unwrap();
    assert!(!last.contains("full check"), "{last}");
}
