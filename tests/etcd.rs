//! --etcd-endpoints: leases in a real etcd 3.4, in upstream's key/value form.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;
use support::*;

fn leases(lab: &Lab) -> Vec<(String, String)> {
    let out = lab.sh(
        "etcdctl",
        &["get", "--prefix", "/coreos.com/network/subnets/"],
    );
    let l: Vec<&str> = out.lines().collect();
    l.chunks(2)
        .map(|c| (c[0].to_string(), c.get(1).unwrap_or(&"").to_string()))
        .collect()
}

fn subnet_of(lab: &Lab, node: u32) -> String {
    let env = lab.subnet_env(node);
    env.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .unwrap_or("")
        .to_string()
}

fn wait_routes(lab: &Lab, nodes: &[u32], want: usize, secs: u64) {
    for &n in nodes {
        wait_until(
            Duration::from_secs(secs),
            &format!("node{n} to program {want} peers"),
            || lab.routes(n).len() == want,
        );
    }
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn three_nodes_upstream_keys_and_full_mesh() {
    require_root();
    let lab = Lab::up("et3", &["--mode", "etcd", "--nodes", "3"]);
    for n in 1..=3 {
        lab.start_flannel(n, &[]);
    }
    wait_routes(&lab, &[1, 2, 3], 2, 30);
    let pods: Vec<(u32, String)> = (1..=3)
        .map(|n| (n, lab.add_pod(n, &format!("p{n}"))))
        .collect();
    for (a, _) in &pods {
        for (b, ip) in &pods {
            if a != b {
                assert!(
                    lab.ping(&format!("p{a}"), ip, 2, "0.2"),
                    "node{a} -> node{b}"
                );
            }
        }
    }
    let ls = leases(&lab);
    assert_eq!(ls.len(), 3);
    for n in 1..=3u32 {
        let sub = subnet_of(&lab, n);
        let net = sub.replace(".1/", ".0-");
        let key = format!("/coreos.com/network/subnets/{net}");
        let mac = lab
            .exec(
                &format!("n{n}"),
                &["cat", "/sys/class/net/flannel.1/address"],
            )
            .trim()
            .to_string();
        let want = format!(
            r#"{{"PublicIP":"198.18.0.{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#,
            10 + n
        );
        assert!(
            ls.contains(&(key.clone(), want.clone())),
            "{key} = {want} not in {ls:?}"
        );
        // The key is bound to an etcd lease of upstream's 24 h TTL.
        let json = lab.sh("etcdctl", &["get", &key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let lease = v["kvs"][0]["lease"].as_i64().expect("key has a lease");
        assert!(lease != 0);
        let ttl = lab.sh("etcdctl", &["lease", "timetolive", &format!("{lease:x}")]);
        let secs: u64 = ttl
            .split("remaining(")
            .nth(1)
            .and_then(|s| s.split('s').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(secs > 86000 && secs <= 86400, "{ttl}");
    }
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn twelve_agents_at_once_get_distinct_subnets() {
    require_root();
    let lab = Lab::up("et12", &["--mode", "etcd", "--nodes", "12"]);
    let children: Vec<_> = (1..=12)
        .map(|n| {
            let name = lab.name.clone();
            std::thread::spawn(move || {
                let o = std::process::Command::new("bash")
                    .arg(top().join("scripts/lab.sh"))
                    .args(["flannel-start", &name, &n.to_string()])
                    .env("FLANNELD", env!("CARGO_BIN_EXE_flanneld"))
                    .output()
                    .unwrap();
                assert!(o.status.success());
            })
        })
        .collect();
    for c in children {
        c.join().unwrap();
    }
    let nodes: Vec<u32> = (1..=12).collect();
    wait_routes(&lab, &nodes, 11, 60);
    let subnets: BTreeSet<String> = nodes.iter().map(|n| subnet_of(&lab, *n)).collect();
    assert_eq!(subnets.len(), 12, "{subnets:?}");
    assert_eq!(leases(&lab).len(), 12);
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn restarts_of_agent_and_etcd_keep_leases_and_traffic() {
    require_root();
    let lab = Lab::up("etrs", &["--mode", "etcd", "--nodes", "2"]);
    lab.start_flannel(1, &[]);
    lab.start_flannel(2, &[]);
    wait_routes(&lab, &[1, 2], 1, 30);
    let before = (subnet_of(&lab, 1), subnet_of(&lab, 2));
    let p1 = lab.add_pod(1, "p1");
    let p2 = lab.add_pod(2, "p2");
    assert!(lab.ping("p1", &p2, 2, "0.2"));

    // An agent restart keeps its subnet (it finds its PublicIP's lease).
    lab.stop_flannel(1, "TERM");
    lab.start_flannel(1, &[]);
    wait_until(Duration::from_secs(20), "node1 to re-lease", || {
        lab.flannel_log(1).matches("wrote ").count() >= 2
    });
    assert_eq!(subnet_of(&lab, 1), before.0);

    // etcd restarted while pods talk: no lease lost, no packet lost.
    let pinger = lab.ping_bg("p2", &p1, 400, "0.01");
    std::thread::sleep(Duration::from_millis(500));
    lab.sh("etcd-restart", &[]);
    let o = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let (sent, got) = ping_counts(&text).unwrap();
    assert_eq!(got, sent, "packets lost across the etcd restart: {text}");
    assert_eq!(leases(&lab).len(), 2);
    // The agents resume: a third node joining after the restart is learnt by both.
    lab.sh("node-add", &["3"]);
    lab.start_flannel(3, &[]);
    wait_routes(&lab, &[1, 2, 3], 2, 40);
    assert_eq!((subnet_of(&lab, 1), subnet_of(&lab, 2)), before);
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn tls_with_client_certificates() {
    require_root();
    let lab = Lab::up("ettls", &["--mode", "etcd", "--nodes", "1"]);
    let pki = lab.sh("etcd-tls", &[]).trim().to_string();
    lab.start_flannel(
        1,
        &[
            "--etcd-endpoints=https://198.18.0.1:2381",
            &format!("--etcd-cafile={pki}/ca.crt"),
            &format!("--etcd-certfile={pki}/client.crt"),
            &format!("--etcd-keyfile={pki}/client.key"),
        ],
    );
    wait_until(Duration::from_secs(30), "a lease over TLS", || {
        !lab.subnet_env(1).is_empty()
    });
    assert!(lab
        .flannel_log(1)
        .contains("connected to etcd at https://198.18.0.1:2381"));
}
