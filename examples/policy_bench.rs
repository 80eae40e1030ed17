//! Benchmark helper for --network-policy (scripts/bench-policy.sh):
//!
//!   policy_bench populate <kubeconfig> <pods> <policies>
//!       namespaces bench-0..49, <pods> Pod objects spread over them (every
//!       100th on node1, the agent's node), with labels, a named port and a
//!       Running status with an address; <policies> NetworkPolicies (pod and
//!       namespace selectors, named ports, ipBlock with except, some egress).
//!   policy_bench changes <kubeconfig> <rounds> <node netns path>
//!       per round: a pod relabelled out of and back into a peer set, a new pod
//!       in a selected namespace getting its address (its Running status), a
//!       policy's ports changed. Each change is timed from just before the API
//!       write to the kernel's first nftables notification about the policy table
//!       in the node (the kernel holding it). Prints one line per kind.
//!
//!   policy_bench compile <pods> <policies> <rounds>
//!       no API server, no kernel: the same objects folded into the agent's
//!       model in memory, then the time to compile this node's table from
//!       scratch and after each kind of change (what every change costs the
//!       agent before nft is run). Prints figures; asserts nothing.
//!
//! Addresses are 10.200.0.0/16 (pod k: 10.200.k/250.k%250+1); nothing is contacted.

use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

const NAMESPACES: usize = 50;

fn pod_ip(k: usize) -> String {
    match k.checked_sub(1_000_000) {
        // Pods added while measuring.
        Some(r) => format!("10.201.{}.{}", r / 250, r % 250 + 1),
        None => format!("10.200.{}.{}", k / 250, k % 250 + 1),
    }
}

fn pod_json(k: usize, ns: usize, j: usize, tier: usize) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("p{k}"), "namespace": format!("bench-{ns}"),
                     "labels": {"app": (j % 10).to_string(), "tier": tier.to_string()}},
        "spec": {"nodeName": if k % 100 == 0 { "node1".to_string() } else { format!("peer-{k}") },
                 "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "none",
                                 "ports": [{"name": "http", "containerPort": 8000 + (j % 5), "protocol": "TCP"}]}]}
    })
}

fn policy_json(ns: usize, m: usize) -> serde_json::Value {
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": (m % 10).to_string()}},
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"tier": (m % 3).to_string()}}}],
             "ports": [{"port": "http"}, {"port": 443}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"team": (m % 5).to_string()}},
                       "podSelector": {"matchLabels": {"app": ((m + 1) % 10).to_string()}}}]}
        ]
    });
    if m % 5 == 0 {
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
        spec["egress"] = json!([{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                                 "ports": [{"port": 53, "protocol": "UDP"}]},
                                {"to": [{"podSelector": {"matchLabels": {"app": (m % 10).to_string()}}}],
                                 "ports": [{"port": "http"}]}]);
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": format!("np{m}"), "namespace": format!("bench-{ns}")}, "spec": spec})
}

async fn client(kubeconfig: &str) -> anyhow::Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// Creates a pod (as the scheduler leaves it: no address yet).
async fn create_pod_object(
    c: &kube::Client,
    k: usize,
    ns: usize,
    j: usize,
    tier: usize,
) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(c.clone(), &format!("bench-{ns}"));
    let pod: Pod = serde_json::from_value(pod_json(k, ns, j, tier))?;
    api.create(&PostParams::default(), &pod).await?;
    Ok(())
}

/// Writes a pod's Running status with its address (as its kubelet does).
async fn start_pod(c: &kube::Client, k: usize, ns: usize) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(c.clone(), &format!("bench-{ns}"));
    let status =
        json!({"status": {"phase": "Running", "podIP": pod_ip(k), "podIPs": [{"ip": pod_ip(k)}]}});
    api.patch_status(
        &format!("p{k}"),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;
    Ok(())
}

