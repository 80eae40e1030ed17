//! Kernel WireGuard through its generic-netlink family ("wireguard"): one
//! dump reads the device, set requests carry up to [`BATCH`] peers each.

use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use genetlink::GenetlinkHandle;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use super::device::DeviceState;
use super::key::Key;
use crate::dataplane::model::{Changes, WgPeer};

/// Peers per set request: well inside a netlink message's size either way.
pub const BATCH: usize = 32;

#[derive(Clone)]
pub struct Genl {
    name: String,
    handle: GenetlinkHandle,
    _conn: Arc<crate::reconcile::drift::AbortOnDrop<()>>,
}

impl Genl {
    /// A control channel for the kernel device `name` in this network namespace.
    pub fn connect(name: &str) -> std::io::Result<Genl> {
        let (conn, handle, _) = genetlink::new_connection()?;
        let conn = tokio::spawn(conn);
        Ok(Genl {
            name: name.to_string(),
            handle,
            _conn: Arc::new(crate::reconcile::drift::AbortOnDrop(conn)),
        })
    }

    async fn send(
        &self,
        msg: WireguardMessage,
        flags: u16,
    ) -> anyhow::Result<Vec<WireguardMessage>> {
        let mut req = NetlinkMessage::from(GenlMessage::from_payload(msg));
        req.header.flags = flags;
        let mut handle = self.handle.clone();
        let mut resp = handle
            .request(req)
            .await
            .with_context(|| format!("the kernel's wireguard netlink family ({})", self.name))?;
        let mut out = Vec::new();
        while let Some(m) = resp.next().await {
            let m = m.context("decoding a wireguard netlink reply")?;
            match m.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(std::io::Error::from_raw_os_error(
                        e.code.map(|c| -c.get()).unwrap_or(libc::EIO),
                    ))
                    .with_context(|| format!("wireguard netlink on {}", self.name))
                }
                NetlinkPayload::InnerMessage(g) => out.push(g.payload),
                _ => {}
            }
        }
        Ok(out)
    }

    pub async fn get(&self) -> anyhow::Result<DeviceState> {
        let msg = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(self.name.clone())],
        };
        let parts = self.send(msg, NLM_F_REQUEST | NLM_F_DUMP).await?;
        Ok(fold(parts))
    }

    pub async fn set_device(&self, private: &Key, port: u16) -> anyhow::Result<()> {
        let msg = WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: vec![
                WireguardAttribute::IfName(self.name.clone()),
                WireguardAttribute::PrivateKey(private.0),
                WireguardAttribute::ListenPort(port),
            ],
        };
        self.send(msg, NLM_F_REQUEST | NLM_F_ACK).await.map(|_| ())
    }

    async fn set(&self, peers: Vec<WireguardPeer>) -> anyhow::Result<()> {
        let msg = WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: vec![
                WireguardAttribute::IfName(self.name.clone()),
                WireguardAttribute::Peers(peers),
            ],
        };
        self.send(msg, NLM_F_REQUEST | NLM_F_ACK).await.map(|_| ())
    }

    pub async fn set_peers(&self, c: &Changes<Key, WgPeer>) -> Vec<String> {
        let mut all: Vec<(Key, WireguardPeer)> =
            c.del.iter().map(|(k, _)| (*k, remove_peer(k))).collect();
        all.extend(c.set.iter().map(|(k, p)| (*k, set_peer(k, p))));
        let mut failed = Vec::new();
        for chunk in all.chunks(BATCH) {
            let batch: Vec<WireguardPeer> = chunk.iter().map(|(_, p)| p.clone()).collect();
            if self.set(batch).await.is_ok() {
                continue;
            }
            // Find the refused one(s): the rest still go in.
            for (k, p) in chunk {
                if let Err(e) = self.set(vec![p.clone()]).await {
                    failed.push(format!("wireguard peer {k} on {}: {e:#}", self.name));
                }
            }
        }
        failed
    }
}

