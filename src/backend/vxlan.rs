//! vxlan: the `flannel.<VNI>` device (IPv6: `flannel-v6.<VNI>`) and, per peer,
//! upstream's three entries: route `<subnet> via <subnet addr> dev flannel.1
//! onlink`, a permanent neighbour `<subnet addr> lladdr <VtepMAC>`, and an FDB
//! entry `<VtepMAC> dst <public IP> self permanent`. Each family has its own
//! device, VTEP MAC and entries.

use std::net::IpAddr;

use anyhow::Context;
use ipnetwork::IpNetwork;

use crate::config::netconf::VxlanConf;
use crate::dataplane::model::{Dev, PeerEntries, Route};
use crate::dataplane::netlink::{Devices, Link, Netlink, VxlanAttrs, VxlanSpec};
use crate::iface::ExternalInterface;
use crate::lease::{BackendData, Lease, Mac, VxlanData};

use super::{hostgw, Backend, Prepared};

/// Linux's VXLAN port when none is given (IANA's is 4789; the kernel keeps 8472).
pub const KERNEL_DEFAULT_PORT: u16 = 8472;

/// One family's device: what it was created with and what it is now.
#[derive(Default)]
struct Device {
    link: Option<Link>,
    /// The VTEP MAC in our published lease: every peer's neighbour and FDB entries
    /// hold it, so the device keeps it (restored if changed, kept if re-created).
    mac: Option<Mac>,
}

pub struct Vxlan {
    conf: VxlanConf,
    v4: bool,
    v6: bool,
    dev4: Device,
    dev6: Device,
}

impl Vxlan {
    /// A vxlan backend for the enabled families.
    pub fn new(conf: VxlanConf, v4: bool, v6: bool) -> Vxlan {
        Vxlan {
            conf,
            v4,
            v6,
            dev4: Device::default(),
            dev6: Device::default(),
        }
    }

    pub fn device_name(&self, v6: bool) -> String {
        if v6 {
            format!("flannel-v6.{}", self.conf.vni)
        } else {
            format!("flannel.{}", self.conf.vni)
        }
    }

    fn families(&self) -> impl Iterator<Item = bool> {
        [(false, self.v4), (true, self.v6)]
            .into_iter()
            .filter_map(|(v6, on)| on.then_some(v6))
    }

    fn dev(&self, v6: bool) -> &Device {
        if v6 {
            &self.dev6
        } else {
            &self.dev4
        }
    }

    fn dev_mut(&mut self, v6: bool) -> &mut Device {
        if v6 {
            &mut self.dev6
        } else {
            &mut self.dev4
        }
    }

    fn spec(&self, ext: &ExternalInterface, v6: bool) -> VxlanSpec {
        VxlanSpec {
            name: self.device_name(v6),
            attrs: VxlanAttrs {
                vni: self.conf.vni,
                local: if v6 {
                    ext.iface_addr6.map(IpAddr::V6)
                } else {
                    ext.iface_addr.map(IpAddr::V4)
                },
                underlay: Some(ext.index),
                port: self.conf.port,
                gbp: self.conf.gbp,
                learning: self.conf.learning,
            },
            mac: self.conf.mac_prefix.as_ref().map(|p| random_mac(p)),
            mtu: self.conf.mtu,
        }
    }

    /// Finds a reusable device or (re)creates it. Returns the link and whether it is new.
    async fn ensure_device(
        &mut self,
        nl: &Netlink,
        spec: &VxlanSpec,
    ) -> anyhow::Result<(Link, bool)> {
        super::ensure_link(
            nl,
            &spec.name,
            |l| compatible(l, &spec.attrs),
            || nl.create_vxlan(spec),
            "creating the VXLAN device",
        )
        .await
    }

    /// Prepares one family's device; returns its MTU and backend data.
    async fn prepare_one(
        &mut self,
        nl: &Netlink,
        ext: &ExternalInterface,
        v6: bool,
    ) -> anyhow::Result<(u32, BackendData)> {
        let spec = self.spec(ext, v6);
        if v6 && spec.attrs.local.is_none() {
            anyhow::bail!("{} has no IPv6 address for {}", ext.name, spec.name);
        }
        let (mut link, _) = self.ensure_device(nl, &spec).await?;
        if let Some(mtu) = self.conf.mtu {
            if link.mtu != mtu {
                nl.set_mtu(link.index, mtu).await?;
                link.mtu = mtu;
            }
        }
        let mac = link
            .mac
            .with_context(|| format!("{} has no MAC address", link.name))?;
        let out = (
            link.mtu,
            BackendData::Vxlan(VxlanData {
                vni: self.conf.vni,
                vtep_mac: mac,
            }),
        );
        let d = self.dev_mut(v6);
        d.link = Some(link);
        d.mac = Some(mac);
        Ok(out)
    }

