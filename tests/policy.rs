//! --network-policy in the lab: real pods (namespaces attached by the CNI
//! plugins) with Pod objects in the API server carrying their addresses, labels,
//! node and ports, NetworkPolicies applied and changed, and real TCP and UDP
//! connections checked both ways after each step. Node 1 enforces; node 2 runs
//! without the flag and enforces nothing for its own pods.

mod support;

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;

/// TCP listeners and UDP echo servers on `ports` inside a lab namespace, until dropped.
struct Servers(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

impl Drop for Servers {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for t in self.1.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(lab: &Lab, ns: &str, ports: &[u16]) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for &port in ports {
        let path = format!("/run/netns/fl{}-{ns}", lab.name);
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        threads.push(std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("pod namespace");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            // Both families where the namespace has IPv6 (v4-mapped), else IPv4.
            let tcp = TcpListener::bind(("::", port))
                .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
                .expect("tcp bind");
            tcp.set_nonblocking(true).unwrap();
            let udp = UdpSocket::bind(("::", port))
                .or_else(|_| UdpSocket::bind(("0.0.0.0", port)))
                .expect("udp bind");
            udp.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            while !flag.load(Ordering::Relaxed) {
                while let Ok((s, _)) = tcp.accept() {
                    drop(s);
                }
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        }));
        rx.recv_timeout(Duration::from_secs(5)).expect("server up");
    }
    Servers(stop, threads)
}

/// One TCP connection (or UDP round trip) from a lab namespace, bounded to 1 s.
fn talks(lab: &Lab, from: &str, ip: &str, port: u16, udp: bool) -> bool {
    let script = if udp {
        format!(
            "exec 3<>/dev/udp/{ip}/{port}; echo ping >&3; timeout 1 head -c 4 <&3 | grep -q ping"
        )
    } else {
        format!("timeout 1 bash -c 'exec 3<>/dev/tcp/{ip}/{port}'")
    };
    lab.try_sh("exec", &[from, "bash", "-c", &script])
        .status
        .success()
}

/// Waits (bounded) until `from` → `ip:port` is `allowed`, then checks it stays so.
fn expect(lab: &Lab, from: &str, ip: &str, port: u16, udp: bool, allowed: bool, what: &str) {
    let proto = if udp { "udp" } else { "tcp" };
    wait_until(
        Duration::from_secs(8),
        &format!(
            "{what}: {from} → {ip}:{port}/{proto} {}",
            if allowed { "allowed" } else { "denied" }
        ),
        || talks(lab, from, ip, port, udp) == allowed,
    );
}

impl Lab {
    fn apply_json(&self, v: serde_json::Value) {
        let path = self.dir.join(format!("obj-{}.json", rand_name()));
        std::fs::write(&path, v.to_string()).unwrap();
        self.kubectl(&["apply", "-f", path.to_str().unwrap()]);
    }

    /// A Pod object for a lab pod: what the API server would say of it once running.
    fn pod_object(
        &self,
        ns: &str,
        name: &str,
        node: u32,
        ip: &str,
        labels: serde_json::Value,
        ports: serde_json::Value,
    ) {
        self.apply_json(
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
        self.apply_json(serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}}));
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": format!("node{node}"), "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "none", "ports": ports}]},
        });
        self.apply_json(pod.clone());
        // Status through the status subresource, as a kubelet writes it.
        let mut with_status = serde_json::from_str::<serde_json::Value>(
            &self.kubectl(&["get", "pod", "-n", ns, name, "-o", "json"]),
        )
        .unwrap();
        with_status["status"] =
            serde_json::json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
        let path = self.dir.join(format!("status-{ns}-{name}.json"));
        std::fs::write(&path, with_status.to_string()).unwrap();
        self.kubectl(&[
            "replace",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
            "-f",
            path.to_str().unwrap(),
        ]);
    }
}

impl Lab {
    /// A Pod object with several addresses (dual-stack), no ports.
    fn pod_object_ips(
        &self,
        ns: &str,
        name: &str,
        node: u32,
        ips: &[&str],
        labels: serde_json::Value,
    ) {
        self.pod_object(ns, name, node, ips[0], labels, serde_json::json!([]));
        let mut pod = serde_json::from_str::<serde_json::Value>(
            &self.kubectl(&["get", "pod", "-n", ns, name, "-o", "json"]),
        )
        .unwrap();
        pod["status"]["podIPs"] =
            serde_json::Value::Array(ips.iter().map(|i| serde_json::json!({"ip": i})).collect());
        let path = self.dir.join(format!("status6-{ns}-{name}.json"));
        std::fs::write(&path, pod.to_string()).unwrap();
        self.kubectl(&[
            "replace",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
            "-f",
            path.to_str().unwrap(),
        ]);
    }
}

fn rand_name() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

