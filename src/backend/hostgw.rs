//! host-gw: a plain route per peer subnet via the peer's public IP on the underlay.

use crate::dataplane::model::{Dev, Route, State};
use crate::dataplane::netlink::{Devices, Netlink};
use crate::iface::ExternalInterface;
use crate::lease::{BackendData, Lease, PeerSet};

use super::{Backend, Prepared, Skipped};

pub struct HostGw;

/// The host-gw route for a peer, or why there is none.
pub fn peer_route(
    ext: &ExternalInterface,
    lease: &Lease,
) -> Result<Option<(ipnetwork::IpNetwork, Route)>, String> {
    let (Some(subnet), Some(ip)) = (lease.subnet, lease.public_ip) else {
        return Ok(None);
    };
    let via = std::net::IpAddr::V4(ip);
    if !ext.on_link(via) {
        return Err(format!(
            "public IP {ip} is not on-link on {} (host-gw needs all nodes on one L2 network)",
            ext.name
        ));
    }
    Ok(Some((
        subnet,
        Route {
            via,
            dev: Dev::Underlay,
            onlink: false,
        },
    )))
}

impl Backend for HostGw {
    fn type_name(&self) -> &'static str {
        "host-gw"
    }

    async fn prepare(
        &mut self,
        _nl: &Netlink,
        ext: &ExternalInterface,
    ) -> anyhow::Result<Prepared> {
        Ok(Prepared {
            mtu: ext.mtu,
            data: BackendData::HostGw,
        })
    }

    async fn configure(
        &mut self,
        _nl: &Netlink,
        _ext: &ExternalInterface,
        _own: &Lease,
    ) -> anyhow::Result<bool> {
        Ok(false)
    }

    fn devices(&self, ext: &ExternalInterface) -> Devices {
        Devices {
            overlay: None,
            underlay: ext.index,
        }
    }

    fn desired(&self, ext: &ExternalInterface, peers: &PeerSet) -> (State, Skipped) {
        let mut s = State::default();
        let mut skipped = Vec::new();
        for (name, lease) in peers.accepted() {
            match peer_route(ext, lease) {
                Ok(Some((dst, r))) => {
                    s.routes.insert(dst, r);
                }
                Ok(None) => {}
                Err(why) => skipped.push((name.clone(), why)),
            }
        }
        (s, skipped)
    }
}