async fn populate(c: kube::Client, pods: usize, policies: usize) -> anyhow::Result<()> {
    let nss: Api<Namespace> = Api::all(c.clone());
    for i in 0..NAMESPACES {
        let ns: Namespace = serde_json::from_value(
            json!({"metadata": {"name": format!("bench-{i}"), "labels": {"team": (i % 5).to_string()}}}),
        )?;
        let _ = nss.create(&PostParams::default(), &ns).await;
        let sa: k8s_openapi::api::core::v1::ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
        let _ = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
            c.clone(),
            &format!("bench-{i}"),
        )
        .create(&PostParams::default(), &sa)
        .await;
    }
    let t = Instant::now();
    let results: Vec<anyhow::Result<()>> = stream::iter(0..pods)
        .map(|k| {
            let c = c.clone();
            async move {
                let ns = k % NAMESPACES;
                create_pod_object(&c, k, ns, k / NAMESPACES, (k / NAMESPACES) % 3).await?;
                start_pod(&c, k, ns).await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r?;
    }
    for m in 0..policies {
        let ns = m % NAMESPACES;
        let api: Api<NetworkPolicy> = Api::namespaced(c.clone(), &format!("bench-{ns}"));
        let np: NetworkPolicy = serde_json::from_value(policy_json(ns, m / NAMESPACES))?;
        api.create(&PostParams::default(), &np).await?;
    }
    eprintln!(
        "populated {pods} pods and {policies} policies in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The node's nftables change notifications about the policy table, as arrival
/// times (what `nft monitor` reads, taken from the kernel directly: nft's own
/// output drops set-element events it cannot match to its cache).
fn monitor(netns: &str) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<Instant>> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
    let f = std::fs::File::open(netns)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let sock = nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)
            .and_then(|_| {
                let mut s = Socket::new(NETLINK_NETFILTER)?;
                s.bind_auto()?;
                s.add_membership(7)?; // NFNLGRP_NFTABLES
                Ok(s)
            });
        let sock = match sock {
            Ok(s) => {
                let _ = ready_tx.send(Ok(()));
                s
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let name = b"flannel-policy\0";
        loop {
            match sock.recv_from_full() {
                Ok((buf, _)) => {
                    if buf.windows(name.len()).any(|w| w == name)
                        && tx.send(Instant::now()).is_err()
                    {
                        return;
                    }
                }
                // A big write overflows the socket (ENOBUFS): later notices still come.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(_) => return,
            }
        }
    });
    ready_rx.recv()??;
    Ok(rx)
}

/// Runs `change`, returns ms until the policy table changed.
async fn timed<F: std::future::Future<Output = anyhow::Result<()>>>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Instant>,
    change: F,
) -> anyhow::Result<f64> {
    // Quiet first: drain what earlier changes produced.
    tokio::time::sleep(Duration::from_millis(150)).await;
    while rx.try_recv().is_ok() {}
    let t0 = Instant::now();
    change.await?;
    let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .map_err(|_| anyhow::anyhow!("the table did not change within 10 s"))?
        .ok_or_else(|| anyhow::anyhow!("monitor ended"))?;
    Ok(seen.duration_since(t0).as_secs_f64() * 1000.0)
}

fn summary(name: &str, v: Vec<f64>) {
    let runs: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
    let mut v = v;
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "  {name:<38}: median {:.1} ms, p95 {:.1} ms, max {:.1} ms ({} runs, in order: {})",
        q(0.5),
        q(0.95),
        v[v.len() - 1],
        v.len(),
        runs.join(" ")
    );
}

