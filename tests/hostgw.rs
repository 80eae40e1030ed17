//! host-gw and vxlan DirectRouting.

mod support;

use std::time::Duration;
use support::*;

const HOSTGW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

fn underlay_routes(lab: &Lab, n: u32) -> Vec<String> {
    lines(&lab.exec(&format!("n{n}"), &["ip", "route", "show", "dev", "eth0"]))
        .into_iter()
        .filter(|r| r.starts_with("10.244."))
        .collect()
}

fn mesh(lab: &Lab, nodes: u32) {
    let pods: Vec<(u32, String)> = (1..=nodes)
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
}

fn want_routes(node: u32, subnets: &[(u32, String)]) -> Vec<String> {
    let mut v: Vec<String> = subnets
        .iter()
        .filter(|(n, _)| *n != node)
        .map(|(n, s)| format!("{s} via 198.18.0.{} dev eth0 proto 70", 10 + n))
        .collect();
    v.sort();
    v
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn host_gw_with_kube_manager() {
    require_root();
    let lab = Lab::up("hgk", &["--nodes", "3", "--net-conf", HOSTGW]);
    for n in 1..=3 {
        lab.start_flannel(n, &[]);
    }
    let subnets: Vec<(u32, String)> = (1..=3)
        .map(|n| (n, format!("10.244.{}.0/24", n - 1)))
        .collect();
    for n in 1..=3 {
        wait_until(Duration::from_secs(30), "host-gw routes", || {
            underlay_routes(&lab, n).len() == 2
        });
        // `ip route show dev eth0` omits the "dev eth0" part it filtered on.
        let want: Vec<String> = want_routes(n, &subnets)
            .iter()
            .map(|r| r.replace(" dev eth0", ""))
            .collect();
        assert_eq!(underlay_routes(&lab, n), want);
        assert!(lab.subnet_env(n).contains("FLANNEL_MTU=1500\n"));
    }
    let ann = lab.kubectl(&[
        "get",
        "node",
        "node2",
        "-o",
        "jsonpath={.metadata.annotations}",
    ]);
    assert!(
        ann.contains(r#""flannel.alpha.coreos.com/backend-data":"null""#),
        "{ann}"
    );
    assert!(
        ann.contains(r#""flannel.alpha.coreos.com/backend-type":"host-gw""#),
        "{ann}"
    );
    mesh(&lab, 3);

    // A route deleted by someone else comes back (event-driven, well within upstream's 10 s).
    lab.exec("n1", &["ip", "route", "del", "10.244.1.0/24"]);
    wait_until(
        Duration::from_secs(10),
        "the deleted route to return",
        || underlay_routes(&lab, 1).len() == 2,
    );

    // An off-link peer and a peer of another backend type are refused with a warning naming them.
    lab.fake_node(
        "offlink",
        "10.244.50.0/24",
        &[
            ("kube-subnet-manager", "true"),
            ("backend-type", "host-gw"),
            ("backend-data", "null"),
            ("public-ip", "203.0.113.5"),
        ],
    );
    lab.fake_node(
        "vxnode",
        "10.244.51.0/24",
        &[
            ("kube-subnet-manager", "true"),
            ("backend-type", "vxlan"),
            ("backend-data", r#"{"VNI":1,"VtepMAC":"52:00:00:00:00:51"}"#),
            ("public-ip", "198.18.0.51"),
        ],
    );
    wait_until(
        Duration::from_secs(10),
        "warnings for the refused peers",
        || {
            let log = lab.flannel_log(1);
            log.contains("offlink")
                && log.contains("not on-link")
                && log.contains("vxnode")
                && log.contains("backend type")
        },
    );
    assert_eq!(underlay_routes(&lab, 1).len(), 2);
    let p2 = std::fs::read_to_string(lab.dir.join("n2/pod-p2.ip")).unwrap();
    assert!(
        lab.ping("p1", p2.trim(), 2, "0.2"),
        "good peers stopped working"
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn host_gw_with_etcd_manager() {
    require_root();
    let lab = Lab::up(
        "hge",
        &["--mode", "etcd", "--nodes", "3", "--net-conf", HOSTGW],
    );
    for n in 1..=3 {
        lab.start_flannel(n, &[]);
    }
    for n in 1..=3 {
        wait_until(Duration::from_secs(30), "host-gw routes", || {
            underlay_routes(&lab, n).len() == 2
        });
    }
    let subnets: Vec<(u32, String)> = (1..=3)
        .map(|n| {
            let env = lab.subnet_env(n);
            let s = env
                .lines()
                .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
                .unwrap()
                .replace(".1/", ".0/");
            (n, s)
        })
        .collect();
    for n in 1..=3 {
        let want: Vec<String> = want_routes(n, &subnets)
            .iter()
            .map(|r| r.replace(" dev eth0", ""))
            .collect();
        assert_eq!(underlay_routes(&lab, n), want);
    }
    let vals = lab.sh(
        "etcdctl",
        &[
            "get",
            "--prefix",
            "/coreos.com/network/subnets/",
            "--print-value-only",
        ],
    );
    for n in 1..=3 {
        assert!(
            vals.contains(&format!(
                r#"{{"PublicIP":"198.18.0.{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
                10 + n
            )),
            "{vals}"
        );
    }
    mesh(&lab, 3);
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn vxlan_direct_routing() {
    require_root();
    let conf = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
    let lab = Lab::up("vxdr", &["--nodes", "2", "--net-conf", conf]);
    lab.start_flannel(1, &[]);
    lab.start_flannel(2, &[]);
    for n in 1..=2 {
        wait_until(Duration::from_secs(30), "direct routes", || {
            underlay_routes(&lab, n).len() == 1
        });
        assert!(lab.neighs(n).is_empty() && lab.fdb(n).is_empty() && lab.routes(n).is_empty());
    }
    assert_eq!(
        underlay_routes(&lab, 1),
        vec!["10.244.1.0/24 via 198.18.0.12 proto 70".to_string()]
    );
    mesh(&lab, 2);
}
