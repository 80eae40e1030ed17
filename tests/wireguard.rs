//! The wireguard backend end to end in the lab: pods talk across encrypted
//! tunnels, the LAN carries only WireGuard's UDP, the published lease and the
//! kernel state are upstream's, and the devices are repaired when tampered
//! with. This machine's kernel has no WireGuard module, so these run the
//! embedded userspace WireGuard; `kernel_vm_*` run the kernel's, inside the
//! project's kernel VM (scripts/kernel-vm.sh, run by scripts/test.sh).

mod support;

use std::io::{Read, Write};
use std::time::Duration;
use support::*;

use flannel::backend::wireguard::key::Key;

const WG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#;
const PSK_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const PSK_B: &str = "HxkdHBsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

/// One WireGuard peer as `wg show <dev> dump` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub key: String,
    pub psk: bool,
    pub endpoint: String,
    /// Sorted, comma-joined.
    pub allowed: String,
    pub keepalive: u16,
}

/// What a node's WireGuard device holds: (its public key, port, peers).
pub fn wg_state(lab: &Lab, node: u32, dev: &str) -> Option<(String, u16, Vec<Peer>)> {
    let sock = lab.dir.join(format!("n{node}/wireguard/{dev}.sock"));
    if sock.exists() {
        uapi_state(&uapi(&sock, "get=1\n\n")?)
    } else {
        let o = lab.try_sh("exec", &[&format!("n{node}"), "wg", "show", dev, "dump"]);
        o.status
            .success()
            .then(|| dump_state(&String::from_utf8_lossy(&o.stdout)))
            .flatten()
    }
}

