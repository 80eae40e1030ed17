//! Compiling policies into nft state, and the transaction between two states.

use std::collections::BTreeMap;

use super::compile::{compile, mapped, Desired};
use super::model::*;
use super::nft;

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, l: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        ns: ns.into(),
        name: name.into(),
        node: node.into(),
        ips: ip.split(',').map(|i| i.parse().unwrap()).collect(),
        labels: labels(l),
        host_network: false,
        ports: vec![],
    }
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Policy {
    let np = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns}, "spec": spec
    }))
    .unwrap();
    Policy::from_api(&np).unwrap()
}

fn cluster(pods: Vec<PodInfo>, policies: Vec<Policy>) -> Cluster {
    let mut c = Cluster::default();
    for p in pods {
        c.namespaces
            .entry(p.ns.clone())
            .or_insert_with(|| labels(&[(NAME_LABEL, &p.ns)]));
        c.pods.insert((p.ns.clone(), p.name.clone()), p);
    }
    for p in policies {
        c.policies.insert((p.ns.clone(), p.name.clone()), p);
    }
    c
}

/// The chain a local pod's address is sent to, in one map.
fn chain<'a>(d: &'a Desired, map: &str, ip: &str) -> Option<&'a Vec<String>> {
    let c = d.maps.get(map)?.get(ip)?;
    d.chains.get(c)
}

#[test]
fn unselected_pods_get_no_chain_and_remote_pods_are_not_ours() {
    let c = cluster(
        vec![
            pod("a", "web", "n1", "10.244.0.5", &[("app", "web")]),
            pod("a", "db", "n1", "10.244.0.6", &[("app", "db")]),
            pod("a", "web2", "n2", "10.244.1.5", &[("app", "web")]),
        ],
        vec![policy(
            "a",
            "deny-web",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}}),
        )],
    );
    let d = compile(&c, "n1");
    assert_eq!(mapped(&d, "in4"), ["10.244.0.5".parse().unwrap()].into());
    assert!(
        mapped(&d, "eg4").is_empty(),
        "Ingress-only policy leaves egress alone"
    );
    assert_eq!(
        chain(&d, "in4", "10.244.0.5").unwrap(),
        &vec!["counter drop comment \"a/web ingress\"".to_string()],
        "selected with no rules: deny all"
    );
}

#[test]
fn rules_union_over_policies_with_peer_sets_and_ports() {
    let mut web = pod("a", "web", "n1", "10.244.0.5,fd00::5", &[("app", "web")]);
    web.ports = vec![NamedPort {
        name: "http".into(),
        port: 8080,
        proto: Proto::Tcp,
    }];
    let c = cluster(
        vec![
            web,
            pod("a", "client", "n2", "10.244.1.7", &[("role", "client")]),
            pod("b", "other", "n2", "10.244.1.8", &[("role", "client")]),
        ],
        vec![
            policy(
                "a",
                "from-clients",
                serde_json::json!({
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": "http"}]}]
                }),
            ),
            policy(
                "a",
                "from-block",
                serde_json::json!({
                    "podSelector": {},
                    "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}], "ports": [{"port": 53, "protocol": "UDP"}, {"port": 132, "protocol": "SCTP", "endPort": 140}]}]
                }),
            ),
        ],
    );
    let d = compile(&c, "n1");
    let rules = chain(&d, "in4", "10.244.0.5").unwrap();
    assert_eq!(
        chain(&d, "in6", "fd00::5"),
        Some(rules),
        "both families share the pod's chain"
    );
    let with_set = rules.iter().find(|r| r.contains('@')).unwrap();
    let set = with_set
        .split('@')
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        d.sets[&set].elems.iter().cloned().collect::<Vec<_>>(),
        ["10.244.1.7"],
        "a pod selector alone picks the policy's namespace only"
    );
    assert!(
        rules.contains(&format!(
            "ip saddr @{set} meta l4proto tcp th dport 8080 return"
        )),
        "named port resolved on the pod: {rules:#?}"
    );
    assert!(rules.contains(&"ip saddr 192.168.0.0/16 ip saddr != { 192.168.1.0/24 } meta l4proto udp th dport 53 return".to_string()), "{rules:#?}");
    assert!(rules.contains(&"ip saddr 192.168.0.0/16 ip saddr != { 192.168.1.0/24 } meta l4proto sctp th dport 132-140 return".to_string()), "{rules:#?}");
    assert_eq!(
        rules.last().unwrap(),
        "counter drop comment \"a/web ingress\""
    );
}

