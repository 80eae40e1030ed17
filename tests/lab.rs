//! The lab itself works: the control plane answers, Node objects exist, and two
//! pods on one node reach each other through cni0.

mod support;

use std::time::Duration;
use support::*;

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn control_plane_nodes_and_same_node_pods() {
    require_root();
    let lab = Lab::up("lab1", &["--nodes", "2"]);
    assert!(lab.kubectl(&["get", "--raw", "/readyz"]).contains("ok"));
    let nodes = lab.kubectl(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.spec.podCIDR} {end}",
    ]);
    assert_eq!(nodes.trim(), "node1=10.244.0.0/24 node2=10.244.1.0/24");
    // The agent's identity has exactly the DaemonSet's permissions.
    let can = |verb: &str, res: &str, sub: &str| {
        let mut a = vec![
            "auth",
            "can-i",
            verb,
            res,
            "--as",
            "system:serviceaccount:kube-flannel:flannel",
        ];
        if !sub.is_empty() {
            a.push(sub);
        }
        let o = lab.try_sh("kubectl", &a);
        String::from_utf8_lossy(&o.stdout).trim() == "yes"
    };
    assert!(can("list", "nodes", "") && can("watch", "nodes", "") && can("get", "pods", ""));
    assert!(can("patch", "nodes", "--subresource=status"));
    assert!(
        !can("patch", "nodes", ""),
        "the agent must not be able to patch whole Node objects"
    );

    lab.start_flannel(1, &[]);
    wait_until(Duration::from_secs(30), "subnet.env on node1", || {
        !lab.subnet_env(1).is_empty()
    });
    let a = lab.add_pod(1, "pa");
    let b = lab.add_pod(1, "pb");
    assert!(
        a.starts_with("10.244.0.") && b.starts_with("10.244.0.") && a != b,
        "{a} {b}"
    );
    assert!(
        lab.ping("pa", &b, 3, "0.2"),
        "pod pa cannot reach pb through cni0"
    );
    let links = lab.exec("n1", &["ip", "-o", "link", "show", "cni0"]);
    assert!(links.contains("cni0"));
}
