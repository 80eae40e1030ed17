//! The lease-only and command backends (alloc, extension) and the start-up
//! knobs of upstream v0.25+ (`node-public-ip` annotations), in the lab.

mod support;

use std::time::Duration;
use support::*;

fn pod_routes(lab: &Lab, n: u32) -> Vec<String> {
    lines(&lab.exec(&format!("n{n}"), &["ip", "route", "show"]))
        .into_iter()
        .filter(|r| r.starts_with("10.244."))
        .collect()
}

fn annotation(lab: &Lab, node: &str, key: &str) -> String {
    let path = format!("jsonpath={{.metadata.annotations.flannel\\.alpha\\.coreos\\.com/{key}}}");
    lab.kubectl(&["get", "node", node, "-o", &path])
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn alloc_publishes_and_keeps_the_lease_and_programs_nothing() {
    require_root();
    let lab = Lab::up(
        "alloc",
        &[
            "--nodes",
            "2",
            "--net-conf",
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}"#,
        ],
    );
    lab.fake_node(
        "peer9",
        "10.244.9.0/24",
        &[
            ("backend-type", "host-gw"),
            ("backend-data", "null"),
            ("public-ip", "198.18.0.99"),
            ("kube-subnet-manager", "true"),
        ],
    );
    lab.start_flannel(1, &["--ip-masq"]);
    lab.start_flannel(2, &[]);
    for n in 1..=2 {
        wait_until(Duration::from_secs(30), "subnet.env", || {
            lab.subnet_env(n).contains("FLANNEL_SUBNET=")
        });
        let env = lab.subnet_env(n);
        assert!(
            env.contains(&format!("FLANNEL_SUBNET=10.244.{}.1/24\n", n - 1)),
            "{env}"
        );
        assert!(env.contains("FLANNEL_MTU=1500\n"), "{env}");
        assert!(env.contains("FLANNEL_NETWORK=10.244.0.0/16\n"), "{env}");
    }
    wait_until(Duration::from_secs(20), "node2's lease annotations", || {
        annotation(&lab, "node2", "kube-subnet-manager") == "true"
    });
    // Upstream's alloc publishes no backend type and no data.
    assert_eq!(annotation(&lab, "node2", "backend-type"), "");
    assert_eq!(annotation(&lab, "node2", "public-ip"), "198.18.0.12");
    wait_until(Duration::from_secs(20), "ready", || {
        lab.flannel_log(1).contains("dataplane ready")
    });
    // The masquerade rules are the backend's business as little as upstream's.
    wait_until(Duration::from_secs(20), "node1's masquerade rules", || {
        let o = lab.try_sh("exec", &["n1", "iptables-save", "-t", "nat"]);
        String::from_utf8_lossy(&o.stdout).contains("-A FLANNEL-POSTRTG")
    });
    for n in 1..=2 {
        // No peer routes, no flannel device: someone else routes.
        assert_eq!(pod_routes(&lab, n), Vec::<String>::new(), "node{n}");
        let links = lab.exec(&format!("n{n}"), &["ip", "-br", "link"]);
        assert!(!links.contains("flannel"), "{links}");
        let log = lab.flannel_log(n);
        // As upstream, alloc does not watch the other Nodes.
        assert!(!log.contains("peer9"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// A host-gw built from the extension backend's commands, as upstream's
/// Documentation/extension.md does, plus a log of every call.
fn extension_conf(log: &str, fail_marker: &str) -> String {
    let add = format!(
        "test ! -e {fail_marker} || {{ echo refusing; exit 1; }}; \
         read DATA; echo \"add $SUBNET $PUBLIC_IP [$IPV6SUBNET] $DATA\" >> {log}; \
         ip route replace $SUBNET via $PUBLIC_IP"
    );
    let remove = format!(
        "read DATA; echo \"remove $SUBNET $PUBLIC_IP $DATA\" >> {log}; ip route del $SUBNET"
    );
    let pre = "ip -br link show eth0 | awk '{print $3}'";
    let post = format!("echo \"post $NETWORK $SUBNET $PUBLIC_IP\" >> {log}");
    serde_json::json!({
        "Network": "10.244.0.0/16",
        "Backend": {
            "Type": "extension",
            "PreStartupCommand": pre,
            "PostStartupCommand": post,
            "SubnetAddCommand": add,
            "SubnetRemoveCommand": remove,
        }
    })
    .to_string()
}

fn calls(path: &std::path::Path) -> Vec<String> {
    lines(&std::fs::read_to_string(path).unwrap_or_default())
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn extension_commands_route_pods_and_retry_failures() {
    require_root();
    let dir = std::path::PathBuf::from("/tmp/flannel-lab/extn");
    let log = dir.join("calls.log");
    let marker = dir.join("fail");
    let conf = extension_conf(log.to_str().unwrap(), marker.to_str().unwrap());
    let lab = Lab::up("extn", &["--nodes", "2", "--net-conf", &conf]);
    for n in 1..=2 {
        lab.start_flannel(n, &[]);
    }
    wait_until(
        Duration::from_secs(30),
        "each node's route to the other",
        || pod_routes(&lab, 1).len() == 1 && pod_routes(&lab, 2).len() == 1,
    );
    assert_eq!(
        pod_routes(&lab, 1),
        vec!["10.244.1.0/24 via 198.18.0.12 dev eth0".to_string()]
    );
    // Pods reach each other over the routes the commands made.
    let ip2 = lab.add_pod(2, "p2");
    lab.add_pod(1, "p1");
    assert!(
        lab.ping("p1", &ip2, 2, "0.2"),
        "pod on node1 -> pod on node2"
    );

    // backend-data is the PreStartupCommand's output as a JSON string: node2's
    // eth0 MAC, which node1's SubnetAddCommand read on stdin.
    let mac2 = lab
        .exec("n2", &["cat", "/sys/class/net/eth0/address"])
        .trim()
        .to_string();
    assert_eq!(
        annotation(&lab, "node2", "backend-data"),
        format!("\"{mac2}\"")
    );
    assert_eq!(annotation(&lab, "node2", "backend-type"), "extension");
    let c = calls(&log);
    assert!(
        c.contains(&format!("add 10.244.1.0/24 198.18.0.12 [] {mac2}")),
        "{c:?}"
    );
    assert!(
        c.contains(&"post 10.244.0.0/16 10.244.0.0/24 198.18.0.11".to_string()),
        "{c:?}"
    );

    // A peer whose command fails is retried until it works; the others keep working.
    std::fs::write(&marker, "").unwrap();
    lab.fake_node(
        "peer9",
        "10.244.9.0/24",
        &[
            ("backend-type", "extension"),
            ("backend-data", "\"aa:bb\""),
            ("public-ip", "198.18.0.12"),
            ("kube-subnet-manager", "true"),
        ],
    );
    wait_until(Duration::from_secs(20), "the failure logged", || {
        lab.flannel_log(1)
            .contains("SubnetAddCommand for peer peer9 failed")
    });
    assert!(!pod_routes(&lab, 1)
        .iter()
        .any(|r| r.starts_with("10.244.9.0/24")));
    assert!(
        lab.ping("p1", &ip2, 1, "0.2"),
        "the other peer keeps working"
    );
    std::fs::remove_file(&marker).unwrap();
    wait_until(Duration::from_secs(20), "peer9 added on retry", || {
        pod_routes(&lab, 1)
            .iter()
            .any(|r| r.starts_with("10.244.9.0/24 via 198.18.0.12"))
    });
    assert!(calls(&log).contains(&"add 10.244.9.0/24 198.18.0.12 [] aa:bb".to_string()));

    // A peer that leaves is removed with the values it was added with.
    lab.kubectl(&["delete", "node", "peer9"]);
    wait_until(Duration::from_secs(20), "peer9 removed", || {
        !pod_routes(&lab, 1)
            .iter()
            .any(|r| r.starts_with("10.244.9.0/24"))
    });
    assert!(calls(&log).contains(&"remove 10.244.9.0/24 198.18.0.12 aa:bb".to_string()));
    let adds = calls(&log)
        .iter()
        .filter(|l| l.starts_with("add 10.244.1.0/24"))
        .count();
    // One add per node1 start for node2: nothing re-ran for the unchanged peer.
    assert_eq!(adds, 1, "{:?}", calls(&log));
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn node_public_ip_annotation_replaces_the_flag() {
    require_root();
    let lab = Lab::up(
        "npip",
        &[
            "--nodes",
            "2",
            "--net-conf",
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        ],
    );
    // node1 is to be reached at a second address of its eth0; node2's annotation is garbage.
    lab.exec(
        "n1",
        &["ip", "addr", "add", "198.18.0.111/24", "dev", "eth0"],
    );
    lab.kubectl(&[
        "annotate",
        "node",
        "node1",
        "flannel.alpha.coreos.com/node-public-ip=198.18.0.111",
    ]);
    lab.kubectl(&[
        "annotate",
        "node",
        "node2",
        "flannel.alpha.coreos.com/node-public-ip=not-an-ip",
    ]);
    for n in 1..=2 {
        lab.start_flannel(n, &[]);
    }
    wait_until(Duration::from_secs(30), "both leases published", || {
        annotation(&lab, "node1", "public-ip") == "198.18.0.111"
            && annotation(&lab, "node2", "public-ip") == "198.18.0.12"
    });
    wait_until(
        Duration::from_secs(20),
        "node2's FDB entry for node1",
        || lab.fdb(2).iter().any(|e| e.contains("dst 198.18.0.111")),
    );
    let log2 = lab.flannel_log(2);
    assert!(
        log2.contains("ignoring annotation flannel.alpha.coreos.com/node-public-ip: \"not-an-ip\" is not an IPv4 address"),
        "{log2}"
    );
    let ip1 = lab.add_pod(1, "p1");
    lab.add_pod(2, "p2");
    assert!(
        lab.ping("p2", &ip1, 2, "0.2"),
        "pod on node2 -> pod on node1 via 198.18.0.111"
    );
}