#[test]
fn named_ports_resolve_per_pod() {
    // The same name, different numbers: each pod's chain has its own.
    let mut a = pod("a", "a", "n1", "10.244.0.5", &[("app", "web")]);
    a.ports = vec![NamedPort {
        name: "http".into(),
        port: 8080,
        proto: Proto::Tcp,
    }];
    let mut b = pod("a", "b", "n1", "10.244.0.6", &[("app", "web")]);
    b.ports = vec![NamedPort {
        name: "http".into(),
        port: 9090,
        proto: Proto::Tcp,
    }];
    let mut dst = pod("a", "dst", "n2", "10.244.1.9", &[("app", "api")]);
    dst.ports = vec![NamedPort {
        name: "api".into(),
        port: 7000,
        proto: Proto::Tcp,
    }];
    let c = cluster(
        vec![a, b, dst],
        vec![
            policy(
                "a",
                "in",
                serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": "http"}]}]}),
            ),
            policy(
                "a",
                "out",
                serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "api"}}}], "ports": [{"port": "api"}]}]}),
            ),
        ],
    );
    let d = compile(&c, "n1");
    assert_eq!(
        chain(&d, "in4", "10.244.0.5").unwrap()[0],
        "meta l4proto tcp th dport 8080 return"
    );
    assert_eq!(
        chain(&d, "in4", "10.244.0.6").unwrap()[0],
        "meta l4proto tcp th dport 9090 return"
    );
    // Egress: the name resolves on each destination pod.
    let eg = chain(&d, "eg4", "10.244.0.5").unwrap();
    let set = eg[0].split('@').nth(1).unwrap().split(' ').next().unwrap();
    assert_eq!(
        eg[0],
        format!("ip daddr . meta l4proto . th dport @{set} return")
    );
    assert_eq!(
        d.sets[set].elems.iter().cloned().collect::<Vec<_>>(),
        ["10.244.1.9 . tcp . 7000"]
    );
}

#[test]
fn host_network_pods_are_neither_targets_nor_peers() {
    let mut h = pod("a", "h", "n1", "198.18.0.11", &[("app", "web")]);
    h.host_network = true;
    let c = cluster(
        vec![h, pod("a", "p", "n1", "10.244.0.7", &[("app", "web")])],
        vec![policy(
            "a",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        )],
    );
    let d = compile(&c, "n1");
    assert_eq!(mapped(&d, "in4"), ["10.244.0.7".parse().unwrap()].into());
    let all: Vec<&String> = d.sets.values().flat_map(|s| &s.elems).collect();
    assert_eq!(
        all,
        ["10.244.0.7"],
        "the hostNetwork pod's (node's) address is in no set"
    );
}