const A: &str = "n2-clienta";
const B: &str = "n2-clientb";
const N: &str = "n1-near";
const O: &str = "n2-other";
const S: &str = "n1-server";

/// The main test's lab: node 1 enforces, with a server and a same-node
/// neighbour (namespace a); node 2 has clients in namespaces a and b.
struct World {
    // Dropped first: the servers stop before the lab goes down.
    _servers: Vec<Servers>,
    lab: Lab,
    server: String,
    client_a: String,
    client_b: String,
}

/// A two-node lab with the policy RBAC applied.
fn policy_lab(name: &str) -> Lab {
    let lab = Lab::up(name, &["--nodes", "2"]);
    let rbac = top().join("deploy/network-policy-rbac.yml");
    lab.kubectl(&["apply", "-f", rbac.to_str().unwrap()]);
    lab
}

fn world() -> World {
    let lab = policy_lab("pol");
    // --ip-masq as in the shipped manifest: without it the bridge plugin
    // masquerades pod traffic between nodes and no policy could see pod addresses.
    lab.start_flannel(1, &["--ip-masq", "--network-policy"]);
    lab.start_flannel(2, &["--ip-masq"]);
    // node1: server (ns a) and a same-node neighbour; node2: clients in a and b.
    let server = lab.add_pod(1, "server");
    let near = lab.add_pod(1, "near");
    let client_a = lab.add_pod(2, "clienta");
    let client_b = lab.add_pod(2, "clientb");
    let other = lab.add_pod(2, "other");
    let http = serde_json::json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]);
    let none = serde_json::json!([]);
    #[rustfmt::skip]
    let objects = [
        ("a", "server", 1, &server, serde_json::json!({"app": "server"}), &http),
        ("a", "near", 1, &near, serde_json::json!({"role": "client"}), &none),
        ("a", "clienta", 2, &client_a, serde_json::json!({"role": "client"}), &none),
        ("b", "clientb", 2, &client_b, serde_json::json!({"role": "client"}), &none),
        ("a", "other", 2, &other, serde_json::json!({"role": "other"}), &none),
    ];
    for (ns, name, node, ip, labels, ports) in objects {
        lab.pod_object(ns, name, node, ip, labels, ports.clone());
    }
    lab.kubectl(&["label", "namespace", "b", "team=friends"]);
    let servers = vec![
        serve(&lab, "n1-server", &[8080, 9090]),
        serve(&lab, "n2-clienta", &[7000]),
        serve(&lab, "n2-clientb", &[7000]),
    ];
    wait_until(
        Duration::from_secs(30),
        "policy enforcement started",
        || lab.flannel_log(1).contains("network policy: enforcing"),
    );
    World {
        lab,
        server,
        client_a,
        client_b,
        _servers: servers,
    }
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn network_policy_on_real_pods() {
    require_root();
    let w = world();
    no_policy_and_deny_all(&w);
    selectors_ports_and_relabels(&w);
    blocks_egress_and_new_pods(&w);
    repair_per_node_update_delete(&w);
    both_selectors_in_one_peer(&w);
}

/// No policy, then deny-all ingress (also through a ClusterIP).
fn no_policy_and_deny_all(w: &World) {
    let (lab, server, client_a, client_b) = (&w.lab, &w.server, &w.client_a, &w.client_b);
    let _ = (client_a, client_b);
    // No policy: everything talks.
    expect(lab, A, server, 8080, false, true, "no policy");
    expect(lab, N, server, 8080, false, true, "no policy, same node");
    // A Service as kube-proxy makes it: DNAT of a ClusterIP to the server, in
    // node 1's prerouting. Policy must judge the backend pod, not the ClusterIP.
    lab.exec(
        "n1",
        &["nft", &format!("add table ip kp; add chain ip kp pre {{ type nat hook prerouting priority dstnat; }}; add rule ip kp pre ip daddr 10.96.0.10 tcp dport 80 dnat to {server}:8080")],
    );
    expect(
        lab,
        N,
        "10.96.0.10",
        80,
        false,
        true,
        "no policy, through a ClusterIP",
    );

    // Deny all ingress in a: nobody reaches the server; the server still reaches out;
    // the node itself (kubelet probes) still reaches the server.
    lab.apply_json(policy("a", "deny", serde_json::json!({"podSelector": {}})));
    expect(lab, A, server, 8080, false, false, "deny-all");
    expect(lab, N, server, 8080, false, false, "deny-all, same node");
    expect(
        lab,
        N,
        "10.96.0.10",
        80,
        false,
        false,
        "deny-all, through a ClusterIP",
    );
    expect(lab, A, server, 8080, true, false, "deny-all, UDP");
    expect(
        lab,
        S,
        client_a,
        7000,
        false,
        true,
        "deny-all ingress leaves egress",
    );
    assert!(
        lab.try_sh(
            "exec",
            &[
                "n1",
                "bash",
                "-c",
                &format!("timeout 1 bash -c 'exec 3<>/dev/tcp/{server}/8080'")
            ]
        )
        .status
        .success(),
        "the node itself must reach its pods"
    );

    // Allow from namespace b (by label): clientb in, clienta still out.
}

