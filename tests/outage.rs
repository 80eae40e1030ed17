//! Store outages (issue 16): the API server or etcd is killed and started again
//! on the same data while pods talk. The agents keep the dataplane, say on
//! /readyz that the watch is broken, and after the store answers again apply
//! what changed within seconds, without a restart or a lost ping. Also: etcd
//! compaction, expiring auth tokens, a renewal that fails, our key deleted or
//! taken.

mod support;

use std::time::{Duration, Instant};
use support::*;

/// The issue's bound for a change made when the store answers again to reach
/// every running agent's kernel (goal 2 s; 3 s on a loaded 2-core machine).
const AFTER_OUTAGE: Duration = Duration::from_secs(3);

fn readyz(lab: &Lab, node: u32) -> String {
    lab.http_get(&format!("http://198.18.0.{}:8471/readyz", 10 + node))
}

fn metric(lab: &Lab, node: u32, name: &str) -> u64 {
    let m = lab.http_get(&format!("http://198.18.0.{}:8471/metrics", 10 + node));
    metric_sum(&m, name).unwrap_or_else(|| panic!("no {name} in {m}")) as u64
}

fn lost_pings(child: std::process::Child) -> (u32, u32) {
    let o = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    ping_counts(&text).unwrap_or_else(|| panic!("no ping summary: {text}"))
}

fn alive(lab: &Lab, node: u32) -> bool {
    let pid = std::fs::read_to_string(lab.dir.join(format!("n{node}/flanneld.pid"))).unwrap();
    std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
}

const HEALTH: [&str; 2] = ["--healthz-ip=0.0.0.0", "--healthz-port=8471"];

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn kube_apiserver_killed_and_restarted() {
    require_root();
    let lab = Lab::up("ko", &["--nodes", "2"]);
    lab.sh("node-add", &["4"]);
    for n in [1, 2, 4] {
        lab.start_flannel(n, &HEALTH);
    }
    for n in [1, 2, 4] {
        wait_until(Duration::from_secs(30), "2 peers each", || {
            lab.routes(n).len() == 2
        });
    }
    let p1 = lab.add_pod(1, "p1");
    let p2 = lab.add_pod(2, "p2");
    assert!(lab.ping("p1", &p2, 2, "0.2"));
    wait_until(Duration::from_secs(10), "node1 ready", || {
        readyz(&lab, 1) == "flanneld is ready"
    });
    let restarts_before = metric(&lab, 1, "flannel_store_reconnects_total");

    // Pods talk across the whole outage.
    let pinger = lab.ping_bg("p1", &p2, 400, "0.05");
    std::thread::sleep(Duration::from_millis(500));
    lab.sh("stop", &["apiserver", "KILL"]);
    wait_until(Duration::from_secs(10), "node1 not ready", || {
        readyz(&lab, 1).starts_with("flanneld is not ready yet: peer watch broken")
    });
    // During the outage: a node's agent starts (it waits for the API), and
    // node4's agent goes away for good.
    lab.sh("node-add", &["3", "--no-api"]);
    lab.start_flannel(3, &HEALTH);
    lab.stop_flannel(4, "KILL");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        lab.routes(1).len(),
        2,
        "routes were dropped during the outage"
    );

    lab.sh("start", &["apiserver"]);
    let back = Instant::now();
    lab.sh("node-object", &["3"]);
    lab.kubectl(&["delete", "node", "node4", "--wait=false"]);
    for n in [1, 2] {
        wait_until(
            AFTER_OUTAGE + Duration::from_secs(20),
            "node3 in, node4 out",
            || {
                let r = lab.routes(n);
                r.iter().any(|l| l.starts_with("10.244.2.0/24"))
                    && !r.iter().any(|l| l.starts_with("10.244.3.0/24"))
            },
        );
    }
    let took = back.elapsed();
    eprintln!(
        "after the API server answered: node3 added and node4 removed everywhere in {took:?}"
    );
    assert!(
        took <= AFTER_OUTAGE,
        "took {took:?} after the API server answered"
    );
    wait_until(AFTER_OUTAGE, "node1 ready again", || {
        readyz(&lab, 1) == "flanneld is ready"
    });

    let (sent, got) = lost_pings(pinger);
    assert_eq!(sent, got, "pings lost across the API server outage");
    assert!(lab.ping("p2", &p1, 2, "0.2"));
    let p3 = lab.add_pod(3, "p3");
    assert!(lab.reaches("p1", &p3, 2));
    for n in [1, 2, 3] {
        assert!(alive(&lab, n), "node{n}'s agent exited");
    }
    assert!(metric(&lab, 1, "flannel_store_reconnects_total") > restarts_before);
    let log = lab.flannel_log(1);
    assert!(log.contains("watching nodes"), "{log}");
    assert!(
        log.contains("working again") || log.contains("re-listing now"),
        "{log}"
    );
}

