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

/// Adds (`-A`) or deletes (`-D`) the POSTROUTING jump to FLANNEL-POSTRTG in a node.
fn jump_to_masq(lab: &Lab, node: u32, iptables: &str, op: &str) {
    lab.exec(
        &format!("n{node}"),
        &[
            iptables,
            "-t",
            "nat",
            op,
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ],
    );
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
        lab.flannel_log(1)
            .contains("iptables (nft) IPv4 rules installed")
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
    jump_to_masq(&lab, 1, "iptables", "-D");
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
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        assert!(
            !lab.exec("n1", &[save]).contains("FLANNEL"),
            "nftables mode must not write iptables rules ({save})"
        );
    }
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

/// The FLANNEL lines of one flavour's `iptables-save` in a node.
fn saved(lab: &Lab, node: u32, save: &str) -> Vec<String> {
    flannel_lines(&lab.exec(&format!("n{node}"), &[save]))
}

/// What kube-proxy leaves in a node before flanneld starts: its marker chain
/// and a few rules, in one flavour (`iptables-legacy` or `iptables-nft`).
fn seed_kube_proxy(lab: &Lab, node: u32, iptables: &str) {
    let n = format!("n{node}");
    for args in [
        "-t mangle -N KUBE-IPTABLES-HINT",
        "-t nat -N KUBE-POSTROUTING",
        "-t nat -A POSTROUTING -m comment --comment kubernetes -j KUBE-POSTROUTING",
        "-t nat -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-t filter -N KUBE-FORWARD",
        "-t filter -A FORWARD -j KUBE-FORWARD",
    ] {
        let mut cmd = vec![iptables];
        cmd.extend(args.split(' '));
        lab.exec(&n, &cmd);
    }
}

/// A host whose kube-proxy uses iptables-legacy gets flannel's chains in legacy,
/// next to kube-proxy's; --ip-masq-fully-random-disable leaves out --random-fully;
/// --ip-blackhole-route keeps `blackhole <own subnet>` under the same repair.
#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn legacy_host_gets_legacy_rules() {
    require_root();
    let lab = Lab::up("fwleg", &["--nodes", "2"]);
    for node in [1, 2] {
        seed_kube_proxy(&lab, node, "iptables-legacy");
    }
    lab.start_flannel(
        1,
        &[
            "--ip-masq",
            "--ip-masq-fully-random-disable",
            "--ip-blackhole-route",
        ],
    );
    lab.start_flannel(2, &["--ip-masq"]);
    wait_until(Duration::from_secs(30), "rules installed", || {
        lab.flannel_log(1)
            .contains("iptables (legacy) IPv4 rules installed")
            && lab
                .flannel_log(2)
                .contains("iptables (legacy) IPv4 rules installed")
    });
    assert!(
        lab.flannel_log(1).contains("marker chains are in legacy"),
        "the choice is logged with its reason:\n{}",
        lab.flannel_log(1)
    );
    let legacy = saved(&lab, 1, "iptables-legacy-save");
    assert!(
        legacy.contains(&"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE".to_string()),
        "{legacy:#?}"
    );
    assert!(legacy.contains(
        &"-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD".to_string()
    ));
    assert!(
        !legacy.iter().any(|l| l.contains("random-fully")),
        "{legacy:#?}"
    );
    assert!(saved(&lab, 2, "iptables-legacy-save")
        .iter()
        .any(|l| l.contains("--random-fully")));
    for node in [1, 2] {
        assert!(
            saved(&lab, node, "iptables-nft-save").is_empty(),
            "nothing in nft on node {node}"
        );
    }
    check_nat(&lab);

    // The blackhole route: the lowest priority, so the bridge's own route keeps working.
    let own = lab
        .subnet_env(1)
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .map(|s| s.replace(".1/24", ".0/24"))
        .expect("FLANNEL_SUBNET");
    let blackholes = |node: &str| lab.exec(node, &["ip", "route", "show", "type", "blackhole"]);
    assert_eq!(
        blackholes("n1").trim(),
        format!("blackhole {own} proto 70 metric 4294967295")
    );
    assert_eq!(blackholes("n2").trim(), "", "node 2 was not asked for one");
    lab.exec(
        "n1",
        &[
            "ip",
            "route",
            "del",
            "blackhole",
            &own,
            "metric",
            "4294967295",
        ],
    );
    wait_until(
        Duration::from_secs(2),
        "the blackhole route to be repaired",
        || blackholes("n1").contains(&own),
    );
    lab.stop_flannel(1, "TERM");
    lab.start_flannel(
        1,
        &[
            "--ip-masq",
            "--ip-masq-fully-random-disable",
            "--ip-blackhole-route",
        ],
    );
    wait_until(Duration::from_secs(30), "restarted", || {
        lab.flannel_log(1)
            .contains("iptables (legacy) IPv4 rules installed")
    });
    assert_eq!(
        blackholes("n1").lines().count(),
        1,
        "a restart keeps one blackhole route"
    );
    assert_eq!(
        saved(&lab, 1, "iptables-legacy-save"),
        legacy,
        "a restart rewrites the same rules"
    );
}