/// Namespace and pod selectors, named ports, protocols, policies adding up, relabels.
fn selectors_ports_and_relabels(w: &World) {
    let (lab, server, client_a, client_b) = (&w.lab, &w.server, &w.client_a, &w.client_b);
    let _ = (client_a, client_b);
    // By the name label, which a 1.20 API server does not set (the agent does)...
    lab.apply_json(policy("a", "from-b-by-name", serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}], "ports": [{"port": 9090}]}]})));
    expect(
        lab,
        B,
        server,
        9090,
        false,
        true,
        "allow from namespace by name label",
    );
    expect(
        lab,
        B,
        server,
        8080,
        false,
        false,
        "allow from namespace by name label, other port",
    );
    // ...and by a label of its own.
    lab.apply_json(policy("a", "from-b", serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "friends"}}}]}]})));
    expect(lab, B, server, 8080, false, true, "allow from namespace");
    expect(lab, A, server, 8080, false, false, "allow from namespace");

    // Allow from pods of a role in namespace a: policies add up (b stays allowed).
    lab.apply_json(policy("a", "from-clients", serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": "http"}]}]})));
    expect(
        lab,
        A,
        server,
        8080,
        false,
        true,
        "allow from pod, named port",
    );
    expect(
        lab,
        N,
        server,
        8080,
        false,
        true,
        "allow from pod, same node",
    );
    expect(
        lab,
        N,
        "10.96.0.10",
        80,
        false,
        true,
        "allowed pod, through a ClusterIP",
    );
    expect(
        lab,
        A,
        server,
        9090,
        false,
        false,
        "named port resolves to 8080 only",
    );
    expect(
        lab,
        A,
        server,
        8080,
        true,
        false,
        "a TCP port does not allow UDP",
    );
    expect(lab, O, server, 8080, false, false, "other role denied");
    expect(
        lab,
        B,
        server,
        9090,
        false,
        true,
        "namespace rule has no ports: all",
    );

    // Pod relabelled: other becomes a client.
    lab.kubectl(&[
        "label",
        "pod",
        "-n",
        "a",
        "other",
        "role=client",
        "--overwrite",
    ]);
    expect(lab, O, server, 8080, false, true, "relabelled pod");
}

/// ipBlock with except, egress to a CIDR, a new pod in a selected namespace.
fn blocks_egress_and_new_pods(w: &World) {
    let (lab, server, client_a, client_b) = (&w.lab, &w.server, &w.client_a, &w.client_b);
    let _ = (client_a, client_b);
    // ipBlock with except, UDP.
    lab.apply_json(policy("a", "block", serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [format!("{client_a}/32")]}}], "ports": [{"port": 9090, "protocol": "UDP"}]}]})));
    expect(
        lab,
        O,
        server,
        9090,
        true,
        true,
        "ipBlock matches pod addresses",
    );
    expect(lab, A, server, 9090, true, false, "ipBlock except");

    // Egress to a CIDR only; replies of allowed ingress still pass.
    lab.apply_json(policy("a", "egress", serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": format!("{client_b}/32")}}]}]})));
    expect(lab, S, client_b, 7000, false, true, "egress to CIDR");
    expect(
        lab,
        S,
        client_a,
        7000,
        false,
        false,
        "egress elsewhere denied",
    );
    expect(
        lab,
        A,
        server,
        8080,
        false,
        true,
        "replies of allowed ingress pass egress policy",
    );

    // A new pod in a selected namespace is allowed at once.
    let client_b2 = lab.add_pod(2, "clientb2");
    lab.pod_object(
        "b",
        "clientb2",
        2,
        &client_b2,
        serde_json::json!({}),
        serde_json::json!([]),
    );
    expect(
        lab,
        "n2-clientb2",
        server,
        9090,
        false,
        true,
        "new pod in selected namespace",
    );
}

/// The table flushed by hand, node 2 not enforcing, policies updated and deleted.
fn repair_per_node_update_delete(w: &World) {
    let (lab, server, client_a, client_b) = (&w.lab, &w.server, &w.client_a, &w.client_b);
    let _ = (client_a, client_b);
    // Someone flushes the table: restored.
    lab.exec("n1", &["nft", "flush", "table", "inet", "flannel-policy"]);
    wait_until(
        Duration::from_secs(1),
        "the flushed table restored within a second",
        || {
            lab.flannel_log(1)
                .contains("changed by someone else; restored")
        },
    );
    expect(lab, A, server, 9090, false, false, "after a flush");

    // Inside the sets and maps (what `nft -t` does not list): every map and set
    // flushed, one element deleted — each undone within a second.
    let restores = || {
        lab.flannel_log(1)
            .matches("changed by someone else; restored")
            .count()
    };
    let names = |kind: &str| -> Vec<String> {
        let prefix = format!("{kind} ");
        lines(&lab.exec(
            "n1",
            &["nft", "-t", "list", "table", "inet", "flannel-policy"],
        ))
        .into_iter()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix(prefix.as_str())?.to_string();
            Some(rest.trim_end_matches(" {").to_string())
        })
        .collect()
    };
    let (maps, sets) = (names("map"), names("set"));
    assert!(maps.contains(&"in4".to_string()), "{maps:?}");
    assert!(
        sets.iter().any(|n| lab
            .exec("n1", &["nft", "list", "set", "inet", "flannel-policy", n])
            .contains("elements =")),
        "the policies use filled peer sets: {sets:?}"
    );
    let mut tamper: Vec<Vec<String>> = Vec::new();
    // Flushing an empty one changes nothing (and the kernel says nothing).
    let filled = |kind: &str, n: &str| {
        lab.exec("n1", &["nft", "list", kind, "inet", "flannel-policy", n])
            .contains("elements =")
    };
    for (kind, list) in [("map", &maps), ("set", &sets)] {
        for n in list.iter().filter(|n| filled(kind, n)) {
            tamper.push(
                ["nft", "flush", kind, "inet", "flannel-policy", n.as_str()]
                    .map(String::from)
                    .to_vec(),
            );
        }
    }
    let el = format!("{{ {server} }}");
    tamper.push(
        [
            "nft",
            "delete",
            "element",
            "inet",
            "flannel-policy",
            "in4",
            el.as_str(),
        ]
        .map(String::from)
        .to_vec(),
    );
    for cmd in &tamper {
        let before = restores();
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        lab.exec("n1", &args);
        wait_until(
            Duration::from_secs(1),
            &format!("`{}` undone within a second", cmd.join(" ")),
            || restores() > before,
        );
    }
    expect(
        lab,
        A,
        server,
        9090,
        false,
        false,
        "after the sets and maps were tampered with",
    );
    let m = lab.exec(
        "n1",
        &["nft", "list", "map", "inet", "flannel-policy", "in4"],
    );
    assert!(m.contains(server.as_str()), "{m}");

    // Node 2 enforces nothing: its pods stay open even though policies select none of them yet.
    lab.apply_json(policy(
        "b",
        "deny-b",
        serde_json::json!({"podSelector": {}}),
    ));
    expect(
        lab,
        S,
        client_b,
        7000,
        false,
        true,
        "node 2 does not enforce",
    );

    // Policies updated and deleted.
    lab.apply_json(policy("a", "from-clients", serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "nobody"}}}]}]})));
    expect(lab, A, server, 8080, false, false, "policy updated");
    for p in [
        "deny",
        "from-b",
        "from-b-by-name",
        "from-clients",
        "block",
        "egress",
    ] {
        lab.kubectl(&["delete", "networkpolicy", "-n", "a", p]);
    }
    expect(lab, A, server, 8080, false, true, "policies deleted");
    expect(
        lab,
        S,
        client_a,
        7000,
        false,
        true,
        "policies deleted, egress",
    );
    let table = lab.exec("n1", &["nft", "list", "table", "inet", "flannel-policy"]);
    assert!(
        !table.contains("chain in-") && !table.contains("chain eg-"),
        "no pod chains left:\n{table}"
    );
}