fn remove_peer(k: &Key) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(k.0),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
    ])
}

fn set_peer(k: &Key, p: &WgPeer) -> WireguardPeer {
    let allowed = p
        .allowed
        .iter()
        .flatten()
        .map(|n| {
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(if n.is_ipv4() {
                    WireguardAddressFamily::Ipv4
                } else {
                    WireguardAddressFamily::Ipv6
                }),
                WireguardAllowedIpAttr::IpAddr(n.network()),
                WireguardAllowedIpAttr::Cidr(n.prefix()),
            ])
        })
        .collect();
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(k.0),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        // All zeros clears a PSK someone else set.
        WireguardPeerAttribute::PresharedKey(p.psk.map(|k| k.0).unwrap_or([0; 32])),
        WireguardPeerAttribute::Endpoint(p.endpoint),
        WireguardPeerAttribute::PersistentKeepalive(p.keepalive),
        WireguardPeerAttribute::AllowedIps(allowed),
    ])
}

/// Folds a dump's messages into one state; a peer whose allowed IPs did not
/// fit one message continues in the next under the same public key.
fn fold(parts: Vec<WireguardMessage>) -> DeviceState {
    let mut st = DeviceState::default();
    let mut acc: std::collections::BTreeMap<Key, (WgPeer, Vec<ipnetwork::IpNetwork>)> =
        Default::default();
    for m in parts {
        for a in m.attributes {
            match a {
                WireguardAttribute::PrivateKey(k) if k != [0; 32] => st.private_key = Some(Key(k)),
                WireguardAttribute::PublicKey(k) if k != [0; 32] => st.public_key = Some(Key(k)),
                WireguardAttribute::ListenPort(p) => st.listen_port = p,
                WireguardAttribute::Peers(peers) => {
                    for p in peers {
                        read_peer(p, &mut acc, &mut st);
                    }
                }
                _ => {}
            }
        }
    }
    for (k, (mut p, nets)) in acc {
        p.allowed = WgPeer::allowed_of(nets);
        st.peers.insert(k, p);
    }
    st
}

fn read_peer(
    p: WireguardPeer,
    acc: &mut std::collections::BTreeMap<Key, (WgPeer, Vec<ipnetwork::IpNetwork>)>,
    st: &mut DeviceState,
) {
    let Some(key) = p.0.iter().find_map(|a| match a {
        WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
        _ => None,
    }) else {
        return;
    };
    let (peer, nets) = acc.entry(key).or_insert_with(|| {
        (
            WgPeer {
                endpoint: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                allowed: [None, None],
                psk: None,
                keepalive: 0,
            },
            Vec::new(),
        )
    });
    let stats = st.stats.entry(key).or_default();
    for a in p.0 {
        match a {
            WireguardPeerAttribute::PresharedKey(k) => peer.psk = (k != [0; 32]).then_some(Key(k)),
            WireguardPeerAttribute::Endpoint(e) => peer.endpoint = e,
            WireguardPeerAttribute::PersistentKeepalive(s) => peer.keepalive = s,
            WireguardPeerAttribute::LastHandshake(t) => {
                stats.last_handshake_secs = t.seconds.max(0) as u64
            }
            WireguardPeerAttribute::RxBytes(b) => stats.rx_bytes = b,
            WireguardPeerAttribute::TxBytes(b) => stats.tx_bytes = b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let mut addr = None;
                    let mut cidr = None;
                    for x in ip.0 {
                        match x {
                            WireguardAllowedIpAttr::IpAddr(i) => addr = Some(i),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
                            _ => {}
                        }
                    }
                    if let Some(n) = addr
                        .zip(cidr)
                        .and_then(|(a, c)| ipnetwork::IpNetwork::new(a, c).ok())
                    {
                        nets.push(n);
                    }
                }
            }
            _ => {}
        }
    }
}