#[test]
fn delta_changes_set_elements_in_place() {
    let p = policy(
        "a",
        "p",
        serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "c"}}}]}]}),
    );
    let web = pod("a", "web", "n1", "10.244.0.5", &[("app", "web")]);
    let c1 = cluster(
        vec![
            web.clone(),
            pod("a", "c1", "n2", "10.244.1.1", &[("role", "c")]),
        ],
        vec![p.clone()],
    );
    let c2 = cluster(
        vec![web, pod("a", "c2", "n2", "10.244.1.2", &[("role", "c")])],
        vec![p],
    );
    let (d1, d2) = (compile(&c1, "n1"), compile(&c2, "n1"));
    let delta = nft::delta(&d1, &d2);
    let lines: Vec<&str> = delta.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "one element in, one out, nothing else: {delta}"
    );
    assert!(
        lines[0].starts_with("add element inet flannel-policy p4-")
            && lines[0].ends_with("{ 10.244.1.2 }")
    );
    assert!(
        lines[1].starts_with("delete element inet flannel-policy p4-")
            && lines[1].ends_with("{ 10.244.1.1 }")
    );
    assert_eq!(nft::delta(&d2, &d2), "", "no change, no commands");
}

#[test]
fn delta_from_nothing_and_back() {
    let c = cluster(
        vec![pod("a", "web", "n1", "10.244.0.5", &[])],
        vec![policy(
            "a",
            "p",
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        )],
    );
    let mut empty = Desired::default();
    for (m, _) in super::compile::MAPS {
        empty.maps.insert(m, BTreeMap::new());
    }
    let d = compile(&c, "n1");
    let up = nft::delta(&empty, &d);
    let first = |p: &str| up.lines().position(|l| l.starts_with(p)).unwrap();
    assert!(
        first("add set") < first("add rule"),
        "sets before the rules naming them:\n{up}"
    );
    assert!(
        first("add chain") < first("add element inet flannel-policy in4"),
        "chains before map entries:\n{up}"
    );
    let down = nft::delta(&d, &empty);
    let first = |p: &str| down.lines().position(|l| l.starts_with(p)).unwrap();
    assert!(
        first("delete element inet flannel-policy in4") < first("delete chain"),
        "{down}"
    );
    assert!(first("delete chain") < first("delete set"), "{down}");
    let full = nft::full(&d);
    assert!(full.starts_with("table inet flannel-policy {}\ndelete table inet flannel-policy\n"));
    assert!(full.contains("type filter hook forward priority filter - 5; policy accept;"));
    // Output (IPVS Services): the node's own traffic and replies pass before any
    // pod chain is consulted.
    let out: Vec<&str> = full
        .split("chain output {")
        .nth(1)
        .and_then(|c| c.split('}').next())
        .map(|c| c.lines().map(str::trim).filter(|l| !l.is_empty()).collect())
        .unwrap_or_default();
    assert_eq!(
        out.first().copied(),
        Some("type filter hook output priority filter - 5; policy accept;"),
        "{full}"
    );
    // A missing line is "last": every ordering with it fails.
    let pos = |p: &str| {
        out.iter()
            .position(|l| l.starts_with(p))
            .unwrap_or(usize::MAX)
    };
    assert!(pos("ct state established,related accept") < pos("fib saddr type local accept"));
    assert!(
        pos("fib saddr type local accept") < pos("ip saddr vmap @eg4"),
        "{full}"
    );
    assert!(pos("ip6 daddr vmap @in6") < usize::MAX, "{full}");
}

#[test]
fn comments_are_bounded_unique_and_quote_free() {
    use super::compile::{comment, MAX_COMMENT};
    assert_eq!(comment("a/web ingress"), "a/web ingress");
    // The longest names the API allows: 63-character namespace, 253-character pod.
    let ns = "n".repeat(63);
    let a = format!("{ns}/{} ingress", "p".repeat(253));
    let b = format!("{ns}/{}q ingress", "p".repeat(252));
    let (ca, cb) = (comment(&a), comment(&b));
    assert!(
        ca.len() <= MAX_COMMENT && cb.len() <= MAX_COMMENT,
        "{} {}",
        ca.len(),
        cb.len()
    );
    assert_ne!(ca, cb, "two long names must not share a comment");
    assert!(ca.starts_with(&ns) && ca.ends_with(" ingress"), "{ca}");
    assert_eq!(comment("x\"y\\z"), "x_y_z");
    // Multibyte text is cut on a character boundary.
    let c = comment(&"é".repeat(200));
    assert!(c.len() <= MAX_COMMENT);
}