/// A host whose rules are in nft gets flannel's chains in nft, and the chains an
/// earlier run left in legacy are cleared; FLANNELD_IPTABLES_MODE overrides the choice.
#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn nft_host_gets_nft_rules_and_mode_overrides() {
    require_root();
    let lab = Lab::up("fwnfth", &["--nodes", "2"]);
    seed_kube_proxy(&lab, 1, "iptables-nft");
    seed_kube_proxy(&lab, 2, "iptables-nft");
    // An earlier agent's chain in the flavour this host does not use.
    lab.exec(
        "n1",
        &["iptables-legacy", "-t", "nat", "-N", "FLANNEL-POSTRTG"],
    );
    jump_to_masq(&lab, 1, "iptables-legacy", "-A");
    lab.start_flannel(1, &["--ip-masq"]);
    lab.start_flannel_env(2, &[("FLANNELD_IPTABLES_MODE", "legacy")], &["--ip-masq"]);
    wait_until(Duration::from_secs(30), "rules installed", || {
        lab.flannel_log(1)
            .contains("iptables (nft) IPv4 rules installed")
            && lab
                .flannel_log(2)
                .contains("iptables (legacy) IPv4 rules installed")
    });
    let log1 = lab.flannel_log(1);
    assert!(log1.contains("marker chains are in nft"), "{log1}");
    assert!(
        log1.contains("removed FLANNEL-POSTRTG from iptables-legacy"),
        "{log1}"
    );
    assert!(saved(&lab, 1, "iptables-legacy-save").is_empty());
    assert_eq!(saved(&lab, 1, "iptables-nft-save").len(), 11);
    assert!(lab.flannel_log(2).contains("--iptables-mode=legacy"));
    assert_eq!(saved(&lab, 2, "iptables-legacy-save").len(), 11);
    assert!(saved(&lab, 2, "iptables-nft-save").is_empty());
    check_nat(&lab);
}

/// Rewrites are one iptables-restore transaction: restarting the agent and
/// repeated resyncs (a foreign rule appended to its chain, every second) under a
/// steady stream of new outbound connections from a pod lose none — every one
/// arrives, masqueraded to the node's address.
#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn rewrites_lose_no_outbound_connection() {
    require_root();
    let lab = Lab::up("fwloss", &["--nodes", "1"]);
    lab.start_flannel(1, &["--ip-masq", "--iptables-resync=1"]);
    wait_until(Duration::from_secs(30), "rules installed", || {
        lab.flannel_log(1).contains("IPv4 rules installed")
    });
    lab.add_pod(1, "p1");
    const N: u32 = 600;
    let sources = lab.tcp_sources("cp", 7777, || {
        let client = lab.exec_bg(
            "n1-p1",
            &format!(
                "ok=0; for i in $(seq {N}); do timeout 2 bash -c 'exec 3<>/dev/tcp/198.18.0.1/7777' && ok=$((ok+1)); sleep 0.005; done; echo ok=$ok"
            ),
        );
        let tamper = ["iptables", "-t", "nat", "-A", "FLANNEL-POSTRTG", "-s", "192.0.2.1", "-j", "RETURN"];
        for round in 0..6 {
            std::thread::sleep(Duration::from_millis(700));
            if round == 3 {
                lab.stop_flannel(1, "TERM");
                lab.start_flannel(1, &["--ip-masq", "--iptables-resync=1"]);
            } else {
                lab.exec("n1", &tamper);
            }
        }
        let out = client.wait_with_output().expect("client");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("ok={N}")), "connections failed: {text}");
    });
    let log = lab.flannel_log(1);
    assert!(
        log.matches("were missing or changed; restored").count() >= 3,
        "the resyncs under test did rewrite the chain:\n{log}"
    );
    assert_eq!(sources.len(), N as usize, "every connection arrived");
    let node: std::net::IpAddr = "198.18.0.11".parse().unwrap();
    let unmasqueraded = sources.iter().filter(|a| **a != node).count();
    assert_eq!(
        unmasqueraded, 0,
        "connections that left without masquerade: {unmasqueraded}"
    );
}
