//! IPv6 and dual-stack in kube mode: the lab's LAN carries IPv6 too, Nodes carry
//! an IPv6 podCIDR, and pods reach each other over both families.

mod support;

use std::time::Duration;
use support::*;

const DUAL_VXLAN: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const DUAL_HOSTGW: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#;
const V6_ONLY_VXLAN: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;

/// The IPv6 pod subnet the lab gives node `n`.
fn subnet6(n: u32) -> String {
    if n == 1 {
        "fd00:10:244::/64".into()
    } else {
        format!("fd00:10:244:{:x}::/64", n - 1)
    }
}

fn node_ip6(n: u32) -> String {
    format!("fd00:198:18::{}", 10 + n)
}

fn v6dev(lab: &Lab, n: u32, what: &[&str]) -> Vec<String> {
    let mut cmd = what.to_vec();
    cmd.extend_from_slice(&["dev", "flannel-v6.1"]);
    lab.on_device(n, &cmd)
}

fn annotations(lab: &Lab, node: u32) -> serde_json::Value {
    let a = lab.kubectl(&[
        "get",
        "node",
        &format!("node{node}"),
        "-o",
        "jsonpath={.metadata.annotations}",
    ]);
    serde_json::from_str(&a).unwrap_or_else(|e| panic!("annotations {a:?}: {e}"))
}

fn mac_of(lab: &Lab, n: u32, dev: &str) -> String {
    let out = lab.exec(
        &format!("n{n}"),
        &["cat", &format!("/sys/class/net/{dev}/address")],
    );
    out.trim().to_string()
}

