//! The ipip backend. This machine's kernel has no ipip module, so the
//! dataplane tests (`kernel_vm_*`) run in the project's kernel VM (Debian 12's
//! own kernel; scripts/test.sh runs them there); here, the agent refuses to
//! start with one message that says what is missing.

mod support;

use std::time::Duration;
use support::*;

const IPIP_DR: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipip","DirectRouting":true}}"#;

/// The lease's network, e.g. 10.244.3.0/24 from FLANNEL_SUBNET=10.244.3.1/24.
fn subnet_of(lab: &Lab, node: u32) -> String {
    let env = lab.subnet_env(node);
    let s = env
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .unwrap_or("")
        .to_string();
    let (addr, len) = s.split_once('/').unwrap_or(("", ""));
    let mut o: Vec<&str> = addr.split('.').collect();
    if let Some(last) = o.last_mut() {
        *last = "0";
    }
    format!("{}/{len}", o.join("."))
}

fn pod_routes(lab: &Lab, n: u32) -> Vec<String> {
    let mut v: Vec<String> =
        lines(&lab.exec(&format!("n{n}"), &["ip", "route", "show", "proto", "70"]))
            .into_iter()
            .filter(|r| r.starts_with("10.244."))
            .collect();
    v.sort();
    v
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn start_fails_clearly_without_the_ipip_module() {
    require_root();
    let lab = Lab::up(
        "ipipno",
        &["--nodes", "1", "--mode", "etcd", "--net-conf", IPIP_DR],
    );
    lab.start_flannel(1, &[]);
    if std::path::Path::new("/sys/module/ipip").exists() {
        // A kernel with the module (e.g. the kernel VM): the agent comes up instead.
        wait_until(Duration::from_secs(30), "subnet.env", || {
            lab.subnet_env(1).contains("FLANNEL_MTU=1480")
        });
        assert!(lab
            .exec("n1", &["ip", "-d", "link", "show", "flannel.ipip"])
            .contains("ipip"));
        return;
    }
    wait_until(Duration::from_secs(30), "the agent's exit", || {
        lab.flannel_log(1)
            .contains("is the kernel's ipip module available?")
    });
    let log = lab.flannel_log(1);
    assert!(log.contains("preparing the ipip backend"), "{log}");
    assert!(
        lab.subnet_env(1).is_empty(),
        "no subnet.env without a dataplane"
    );
}

/// Upstream's kernel state, a mixed L2/L3 peer set under DirectRouting, pods
/// talking over both, and drift (a deleted device, a deleted route, a changed
/// MTU) repaired.
#[test]
#[ignore = "needs a kernel with ipip: scripts/test.sh runs it in the kernel VM (scripts/kernel-vm.sh)"]
fn kernel_vm_ipip_direct_routing_mixed_peers_and_repair() {
    require_root();
    let lab = Lab::up(
        "ipip",
        &["--nodes", "3", "--mode", "etcd", "--net-conf", IPIP_DR],
    );
    // node3 is reached at an address off node1's and node2's L2 network
    // (routed through its eth0), so they tunnel to it; node1 and node2 are
    // on-link to each other (direct routes). node3 sees both on-link and
    // answers directly: the reply arrives on eth0 while the request came over
    // the tunnel, so node3 must not filter on the reverse path.
    lab.exec(
        "n3",
        &["ip", "addr", "add", "198.19.0.13/32", "dev", "eth0"],
    );
    for k in ["all", "default", "eth0"] {
        lab.exec(
            "n3",
            &["sysctl", "-qw", &format!("net.ipv4.conf.{k}.rp_filter=0")],
        );
    }
    for n in 1..=2 {
        lab.exec(
            &format!("n{n}"),
            &["ip", "route", "add", "198.19.0.13/32", "via", "198.18.0.13"],
        );
    }
    lab.start_flannel(1, &[]);
    lab.start_flannel(2, &[]);
    lab.start_flannel(3, &["--public-ip", "198.19.0.13"]);
    for n in 1..=3 {
        wait_until(
            Duration::from_secs(60),
            &format!("node{n}'s routes"),
            || pod_routes(&lab, n).len() == 2,
        );
    }
    let (s1, s2, s3) = (subnet_of(&lab, 1), subnet_of(&lab, 2), subnet_of(&lab, 3));
    let mut want1 = vec![
        format!("{s2} via 198.18.0.12 dev eth0"),
        format!("{s3} via 198.19.0.13 dev flannel.ipip onlink"),
    ];
    want1.sort();
    let shape = |n: u32| -> Vec<String> {
        pod_routes(&lab, n)
            .into_iter()
            .map(|r| r.replace(" proto 70", ""))
            .collect()
    };
    assert_eq!(shape(1), want1);
    let mut want3 = vec![
        format!("{s1} via 198.18.0.11 dev eth0"),
        format!("{s2} via 198.18.0.12 dev eth0"),
    ];
    want3.sort();
    assert_eq!(shape(3), want3);
    // The device: ours (local = the interface address, remote any), MTU − 20, a /32.
    let d = lab.exec("n1", &["ip", "-d", "link", "show", "flannel.ipip"]);
    assert!(
        d.contains("ipip") && d.contains("remote any local 198.18.0.11"),
        "{d}"
    );
    assert!(d.contains("mtu 1480"), "{d}");
    let a = lab.exec("n1", &["ip", "-4", "-br", "addr", "show", "flannel.ipip"]);
    assert!(
        a.contains(&format!("{}/32", s1.split('/').next().unwrap())),
        "{a}"
    );
    assert!(lab.subnet_env(1).contains("FLANNEL_MTU=1480\n"));
    // Pods talk over the direct route and over the tunnel, both ways.
    let ips: Vec<String> = (1..=3).map(|n| lab.add_pod(n, &format!("p{n}"))).collect();
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        assert!(
            lab.reaches(&format!("n{a}-p{a}"), &ips[b - 1], 2),
            "p{a} -> p{b}"
        );
    }

    // Drift: each repaired within a bounded wait, the tunnel working after.
    lab.exec("n1", &["ip", "route", "del", &s3]);
    wait_until(
        Duration::from_secs(10),
        "the deleted route restored",
        || shape(1) == want1,
    );
    lab.exec("n1", &["ip", "link", "set", "flannel.ipip", "mtu", "1400"]);
    wait_until(Duration::from_secs(10), "the MTU restored", || {
        lab.exec("n1", &["cat", "/sys/class/net/flannel.ipip/mtu"])
            .trim()
            == "1480"
    });
    lab.exec("n1", &["ip", "link", "del", "flannel.ipip"]);
    wait_until(
        Duration::from_secs(10),
        "the device re-created with its route",
        || shape(1) == want1,
    );
    let d = lab.exec("n1", &["ip", "-d", "link", "show", "flannel.ipip"]);
    assert!(
        d.contains("remote any local 198.18.0.11") && d.contains("UP"),
        "{d}"
    );
    assert!(
        lab.reaches("n1-p1", &ips[2], 2),
        "p1 -> p3 over the re-created tunnel"
    );
    // The kernel's own tunl0 (created with the module) was never touched.
    let t = lab.exec("n1", &["ip", "-d", "link", "show", "tunl0"]);
    assert!(t.contains("remote any local any"), "{t}");
}