    /// Makes one family's device carry the lease's address; true if re-created.
    async fn configure_one(
        &mut self,
        nl: &Netlink,
        ext: &ExternalInterface,
        own: Option<IpNetwork>,
        v6: bool,
    ) -> anyhow::Result<bool> {
        // From the current interface (its address may have changed: a new `local`
        // re-creates the device). A re-created device gets the published MAC back.
        let mut spec = self.spec(ext, v6);
        let mac = self.dev(v6).mac;
        if mac.is_some() {
            spec.mac = mac;
        }
        let (mut link, created) = self.ensure_device(nl, &spec).await?;
        if let (Some(want), Some(have)) = (mac, link.mac) {
            if want != have {
                // Restored rather than re-published: one local change instead of
                // every peer rewriting its entries, and peers that cache the old
                // MAC (upstream agents between restarts) keep reaching us.
                tracing::warn!(
                    "{} has MAC {have}, not the published {want}; restoring it",
                    link.name
                );
                nl.set_mac(link.index, want).await?;
                link.mac = Some(want);
            }
        }
        if let Some(mtu) = self.conf.mtu {
            if link.mtu != mtu {
                nl.set_mtu(link.index, mtu).await?;
            }
        }
        if v6 {
            disable_accept_ra(&link.name);
        }
        super::carry_lease(nl, &mut link, own, v6).await?;
        let d = self.dev_mut(v6);
        let changed = created || d.link.as_ref().map(|l| l.index) != Some(link.index);
        d.link = Some(link);
        Ok(changed)
    }
}

/// Upstream sets accept_ra=0 on the IPv6 device: router advertisements arriving
/// over the overlay must not configure this node.
fn disable_accept_ra(dev: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
        return;
    }
    if let Err(e) = std::fs::write(&path, "0") {
        tracing::warn!("setting {path} to 0: {e}");
    }
}

/// Attributes that must match for an existing device to be reused as is.
pub fn compatible(l: &Link, want: &VxlanAttrs) -> bool {
    let Some(have) = &l.vxlan else { return false };
    let port = |p: u16| if p == 0 { KERNEL_DEFAULT_PORT } else { p };
    have.vni == want.vni
        && have.local == want.local
        && (want.underlay.is_none() || have.underlay == want.underlay)
        && port(have.port) == port(want.port)
        && have.gbp == want.gbp
        && have.learning == want.learning
}

/// A random locally administered unicast MAC starting with `prefix`.
fn random_mac(prefix: &[u8]) -> Mac {
    let mut m: [u8; 6] = rand::random();
    m[0] = (m[0] & 0xfe) | 0x02;
    for (i, b) in prefix.iter().enumerate().take(6) {
        m[i] = *b;
    }
    Mac(m)
}

/// The vxlan entries for one peer in one family: (subnet, route, neighbour
/// address, VTEP MAC, FDB destination). Like upstream, the peer's VNI is not
/// compared: all nodes of a network share the net-conf.
pub fn peer_entries(lease: &Lease, v6: bool) -> Option<(IpNetwork, Route, IpAddr, Mac, IpAddr)> {
    let (subnet, dst) = hostgw::peer_target(lease, v6)?;
    let data = if v6 {
        lease.backend_v6.as_ref()?
    } else {
        &lease.backend
    };
    let BackendData::Vxlan(d) = *data else {
        return None;
    };
    let gw = subnet.network();
    Some((
        subnet,
        Route {
            via: gw,
            dev: Dev::Overlay,
            onlink: true,
            adopted: false,
        },
        gw,
        d.vtep_mac,
        dst,
    ))
}