/// Every pod reaches every other pod in the given families.
fn mesh(lab: &Lab, nodes: u32, families: &[u8]) {
    for n in 1..=nodes {
        lab.add_pod(n, &format!("p{n}"));
    }
    for &fam in families {
        for a in 1..=nodes {
            for b in 1..=nodes {
                if a != b {
                    let ip = lab.pod_ip(b, &format!("p{b}"), fam);
                    assert!(
                        lab.reaches(&format!("p{a}"), &ip, 3),
                        "IPv{fam}: pod on node{a} cannot reach {ip} on node{b}\n{}",
                        lab.dump(a)
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn dual_stack_vxlan_has_upstreams_form_and_full_mesh() {
    require_root();
    let lab = Lab::up(
        "v6dual",
        &["--nodes", "3", "--ip", "dual", "--net-conf", DUAL_VXLAN],
    );
    for n in 1..=3 {
        lab.start_flannel(n, &["--ip-masq"]);
    }
    for n in 1..=3 {
        wait_until(Duration::from_secs(30), "IPv4 and IPv6 entries", || {
            lab.routes(n).len() == 2 && v6dev(&lab, n, &["bridge", "fdb", "show"]).len() == 2
        });
    }
    for n in 1..=3 {
        // subnet.env: upstream's lines and order; the pods' MTU is the IPv4 device's.
        assert_eq!(
            lab.subnet_env(n),
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{}.1/24\n\
                 FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET={}1/64\n\
                 FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
                n - 1,
                subnet6(n).trim_end_matches("/64")
            )
        );
        // The IPv6 device: its own VXLAN over the IPv6 underlay, kernel MTU (−70),
        // the lease's network address /128, router advertisements ignored.
        let link = lab.exec(
            &format!("n{n}"),
            &["ip", "-d", "link", "show", "flannel-v6.1"],
        );
        assert!(link.contains("mtu 1430"), "{link}");
        assert!(
            link.contains(&format!("vxlan id 1 local {} dev eth0", node_ip6(n))),
            "{link}"
        );
        assert!(link.contains("dstport 8472 nolearning"), "{link}");
        let addr = lab.exec(
            &format!("n{n}"),
            &[
                "ip",
                "-o",
                "-6",
                "addr",
                "show",
                "dev",
                "flannel-v6.1",
                "scope",
                "global",
            ],
        );
        assert!(
            addr.contains(&format!("inet6 {}/128", subnet6(n).trim_end_matches("/64"))),
            "{addr}"
        );
        let ra = lab.exec(
            &format!("n{n}"),
            &["cat", "/proc/sys/net/ipv6/conf/flannel-v6.1/accept_ra"],
        );
        assert_eq!(ra.trim(), "0");

        // Annotations: both families, each with its own device's MAC.
        let a = annotations(&lab, n);
        let k = |s: &str| {
            a[format!("flannel.alpha.coreos.com/{s}")]
                .as_str()
                .map(String::from)
        };
        assert_eq!(
            k("public-ip").as_deref(),
            Some(format!("198.18.0.{}", 10 + n).as_str())
        );
        assert_eq!(k("public-ipv6"), Some(node_ip6(n)));
        assert_eq!(
            k("backend-data"),
            Some(format!(
                r#"{{"VNI":1,"VtepMAC":"{}"}}"#,
                mac_of(&lab, n, "flannel.1")
            ))
        );
        assert_eq!(
            k("backend-v6-data"),
            Some(format!(
                r#"{{"VNI":1,"VtepMAC":"{}"}}"#,
                mac_of(&lab, n, "flannel-v6.1")
            ))
        );

        // Kernel entries per peer, exactly upstream's form.
        let mut routes = Vec::new();
        let mut neighs = Vec::new();
        let mut fdb = Vec::new();
        for p in (1..=3).filter(|p| *p != n) {
            let s = subnet6(p);
            let gw = s.trim_end_matches("/64");
            let mac = mac_of(&lab, p, "flannel-v6.1");
            routes.push(format!(
                "{s} via {gw} proto 70 metric 1024 onlink pref medium"
            ));
            neighs.push(format!("{gw} lladdr {mac} PERMANENT"));
            fdb.push(format!("{mac} dst {} self permanent", node_ip6(p)));
        }
        routes.sort();
        neighs.sort();
        fdb.sort();
        let have_routes: Vec<String> = v6dev(&lab, n, &["ip", "-6", "route", "show"])
            .into_iter()
            .filter(|r| !r.starts_with("fe80") && !r.contains("proto kernel"))
            .collect();
        assert_eq!(have_routes, routes, "node{n}");
        assert_eq!(v6dev(&lab, n, &["ip", "-6", "neigh", "show"]), neighs);
        assert_eq!(v6dev(&lab, n, &["bridge", "fdb", "show"]), fdb);
    }
    // ip6tables holds upstream's rules for the IPv6 network and lease.
    let rules = lab.exec("n2", &["ip6tables-save"]);
    for r in [
        "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
        "-A FLANNEL-POSTRTG -s fd00:10:244::/56 -d fd00:10:244::/56 -m comment --comment \"flanneld masq\" -j RETURN",
        "-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
        "-A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244:1::/64 -m comment --comment \"flanneld masq\" -j RETURN",
        "-A FLANNEL-FWD -s fd00:10:244::/56 -m comment --comment \"flanneld forward\" -j ACCEPT",
    ] {
        assert!(rules.contains(r), "missing {r}\n{rules}");
    }
    mesh(&lab, 3, &[4, 6]);
    // Masquerade: the control plane has no route back to pods, so an answer from
    // it proves the pod's IPv6 packets left with the node's address.
    assert!(
        lab.reaches("p1", "fd00:198:18::1", 2),
        "pod -> LAN over IPv6"
    );

    // A restarted agent keeps both devices (and MACs) and changes nothing.
    let macs: Vec<String> = ["flannel.1", "flannel-v6.1"]
        .iter()
        .map(|d| mac_of(&lab, 1, d))
        .collect();
    lab.stop_flannel(1, "KILL");
    lab.start_flannel(1, &["--ip-masq"]);
    wait_until(
        Duration::from_secs(30),
        "the restarted agent to be up",
        || lab.flannel_log(1).matches("wrote ").count() >= 2,
    );
    let after: Vec<String> = ["flannel.1", "flannel-v6.1"]
        .iter()
        .map(|d| mac_of(&lab, 1, d))
        .collect();
    assert_eq!(macs, after);
    assert!(lab.reaches("p2", &lab.pod_ip(1, "p1", 6), 3));
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn dual_stack_host_gw() {
    require_root();
    let lab = Lab::up(
        "v6hgw",
        &["--nodes", "3", "--ip", "dual", "--net-conf", DUAL_HOSTGW],
    );
    for n in 1..=3 {
        lab.start_flannel(n, &[]);
    }
    for n in 1..=3 {
        let mut want: Vec<String> = (1..=3)
            .filter(|p| *p != n)
            .map(|p| {
                format!(
                    "{} via {} proto 70 metric 1024 pref medium",
                    subnet6(p),
                    node_ip6(p)
                )
            })
            .collect();
        want.sort();
        let v6routes = || -> Vec<String> {
            lines(&lab.exec(
                &format!("n{n}"),
                &["ip", "-6", "route", "show", "dev", "eth0"],
            ))
            .into_iter()
            .filter(|r| r.starts_with("fd00:10:244"))
            .collect()
        };
        wait_until(Duration::from_secs(30), "IPv6 host-gw routes", || {
            v6routes().len() == 2
        });
        assert_eq!(v6routes(), want, "node{n}");
        let v4: Vec<String> =
            lines(&lab.exec(&format!("n{n}"), &["ip", "route", "show", "dev", "eth0"]))
                .into_iter()
                .filter(|r| r.starts_with("10.244."))
                .collect();
        assert_eq!(v4.len(), 2, "{v4:?}");
        let a = annotations(&lab, n);
        assert_eq!(a["flannel.alpha.coreos.com/backend-v6-data"], "null");
        assert_eq!(a["flannel.alpha.coreos.com/backend-data"], "null");
        assert!(lab.subnet_env(n).contains("FLANNEL_MTU=1500\n"));
    }
    mesh(&lab, 3, &[4, 6]);

    // A deleted IPv6 route comes back (the drift monitor watches IPv6 routes too).
    lab.exec("n1", &["ip", "-6", "route", "del", &subnet6(2)]);
    wait_until(
        Duration::from_secs(10),
        "the deleted IPv6 route to return",
        || {
            lab.exec("n1", &["ip", "-6", "route", "show", &subnet6(2)])
                .contains(&node_ip6(2))
        },
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn ipv6_only_vxlan() {
    require_root();
    let lab = Lab::up(
        "v6only",
        &["--nodes", "2", "--ip", "6", "--net-conf", V6_ONLY_VXLAN],
    );
    // IPv6 interface selection: node1 names its interface by IPv6 address, node2 gives
    // its public IPv6 explicitly.
    lab.start_flannel(1, &["--ip-masq", "--iface", &node_ip6(1)]);
    lab.start_flannel(2, &["--ip-masq", "--public-ipv6", &node_ip6(2)]);
    for n in 1..=2 {
        wait_until(Duration::from_secs(30), "IPv6 fdb entry", || {
            v6dev(&lab, n, &["bridge", "fdb", "show"]).len() == 1
        });
        assert_eq!(
            lab.subnet_env(n),
            format!(
                "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET={}1/64\n\
                 FLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n",
                subnet6(n).trim_end_matches("/64")
            )
        );
        // No IPv4 device, no IPv4 annotations.
        let links = lab.exec(
            &format!("n{n}"),
            &["ip", "-o", "link", "show", "type", "vxlan"],
        );
        assert!(
            links.contains("flannel-v6.1") && !links.contains("flannel.1:"),
            "{links}"
        );
        let a = annotations(&lab, n);
        assert!(a.get("flannel.alpha.coreos.com/public-ip").is_none(), "{a}");
        assert!(
            a.get("flannel.alpha.coreos.com/backend-data").is_none(),
            "{a}"
        );
        assert_eq!(a["flannel.alpha.coreos.com/public-ipv6"], node_ip6(n));
    }
    mesh(&lab, 2, &[6]);
    // nftables mode: only the IPv6 table, with upstream's rules; masquerade works
    // (the control plane has no route back to pods).
    let tables = lab.exec("n1", &["nft", "list", "tables"]);
    assert_eq!(lines(&tables), vec!["table ip6 flannel-ipv6".to_string()]);
    let t = lab.exec("n1", &["nft", "list", "table", "ip6", "flannel-ipv6"]);
    assert!(
        t.contains("ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random comment \"flanneld masq\""),
        "{t}"
    );
    assert!(
        lab.reaches("p1", "fd00:198:18::1", 2),
        "pod -> LAN over IPv6"
    );
}

/// `KEY=VALUE` from a node's subnet.env.
fn env_value(lab: &Lab, n: u32, key: &str) -> String {
    lab.subnet_env(n)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(String::from))
        .unwrap_or_default()
}

/// `10.244.7.1/24` → `10.244.7.0-24`; `fd00:10:244:3a::1/64` → `fd00:10:244:3a::-64`.
fn key_part(gw: &str) -> String {
    let (ip, len) = gw.split_once('/').unwrap();
    let net = if ip.contains(':') {
        format!("{}::", ip.trim_end_matches("::1"))
    } else {
        format!("{}.0", ip.rsplit_once('.').unwrap().0)
    };
    format!("{net}-{len}")
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn dual_stack_with_etcd_manager() {
    require_root();
    let lab = Lab::up(
        "v6etcd",
        &[
            "--mode",
            "etcd",
            "--nodes",
            "3",
            "--ip",
            "dual",
            "--net-conf",
            DUAL_VXLAN,
        ],
    );
    for n in 1..=3 {
        lab.start_flannel(n, &[]);
    }
    for n in 1..=3 {
        wait_until(Duration::from_secs(30), "IPv4 and IPv6 entries", || {
            lab.routes(n).len() == 2 && v6dev(&lab, n, &["bridge", "fdb", "show"]).len() == 2
        });
    }
    for n in 1..=3 {
        // One key per node naming both subnets, upstream's value, bound to a lease.
        let v4 = env_value(&lab, n, "FLANNEL_SUBNET");
        let v6 = env_value(&lab, n, "FLANNEL_IPV6_SUBNET");
        assert!(
            v6.starts_with("fd00:10:244:") && v6.ends_with("::1/64"),
            "{v6}"
        );
        let key = format!(
            "/coreos.com/network/subnets/{}&{}",
            key_part(&v4),
            key_part(&v6)
        );
        let json = lab.sh("etcdctl", &["get", &key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(
            v["kvs"][0]["lease"].as_i64().unwrap_or(0) != 0,
            "{key}: {json}"
        );
        let value = lab.sh("etcdctl", &["get", &key, "--print-value-only"]);
        let want = format!(
            r#"{{"PublicIP":"198.18.0.{}","PublicIPv6":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            10 + n,
            node_ip6(n),
            mac_of(&lab, n, "flannel.1"),
            mac_of(&lab, n, "flannel-v6.1")
        );
        assert_eq!(value.trim(), want);
    }
    mesh(&lab, 3, &[4, 6]);

    // A restarted agent keeps both subnets.
    let before = lab.subnet_env(2);
    lab.stop_flannel(2, "TERM");
    lab.start_flannel(2, &[]);
    wait_until(Duration::from_secs(30), "the restarted agent", || {
        lab.flannel_log(2).matches("wrote ").count() >= 2
    });
    assert_eq!(lab.subnet_env(2), before);
    assert!(lab.reaches("p1", &lab.pod_ip(2, "p2", 6), 3));
}
