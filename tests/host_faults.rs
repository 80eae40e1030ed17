//! Host faults under a running agent (issue 18): the flannel device deleted or
//! flushed, the underlay flapping, the node's address changing, the VTEP MAC
//! changed by someone else. Each row: the time until node 1's pod reaches node
//! 2's pod again (goal 1 s, hard bound 3 s on a loaded machine), and that the
//! repair rewrote nothing else (netlink operation counts).

mod support;

use std::time::{Duration, Instant};
use support::*;

const GOAL: Duration = Duration::from_secs(1);
const HARD: Duration = Duration::from_secs(3);
const HEALTH: [&str; 2] = ["--healthz-ip=0.0.0.0", "--healthz-port=8471"];

struct Two {
    lab: Lab,
    p2: String,
}

fn two(name: &str, args: &[&str]) -> Two {
    let mut a = vec!["--nodes", "2"];
    a.extend_from_slice(args);
    let lab = Lab::up(name, &a);
    for n in [1, 2] {
        lab.start_flannel(n, &HEALTH);
    }
    for n in [1, 2] {
        wait_until(Duration::from_secs(30), "1 peer each", || {
            lab.exec(&format!("n{n}"), &["ip", "-o", "route"])
                .lines()
                .filter(|l| l.starts_with("10.244.") && !l.contains("cni0"))
                .count()
                == 1
        });
    }
    lab.add_pod(1, "p1");
    let p2 = lab.add_pod(2, "p2");
    assert!(lab.reaches("p1", &p2, 2));
    Two { lab, p2 }
}

/// Seconds-resolution repair time: pings (0.2 s timeout each) until one answers.
fn until_reached(t: &Two, since: Instant, what: &str) -> Duration {
    let end = since + Duration::from_secs(20);
    loop {
        let o = t.lab.try_sh(
            "exec",
            &["n1-p1", "ping", "-n", "-q", "-c", "1", "-W", "0.2", &t.p2],
        );
        if o.status.success() {
            let took = since.elapsed();
            eprintln!("{what}: pod traffic back after {took:?}");
            if took > GOAL {
                eprintln!("{what}: over the 1 s goal (loaded machine?)");
            }
            assert!(took <= HARD, "{what}: {took:?} > {HARD:?}");
            return took;
        }
        assert!(Instant::now() < end, "{what}: pods still apart after 20 s");
    }
}

fn ops(lab: &Lab, node: u32, ip: &str) -> u64 {
    let m = lab.http_get(&format!("http://{ip}:8471/metrics"));
    let _ = node;
    metric_sum(&m, "flannel_netlink_operations_total")
        .unwrap_or_else(|| panic!("no netlink op count in {m}")) as u64
}