/// Both selectors in one peer.
fn both_selectors_in_one_peer(w: &World) {
    let (lab, server, client_a, client_b) = (&w.lab, &w.server, &w.client_a, &w.client_b);
    let _ = (client_a, client_b);
    // Both selectors in one peer: pods of that role in those namespaces only.
    lab.apply_json(policy("a", "combo", serde_json::json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "friends"}}, "podSelector": {"matchLabels": {"role": "client"}}}]}]})));
    expect(
        lab,
        B,
        server,
        8080,
        false,
        true,
        "pod and namespace selector together",
    );
    expect(
        lab,
        "n2-clientb2",
        server,
        8080,
        false,
        false,
        "right namespace, wrong role",
    );
    expect(
        lab,
        A,
        server,
        8080,
        false,
        false,
        "right role, wrong namespace",
    );
}

/// IPv6 (dual-stack) with the host-gw backend: the same enforcement per family;
/// neighbour discovery passes while other ICMPv6 (echo) obeys the policy.
#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn network_policy_ipv6_and_host_gw() {
    require_root();
    let conf = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#;
    let lab = Lab::up(
        "pol6",
        &["--nodes", "2", "--ip", "dual", "--net-conf", conf],
    );
    lab.kubectl(&[
        "apply",
        "-f",
        top()
            .join("deploy/network-policy-rbac.yml")
            .to_str()
            .unwrap(),
    ]);
    lab.start_flannel(1, &["--ip-masq", "--network-policy"]);
    lab.start_flannel(2, &["--ip-masq"]);
    lab.add_pod(1, "server");
    lab.add_pod(2, "client");
    lab.add_pod(2, "stranger");
    lab.add_pod(1, "near");
    let near = [lab.pod_ip(1, "near", 4), lab.pod_ip(1, "near", 6)];
    let (server4, server6) = (lab.pod_ip(1, "server", 4), lab.pod_ip(1, "server", 6));
    let (client4, client6) = (lab.pod_ip(2, "client", 4), lab.pod_ip(2, "client", 6));
    let stranger6 = lab.pod_ip(2, "stranger", 6);
    for (name, node, ips, role) in [
        ("server", 1, [&server4, &server6], "server"),
        ("client", 2, [&client4, &client6], "client"),
        (
            "stranger",
            2,
            [&lab.pod_ip(2, "stranger", 4), &stranger6],
            "stranger",
        ),
        ("near", 1, [&near[0], &near[1]], "client"),
    ] {
        lab.pod_object_ips(
            "a",
            name,
            node,
            &ips.map(|s| s.as_str()),
            serde_json::json!({"role": role}),
        );
    }
    let _srv = serve(&lab, "n1-server", &[8080]);
    let _near = serve(&lab, "n1-near", &[7000]);
    wait_until(
        Duration::from_secs(30),
        "policy enforcement started",
        || lab.flannel_log(1).contains("network policy: enforcing"),
    );
    assert!(
        lab.reaches("n2-client", &server6, 2),
        "IPv6 before any policy"
    );
    // Only TCP 8080 from clients: TCP over IPv6 works (neighbour discovery passes),
    // ping6 (ICMPv6 echo) does not, and a stranger gets nothing.
    lab.apply_json(policy("a", "tcp-from-clients", serde_json::json!({
        "podSelector": {"matchLabels": {"role": "server"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": 8080}]}]
    })));
    expect(
        &lab,
        "n2-stranger",
        &server6,
        8080,
        false,
        false,
        "IPv6 stranger",
    );
    // Let the neighbour entries expire from the cache path: flush them, so the
    // next connection needs neighbour discovery through the policy.
    lab.exec("n1-server", &["ip", "-6", "neigh", "flush", "all"]);
    lab.exec("n2-client", &["ip", "-6", "neigh", "flush", "all"]);
    expect(
        &lab,
        "n2-client",
        &server6,
        8080,
        false,
        true,
        "IPv6 client, after a neighbour flush",
    );
    expect(
        &lab,
        "n2-client",
        &server4,
        8080,
        false,
        true,
        "IPv4 client",
    );
    // Same node: the pods' neighbour discovery crosses the bridge, through the
    // policy; with an egress policy on the server (TCP 7000 to clients only) its
    // own solicitations pass its egress chain only as neighbour discovery.
    lab.apply_json(policy("a", "server-out", serde_json::json!({
        "podSelector": {"matchLabels": {"role": "server"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": 7000}]}]
    })));
    lab.exec("n1-near", &["ip", "-6", "neigh", "flush", "all"]);
    lab.exec("n1-server", &["ip", "-6", "neigh", "flush", "all"]);
    expect(
        &lab,
        "n1-server",
        &near[1],
        7000,
        false,
        true,
        "IPv6 egress to a same-node client, after a neighbour flush",
    );
    lab.exec("n1-near", &["ip", "-6", "neigh", "flush", "all"]);
    lab.exec("n1-server", &["ip", "-6", "neigh", "flush", "all"]);
    expect(
        &lab,
        "n1-near",
        &server6,
        8080,
        false,
        true,
        "IPv6 same-node client, after a neighbour flush",
    );
    assert!(
        !lab.ping("n2-client", &server6, 2, "0.2"),
        "ICMPv6 echo is not allowed by a TCP rule"
    );
    // An ipBlock of the client's IPv6 address allows everything from it, ping included.
    lab.apply_json(policy(
        "a",
        "v6-block",
        serde_json::json!({
            "podSelector": {"matchLabels": {"role": "server"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": format!("{client6}/128")}}]}]
        }),
    ));
    wait_until(
        Duration::from_secs(8),
        "ping6 allowed by the ipBlock",
        || lab.ping("n2-client", &server6, 1, "0.2"),
    );
    expect(
        &lab,
        "n2-stranger",
        &server6,
        8080,
        false,
        false,
        "IPv6 stranger, still",
    );
}

/// nft itself accepts what the largest objects the API allows compile to: a
/// 63-character namespace, 253-character pod names, and a policy of the
/// longest name, checked with `nft -c` in a throwaway namespace (nothing is
/// committed, and not in the machine's own namespace).
#[test]
#[ignore = "needs root (network namespaces, nft); scripts/test.sh runs it as root"]
fn the_largest_objects_compile_to_a_table_nft_accepts() {
    use flannel::policy::{compile, model, nft};
    require_root();
    let ns = "n".repeat(63);
    let mut c = model::Cluster::default();
    c.namespaces.insert(
        ns.clone(),
        [("kubernetes.io/metadata.name".to_string(), ns.clone())]
            .into_iter()
            .collect(),
    );
    for i in 0..3u8 {
        let pod: flannel::policy::lite::PodLite = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{}{i}", "p".repeat(252)), "namespace": ns, "labels": {"app": "web"}},
            "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [
                {"name": "h".repeat(15), "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": format!("10.244.0.{}", 10 + i)}
        }))
        .unwrap();
        let p = model::PodInfo::from_api(&pod, &mut model::Interner::default()).unwrap();
        c.pods.insert((p.ns.clone(), p.name.clone()), p);
    }
    let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "x".repeat(253), "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "h".repeat(15)}]}],
                 "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]}
    }))
    .unwrap();
    let p = model::Policy::from_api(&np).unwrap();
    c.policies.insert((p.ns.clone(), p.name.clone()), p);
    let text = nft::full(&compile::compile(&c, "node1"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.nft");
    std::fs::write(&file, &text).unwrap();
    let netns = format!("flnftc{}", std::process::id());
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    assert!(std::process::Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .unwrap()
        .success());
    let _gone = Gone(netns.clone());
    // nsenter, not `ip netns exec`: nft needs no mount namespace, and `ip
    // netns exec` cannot remount / in every root (a fresh-machine chroot).
    let o = std::process::Command::new("timeout")
        .arg("10")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["nft", "-c", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nft -c refused the table: {}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains(&format!("{}/", ns)),
        "the comments name the pods"
    );
}

/// An nft that refuses every transaction naming `markers` (as the kernel
/// refuses an object it cannot hold) and passes everything else to the real
/// nft: the agent must single out the refused object and enforce the rest.
fn picky_nft(lab: &Lab, markers: &[&str]) -> String {
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v nft"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let dir = lab.dir.join("picky-nft");
    std::fs::create_dir_all(&dir).unwrap();
    let cases: Vec<String> = markers.iter().map(|m| format!("*{m}*")).collect();
    let script = format!(
        r#"#!/bin/bash
# Refuses (as the kernel would) any transaction naming {markers:?}.
for a in "$@"; do [ "$a" = "-f" ] && f=1; done
[ -n "$f" ] || exec {real} "$@"
text=$(cat)
case "$text" in {cases}) echo "Error: Could not process rule: Invalid argument (picky nft)" >&2; exit 1;; esac
printf '%s\n' "$text" | exec {real} "$@"
"#,
        real = real.trim(),
        cases = cases.join("|")
    );
    let nft = dir.join("nft");
    std::fs::write(&nft, script).unwrap();
    std::process::Command::new("chmod")
        .arg("755")
        .arg(&nft)
        .status()
        .unwrap();
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
#[ignore = "needs root (network namespaces, nft); scripts/test.sh runs it as root"]
fn an_object_nft_refuses_is_left_out_and_the_rest_enforced() {
    require_root();
    let lab = policy_lab("polr");
    // The pod a/refuse-me (its chains' comment) and 203.0.113.99 (one
    // policy's ipBlock) are what this node's nft will not take.
    let path = picky_nft(&lab, &["a/refuse-me", "203.0.113.99"]);
    let health = ["--healthz-ip=0.0.0.0", "--healthz-port=8471"];
    let mut args = vec!["--ip-masq", "--network-policy", "--policy-log-denied"];
    args.extend(health);
    lab.start_flannel_env(1, &[("PATH", &path)], &args);
    lab.start_flannel(2, &["--ip-masq"]);
    let server = lab.add_pod(1, "server");
    let client = lab.add_pod(2, "client");
    let http = serde_json::json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]);
    lab.pod_object(
        "a",
        "server",
        1,
        &server,
        serde_json::json!({"app": "server"}),
        http,
    );
    let none = serde_json::json!([]);
    let client_labels = serde_json::json!({"role": "client"});
    lab.pod_object("a", "client", 2, &client, client_labels, none.clone());
    // A second server pod (an object only) next to the good one.
    let other = format!("{}.200", server.rsplit_once('.').unwrap().0);
    let refused_labels = serde_json::json!({"app": "server"});
    lab.pod_object("a", "refuse-me", 1, &other, refused_labels, none);
    let _servers = serve(&lab, "n1-server", &[8080]);
    wait_until(
        Duration::from_secs(30),
        "policy enforcement started",
        || lab.flannel_log(1).contains("network policy: enforcing"),
    );
    let (from, port) = ("n2-client", 8080);
    let tcp = |allowed: bool, what: &str| expect(&lab, from, &server, port, false, allowed, what);
    tcp(true, "no policy");

    // Deny all ingress in a: the refused pod is left out, the server is protected.
    lab.apply_json(policy(
        "a",
        "deny",
        serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    ));
    wait_until(Duration::from_secs(15), "the refused pod named", || {
        lab.flannel_log(1)
            .contains("nft refuses the chains of pod a/refuse-me")
    });
    tcp(false, "deny-all, one pod refused");
    // The denied attempts are counted, per pod and per isolating policy.
    let count = |series: &str| {
        let text = lab.http_get("http://198.18.0.11:8471/metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let pod =
        r#"flannel_policy_denied_packets_total{namespace="a",pod="server",direction="ingress"} "#;
    let pol = r#"flannel_policy_denied_by_policy_packets_total{namespace="a",policy="deny",direction="ingress"} "#;
    let before = count(pod);
    assert!(before >= 1.0, "denied packets counted: {before}");
    assert!(count(pol) >= before, "and for the policy");
    tcp(false, "still denied");
    assert!(count(pod) > before, "a new attempt counted");
    // And logged (nflog): who, to whom, on what, whose default deny.
    let said = format!(
        "network policy denied: a/client ({client}) → a/server ({server}) tcp/8080: ingress of a/server, isolated by deny, no rule allows it"
    );
    wait_until(Duration::from_secs(5), "the denied attempt logged", || {
        lab.flannel_log(1).contains(&said)
    });

    // A policy nft refuses is left out (the server stays denied); a good one
    // written after it still takes effect.
    let bad = serde_json::json!({
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}},
                              {"ipBlock": {"cidr": "203.0.113.99/32"}}]}]});
    lab.apply_json(policy("a", "allow-bad", bad));
    wait_until(Duration::from_secs(15), "the refused policy named", || {
        lab.flannel_log(1)
            .contains("nft refuses NetworkPolicy a/allow-bad")
    });
    tcp(false, "the refused policy allows nothing");
    let good = serde_json::json!({
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                     "ports": [{"port": 8080}]}]});
    lab.apply_json(policy("a", "allow-good", good));
    tcp(true, "a good policy next to a refused one");

    let refused = |kind: &str| {
        let text = lab.http_get("http://198.18.0.11:8471/metrics");
        let want = format!("flannel_policy_refused{{kind=\"{kind}\",reason=\"kernel\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&want).map(|v| v.trim().to_string()))
    };
    assert_eq!(refused("pod").as_deref(), Some("1"), "refused pods");
    assert_eq!(refused("policy").as_deref(), Some("1"), "refused policies");
    // Gone from the API, gone from the refusals.
    lab.kubectl(&["delete", "networkpolicy", "-n", "a", "allow-bad"]);
    wait_until(Duration::from_secs(10), "the refusal dropped", || {
        refused("policy").as_deref() == Some("0")
    });
    let log = lab.flannel_log(1);
    assert_eq!(
        log.matches("nft refuses NetworkPolicy a/allow-bad").count(),
        1,
        "warned once: {log}"
    );
    tcp(true, "after the refused policy went");
}