fn etcd_key_of(lab: &Lab, node: u32) -> (String, String) {
    let env = lab.subnet_env(node);
    let subnet = env
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .expect("FLANNEL_SUBNET");
    let net: ipnetwork::Ipv4Network = subnet.parse().unwrap();
    let key = format!(
        "/coreos.com/network/subnets/{}-{}",
        net.network(),
        net.prefix()
    );
    let out = lab.sh("etcdctl", &["get", &key, "-w", "fields"]);
    let lease = out
        .lines()
        .find_map(|l| l.strip_prefix("\"Lease\" : "))
        .unwrap_or("")
        .to_string();
    (key, lease)
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn etcd_killed_across_a_renewal_then_compacted() {
    require_root();
    let lab = Lab::up("eo", &["--mode", "etcd", "--nodes", "2"]);
    // An 8 s lease renewed every 4 s, so the outage spans a renewal.
    let ttl = [("FLANNEL_RS_LEASE_TTL_SECONDS", "8")];
    for n in [1, 2] {
        lab.start_flannel_env(n, &ttl, &HEALTH);
    }
    for n in [1, 2] {
        wait_until(Duration::from_secs(30), "1 peer each", || {
            lab.routes(n).len() == 1
        });
    }
    let p1 = lab.add_pod(1, "p1");
    let p2 = lab.add_pod(2, "p2");
    assert!(lab.ping("p1", &p2, 2, "0.2"));
    let (key1, lease1) = etcd_key_of(&lab, 1);
    assert!(!lease1.is_empty() && lease1 != "0");

    let pinger = lab.ping_bg("p1", &p2, 400, "0.05");
    std::thread::sleep(Duration::from_millis(500));
    lab.sh("stop", &["etcd", "KILL"]);
    wait_until(Duration::from_secs(15), "node1 not ready", || {
        readyz(&lab, 1).starts_with("flanneld is not ready yet: peer watch broken")
    });
    lab.sh("node-add", &["3"]);
    lab.start_flannel_env(3, &ttl, &HEALTH);
    std::thread::sleep(Duration::from_secs(6));
    lab.sh("start", &["etcd"]);
    let back = Instant::now();
    for n in [1, 2] {
        wait_until(
            AFTER_OUTAGE + Duration::from_secs(20),
            "node3 learnt",
            || lab.routes(n).len() == 2,
        );
    }
    let took = back.elapsed();
    eprintln!("after etcd answered: node3 in every kernel in {took:?}");
    assert!(took <= AFTER_OUTAGE, "took {took:?} after etcd answered");
    wait_until(AFTER_OUTAGE, "node1 ready again", || {
        readyz(&lab, 1) == "flanneld is ready"
    });
    let (sent, got) = lost_pings(pinger);
    assert_eq!(sent, got, "pings lost across the etcd outage");

    // The renewal that failed during the outage was retried, not treated as a
    // lost lease: the same key on the same etcd lease, renewed again since.
    let renewed = metric(&lab, 1, "flannel_lease_renewals_total");
    wait_until(Duration::from_secs(10), "another renewal", || {
        metric(&lab, 1, "flannel_lease_renewals_total") > renewed
    });
    assert_eq!(etcd_key_of(&lab, 1), (key1.clone(), lease1.clone()));
    let log = lab.flannel_log(1);
    assert!(
        log.contains("renewing our lease"),
        "no failed renewal logged:\n{log}"
    );
    assert!(!log.contains("re-created"), "{log}");

    // Compaction while the agents watch: they keep following changes.
    let rev = lab.sh(
        "etcdctl",
        &["get", "/coreos.com/network/config", "-w", "fields"],
    );
    let rev = rev
        .lines()
        .find_map(|l| l.strip_prefix("\"Revision\" : "))
        .unwrap()
        .trim()
        .to_string();
    lab.sh("etcdctl", &["compact", &rev]);
    lab.sh("node-add", &["4"]);
    lab.start_flannel_env(4, &ttl, &[]);
    for n in [1, 2, 3] {
        wait_until(
            Duration::from_secs(20),
            "node4 learnt after compaction",
            || lab.routes(n).len() == 3,
        );
    }

    // Our key deleted by hand: re-created (after reading it is gone), peers keep us.
    lab.sh("etcdctl", &["del", &key1]);
    wait_until(Duration::from_secs(5), "node1's key back", || {
        let (k, l) = etcd_key_of(&lab, 1);
        k == key1 && !l.is_empty() && l != lease1
    });
    assert!(lab.flannel_log(1).contains("re-created"));
    assert!(lab.reaches("p2", &p1, 2));

    // Another node's value on our key: node2 says so and exits (a restart takes a new subnet).
    let (key2, _) = etcd_key_of(&lab, 2);
    let foreign = r#"{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}"#;
    lab.sh("etcdctl", &["put", &key2, foreign]);
    wait_until(Duration::from_secs(10), "node2 to exit", || !alive(&lab, 2));
    let log = lab.flannel_log(2);
    assert!(
        log.contains("is now held by another node (public IP 198.18.0.99)"),
        "{log}"
    );
    assert!(alive(&lab, 1) && alive(&lab, 3));
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn etcd_auth_tokens_expire_and_are_refreshed() {
    require_root();
    let lab = Lab::up("eauth", &["--mode", "etcd", "--nodes", "2"]);
    for a in [
        &["user", "add", "root:rootpw", "--interactive=false"][..],
        &["user", "add", "flannel:flannelpw", "--interactive=false"],
        &["role", "add", "flannel"],
        &[
            "role",
            "grant-permission",
            "flannel",
            "--prefix=true",
            "readwrite",
            "/coreos.com/network/",
        ],
        &["user", "grant-role", "flannel", "flannel"],
        &["auth", "enable"],
    ] {
        lab.sh("etcdctl", a);
    }
    // Tokens live 2 s: every renewal (each 4 s) and re-read finds its token expired.
    lab.sh("etcd-restart", &["--auth-token-ttl", "2"]);
    let ttl = [("FLANNEL_RS_LEASE_TTL_SECONDS", "8")];
    let auth = ["--etcd-username=flannel", "--etcd-password=flannelpw"];
    for n in [1, 2] {
        lab.start_flannel_env(n, &ttl, &auth);
    }
    for n in [1, 2] {
        wait_until(Duration::from_secs(30), "1 peer each", || {
            lab.routes(n).len() == 1
        });
    }
    // Several token lifetimes and renewals go by.
    wait_until(Duration::from_secs(30), "three renewals on node1", || {
        lab.flannel_log(1).matches("renewed lease").count() >= 3
    });
    lab.sh("node-add", &["3"]);
    lab.start_flannel_env(3, &ttl, &auth);
    for n in [1, 2] {
        wait_until(Duration::from_secs(10), "node3 learnt", || {
            lab.routes(n).len() == 2
        });
    }
    lab.add_pod(1, "p1");
    let p3 = lab.add_pod(3, "p3");
    assert!(lab.reaches("p1", &p3, 2));
    for n in [1, 2, 3] {
        assert!(alive(&lab, n), "node{n}'s agent exited");
        assert!(
            !lab.flannel_log(n).contains("invalid auth token"),
            "{}",
            lab.flannel_log(n)
        );
    }
}