async fn changes(c: kube::Client, rounds: usize, netns: &str) -> anyhow::Result<()> {
    let mut rx = monitor(netns)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "bench-0");
    let pols: Api<NetworkPolicy> = Api::namespaced(c.clone(), "bench-0");
    let (mut relabel, mut new_pod, mut policy) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        // p150: tier 0 in namespace 0, a peer of np0 (which selects node1's p0),
        // moved out of the peer set and back in on alternate rounds.
        let name = "p150".to_string();
        let to = if r % 2 == 0 { "1" } else { "0" };
        let patch = json!({"metadata": {"labels": {"tier": to}}});
        let p = &pods;
        relabel.push(
            timed(&mut rx, async {
                p.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .map_err(Into::into)
            })
            .await?,
        );
        // A new pod in namespace 0, tier 0: timed from its kubelet reporting its address.
        let kk = 1_000_000 + r;
        create_pod_object(&c, kk, 0, 0, 0).await?;
        new_pod.push(timed(&mut rx, start_pod(&c, kk, 0)).await?);
        // A port no earlier run used, so every round changes the policy.
        let port = 10000 + (std::process::id() % 1000) as i32 * 50 + r as i32;
        let patch = json!({"spec": {"ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "0"}}}], "ports": [{"port": port}]}]}});
        let pp = &pols;
        policy.push(
            timed(&mut rx, async {
                pp.patch("np0", &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .map_err(Into::into)
            })
            .await?,
        );
    }
    summary("pod relabelled → table", relabel);
    summary("new pod's address → table", new_pod);
    summary("policy changed → table", policy);
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("populate") if a.len() == 5 => populate(client(&a[2]).await?, a[3].parse()?, a[4].parse()?).await,
        Some("changes") if a.len() == 5 => changes(client(&a[2]).await?, a[3].parse()?, &a[4]).await,
        Some("compile") if a.len() == 5 => {
            compile(a[2].parse()?, a[3].parse()?, a[4].parse()?);
            Ok(())
        }
        _ => anyhow::bail!("usage: policy_bench populate <kubeconfig> <pods> <policies> | changes <kubeconfig> <rounds> <netns path> | compile <pods> <policies> <rounds>"),
    }
}

/// The bench's objects as the agent's model holds them, without an API server.
fn model(pods: usize, policies: usize) -> flannel::policy::watch::State {
    use flannel::policy::watch::{Change, State};
    use kube::runtime::watcher::Event;
    let mut st = State::default();
    for e in [Event::Init, Event::InitDone] {
        st.take(Change::Policy(e));
    }
    st.take(Change::Namespace(Event::Init));
    for i in 0..NAMESPACES {
        let ns: Namespace = serde_json::from_value(
            json!({"metadata": {"name": format!("bench-{i}"), "labels": {"team": (i % 5).to_string()}}}),
        )
        .expect("namespace");
        st.take(Change::Namespace(Event::InitApply(ns)));
    }
    st.take(Change::Namespace(Event::InitDone));
    st.take(Change::Pod(Event::Init));
    for k in 0..pods {
        st.take(Change::Pod(Event::InitApply(lite_pod(
            k,
            k / NAMESPACES,
            (k / NAMESPACES) % 3,
        ))));
    }
    st.take(Change::Pod(Event::InitDone));
    for m in 0..policies {
        let np: NetworkPolicy =
            serde_json::from_value(policy_json(m % NAMESPACES, m / NAMESPACES)).expect("policy");
        st.take(Change::Policy(Event::Apply(np)));
    }
    st
}

fn lite_pod(k: usize, j: usize, tier: usize) -> flannel::policy::lite::PodLite {
    let mut v = pod_json(k, k % NAMESPACES, j, tier);
    v["status"] = json!({"phase": "Running", "podIP": pod_ip(k), "podIPs": [{"ip": pod_ip(k)}]});
    serde_json::from_value(v).expect("pod")
}

fn compile(pods: usize, policies: usize, rounds: usize) {
    use flannel::policy::compile::{compile_skipping, compile_with, Memo, Skip};
    use flannel::policy::watch::Change;
    use kube::runtime::watcher::Event;
    let t = Instant::now();
    let mut st = model(pods, policies);
    println!("policy compile bench: PODS={pods} POLICIES={policies} (in memory)");
    println!("  model built in {:?}, RSS {} MB", t.elapsed(), rss_mb());
    // As the agent does: the chains of the last compile are reused.
    let mut memo = Memo::default();
    let mut run = |st: &flannel::policy::watch::State| {
        let t = Instant::now();
        let d = compile_with(&st.cluster, "node1", &Skip::default(), false, &mut memo);
        (t.elapsed().as_secs_f64() * 1e3, d.objects())
    };
    let (ms, objects) = run(&st);
    println!("  first compile: {ms:.1} ms, {objects} nft objects");
    if let Ok(path) = std::env::var("DUMP") {
        // The whole table as nft -f input (to time nft itself on it).
        let d = compile_skipping(&st.cluster, "node1", &Skip::default(), false);
        let _ = std::fs::write(path, flannel::policy::nft::full(&d));
    }
    let mut relabel = Vec::new();
    let mut added = Vec::new();
    let mut policy = Vec::new();
    for r in 0..rounds {
        // A peer pod changes tier (out of one peer set, into another).
        let k = 1 + 7 * r;
        st.take(Change::Pod(Event::Apply(lite_pod(
            k,
            k / NAMESPACES,
            (k / NAMESPACES + 1 + r) % 3,
        ))));
        relabel.push(run(&st).0);
        let k = 1_000_000 + r;
        st.take(Change::Pod(Event::Apply(lite_pod(k, r, r % 3))));
        added.push(run(&st).0);
        let mut np = policy_json(r % NAMESPACES, 0);
        np["spec"]["ingress"][0]["ports"] = json!([{"port": 9000 + r}]);
        st.take(Change::Policy(Event::Apply(
            serde_json::from_value(np).expect("policy"),
        )));
        policy.push(run(&st).0);
    }
    println!("  RSS after the changes: {} MB", rss_mb());
    for (name, v) in [
        ("pod relabelled", relabel),
        ("pod added", added),
        ("policy changed", policy),
    ] {
        summary(&format!("compile after {name}"), v);
    }
}

fn rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}