/// One SCTP round trip from a lab namespace (socat; the association stays
/// up until the echo is back), bounded to 3 s.
fn sctp_talks(lab: &Lab, from: &str, ip: &str, port: u16) -> bool {
    let script = format!(
        "echo ping | timeout 3 socat -t1 - SCTP-CONNECT:{ip}:{port},shut-none | grep -q ping"
    );
    lab.try_sh("exec", &[from, "bash", "-c", &script])
        .status
        .success()
}

fn expect_sctp(lab: &Lab, from: &str, ip: &str, port: u16, allowed: bool, what: &str) {
    let verdict = if allowed { "allowed" } else { "denied" };
    wait_until(
        Duration::from_secs(10),
        &format!("{what}: {from} → {ip}:{port}/sctp {verdict}"),
        || sctp_talks(lab, from, ip, port) == allowed,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sctp_talks(lab, from, ip, port),
        allowed,
        "{what}: {from} → {ip}:{port}/sctp stays {verdict}"
    );
}

/// kube-proxy's IPVS mode on a node: a ClusterIP on the kube-ipvs0 dummy,
/// TCP `vip:80` to `backend`:8080 (NAT), conntrack on.
fn ipvs_service(lab: &Lab, node: &str, vip: &str, backend: &str) {
    let script = format!(
        "set -e; sysctl -qw net.ipv4.vs.conntrack=1
         ip link show kube-ipvs0 >/dev/null 2>&1 || ip link add kube-ipvs0 type dummy
         ip addr add {vip}/32 dev kube-ipvs0
         ipvsadm -A -t {vip}:80 -s rr; ipvsadm -a -t {vip}:80 -r {backend}:8080 -m"
    );
    lab.exec(node, &["bash", "-c", &script]);
}

