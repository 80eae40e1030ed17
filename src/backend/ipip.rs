//! ipip (IPv4 only), as upstream v0.20.2: the device `flannel.ipip` of kind
//! ipip with `local` = the interface address — a device of our own, never the
//! kernel's catch-all `tunl0`, which may belong to someone else — MTU = the
//! underlay's − 20, the lease's network address as a /32, and per peer
//! `<subnet> via <public IP> dev flannel.ipip onlink`. With `DirectRouting`, a
//! peer on the same L2 network gets host-gw's route instead.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context;

use crate::config::netconf::IpipConf;
use crate::dataplane::model::{Dev, PeerEntries, Route};
use crate::dataplane::netlink::{Devices, Link, Netlink};
use crate::iface::ExternalInterface;
use crate::lease::{BackendData, Lease};

use super::{carry_lease, hostgw, Backend, Prepared};

pub const DEVICE: &str = "flannel.ipip";
/// The outer IPv4 header.
pub const OVERHEAD: u32 = 20;

pub struct Ipip {
    conf: IpipConf,
    link: Option<Link>,
}

impl Ipip {
    pub fn new(conf: IpipConf) -> Ipip {
        Ipip { conf, link: None }
    }

    /// The existing device if it is ours as we would create it, else a new one.
    /// Returns it and whether it was (re-)created.
    async fn ensure_device(
        &mut self,
        nl: &Netlink,
        ext: &ExternalInterface,
    ) -> anyhow::Result<(Link, bool)> {
        let local = ext
            .iface_addr
            .with_context(|| format!("{} has no IPv4 address for {DEVICE}", ext.name))?;
        let mtu = tunnel_mtu(ext)?;
        super::ensure_link(
            nl,
            DEVICE,
            |l| compatible(l, local),
            || nl.create_ipip(DEVICE, local, mtu),
            "creating the ipip device (is the kernel's ipip module available?)",
        )
        .await
    }
}

/// The tunnel's MTU: the underlay's less the outer header.
fn tunnel_mtu(ext: &ExternalInterface) -> anyhow::Result<u32> {
    ext.mtu
        .checked_sub(OVERHEAD)
        .filter(|m| *m >= 68)
        .with_context(|| format!("MTU {} of {} is too small for ipip", ext.mtu, ext.name))
}

/// Reusable as is: an ipip link from our address to anyone.
pub fn compatible(l: &Link, local: Ipv4Addr) -> bool {
    l.kind.as_deref() == Some("ipip") && l.iptun == Some((Some(IpAddr::V4(local)), None))
}

/// The route to one peer (pure).
pub fn peer_route(
    conf: &IpipConf,
    ext: &ExternalInterface,
    lease: &Lease,
) -> Option<(ipnetwork::IpNetwork, Route)> {
    let (subnet, via) = hostgw::peer_target(lease, false)?;
    let route = if conf.direct_routing && ext.on_link(via) {
        Route {
            via,
            dev: Dev::Underlay,
            onlink: false,
            adopted: false,
        }
    } else {
        Route {
            via,
            dev: Dev::Overlay,
            onlink: true,
            adopted: false,
        }
    };
    Some((subnet, route))
}

impl Backend for Ipip {
    fn type_name(&self) -> &'static str {
        "ipip"
    }

    async fn prepare(&mut self, nl: &Netlink, ext: &ExternalInterface) -> anyhow::Result<Prepared> {
        let (mut link, _) = self.ensure_device(nl, ext).await?;
        let mtu = tunnel_mtu(ext)?;
        if link.mtu != mtu {
            nl.set_mtu(link.index, mtu).await?;
            link.mtu = mtu;
        }
        self.link = Some(link);
        Ok(Prepared {
            mtu,
            data: BackendData::Ipip,
            data_v6: None,
        })
    }

    async fn configure(
        &mut self,
        nl: &Netlink,
        ext: &ExternalInterface,
        own: &Lease,
    ) -> anyhow::Result<bool> {
        let (mut link, created) = self.ensure_device(nl, ext).await?;
        let mtu = tunnel_mtu(ext)?;
        if link.mtu != mtu {
            tracing::warn!("{DEVICE} has MTU {}, not {mtu}; restoring it", link.mtu);
            nl.set_mtu(link.index, mtu).await?;
            link.mtu = mtu;
        }
        carry_lease(nl, &mut link, own.subnet, false).await?;
        let changed = created || self.link.as_ref().map(|l| l.index) != Some(link.index);
        self.link = Some(link);
        Ok(changed)
    }

    fn devices(&self, ext: &ExternalInterface, _v6: bool) -> Devices {
        Devices {
            overlay: self.link.as_ref().map(|l| l.index),
            underlay: ext.index,
            network_route: false,
        }
    }

    fn entries(
        &self,
        ext: &ExternalInterface,
        lease: &Lease,
        v6: bool,
    ) -> Result<Option<PeerEntries>, String> {
        if v6 {
            return Ok(None);
        }
        Ok(peer_route(&self.conf, ext, lease).map(|r| PeerEntries {
            route: Some(r),
            ..Default::default()
        }))
    }
}