#[test]
fn longest_pod_names_compile_to_writable_rules() {
    let ns = "n".repeat(63);
    let name = "p".repeat(253);
    let c = cluster(
        vec![pod(&ns, &name, "node1", "10.244.0.5", &[("app", "web")])],
        vec![policy(&ns, "deny", serde_json::json!({"podSelector": {}}))],
    );
    let d = compile(&c, "node1");
    for rules in d.chains.values() {
        for r in rules {
            if let Some(i) = r.find("comment \"") {
                let text = &r[i + 9..r.len() - 1];
                assert!(text.len() <= super::compile::MAX_COMMENT, "{r}");
            }
        }
    }
}

#[test]
fn a_terminating_pod_keeps_its_policy_until_it_is_gone() {
    let api: super::lite::PodLite = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "a", "deletionTimestamp": "2026-12-03T10:00:00Z",
                     "labels": {"app": "web"}},
        "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.5"}
    }))
    .unwrap();
    let p = PodInfo::from_api(&api, &mut Interner::default())
        .expect("a terminating pod still takes part");
    assert_eq!(
        p.ips,
        vec!["10.244.0.5".parse::<std::net::IpAddr>().unwrap()]
    );
    let mut done = api.clone();
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    assert_eq!(PodInfo::from_api(&done, &mut Interner::default()), None);
}