/// In a real kernel (ip_vs, sctp, br_netfilter): Service traffic through
/// kube-proxy's IPVS mode — which never passes the forward hook on the node
/// that DNATs it — is judged as traffic to the backend pod it is, for ingress
/// and egress, same node and across nodes; SCTP is matched as itself, port by
/// port; the node's own connections to its pods stay allowed.
#[test]
#[ignore = "needs ip_vs, sctp and br_netfilter: scripts/test.sh runs it in the kernel VM (scripts/kernel-vm.sh)"]
fn kernel_vm_policy_ipvs_services_and_sctp() {
    require_root();
    let lab = policy_lab("pvs");
    // Same-node bridged traffic reaches nftables only through br_netfilter.
    lab.exec(
        "n1",
        &["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"],
    );
    lab.start_flannel(1, &["--ip-masq", "--network-policy"]);
    lab.start_flannel(2, &["--ip-masq"]);
    let server = lab.add_pod(1, "server");
    let near = lab.add_pod(1, "near");
    let other = lab.add_pod(1, "other");
    let far = lab.add_pod(2, "far");
    let ports = serde_json::json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                   {"name": "assoc", "containerPort": 9000, "protocol": "SCTP"}]);
    let none = serde_json::json!([]);
    lab.pod_object(
        "a",
        "server",
        1,
        &server,
        serde_json::json!({"app": "server"}),
        ports,
    );
    let client = serde_json::json!({"role": "client"});
    lab.pod_object("a", "near", 1, &near, client.clone(), none.clone());
    lab.pod_object("a", "far", 2, &far, client, none.clone());
    lab.pod_object(
        "a",
        "other",
        1,
        &other,
        serde_json::json!({"role": "other"}),
        none,
    );
    let _tcp = serve(&lab, "n1-server", &[8080]);
    let mut sctp: Vec<std::process::Child> = [9000, 9001]
        .iter()
        .map(|p| {
            lab.exec_bg(
                "n1-server",
                &format!("exec socat SCTP-LISTEN:{p},fork,reuseaddr PIPE"),
            )
        })
        .collect();
    struct Kill<'a>(&'a mut Vec<std::process::Child>);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            for c in self.0.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let _kill = Kill(&mut sctp);
    let (vip1, vip2) = ("10.96.0.10", "10.96.0.20");
    ipvs_service(&lab, "n1", vip1, &server);
    ipvs_service(&lab, "n2", vip2, &server);
    wait_until(
        Duration::from_secs(60),
        "policy enforcement started",
        || lab.flannel_log(1).contains("network policy: enforcing"),
    );
    let tcp = |from: &str, ip: &str, port: u16, allowed: bool, what: &str| {
        expect(&lab, &format!("n{from}"), ip, port, false, allowed, what)
    };
    let sctp = |from: &str, port: u16, allowed: bool, what: &str| {
        expect_sctp(&lab, &format!("n{from}"), &server, port, allowed, what)
    };
    tcp("1-other", vip1, 80, true, "no policy, through IPVS");
    sctp("1-other", 9000, true, "no policy, SCTP, same node");
    sctp("2-far", 9001, true, "no policy, SCTP");

    // The server admits role=client on TCP 8080 and SCTP 9000 only.
    let clients = serde_json::json!({
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                     "ports": [{"port": 8080}, {"protocol": "SCTP", "port": "assoc"}]}]});
    lab.apply_json(policy("a", "clients", clients));
    tcp("1-other", vip1, 80, false, "same node, through IPVS");
    tcp("1-other", &server, 8080, false, "same node, direct");
    tcp(
        "1-near",
        vip1,
        80,
        true,
        "a client, same node, through IPVS",
    );
    tcp(
        "2-far",
        vip2,
        80,
        true,
        "a client on another node, through its IPVS",
    );
    sctp("1-other", 9000, false, "SCTP, not a client");
    sctp("1-near", 9000, true, "SCTP client, same node");
    sctp("2-far", 9000, true, "SCTP client, named port");
    sctp("2-far", 9001, false, "SCTP, a port not allowed");
    // The node itself (kubelet's probes) is not a pod: never judged.
    let probe = format!("timeout 2 bash -c 'exec 3<>/dev/tcp/{server}/8080'");
    let o = lab.try_sh("exec", &["n1", "bash", "-c", &probe]);
    assert!(o.status.success(), "the node's own connection to its pod");

    // Egress of the clients: only TCP 8080 to the server (through the
    // Service: judged after the DNAT, as the server's 8080); SCTP no more.
    let out = serde_json::json!({
        "podSelector": {"matchLabels": {"role": "client"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}]}]});
    lab.apply_json(policy("a", "clients-out", out));
    sctp("1-near", 9000, false, "egress, SCTP");
    tcp("1-near", vip1, 80, true, "egress allowed, through IPVS");
    tcp("1-near", "10.96.0.99", 80, false, "egress, elsewhere");
}
