//! host-gw: a plain route per peer subnet via the peer's public IP on the underlay.

use std::net::IpAddr;

use crate::dataplane::model::{Dev, PeerEntries, Route};
use crate::dataplane::netlink::Netlink;
use crate::iface::ExternalInterface;
use crate::lease::{BackendData, Lease};

use super::{Backend, Prepared};

pub struct HostGw;

/// A peer's subnet and public address in one family.
pub fn peer_target(lease: &Lease, v6: bool) -> Option<(ipnetwork::IpNetwork, IpAddr)> {
    if v6 {
        Some((lease.ipv6_subnet?, IpAddr::V6(lease.public_ipv6?)))
    } else {
        Some((lease.subnet?, IpAddr::V4(lease.public_ip?)))
    }
}

/// The host-gw route for a peer in one family, or why there is none.
pub fn peer_route(
    ext: &ExternalInterface,
    lease: &Lease,
    v6: bool,
) -> Result<Option<(ipnetwork::IpNetwork, Route)>, String> {
    let Some((subnet, via)) = peer_target(lease, v6) else {
        return Ok(None);
    };
    if !ext.on_link(via) {
        return Err(format!(
            "public IP {via} is not on-link on {} (host-gw needs all nodes on one L2 network)",
            ext.name
        ));
    }
    Ok(Some((
        subnet,
        Route {
            via,
            dev: Dev::Underlay,
            onlink: false,
            adopted: false,
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
            data_v6: Some(BackendData::HostGw),
        })
    }

    fn entries(
        &self,
        ext: &ExternalInterface,
        lease: &Lease,
        v6: bool,
    ) -> Result<Option<PeerEntries>, String> {
        Ok(peer_route(ext, lease, v6)?.map(|r| PeerEntries {
            route: Some(r),
            ..Default::default()
        }))
    }
}