#[test]
fn denied_counters_grow_across_chain_rewrites_and_forget_gone_pods() {
    use super::compile::Owner;
    use super::denied::{drops, Denied};
    use crate::metrics::Metrics;
    let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
        {"rule": {"chain": "in-1", "expr": [{"match": {}}, {"return": null}]}},
        {"rule": {"chain": "in-1", "comment": "a/web ingress", "expr": [{"counter": {"packets": 7, "bytes": 420}}, {"drop": null}]}},
        {"rule": {"chain": "eg-2", "expr": [{"counter": {"packets": 3, "bytes": 1}}, {"drop": null}]}},
        {"rule": {"chain": "forward", "expr": [{"counter": {"packets": 99, "bytes": 1}}]}}]}"#;
    let d = drops(json);
    assert_eq!(d.get("in-1"), Some(&7));
    assert_eq!(d.get("eg-2"), Some(&3));
    assert_eq!(
        d.get("forward"),
        None,
        "a counter without drop is not a denial"
    );
    assert!(drops("not json").is_empty());

    let owner = |pod: &str, direction, policies: &[&str]| Owner {
        ns: "a".into(),
        pod: pod.into(),
        direction,
        policies: policies.iter().map(|p| p.to_string()).collect(),
    };
    let owners: BTreeMap<String, Owner> = [
        (
            "in-1".to_string(),
            owner("web", "ingress", &["deny", "allow"]),
        ),
        ("eg-2".to_string(), owner("db", "egress", &["deny"])),
    ]
    .into_iter()
    .collect();
    let m = Metrics::new();
    let mut den = Denied::default();
    den.set_owners(owners.clone(), None);
    den.observe(&d, &m);
    let text = m.render();
    let value = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series).map(|v| v.trim().to_string()))
    };
    assert_eq!(
        value(
            r#"flannel_policy_denied_packets_total{namespace="a",pod="web",direction="ingress"} "#
        )
        .as_deref(),
        Some("7"),
        "{text}"
    );
    assert_eq!(
        value(r#"flannel_policy_denied_by_policy_packets_total{namespace="a",policy="deny",direction="ingress"} "#)
            .as_deref(),
        Some("7"),
        "{text}"
    );
    // in-1 rewritten (its kernel counter restarts at 0, then 2 more drops);
    // db's pod gone.
    den.set_owners(
        owners.into_iter().filter(|(c, _)| c == "in-1").collect(),
        Some(&["in-1".to_string()]),
    );
    den.observe(&drops(r#"{"nftables": [{"rule": {"chain": "in-1", "expr": [{"counter": {"packets": 2}}, {"drop": null}]}}]}"#), &m);
    let text = m.render();
    assert!(
        text.contains(
            r#"flannel_policy_denied_packets_total{namespace="a",pod="web",direction="ingress"} 9"#
        ),
        "{text}"
    );
    assert!(
        !text.contains(r#"pod="db""#),
        "a gone pod's series is removed: {text}"
    );
    assert!(
        text.contains(r#"flannel_policy_denied_by_policy_packets_total{namespace="a",policy="deny",direction="ingress"} 9"#),
        "{text}"
    );
    assert!(!text.contains(r#"direction="egress""#), "{text}");
}

#[test]
fn a_denial_names_both_pods_the_port_and_the_isolating_policies() {
    use super::compile::Owner;
    use super::deny_log::line;
    use super::nflog::Denial;
    let c = cluster(
        vec![
            pod("a", "client", "n2", "10.244.1.5", &[]),
            pod("a", "server", "n1", "10.244.0.3", &[]),
        ],
        vec![],
    );
    let d = Denial {
        chain: "in-1".into(),
        src: "10.244.1.5".parse().unwrap(),
        dst: "10.244.0.3".parse().unwrap(),
        proto: "tcp".into(),
        port: Some(8080),
    };
    let o = Owner {
        ns: "a".into(),
        pod: "server".into(),
        direction: "ingress",
        policies: vec!["deny".into(), "web".into()],
    };
    assert_eq!(
        line(&d, Some(&o), &c),
        "network policy denied: a/client (10.244.1.5) → a/server (10.244.0.3) tcp/8080: ingress of a/server, isolated by deny, web, no rule allows it"
    );
    // An address no pod holds, a chain no longer known, no port.
    let other = Denial {
        src: "192.0.2.1".parse().unwrap(),
        proto: "icmp".into(),
        port: None,
        ..d
    };
    assert_eq!(
        line(&other, None, &c),
        "network policy denied: 192.0.2.1 → a/server (10.244.0.3) icmp: chain in-1, no rule allows it"
    );
}

#[test]
fn a_full_pod_decodes_to_what_policy_reads_and_nothing_else() {
    // A Pod as the API server sends it: managedFields, annotations, env,
    // volumes and conditions are skipped; what policy reads is kept.
    let json = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "resourceVersion": "42",
            "labels": {"app": "web", "tier": "front"},
            "annotations": {"big": "x".repeat(10_000)},
            "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {}}}],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "u"}]},
        "spec": {"nodeName": "node1", "hostNetwork": false,
            "volumes": [{"name": "v", "emptyDir": {}}],
            "containers": [
                {"name": "app", "image": "i", "env": [{"name": "A", "value": "b"}],
                 "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                           {"containerPort": 9000},
                           {"name": "assoc", "containerPort": 9000, "protocol": "SCTP"}]},
                {"name": "side", "image": "j"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.5",
            "podIPs": [{"ip": "10.244.0.5"}, {"ip": "fd00:10:244::5"}],
            "conditions": [{"type": "Ready", "status": "True"}]}
    });
    let lite: super::lite::PodLite = serde_json::from_value(json).unwrap();
    assert_eq!(lite.metadata.resource_version.as_deref(), Some("42"));
    assert!(lite.metadata.annotations.is_none() && lite.metadata.managed_fields.is_none());
    let p = PodInfo::from_api(&lite, &mut Interner::default()).unwrap();
    assert_eq!(
        (p.ns.as_str(), p.name.as_str(), &*p.node),
        ("shop", "web-0", "node1")
    );
    assert_eq!(p.labels, labels(&[("app", "web"), ("tier", "front")]));
    assert_eq!(
        p.ips,
        vec![
            "10.244.0.5".parse::<std::net::IpAddr>().unwrap(),
            "fd00:10:244::5".parse().unwrap()
        ]
    );
    assert_eq!(p.named_port("http", Proto::Tcp), Some(8080));
    assert_eq!(p.named_port("assoc", Proto::Sctp), Some(9000));
    assert_eq!(p.named_port("assoc", Proto::Tcp), None);
    assert_eq!(p.ports.len(), 2, "an unnamed port is no named port");
    assert!(!p.host_network);
}

/// The memo (chains and sets kept between compiles) never changes the
/// result: after every kind of change, compiling with it gives what a
/// compile from nothing gives. Deterministic pseudo-random changes.
#[test]
fn compiling_with_the_memo_equals_compiling_from_scratch() {
    use super::compile::{compile_skipping, compile_with, Memo, Skip};
    let spec = |m: usize| {
        serde_json::json!({
            "podSelector": {"matchLabels": {"app": (m % 3).to_string()}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"tier": (m % 2).to_string()}}}], "ports": [{"port": "http"}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"team": (m % 2).to_string()}},
                           "podSelector": {"matchLabels": {"app": ((m + 1) % 3).to_string()}}}]},
            ],
            "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]},
                       {"to": [{"podSelector": {"matchLabels": {"app": (m % 3).to_string()}}}]}],
        })
    };
    let mk = |k: usize, app: usize, tier: usize| {
        let ns = format!("ns{}", k % 4);
        let node = if k % 3 == 0 { "n1" } else { "n2" };
        let ip = format!("10.244.{}.{}", k / 200, k % 200 + 1);
        let mut p = pod(&ns, &format!("p{k}"), node, &ip, &[]);
        p.labels = labels(&[("app", &app.to_string()), ("tier", &tier.to_string())]);
        p.ports = vec![NamedPort {
            name: "http".into(),
            port: 8000 + (k % 3) as u16,
            proto: Proto::Tcp,
        }];
        p
    };
    let mut c = cluster(
        (0..60).map(|k| mk(k, k % 3, k % 2)).collect(),
        (0..6)
            .map(|m| policy(&format!("ns{}", m % 4), &format!("np{m}"), spec(m)))
            .collect(),
    );
    for n in 0..4 {
        c.namespaces.insert(
            format!("ns{n}"),
            labels(&[
                (NAME_LABEL, &format!("ns{n}")),
                ("team", &(n % 2).to_string()),
            ]),
        );
    }
    let mut memo = Memo::default();
    let mut rng: u64 = 7;
    let mut next = move |m: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % m
    };
    for step in 0..300 {
        let k = next(80) as usize;
        match next(6) {
            0 | 1 => {
                let p = mk(k, next(3) as usize, next(2) as usize);
                c.put_pod((p.ns.clone(), p.name.clone()), p);
            }
            2 => {
                c.remove_pod(&(format!("ns{}", k % 4), format!("p{k}")));
            }
            3 => {
                let n = format!("ns{}", next(4));
                c.namespaces.insert(
                    n.clone(),
                    labels(&[(NAME_LABEL, &n), ("team", &next(3).to_string())]),
                );
            }
            4 => {
                let m = next(8) as usize;
                let p = policy(&format!("ns{}", m % 4), &format!("np{m}"), spec(m + step));
                c.policies.insert((p.ns.clone(), p.name.clone()), p);
            }
            _ => {
                let m = next(8) as usize;
                c.policies
                    .remove(&(format!("ns{}", m % 4), format!("np{m}")));
            }
        }
        let fresh = compile_skipping(&c, "n1", &Skip::default(), false);
        let kept = compile_with(&c, "n1", &Skip::default(), false, &mut memo);
        assert_eq!(kept, fresh, "after step {step}");
        if step == 299 {
            assert!(
                !memo.is_empty() && fresh.objects() > 50,
                "the case compiles to something"
            );
        }
    }
}