/// Sends one configuration-protocol request to a userspace device's socket.
pub fn uapi(sock: &std::path::Path, req: &str) -> Option<String> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while !(out.ends_with(b"\n\n") && out.windows(6).any(|w| w == b"errno=")) {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn b64(hex: &str) -> String {
    Key::from_hex(hex)
        .map(|k| k.to_string())
        .unwrap_or_default()
}

fn uapi_state(reply: &str) -> Option<(String, u16, Vec<Peer>)> {
    let (mut private, mut port, mut peers) = (String::new(), 0, Vec::<(Peer, Vec<String>)>::new());
    for l in reply.lines() {
        let Some((k, v)) = l.split_once('=') else {
            continue;
        };
        match k {
            "own_public_key" => private = b64(v),
            "listen_port" => port = v.parse().ok()?,
            "public_key" => peers.push((
                Peer {
                    key: b64(v),
                    psk: false,
                    endpoint: String::new(),
                    allowed: String::new(),
                    keepalive: 0,
                },
                vec![],
            )),
            _ => {
                let (p, allowed) = peers.last_mut()?;
                match k {
                    "preshared_key" => p.psk = v.chars().any(|c| c != '0'),
                    "endpoint" => p.endpoint = v.to_string(),
                    "allowed_ip" => allowed.push(v.to_string()),
                    "persistent_keepalive_interval" => p.keepalive = v.parse().ok()?,
                    _ => {}
                }
            }
        }
    }
    let mut out: Vec<Peer> = peers
        .into_iter()
        .map(|(mut p, mut a)| {
            a.sort();
            p.allowed = a.join(",");
            p
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Some((private, port, out))
}

/// `wg show <dev> dump`: the device line, then one line per peer.
fn dump_state(text: &str) -> Option<(String, u16, Vec<Peer>)> {
    let mut lines = text.lines();
    let dev: Vec<&str> = lines.next()?.split('\t').collect();
    let mut peers: Vec<Peer> = lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let mut allowed: Vec<&str> = f.get(3)?.split(',').collect();
            allowed.sort();
            Some(Peer {
                key: f[0].to_string(),
                psk: f[1] != "(none)",
                endpoint: f[2].to_string(),
                allowed: allowed.join(","),
                keepalive: f.get(7)?.parse().unwrap_or(0),
            })
        })
        .collect();
    peers.sort_by(|a, b| a.key.cmp(&b.key));
    Some((dev.get(1)?.to_string(), dev.get(2)?.parse().ok()?, peers))
}

/// The public key a node publishes (its backend-data annotation).
fn published_key(lab: &Lab, node: u32) -> String {
    let data = lab.kubectl(&[
        "get",
        "node",
        &format!("node{node}"),
        "-o",
        r"jsonpath={.metadata.annotations.flannel\.alpha\.coreos\.com/backend-data}",
    ]);
    let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
    v["PublicKey"].as_str().unwrap_or_default().to_string()
}

fn wait_wg_peers(lab: &Lab, nodes: &[u32], dev: &str) {
    for &n in nodes {
        wait_until(
            Duration::from_secs(30),
            &format!("node{n} to hold {} WireGuard peers", nodes.len() - 1),
            || wg_state(lab, n, dev).is_some_and(|(_, _, p)| p.len() == nodes.len() - 1),
        );
    }
}

fn node_ip(n: u32) -> String {
    format!("198.18.0.{}", 10 + n)
}

/// Captures the LAN's IP packets between nodes while `during` runs; returns
/// tcpdump's one-line summaries.
fn capture_lan(lab: &Lab, during: impl FnOnce()) -> Vec<String> {
    let pcap = lab.dir.join("lan.pcap");
    let p = pcap.to_str().unwrap().to_string();
    let mut cap = lab.exec_bg(
        "lan",
        &format!(
            "timeout 12 tcpdump -i br0 -nn -U -w {p} 'ip and not host 198.18.0.1' 2>/dev/null"
        ),
    );
    std::thread::sleep(Duration::from_millis(800));
    during();
    // The capture ends by its own timeout (bounded; nothing else is signalled).
    let _ = cap.wait();
    lines(&lab.exec("lan", &["tcpdump", "-nn", "-r", &p]))
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn kube_three_nodes_talk_encrypted_with_upstreams_lease_and_state() {
    require_root();
    let lab = Lab::up("wg3", &["--nodes", "3", "--net-conf", WG]);
    for n in 1..=3 {
        lab.start_flannel(n, &[]);
    }
    wait_wg_peers(&lab, &[1, 2, 3], "flannel-wg");
    let pods: Vec<(u32, String)> = (1..=3)
        .map(|n| (n, lab.add_pod(n, &format!("p{n}"))))
        .collect();
    for n in 1..=3u32 {
        // The key file: base64, 0400, and what the lease publishes.
        let kf = lab.dir.join(format!("n{n}/wgkey"));
        let private: Key = std::fs::read_to_string(&kf).unwrap().parse().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&kf).unwrap().permissions().mode() & 0o777,
            0o400
        );
        let public = private.public().to_string();
        let ann = lab.kubectl(&[
            "get",
            "node",
            &format!("node{n}"),
            "-o",
            "jsonpath={.metadata.annotations}",
        ]);
        let ann: serde_json::Value = serde_json::from_str(&ann).unwrap();
        let get = |k: &str| {
            ann[format!("flannel.alpha.coreos.com/{k}")]
                .as_str()
                .map(String::from)
        };
        assert_eq!(get("backend-type").as_deref(), Some("wireguard"));
        assert_eq!(
            get("backend-data"),
            Some(format!(r#"{{"PublicKey":"{public}","Port":51820}}"#))
        );
        assert_eq!(get("public-ip"), Some(node_ip(n)));
        assert!(
            lab.subnet_env(n).contains("FLANNEL_MTU=1420\n"),
            "{}",
            lab.subnet_env(n)
        );
        // Kernel state: the subnet address, one route for the network, a peer per node.
        let routes = lab.on_device(n, &["ip", "route", "show", "dev", "flannel-wg"]);
        assert_eq!(
            routes,
            vec!["10.244.0.0/16 proto 70 scope link".to_string()]
        );
        let addr = lab.exec(
            &format!("n{n}"),
            &["ip", "-4", "-o", "addr", "show", "flannel-wg"],
        );
        assert!(
            addr.contains(&format!("inet 10.244.{}.0/32", n - 1)),
            "{addr}"
        );
        let mtu = lab.exec(&format!("n{n}"), &["cat", "/sys/class/net/flannel-wg/mtu"]);
        assert_eq!(mtu.trim(), "1420");
        let (key, port, peers) = wg_state(&lab, n, "flannel-wg").unwrap();
        assert_eq!((key, port), (public.clone(), 51820));
        let mut want: Vec<Peer> = (1..=3u32)
            .filter(|&m| m != n)
            .map(|m| Peer {
                key: published_key(&lab, m),
                psk: false,
                endpoint: format!("{}:51820", node_ip(m)),
                allowed: format!("10.244.{}.0/24", m - 1),
                keepalive: 0,
            })
            .collect();
        want.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(peers, want, "node{n}'s peers");
    }
    // On the LAN: only WireGuard's UDP between the nodes, no pod packet in clear.
    let seen = capture_lan(&lab, || {
        for (a, _) in &pods {
            for (b, ip) in &pods {
                if a != b {
                    assert!(lab.ping(&format!("p{a}"), ip, 3, "0.1"), "p{a} -> p{b}");
                }
            }
        }
    });
    assert!(seen.len() >= 18, "too few packets captured: {seen:?}");
    for l in &seen {
        assert!(
            l.contains(" UDP, length") && l.contains(".51820"),
            "not WireGuard UDP on the LAN: {l}"
        );
        assert!(
            !l.contains("10.244."),
            "a pod address in clear on the LAN: {l}"
        );
        assert!(!l.contains("ICMP"), "plaintext ICMP on the LAN: {l}");
    }
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn etcd_leases_carry_upstreams_value_and_pods_talk() {
    require_root();
    let lab = Lab::up("wge", &["--nodes", "2", "--mode", "etcd", "--net-conf", WG]);
    for n in 1..=2 {
        lab.start_flannel(n, &[]);
    }
    wait_wg_peers(&lab, &[1, 2], "flannel-wg");
    let keys = lab.sh(
        "etcdctl",
        &["get", "--prefix", "/coreos.com/network/subnets/"],
    );
    for n in 1..=2u32 {
        let private: Key = std::fs::read_to_string(lab.dir.join(format!("n{n}/wgkey")))
            .unwrap()
            .parse()
            .unwrap();
        let want = format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{}","Port":51820}}}}"#,
            node_ip(n),
            private.public()
        );
        assert!(
            keys.lines().any(|l| l == want),
            "no value {want} in\n{keys}"
        );
    }
    let ip2 = lab.add_pod(2, "b");
    lab.add_pod(1, "a");
    assert!(lab.reaches("n1-a", &ip2, 3));
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn a_node_with_another_psk_cannot_talk() {
    require_root();
    let with = |psk: &str| {
        format!(
            r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard","PSK":"{psk}","PersistentKeepaliveInterval":25}}}}"#
        )
    };
    let lab = Lab::up("wgpsk", &["--nodes", "3", "--net-conf", &with(PSK_A)]);
    let other = lab.dir.join("net-conf-b.json");
    std::fs::write(&other, with(PSK_B)).unwrap();
    lab.start_flannel(1, &[]);
    lab.start_flannel(2, &[]);
    lab.start_flannel_env(3, &[("NET_CONF", other.to_str().unwrap())], &[]);
    wait_wg_peers(&lab, &[1, 2, 3], "flannel-wg");
    let (_, _, peers) = wg_state(&lab, 1, "flannel-wg").unwrap();
    assert!(
        peers.iter().all(|p| p.psk && p.keepalive == 25),
        "{peers:?}"
    );
    let ip: Vec<String> = (1..=3).map(|n| lab.add_pod(n, &format!("p{n}"))).collect();
    assert!(lab.reaches("n1-p1", &ip[1], 3), "same PSK must talk");
    assert!(
        !lab.ping("n1-p1", &ip[2], 3, "0.3"),
        "a node with another PSK answered"
    );
    assert!(
        !lab.ping("n3-p3", &ip[0], 3, "0.3"),
        "a node with another PSK reached in"
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn key_survives_restart_and_a_lost_key_file_means_a_new_key_peers_follow() {
    require_root();
    let lab = Lab::up("wgkey", &["--nodes", "2", "--net-conf", WG]);
    lab.start_flannel(1, &[]);
    lab.start_flannel(2, &[]);
    wait_wg_peers(&lab, &[1, 2], "flannel-wg");
    let ip1 = lab.add_pod(1, "a");
    lab.add_pod(2, "b");
    assert!(lab.reaches("n2-b", &ip1, 2));
    let first = published_key(&lab, 1);
    lab.stop_flannel(1, "TERM");
    lab.start_flannel(1, &[]);
    wait_until(Duration::from_secs(20), "node1 back", || {
        lab.flannel_log(1).matches("dataplane ready").count() >= 2
    });
    assert_eq!(
        published_key(&lab, 1),
        first,
        "the key changed across a restart"
    );
    assert!(lab.reaches("n2-b", &ip1, 3));
    // The key file is gone (a new /run after a reboot): a new key, and node2 follows.
    lab.stop_flannel(1, "TERM");
    std::fs::remove_file(lab.dir.join("n1/wgkey")).unwrap();
    lab.start_flannel(1, &[]);
    wait_until(Duration::from_secs(20), "a new key published", || {
        let k = published_key(&lab, 1);
        !k.is_empty() && k != first
    });
    let second = published_key(&lab, 1);
    wait_until(
        Duration::from_secs(10),
        "node2 to hold node1's new key only",
        || {
            wg_state(&lab, 2, "flannel-wg")
                .is_some_and(|(_, _, p)| p.len() == 1 && p[0].key == second)
        },
    );
    assert!(lab.reaches("n2-b", &ip1, 3));
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn tampering_is_repaired_and_hostile_peers_are_refused() {
    require_root();
    let lab = Lab::up("wgdrift", &["--nodes", "2", "--net-conf", WG]);
    let health = ["--healthz-ip=0.0.0.0", "--healthz-port=8471"];
    lab.start_flannel(1, &health);
    lab.start_flannel(2, &[]);
    wait_wg_peers(&lab, &[1, 2], "flannel-wg");
    let ip2 = lab.add_pod(2, "b");
    lab.add_pod(1, "a");
    assert!(lab.reaches("n1-a", &ip2, 2));
    let good = wg_state(&lab, 1, "flannel-wg").unwrap();
    let sock = lab.dir.join("n1/wireguard/flannel-wg.sock");
    let k2: Key = published_key(&lab, 2).parse().unwrap();
    // The userspace device's socket serves `wg show` but refuses changes: the
    // agent owns the device (changes by hand are the kernel path's drift test).
    let r = uapi(
        &sock,
        &format!("set=1\npublic_key={}\nremove=true\n\n", k2.hex()),
    )
    .unwrap();
    assert_eq!(r, format!("errno={}\n\n", -libc::EPERM));
    assert_eq!(wg_state(&lab, 1, "flannel-wg").as_ref(), Some(&good));
    // The device deleted: re-created, peers and route back.
    lab.exec("n1", &["ip", "link", "del", "flannel-wg"]);
    wait_until(
        Duration::from_secs(5),
        "flannel-wg re-created with its peers",
        || {
            wg_state(&lab, 1, "flannel-wg").as_ref() == Some(&good)
                && lab
                    .on_device(1, &["ip", "route", "show", "dev", "flannel-wg"])
                    .len()
                    == 1
        },
    );
    assert!(lab.reaches("n1-a", &ip2, 3));
    // The network route deleted: back.
    lab.exec(
        "n1",
        &["ip", "route", "del", "10.244.0.0/16", "dev", "flannel-wg"],
    );
    wait_until(Duration::from_secs(3), "the network route restored", || {
        lab.on_device(1, &["ip", "route", "show", "dev", "flannel-wg"])
            .len()
            == 1
    });

    // Hostile and upstream-shaped peers. Cost: one peer operation each.
    let m = |name: &str| {
        metric_sum(&lab.http_get("http://198.18.0.11:8471/metrics"), name).unwrap_or(-1.0)
    };
    let ops = |op: &str| {
        let text = lab.http_get("http://198.18.0.11:8471/metrics");
        metric_sum(
            &text
                .lines()
                .filter(|l| l.contains(&format!(r#"op="{op}",kind="wgpeer""#)))
                .collect::<Vec<_>>()
                .join("\n"),
            "flannel_netlink_operations_total",
        )
        .unwrap_or(0.0)
    };
    let before_set = ops("set");
    let upstream_key = Key::generate().public().to_string();
    // Upstream before v0.26.6 publishes no Port: reached on our listen port.
    lab.fake_node(
        "old",
        "10.244.7.0/24",
        &[
            ("kube-subnet-manager", "true"),
            ("backend-type", "wireguard"),
            (
                "backend-data",
                &format!(r#"{{"PublicKey":"{upstream_key}"}}"#),
            ),
            ("public-ip", "198.18.0.77"),
        ],
    );
    lab.fake_node(
        "bad",
        "10.244.8.0/24",
        &[
            ("kube-subnet-manager", "true"),
            ("backend-type", "wireguard"),
            ("backend-data", r#"{"PublicKey":"not-a-key"}"#),
            ("public-ip", "198.18.0.78"),
        ],
    );
    lab.fake_node(
        "thief",
        "10.244.9.0/24",
        &[
            ("kube-subnet-manager", "true"),
            ("backend-type", "wireguard"),
            (
                "backend-data",
                &format!(r#"{{"PublicKey":"{}","Port":51820}}"#, k2),
            ),
            ("public-ip", "198.18.0.79"),
        ],
    );
    wait_until(
        Duration::from_secs(10),
        "the upstream-shaped peer programmed",
        || {
            wg_state(&lab, 1, "flannel-wg").is_some_and(|(_, _, p)| {
                p.iter().any(|p| {
                    p.key == upstream_key
                        && p.endpoint == "198.18.0.77:51820"
                        && p.allowed == "10.244.7.0/24"
                })
            })
        },
    );
    let (_, _, peers) = wg_state(&lab, 1, "flannel-wg").unwrap();
    assert_eq!(
        peers.len(),
        2,
        "only node2 and the upstream-shaped peer: {peers:?}"
    );
    let node2 = peers.iter().find(|p| p.key == k2.to_string()).unwrap();
    assert_eq!(
        node2.endpoint, "198.18.0.12:51820",
        "the thief displaced node2"
    );
    assert_eq!(
        ops("set") - before_set,
        1.0,
        "one new peer, one peer operation"
    );
    assert!(m("flannel_peer_leases_refused") >= 2.0);
    assert!(lab.reaches("n1-a", &ip2, 2));
    let before_del = ops("delete");
    lab.kubectl(&["delete", "node", "old"]);
    wait_until(Duration::from_secs(10), "the departed peer removed", || {
        wg_state(&lab, 1, "flannel-wg").is_some_and(|(_, _, p)| p.len() == 1)
    });
    assert_eq!(ops("delete") - before_del, 1.0);
    let log = lab.flannel_log(1);
    assert_eq!(
        log.lines().filter(|l| l.contains("not-a-key")).count(),
        1,
        "one warning for the bad peer"
    );
    // The peer gauges are refreshed every 10 s.
    wait_until(Duration::from_secs(15), "the WireGuard peer gauge", || {
        m("flannel_wireguard_peers") >= 1.0
    });
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn dual_stack_in_separate_and_auto_modes() {
    require_root();
    for (mode, devs) in [("separate", 2), ("auto", 1)] {
        let conf = format!(
            r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
        );
        let lab = Lab::up(
            "wg6",
            &["--nodes", "2", "--ip", "dual", "--net-conf", &conf],
        );
        lab.start_flannel(1, &[]);
        lab.start_flannel(2, &[]);
        wait_wg_peers(&lab, &[1, 2], "flannel-wg");
        let k2 = published_key(&lab, 2);
        let (_, _, p) = wg_state(&lab, 1, "flannel-wg").unwrap();
        if devs == 2 {
            wait_wg_peers(&lab, &[1, 2], "flannel-wg-v6");
            assert_eq!(p[0].allowed, "10.244.1.0/24");
            let (_, port6, p6) = wg_state(&lab, 1, "flannel-wg-v6").unwrap();
            assert_eq!(port6, 51821);
            assert_eq!(
                (p6[0].key.as_str(), p6[0].allowed.as_str()),
                (k2.as_str(), "fd00:10:244:1::/64")
            );
            assert_eq!(p6[0].endpoint, "[fd00:198:18::12]:51821");
            let r6 = lab.on_device(1, &["ip", "-6", "route", "show", "dev", "flannel-wg-v6"]);
            assert!(
                r6.iter()
                    .any(|r| r.starts_with("fd00:10:244::/56 proto 70")),
                "{r6:?}"
            );
        } else {
            // One device, one peer with both subnets, reached over IPv4 (its IPv4 is
            // private and so is everyone's IPv6 here: upstream's rule picks IPv4).
            assert_eq!(p[0].allowed, "10.244.1.0/24,fd00:10:244:1::/64");
            assert_eq!(p[0].endpoint, "198.18.0.12:51820");
            assert!(wg_state(&lab, 1, "flannel-wg-v6").is_none());
        }
        lab.add_pod(1, "a");
        lab.add_pod(2, "b");
        let (b4, b6) = (lab.pod_ip(2, "b", 4), lab.pod_ip(2, "b", 6));
        assert!(lab.reaches("n1-a", &b4, 2), "{mode}: IPv4");
        assert!(lab.reaches("n1-a", &b6, 2), "{mode}: IPv6");
    }
}

/// Starts node `n`'s agent with the kernel's or the userspace WireGuard forced.
fn start_with(lab: &Lab, n: u32, imp: &str) {
    lab.start_flannel_env(n, &[("FLANNEL_WG_IMPL", imp)], &[]);
}

fn kind_of(lab: &Lab, n: u32) -> String {
    let d = lab.exec(
        &format!("n{n}"),
        &["ip", "-d", "link", "show", "flannel-wg"],
    );
    if d.contains("wireguard") {
        "wireguard".into()
    } else if d.contains("tun") {
        "tun".into()
    } else {
        d
    }
}

/// Pings every 20 ms from `from` to `to` while `during` runs; the loss.
fn loss_during(lab: &Lab, from: &str, to: &str, count: u32, during: impl FnOnce()) -> (u32, u32) {
    let pinger = lab.ping_bg(from, to, count, "0.02");
    std::thread::sleep(Duration::from_millis(500));
    during();
    let o = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    ping_counts(&text).unwrap_or_else(|| panic!("no ping summary: {text}"))
}

/// The kernel path, in the project's kernel VM (scripts/test.sh runs it there):
/// a mixed cluster of kernel and userspace nodes talks; a kernel node holds
/// upstream's kernel state, undoes changes made with `wg set`, and keeps its
/// device, key and peers through an agent SIGTERM + restart and a SIGKILL +
/// restart with pods pinging every 20 ms losing nothing.
#[test]
#[ignore = "needs a kernel with WireGuard: scripts/test.sh runs it in the kernel VM (scripts/kernel-vm.sh)"]
fn kernel_vm_mixed_cluster_keeps_state_and_repairs_drift() {
    require_root();
    let lab = Lab::up("wgk", &["--nodes", "3", "--mode", "etcd", "--net-conf", WG]);
    start_with(&lab, 1, "kernel");
    start_with(&lab, 2, "kernel");
    start_with(&lab, 3, "userspace");
    wait_wg_peers(&lab, &[1, 2, 3], "flannel-wg");
    assert_eq!(
        (kind_of(&lab, 1), kind_of(&lab, 2), kind_of(&lab, 3)),
        ("wireguard".into(), "wireguard".into(), "tun".into())
    );
    let ips: Vec<String> = (1..=3).map(|n| lab.add_pod(n, &format!("p{n}"))).collect();
    for a in 1..=3usize {
        for b in 1..=3usize {
            if a != b {
                assert!(
                    lab.reaches(&format!("n{a}-p{a}"), &ips[b - 1], 2),
                    "p{a} -> p{b}"
                );
            }
        }
    }
    // Upstream's kernel state on a kernel node.
    let (public, port, peers) = wg_state(&lab, 1, "flannel-wg").unwrap();
    let private: Key = std::fs::read_to_string(lab.dir.join("n1/wgkey"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!((public, port), (private.public().to_string(), 51820));
    assert_eq!(peers.len(), 2);
    for p in &peers {
        assert!(
            p.endpoint.starts_with("198.18.0.1") && p.endpoint.ends_with(":51820"),
            "{p:?}"
        );
        assert!(
            p.allowed.starts_with("10.244.") && p.allowed.ends_with("/24"),
            "{p:?}"
        );
    }
    let routes = lab.on_device(1, &["ip", "route", "show", "dev", "flannel-wg"]);
    assert_eq!(
        routes,
        vec!["10.244.0.0/16 proto 70 scope link".to_string()]
    );
    let mtu = lab.exec("n1", &["cat", "/sys/class/net/flannel-wg/mtu"]);
    assert_eq!(mtu.trim(), "1420");

    // `wg set` by hand: every change undone.
    let good = wg_state(&lab, 1, "flannel-wg").unwrap();
    let k = peers[0].key.clone();
    let keyfile = lab.dir.join("other.key");
    std::fs::write(&keyfile, Key::generate().to_string()).unwrap();
    let kf = keyfile.to_str().unwrap().to_string();
    // Each change is seen by the agent's 1 s check and undone: the evidence is
    // the agent's own record of the repair (a re-programmed peer, or the key or
    // port restored) — reading the device right after `wg set` could already
    // find it repaired.
    let repairs = || {
        let log = lab.flannel_log(1);
        log.matches("wireguard peers) in").count() + log.matches("restoring ours").count()
    };
    for (what, args) in [
        ("a removed peer", vec!["peer", k.as_str(), "remove"]),
        (
            "a moved endpoint",
            vec!["peer", k.as_str(), "endpoint", "192.0.2.9:9"],
        ),
        (
            "changed allowed-ips",
            vec!["peer", k.as_str(), "allowed-ips", "10.99.0.0/16"],
        ),
        ("a replaced key", vec!["private-key", kf.as_str()]),
        ("another listen port", vec!["listen-port", "40000"]),
    ] {
        let before = repairs();
        let mut cmd = vec!["wg", "set", "flannel-wg"];
        cmd.extend(args);
        lab.exec("n1", &cmd);
        wait_until(Duration::from_secs(5), &format!("{what} repaired"), || {
            repairs() > before
        });
        wait_until(Duration::from_secs(5), &format!("{what} restored"), || {
            wg_state(&lab, 1, "flannel-wg").as_ref() == Some(&good)
        });
    }
    assert!(lab.reaches("n2-p2", &ips[0], 2));

    // Restarts: the device, key and peers stay; nothing is lost.
    let index = lab.exec("n1", &["cat", "/sys/class/net/flannel-wg/ifindex"]);
    for signal in ["TERM", "KILL"] {
        let (sent, got) = loss_during(&lab, "n2-p2", &ips[0], 600, || {
            let starts = lab.flannel_log(1).matches("dataplane ready").count();
            lab.stop_flannel(1, signal);
            start_with(&lab, 1, "kernel");
            wait_until(Duration::from_secs(30), "node1 back", || {
                lab.flannel_log(1).matches("dataplane ready").count() > starts
            });
        });
        assert_eq!(got, sent, "pings lost across an agent {signal} + restart");
        assert_eq!(wg_state(&lab, 1, "flannel-wg").as_ref(), Some(&good));
        assert_eq!(
            lab.exec("n1", &["cat", "/sys/class/net/flannel-wg/ifindex"]),
            index,
            "the device was re-created across a {signal} restart"
        );
    }
    let log = lab.flannel_log(1);
    assert!(
        log.contains("adopting the kernel WireGuard device flannel-wg"),
        "{log}"
    );
}