impl Backend for Vxlan {
    fn type_name(&self) -> &'static str {
        "vxlan"
    }

    async fn prepare(&mut self, nl: &Netlink, ext: &ExternalInterface) -> anyhow::Result<Prepared> {
        let mut out: Option<Prepared> = None;
        for v6 in self.families().collect::<Vec<_>>() {
            let (mtu, data) = self.prepare_one(nl, ext, v6).await?;
            match out.as_mut() {
                // Dual-stack: pods get the IPv4 device's MTU and backend-data, as upstream.
                Some(p) => p.data_v6 = Some(data),
                None => {
                    out = Some(Prepared {
                        mtu,
                        data_v6: v6.then(|| data.clone()),
                        data,
                    })
                }
            }
        }
        out.context("neither IPv4 nor IPv6 is enabled")
    }

    async fn configure(
        &mut self,
        nl: &Netlink,
        ext: &ExternalInterface,
        own: &Lease,
    ) -> anyhow::Result<bool> {
        let mut changed = false;
        for v6 in self.families().collect::<Vec<_>>() {
            let subnet = if v6 { own.ipv6_subnet } else { own.subnet };
            changed |= self.configure_one(nl, ext, subnet, v6).await?;
        }
        Ok(changed)
    }

    fn devices(&self, ext: &ExternalInterface, v6: bool) -> Devices {
        Devices {
            overlay: self.dev(v6).link.as_ref().map(|l| l.index),
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
        if self.conf.direct_routing {
            if let Ok(Some(r)) = hostgw::peer_route(ext, lease, v6) {
                return Ok(Some(PeerEntries {
                    route: Some(r),
                    ..Default::default()
                }));
            }
        }
        Ok(
            peer_entries(lease, v6).map(|(subnet, route, gw, mac, dst)| PeerEntries {
                route: Some((subnet, route)),
                neigh: Some((gw, mac)),
                fdb: Some((mac, dst)),
                wg: None,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::netconf::NetConf;
    use crate::lease::PeerSet;

    fn ext() -> ExternalInterface {
        ExternalInterface {
            index: 2,
            name: "eth0".into(),
            mtu: 1500,
            iface_addr: Some("198.18.0.11".parse().unwrap()),
            iface_addr6: None,
            public_ip: Some("198.18.0.11".parse().unwrap()),
            public_ipv6: None,
            networks: vec!["198.18.0.0/24".parse().unwrap()],
        }
    }

    fn lease(i: u8, ip: &str) -> Lease {
        Lease {
            subnet: Some(format!("10.244.{i}.0/24").parse().unwrap()),
            ipv6_subnet: None,
            public_ip: Some(ip.parse().unwrap()),
            public_ipv6: None,
            backend: BackendData::Vxlan(VxlanData {
                vni: 1,
                vtep_mac: Mac([0x52, 0, 0, 0, 0, i]),
            }),
            backend_v6: None,
        }
    }

    fn peers(conf: &NetConf) -> PeerSet {
        let own = lease(1, "198.18.0.11");
        let mut p = PeerSet::default();
        p.upsert("n2", lease(2, "198.18.0.12"), conf, &own);
        p.upsert("far", lease(3, "203.0.113.7"), conf, &own);
        p
    }

    #[test]
    fn vxlan_entries_have_upstreams_form() {
        let conf =
            NetConf::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let b = Vxlan::new(VxlanConf::default(), true, false);
        let (s, skipped) = b.desired(&ext(), &peers(&conf), false);
        assert!(skipped.is_empty());
        let r = s.routes[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            r,
            Route {
                via: "10.244.2.0".parse().unwrap(),
                dev: Dev::Overlay,
                onlink: true,
                adopted: false
            }
        );
        assert_eq!(
            s.neighs[&"10.244.2.0".parse().unwrap()],
            Mac([0x52, 0, 0, 0, 0, 2])
        );
        assert_eq!(
            s.fdb[&Mac([0x52, 0, 0, 0, 0, 2])],
            "198.18.0.12".parse::<IpAddr>().unwrap()
        );
        assert_eq!(s.len(), 6);
    }

    #[test]
    fn ipv6_entries_use_the_v6_device_data_and_public_ipv6() {
        let conf = NetConf::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let dual = |i: u8, ip6: &str| Lease {
            ipv6_subnet: Some(format!("fd00:10:244:{i}::/64").parse().unwrap()),
            public_ipv6: Some(ip6.parse().unwrap()),
            backend_v6: Some(BackendData::Vxlan(VxlanData {
                vni: 1,
                vtep_mac: Mac([0x66, 0, 0, 0, 0, i]),
            })),
            ..lease(i, &format!("198.18.0.{}", 10 + i))
        };
        let own = dual(1, "fd00:198:18::11");
        let mut p = PeerSet::default();
        let out = p.upsert("n2", dual(2, "fd00:198:18::12"), &conf, &own);
        assert!(out.refused.is_empty(), "{out:?}");
        let b = Vxlan::new(VxlanConf::default(), true, true);
        let (v4, _) = b.desired(&ext(), &p, false);
        let (v6, _) = b.desired(&ext(), &p, true);
        assert_eq!(v4.len(), 3);
        assert_eq!(
            v6.routes[&"fd00:10:244:2::/64".parse().unwrap()],
            Route {
                via: "fd00:10:244:2::".parse().unwrap(),
                dev: Dev::Overlay,
                onlink: true,
                adopted: false
            }
        );
        let mac6 = Mac([0x66, 0, 0, 0, 0, 2]);
        assert_eq!(v6.neighs[&"fd00:10:244:2::".parse().unwrap()], mac6);
        assert_eq!(v6.fdb[&mac6], "fd00:198:18::12".parse::<IpAddr>().unwrap());
        assert!(!v4.fdb.contains_key(&mac6));
        // A peer without IPv6 data gets no IPv6 entries.
        let mut q = PeerSet::default();
        q.upsert("n3", lease(3, "198.18.0.13"), &conf, &own);
        assert!(b.desired(&ext(), &q, true).0.is_empty());
        assert_eq!(b.device_name(true), "flannel-v6.1");
    }

    #[test]
    fn direct_routing_uses_underlay_for_on_link_peers_only() {
        let conf = NetConf::parse(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
        )
        .unwrap();
        let b = Vxlan::new(
            VxlanConf {
                direct_routing: true,
                ..Default::default()
            },
            true,
            false,
        );
        let (s, _) = b.desired(&ext(), &peers(&conf), false);
        assert_eq!(
            s.routes[&"10.244.2.0/24".parse().unwrap()],
            Route {
                via: "198.18.0.12".parse().unwrap(),
                dev: Dev::Underlay,
                onlink: false,
                adopted: false
            }
        );
        assert!(!s.neighs.contains_key(&"10.244.2.0".parse().unwrap()));
        assert_eq!(
            s.routes[&"10.244.3.0/24".parse().unwrap()].dev,
            Dev::Overlay
        );
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn host_gw_refuses_off_link_peers() {
        let conf =
            NetConf::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
        let own = Lease {
            backend: BackendData::HostGw,
            ..lease(1, "198.18.0.11")
        };
        let mut p = PeerSet::default();
        p.upsert(
            "n2",
            Lease {
                backend: BackendData::HostGw,
                ..lease(2, "198.18.0.12")
            },
            &conf,
            &own,
        );
        p.upsert(
            "far",
            Lease {
                backend: BackendData::HostGw,
                ..lease(3, "203.0.113.7")
            },
            &conf,
            &own,
        );
        let (s, skipped) = hostgw::HostGw.desired(&ext(), &p, false);
        assert_eq!(s.routes.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].0, "far");
    }

    #[test]
    fn device_reuse_rules() {
        let want = VxlanAttrs {
            vni: 1,
            local: Some("198.18.0.11".parse().unwrap()),
            underlay: Some(2),
            port: 0,
            gbp: false,
            learning: false,
        };
        let mut l = Link {
            index: 5,
            name: "flannel.1".into(),
            mtu: 1450,
            mac: None,
            up: true,
            kind: Some("vxlan".into()),
            vxlan: Some(VxlanAttrs {
                port: 8472,
                ..want.clone()
            }),
            iptun: None,
        };
        assert!(compatible(&l, &want));
        l.vxlan.as_mut().unwrap().vni = 2;
        assert!(!compatible(&l, &want));
        l.vxlan = None;
        assert!(!compatible(&l, &want));
    }

    #[test]
    fn mac_prefix_is_kept() {
        let m = random_mac(&[0x0e, 0x2a]);
        assert_eq!(&m.0[..2], &[0x0e, 0x2a]);
        // The bytes after the prefix are drawn: 64 draws of one free byte
        // are not all the same (odds 256^-63), and the prefix is never touched.
        let draws: std::collections::HashSet<[u8; 6]> =
            (0..64).map(|_| random_mac(&[2, 0, 0, 0, 0]).0).collect();
        assert!(draws.len() > 1, "the last byte is not random");
        assert!(draws.iter().all(|m| m[..5] == [2, 0, 0, 0, 0]));
    }
}
