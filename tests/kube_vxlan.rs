//! --kube-subnet-mgr with the vxlan backend, end to end in the lab, checked
//! against upstream flanneld's exact annotations, condition, subnet.env and
//! kernel entries.

mod support;

use std::time::Duration;
use support::*;

fn mac_of(lab: &Lab, node: u32) -> String {
    lab.exec(
        &format!("n{node}"),
        &["cat", "/sys/class/net/flannel.1/address"],
    )
    .trim()
    .to_string()
}

fn wait_peers(lab: &Lab, nodes: &[u32]) {
    for &n in nodes {
        wait_until(
            Duration::from_secs(30),
            &format!("node{n} to program {} peers", nodes.len() - 1),
            || lab.routes(n).len() == nodes.len() - 1 && lab.fdb(n).len() == nodes.len() - 1,
        );
    }
}

fn all_pairs_ping(lab: &Lab, pods: &[(u32, String)]) {
    for (a, _) in pods {
        for (b, ip) in pods {
            if a != b {
                assert!(
                    lab.ping(&format!("p{a}"), ip, 2, "0.2"),
                    "pod on node{a} cannot reach pod on node{b} ({ip})"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn three_nodes_have_upstreams_exact_state() {
    require_root();
    let lab = Lab::up("kv3", &["--nodes", "3"]);
    for n in 1..=3 {
        lab.start_flannel(n, &[]);
    }
    wait_peers(&lab, &[1, 2, 3]);
    let pods: Vec<(u32, String)> = (1..=3)
        .map(|n| (n, lab.add_pod(n, &format!("p{n}"))))
        .collect();
    all_pairs_ping(&lab, &pods);

    let macs: Vec<String> = (1..=3).map(|n| mac_of(&lab, n)).collect();
    for n in 1..=3u32 {
        let me = (n - 1) as usize;
        let ip = format!("198.18.0.{}", 10 + n);
        // Annotations: exactly upstream's keys and values.
        let ann = lab.kubectl(&[
            "get",
            "node",
            &format!("node{n}"),
            "-o",
            "jsonpath={.metadata.annotations}",
        ]);
        let ann: serde_json::Value = serde_json::from_str(&ann).unwrap();
        let flannel: Vec<(String, String)> = ann
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("flannel.alpha.coreos.com/"))
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            flannel,
            vec![
                (
                    "flannel.alpha.coreos.com/backend-data".into(),
                    format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, macs[me])
                ),
                (
                    "flannel.alpha.coreos.com/backend-type".into(),
                    "vxlan".into()
                ),
                (
                    "flannel.alpha.coreos.com/kube-subnet-manager".into(),
                    "true".into()
                ),
                ("flannel.alpha.coreos.com/public-ip".into(), ip.clone()),
            ]
        );
        // The NetworkUnavailable condition.
        let cond = lab.kubectl(&[
            "get", "node", &format!("node{n}"), "-o",
            r#"jsonpath={range .status.conditions[?(@.type=="NetworkUnavailable")]}{.status}|{.reason}|{.message}{end}"#,
        ]);
        assert_eq!(cond, "False|FlannelIsUp|Flannel is running on this node");
        // subnet.env.
        assert_eq!(
            lab.subnet_env(n),
            format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n", n - 1)
        );
        // The device.
        let link = lab.exec(&format!("n{n}"), &["ip", "-d", "link", "show", "flannel.1"]);
        assert!(link.contains("mtu 1450"), "{link}");
        assert!(
            link.contains(&format!("vxlan id 1 local {ip} dev eth0 ")),
            "{link}"
        );
        assert!(
            link.contains("dstport 8472") && link.contains("nolearning"),
            "{link}"
        );
        assert!(link.contains("UP"), "{link}");
        let addrs = lines(&lab.exec(
            &format!("n{n}"),
            &["ip", "-o", "-4", "addr", "show", "dev", "flannel.1"],
        ));
        assert_eq!(addrs.len(), 1, "{addrs:?}");
        assert!(
            addrs[0].contains(&format!(
                "inet 10.244.{}.0/32 scope global flannel.1",
                n - 1
            )),
            "{addrs:?}"
        );
        // Routes, neighbours, FDB: exactly one of each per peer, nothing else.
        let peers: Vec<u32> = (1..=3).filter(|p| *p != n).collect();
        let want_routes: Vec<String> = lines(
            &peers
                .iter()
                // Upstream's form, marked with our route protocol (what we own).
                .map(|p| format!("10.244.{0}.0/24 via 10.244.{0}.0 proto 70 onlink\n", p - 1))
                .collect::<String>(),
        );
        assert_eq!(lab.routes(n), want_routes);
        let want_neigh: Vec<String> = lines(
            &peers
                .iter()
                .map(|p| {
                    format!(
                        "10.244.{}.0 lladdr {} PERMANENT\n",
                        p - 1,
                        macs[(p - 1) as usize]
                    )
                })
                .collect::<String>(),
        );
        assert_eq!(lab.neighs(n), want_neigh);
        let want_fdb: Vec<String> = lines(
            &peers
                .iter()
                .map(|p| {
                    format!(
                        "{} dst 198.18.0.{} self permanent\n",
                        macs[(p - 1) as usize],
                        10 + p
                    )
                })
                .collect::<String>(),
        );
        assert_eq!(lab.fdb(n), want_fdb);
    }
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn nodes_joining_and_leaving() {
    require_root();
    let lab = Lab::up("kvjoin", &["--nodes", "2"]);
    lab.start_flannel(1, &[]);
    lab.start_flannel(2, &[]);
    wait_peers(&lab, &[1, 2]);
    lab.sh("node-add", &["3"]);
    lab.start_flannel(3, &[]);
    wait_peers(&lab, &[1, 2, 3]);
    let pods: Vec<(u32, String)> = (1..=3)
        .map(|n| (n, lab.add_pod(n, &format!("p{n}"))))
        .collect();
    all_pairs_ping(&lab, &pods);

    // Deleting node3's Node object removes it from every peer's tables within seconds.
    lab.stop_flannel(3, "TERM");
    lab.kubectl(&["delete", "node", "node3"]);
    for n in [1, 2] {
        wait_until(
            Duration::from_secs(5),
            &format!("node{n} to forget node3"),
            || lab.routes(n).len() == 1 && lab.neighs(n).len() == 1 && lab.fdb(n).len() == 1,
        );
        assert!(!lab.routes(n).iter().any(|r| r.starts_with("10.244.2.0/24")));
    }
    assert!(lab.ping("p1", &pods[1].1, 2, "0.2"));
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn sigkill_and_restart_lose_no_packet_and_change_nothing() {
    require_root();
    let lab = Lab::up("kvkill", &["--nodes", "3"]);
    for n in 1..=3 {
        lab.start_flannel(n, &[]);
    }
    wait_peers(&lab, &[1, 2, 3]);
    let pods: Vec<(u32, String)> = (1..=3)
        .map(|n| (n, lab.add_pod(n, &format!("p{n}"))))
        .collect();
    all_pairs_ping(&lab, &pods);
    let before: Vec<String> = (1..=3).map(|n| lab.dump(n)).collect();

    // 10 ms pings around the ring while every agent is killed and restarted.
    let pingers: Vec<_> = [(1, 1usize), (2, 2), (3, 0)]
        .iter()
        .map(|(from, to)| lab.ping_bg(&format!("p{from}"), &pods[*to].1, 700, "0.01"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for n in 1..=3 {
        let log_len = lab.flannel_log(n).len();
        lab.stop_flannel(n, "KILL");
        lab.start_flannel(n, &[]);
        wait_until(
            Duration::from_secs(20),
            &format!("node{n}'s agent to be ready again"),
            || {
                let log = lab.flannel_log(n);
                log[log_len..].contains("wrote ")
                    && (log[log_len..].contains("NetworkUnavailable")
                        || log[log_len..].contains("peers"))
                    || log[log_len..].contains("already carries")
            },
        );
        std::thread::sleep(Duration::from_millis(500));
        let fresh = &lab.flannel_log(n)[log_len..];
        assert!(
            !fresh.contains("created flannel.1"),
            "restart re-created the device:\n{fresh}"
        );
        assert!(
            !fresh.contains("programmed"),
            "restart changed kernel entries:\n{fresh}"
        );
        assert!(
            fresh.contains("already carries"),
            "restart re-patched annotations:\n{fresh}"
        );
    }
    for (i, p) in pingers.into_iter().enumerate() {
        let o = p.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let (sent, got) = ping_counts(&text).unwrap_or_else(|| panic!("no ping summary: {text}"));
        assert_eq!(sent, 700, "pinger {i}: {text}");
        assert_eq!(
            got, sent,
            "pinger {i} lost packets across agent restarts: {text}"
        );
    }
    let after: Vec<String> = (1..=3).map(|n| lab.dump(n)).collect();
    assert_eq!(before, after, "kernel state changed across restarts");
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn node_found_through_its_pod() {
    require_root();
    let lab = Lab::up("kvpod", &["--nodes", "1"]);
    // The DaemonSet pod, bound to node1 (no scheduler or kubelet needed to store it).
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "kube-flannel-ds-abcde", "namespace": "kube-flannel" },
        "spec": { "nodeName": "node1", "serviceAccountName": "flannel", "automountServiceAccountToken": false,
                  "containers": [{ "name": "kube-flannel", "image": "flannel-rs" }] },
    });
    let path = lab.dir.join("pod.json");
    std::fs::write(&path, pod.to_string()).unwrap();
    lab.kubectl(&["create", "-f", path.to_str().unwrap()]);
    let o = std::process::Command::new("bash")
        .arg(top().join("scripts/lab.sh"))
        .args(["flannel-start", &lab.name, "1"])
        .env("FLANNELD", env!("CARGO_BIN_EXE_flanneld"))
        .env("POD_NAME", "kube-flannel-ds-abcde")
        .env("POD_NAMESPACE", "kube-flannel")
        .output()
        .unwrap();
    assert!(o.status.success());
    wait_until(Duration::from_secs(30), "the lease of node1", || {
        lab.subnet_env(1).contains("FLANNEL_SUBNET=10.244.0.1/24")
    });
    assert!(lab
        .flannel_log(1)
        .contains("kube subnet manager for node node1"));
}