fn sh(lab: &Lab, ns: &str, cmd: &str) {
    lab.exec(ns, &["sh", "-c", cmd]);
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn vxlan_device_deleted_flushed_and_underlay_flapped() {
    require_root();
    let t = two("hfv", &[]);
    let lab = &t.lab;
    // The device deleted: re-created with its MAC, re-programmed.
    let mac = lab.exec("n1", &["cat", "/sys/class/net/flannel.1/address"]);
    let at = Instant::now();
    sh(lab, "n1", "ip link del flannel.1");
    until_reached(&t, at, "vxlan: ip link del flannel.1");
    assert_eq!(
        lab.exec("n1", &["cat", "/sys/class/net/flannel.1/address"]),
        mac
    );

    // Its routes, neighbours and FDB entries flushed.
    let before = ops(lab, 1, "198.18.0.11");
    let at = Instant::now();
    sh(
        lab,
        "n1",
        "ip route flush dev flannel.1; ip neigh flush dev flannel.1 nud permanent; \
         bridge fdb show dev flannel.1 | grep dst | while read m _ ; do bridge fdb del $m dev flannel.1 self; done",
    );
    until_reached(&t, at, "vxlan: entries of flannel.1 flushed");
    wait_until(Duration::from_secs(3), "the repair counted", || {
        ops(lab, 1, "198.18.0.11") > before
    });
    // Exactly the three entries of the one peer came back, nothing more.
    assert!(ops(lab, 1, "198.18.0.11") - before <= 3);

    // The underlay down for 2 s, then up.
    let before = ops(lab, 1, "198.18.0.11");
    sh(lab, "n1", "ip link set eth0 down");
    std::thread::sleep(Duration::from_secs(2));
    let at = Instant::now();
    sh(
        lab,
        "n1",
        "ip link set eth0 up; ip route replace default via 198.18.0.1",
    );
    until_reached(&t, at, "vxlan: eth0 down 2 s, up");
    assert!(
        ops(lab, 1, "198.18.0.11") - before <= 3,
        "the flap rewrote more than one peer's entries"
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn host_gw_underlay_flap() {
    require_root();
    let t = two(
        "hfh",
        &[
            "--net-conf",
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        ],
    );
    let lab = &t.lab;
    sh(lab, "n1", "ip link set eth0 down");
    std::thread::sleep(Duration::from_secs(2));
    // The kernel dropped the route via eth0 without a deletion message for it.
    assert!(!lab.exec("n1", &["ip", "route"]).contains("via 198.18.0.12"));
    let at = Instant::now();
    sh(
        lab,
        "n1",
        "ip link set eth0 up; ip route replace default via 198.18.0.1",
    );
    until_reached(&t, at, "host-gw: eth0 down 2 s, up");
    assert!(lab
        .exec("n1", &["ip", "route"])
        .contains("10.244.1.0/24 via 198.18.0.12 dev eth0"));
}

/// Node 1 moves from .11 to .31 in the same subnet (as a DHCP renumbering
/// does: the new address first, then the old one goes).
fn renumber_node1(lab: &Lab) {
    sh(
        lab,
        "n1",
        "sysctl -qw net.ipv4.conf.eth0.promote_secondaries=1; \
         ip addr add 198.18.0.31/16 dev eth0; ip addr del 198.18.0.11/16 dev eth0",
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn node_address_change_vxlan_kube() {
    require_root();
    let t = two("hfa", &[]);
    let lab = &t.lab;
    let before = ops(lab, 2, "198.18.0.12");
    let at = Instant::now();
    renumber_node1(lab);
    until_reached(&t, at, "vxlan/kube: node1 .11 -> .31");
    let ann = lab.kubectl(&[
        "get",
        "node",
        "node1",
        "-o",
        "jsonpath={.metadata.annotations}",
    ]);
    assert!(
        ann.contains(r#""flannel.alpha.coreos.com/public-ip":"198.18.0.31""#),
        "{ann}"
    );
    let link = lab.exec("n1", &["ip", "-d", "link", "show", "flannel.1"]);
    assert!(link.contains("local 198.18.0.31"), "{link}");
    wait_until(Duration::from_secs(3), "node2's FDB entry to .31", || {
        lab.fdb(2).iter().any(|l| l.contains("dst 198.18.0.31"))
    });
    // Node 2 rewrote only node 1's FDB entry.
    assert!(ops(lab, 2, "198.18.0.12") - before <= 2);
    assert_eq!(lab.routes(2).len(), 1);
    assert!(lab.flannel_log(1).contains("the node's interface changed"));
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn node_address_change_host_gw_etcd() {
    require_root();
    let t = two(
        "hfe",
        &[
            "--mode",
            "etcd",
            "--net-conf",
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        ],
    );
    let lab = &t.lab;
    let at = Instant::now();
    renumber_node1(lab);
    until_reached(&t, at, "host-gw/etcd: node1 .11 -> .31");
    // Pods may still talk through node 2's neighbour cache; the route must follow.
    wait_until(HARD, "the lease and node2's route to follow .31", || {
        let leases = lab.sh(
            "etcdctl",
            &["get", "--prefix", "/coreos.com/network/subnets/"],
        );
        leases.contains(r#""PublicIP":"198.18.0.31""#)
            && lab
                .exec("n2", &["ip", "route"])
                .contains("via 198.18.0.31 dev eth0")
    });
    eprintln!(
        "host-gw/etcd: node2's route via .31 after {:?}",
        at.elapsed()
    );
    // The agent keeps its lease: the renewer still takes the key as ours.
    std::thread::sleep(Duration::from_secs(1));
    let pid = std::fs::read_to_string(lab.dir.join("n1/flanneld.pid")).unwrap();
    assert!(std::path::Path::new(&format!("/proc/{}", pid.trim())).exists());
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn vtep_mac_changed_by_someone_else_is_restored() {
    require_root();
    let t = two("hfm", &[]);
    let lab = &t.lab;
    let mac = lab.exec("n2", &["cat", "/sys/class/net/flannel.1/address"]);
    let at = Instant::now();
    sh(lab, "n2", "ip link set flannel.1 address 02:11:22:33:44:55");
    until_reached(&t, at, "vxlan: node2's flannel.1 MAC changed");
    wait_until(HARD, "the MAC restored", || {
        lab.exec("n2", &["cat", "/sys/class/net/flannel.1/address"]) == mac
    });
    assert!(lab.flannel_log(2).contains("restoring it"));
}
