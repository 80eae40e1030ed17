//! --ip-masq and the forward rules, with iptables and with nftables.

mod support;

use std::time::Duration;
use support::*;

fn flannel_lines(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.contains("FLANNEL") || l.contains("flanneld"))
        .map(String::from)
        .collect()
}

/// Pod traffic to the LAN leaves with the node's address; pod-to-pod keeps pod addresses.
fn check_nat(lab: &Lab) {
    let p1 = lab.add_pod(1, "p1");
    let p2 = lab.add_pod(2, "p2");
    assert!(lab.ping("p1", &p2, 2, "0.2"));
    let seen = lab.udp_source("cp", 9999, || lab.udp_send("n1-p1", "198.18.0.1", 9999));
    assert_eq!(
        seen.map(|a| a.to_string()),
        Some("198.18.0.11".to_string()),
        "LAN host must see the node's address"
    );
    let seen = lab.udp_source("n2-p2", 9998, || lab.udp_send("n1-p1", &p2, 9998));
    assert_eq!(
        seen.map(|a| a.to_string()),
        Some(p1),
        "a pod must see the other pod's own address"
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn iptables_masquerade_and_forward_rules() {
    require_root();
    let lab = Lab::up("fwipt", &["--nodes", "2"]);
    lab.start_flannel(1, &["--ip-masq"]);
    lab.start_flannel(2, &["--ip-masq"]);
    wait_until(Duration::from_secs(30), "rules installed", || {
        lab.flannel_log(1).contains("iptables IPv4 rules installed")
    });
    assert_eq!(
        flannel_lines(&lab.exec("n1", &["iptables-save"])),
        vec![
            ":FLANNEL-FWD - [0:0]",
            "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
            "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
            "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
            ":FLANNEL-POSTRTG - [0:0]",
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
            "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN",
            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN",
            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
            "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
            "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
        ]
    );
    assert!(lab.subnet_env(1).contains("FLANNEL_IPMASQ=true"));
    check_nat(&lab);

    // A flushed chain comes back within the resync period (5 s), without duplicates.
    let before = flannel_lines(&lab.exec("n1", &["iptables-save"]));
    lab.exec("n1", &["iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG"]);
    lab.exec(
        "n1",
        &[
            "iptables",
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ],
    );
    wait_until(
        Duration::from_secs(8),
        "the masquerade rules to return",
        || flannel_lines(&lab.exec("n1", &["iptables-save"])) == before,
    );
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        flannel_lines(&lab.exec("n1", &["iptables-save"])),
        before,
        "resync duplicated or changed rules"
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn nftables_mode() {
    require_root();
    let conf = r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;
    let lab = Lab::up("fwnft", &["--nodes", "2", "--net-conf", conf]);
    lab.start_flannel(1, &["--ip-masq"]);
    lab.start_flannel(2, &["--ip-masq"]);
    wait_until(Duration::from_secs(30), "rules installed", || {
        lab.flannel_log(1).contains("nftables IPv4 rules installed")
    });
    let table = lab.exec("n1", &["nft", "list", "table", "ip", "flannel-ipv4"]);
    for want in [
        "type nat hook postrouting priority srcnat; policy accept;",
        "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment \"flanneld masq\"",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/24 return comment \"flanneld masq\"",
        "ip saddr 10.244.0.0/16 accept comment \"flanneld forward\"",
    ] {
        assert!(table.contains(want), "missing {want:?} in\n{table}");
    }
    assert!(
        !lab.exec("n1", &["iptables-save"]).contains("FLANNEL"),
        "nftables mode must not write iptables rules"
    );
    check_nat(&lab);
    lab.exec("n1", &["nft", "delete", "table", "ip", "flannel-ipv4"]);
    wait_until(
        Duration::from_secs(8),
        "the nftables table to return",
        || {
            lab.try_sh(
                "exec",
                &["n1", "nft", "list", "table", "ip", "flannel-ipv4"],
            )
            .status
            .success()
        },
    );
    assert_eq!(
        lab.exec("n1", &["nft", "list", "table", "ip", "flannel-ipv4"]),
        table
    );
}
