//! Benchmark helper: fills the lab's API server or etcd with N flannel peers, as
//! running flanneld agents would have written them. Used by scripts/bench.sh.
//!
//!   populate kube <kubeconfig> <first> <count>   Node objects peer-<k> with podCIDR and annotations
//!   populate etcd <endpoint> <first> <count>     /coreos.com/network/subnets/<subnet> keys with a lease
//!   populate kube-delete <kubeconfig> <first> <count>, etcd-delete <endpoint> <first> <count>: remove them
//! Peer k: subnet 10.128.0.0/9 + (256 + k) × /24, public IP 198.19.(k/256).(k%256)
//! (never contacted), VtepMAC 52:54:00:<k> (BACKEND=wireguard: a public key
//! made from k). Prints the Unix time in ns just before
//! the first request, so a caller can time how long until an agent programs it.

use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

fn subnet(k: u32) -> String {
    let n = (10u32 << 24 | 128 << 16) + ((256 + k) << 8);
    format!("{}/24", Ipv4Addr::from(n))
}
fn public_ip(k: u32) -> String {
    format!("198.19.{}.{}", k / 256, k % 256)
}
fn mac(k: u32) -> String {
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (k >> 16) & 255,
        (k >> 8) & 255,
        k & 255
    )
}
/// `BACKEND=wireguard`: WireGuard peers (a public key derived from k, port 51820);
/// `BACKEND=extension`: extension peers (their data a JSON string, a MAC).
fn backend() -> &'static str {
    match std::env::var("BACKEND").as_deref() {
        Ok("wireguard") => "wireguard",
        Ok("extension") => "extension",
        _ => "vxlan",
    }
}
fn data(k: u32) -> String {
    if backend() == "extension" {
        return format!(r#""{}""#, mac(k));
    }
    if backend() == "wireguard" {
        let mut b = [7u8; 32];
        b[..4].copy_from_slice(&k.to_be_bytes());
        let key = flannel::backend::wireguard::key::Key(b);
        return format!(r#"{{"PublicKey":"{key}","Port":51820}}"#);
    }
    format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, mac(k))
}
fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The Nodes API with its connection warmed (TLS handshake done), so a printed
/// time is the request's own.
async fn warm_nodes_api(kubeconfig: &str) -> anyhow::Result<Api<Node>> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let nodes: Api<Node> = Api::all(kube::Client::try_from(cfg)?);
    nodes
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await?;
    Ok(nodes)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 5,
        "usage: populate kube|etcd <kubeconfig|endpoint> <first> <count>"
    );
    let (first, count): (u32, u32) = (a[3].parse()?, a[4].parse()?);
    match a[1].as_str() {
        "kube" => {
            let nodes = warm_nodes_api(&a[2]).await?;
            println!("{}", now_ns());
            let results: Vec<_> = stream::iter(first..first + count)
                .map(|k| {
                    let nodes = nodes.clone();
                    async move {
                        let node: Node = serde_json::from_value(serde_json::json!({
                            "metadata": { "name": format!("peer-{k}"), "annotations": {
                                "flannel.alpha.coreos.com/backend-data": data(k),
                                "flannel.alpha.coreos.com/backend-type": backend(),
                                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                                "flannel.alpha.coreos.com/public-ip": public_ip(k),
                            }},
                            "spec": { "podCIDR": subnet(k), "podCIDRs": [subnet(k)] },
                        }))?;
                        nodes.create(&PostParams::default(), &node).await?;
                        Ok::<(), anyhow::Error>(())
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            for r in results {
                r?;
            }
        }
        "etcd" => {
            let mut c = etcd_client::Client::connect([a[2].as_str()], None).await?;
            let lease = c.lease_grant(86400, None).await?.id();
            // (lease_grant above also warmed the connection)
            println!("{}", now_ns());
            let results: Vec<_> = stream::iter(first..first + count)
                .map(|k| {
                    let mut c = c.clone();
                    async move {
                        let key = format!("/coreos.com/network/subnets/{}", subnet(k).replace('/', "-"));
                        let val = format!(
                            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"{}","BackendData":{}}}"#,
                            public_ip(k),
                            backend(),
                            data(k)
                        );
                        c.put(key, val, Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
                        Ok::<(), anyhow::Error>(())
                    }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            for r in results {
                r?;
            }
        }
        "kube-delete" => {
            let nodes = warm_nodes_api(&a[2]).await?;
            println!("{}", now_ns());
            for k in first..first + count {
                nodes
                    .delete(&format!("peer-{k}"), &kube::api::DeleteParams::default())
                    .await?;
            }
        }
        "etcd-delete" => {
            let mut c = etcd_client::Client::connect([a[2].as_str()], None).await?;
            c.status().await?;
            println!("{}", now_ns());
            for k in first..first + count {
                let key = format!(
                    "/coreos.com/network/subnets/{}",
                    subnet(k).replace('/', "-")
                );
                c.delete(key, None).await?;
            }
        }
        other => anyhow::bail!("unknown target {other}"),
    }
    Ok(())
}
