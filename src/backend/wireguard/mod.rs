//! wireguard: encrypted pod traffic, wire-compatible with upstream's backend.
//!
//! Devices: `flannel-wg` (IPv4) and `flannel-wg-v6` (IPv6) in `Mode: separate`,
//! one `flannel-wg` for both families otherwise. Each holds this node's subnet
//! address, the node's key and listen port, and one route for the whole
//! network (`<Network> dev flannel-wg scope link`); each peer is a WireGuard
//! peer (public key, PSK, endpoint `PublicIP:Port`, allowed-ips = its
//! subnets, keepalive) — desired state like vxlan's routes, diffed against
//! the device's peer list and applied through the reconciler's one path.
//!
//! Unlike upstream, the devices, key and peers are kept across agent restarts
//! (adopted, then diffed), so a restart costs pods nothing. Where the kernel
//! has no WireGuard, an embedded userspace implementation serves the same
//! device name (see [`userspace`]); both speak the same protocol.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use ipnetwork::IpNetwork;

use crate::config::netconf::{NetConf, WgImpl, WgMode, WireguardConf};
use crate::dataplane::model::{Changes, PeerEntries, WgPeer};
use crate::dataplane::netlink::{Devices, Link, Netlink};
use crate::iface::ExternalInterface;
use crate::lease::{BackendData, Lease, WireguardData};

use super::{Backend, Prepared};
use device::{Control, Flavor};
use key::Key;

pub mod device;
pub mod kernel;
pub mod key;
pub mod uapi;
pub mod userspace;

/// Bytes WireGuard adds to a packet (outer IPv6 header 40, UDP 8, type 4,
/// key index 4, nonce 8, tag 16), as upstream subtracts it.
pub const OVERHEAD: u32 = 80;
pub const DEVICE: &str = "flannel-wg";
pub const DEVICE_V6: &str = "flannel-wg-v6";

/// One device and the families it carries.
struct Dev {
    name: &'static str,
    port: u16,
    v4: bool,
    v6: bool,
    link: Option<Link>,
    ctl: Option<Control>,
    /// The running userspace device, when this one is userspace.
    user: Option<userspace::UserDevice>,
}

/// What the drift check reads: per family plane (`v6`), the device's control
/// channel and what it must hold besides the peers (key, port). Replaced when
/// a device is re-created.
#[derive(Clone, Default)]
pub struct Probe {
    pub devices: Arc<RwLock<Vec<ProbeDev>>>,
}

#[derive(Clone)]
pub struct ProbeDev {
    /// The plane whose wanted peers this device holds.
    pub v6: bool,
    /// Compared with what is wanted every check (kernel devices); otherwise read
    /// only for the peer gauges, every [`crate::reconcile::drift::WG_STATS_EVERY`] checks.
    pub check: bool,
    pub ctl: Control,
    pub private: Key,
    pub port: u16,
}

pub struct Wireguard {
    conf: WireguardConf,
    imp: WgImpl,
    v4: bool,
    v6: bool,
    network: Option<IpNetwork>,
    network_v6: Option<IpNetwork>,
    devs: Vec<Dev>,
    key: Option<Key>,
    mtu: u32,
    /// Said once: why userspace serves (the kernel could not create the link).
    fell_back: bool,
    probe: Probe,
}

impl Wireguard {
    pub fn new(conf: WireguardConf, net: &NetConf, imp: WgImpl) -> Wireguard {
        let (v4, v6) = (net.v4.is_some(), net.v6.is_some());
        let dev = |name, port, v4, v6| Dev {
            name,
            port,
            v4,
            v6,
            link: None,
            ctl: None,
            user: None,
        };
        let devs = match conf.mode {
            WgMode::Separate => {
                let mut d = Vec::new();
                if v4 {
                    d.push(dev(DEVICE, conf.listen_port, true, false));
                }
                if v6 {
                    d.push(dev(DEVICE_V6, conf.listen_port_v6, false, true));
                }
                d
            }
            _ => vec![dev(DEVICE, conf.listen_port, v4, v6)],
        };
        Wireguard {
            conf,
            imp,
            v4,
            v6,
            network: net.v4.as_ref().map(|p| p.network),
            network_v6: net.v6.as_ref().map(|p| p.network),
            devs,
            key: None,
            mtu: 0,
            fell_back: false,
            probe: Probe::default(),
        }
    }

    /// The device carrying family `v6`'s traffic.
    fn dev_index(&self, v6: bool) -> Option<usize> {
        self.devs.iter().position(|d| if v6 { d.v6 } else { d.v4 })
    }

    /// Whether family `v6`'s plane holds the device's peers: each family in
    /// `separate`, the first enabled family of the one device otherwise.
    fn owns_peers(&self, v6: bool) -> bool {
        match self.conf.mode {
            WgMode::Separate => true,
            _ => v6 != self.v4,
        }
    }

    /// Which implementations serve the devices (for logs and tests).
    pub fn flavor(&self) -> Option<Flavor> {
        self.devs
            .iter()
            .find_map(|d| d.ctl.as_ref().map(|c| c.flavor()))
    }

    fn publish_probe(&self) {
        let Some(private) = self.key else { return };
        let mut v = Vec::new();
        for d in &self.devs {
            let Some(ctl) = d.ctl.clone() else { continue };
            for v6 in [false, true] {
                let carries = if v6 { d.v6 } else { d.v4 };
                if carries && self.owns_peers(v6) {
                    v.push(ProbeDev {
                        v6,
                        // A userspace device changes only through this agent (its
                        // socket refuses `set`); its loss is a netlink link event.
                        check: ctl.flavor() == Flavor::Kernel,
                        ctl: ctl.clone(),
                        private,
                        port: d.port,
                    });
                }
            }
        }
        *self
            .probe
            .devices
            .write()
            .unwrap_or_else(|e| e.into_inner()) = v;
    }

    /// Finds, adopts or creates device `i`; true if it was (re)created.
    async fn ensure_device(&mut self, nl: &Netlink, i: usize) -> anyhow::Result<bool> {
        let name = self.devs[i].name;
        let existing = nl.link_by_name(name).await?;
        let ours_user = self.devs[i].user.is_some();
        match existing {
            Some(l) if l.kind.as_deref() == Some("wireguard") => {
                if !matches!(self.devs[i].ctl, Some(Control::Kernel(_)))
                    || self.devs[i].link.as_ref().map(|x| x.index) != Some(l.index)
                {
                    tracing::info!(
                        "adopting the kernel WireGuard device {name} (index {})",
                        l.index
                    );
                    self.devs[i].ctl = Some(Control::Kernel(kernel::Genl::connect(name)?));
                }
                self.finish_link(nl, i, l).await?;
                return Ok(false);
            }
            Some(l) if ours_user && l.kind.as_deref() == Some("tun") => {
                if self.devs[i].link.as_ref().map(|x| x.index) == Some(l.index) {
                    self.finish_link(nl, i, l).await?;
                    return Ok(false);
                }
                // Our TUN was replaced by someone else's of the same name.
                tracing::warn!("{name} is not the TUN of our userspace WireGuard; re-creating it");
                nl.delete_link(l.index).await?;
            }
            Some(l) => {
                tracing::warn!(
                    "{name} exists as a {} device; re-creating it as WireGuard",
                    l.kind.as_deref().unwrap_or("unknown")
                );
                nl.delete_link(l.index).await?;
            }
            None => {}
        }
        if let Some(u) = self.devs[i].user.take() {
            tracing::warn!("the userspace WireGuard device {name} went away; starting it again");
            u.stop().await;
        }
        self.devs[i].ctl = None;
        self.create(nl, i).await?;
        let l = nl
            .link_by_name(name)
            .await?
            .with_context(|| format!("{name} vanished after creation"))?;
        tracing::info!(
            "created {} WireGuard device {name} (index {}, MTU {})",
            self.flavor().map(Flavor::name).unwrap_or("?"),
            l.index,
            self.mtu
        );
        self.finish_link(nl, i, l).await?;
        Ok(true)
    }

    /// Creates device `i` as the override (or the kernel, then userspace) says.
    async fn create(&mut self, nl: &Netlink, i: usize) -> anyhow::Result<()> {
        let name = self.devs[i].name;
        if self.imp != WgImpl::Userspace && !(self.imp == WgImpl::Auto && self.fell_back) {
            match nl.create_wireguard(name, self.mtu).await {
                Ok(()) => {
                    self.devs[i].ctl = Some(Control::Kernel(kernel::Genl::connect(name)?));
                    return Ok(());
                }
                Err(e) if e.errno() == Some(libc::EEXIST) => {
                    self.devs[i].ctl = Some(Control::Kernel(kernel::Genl::connect(name)?));
                    return Ok(());
                }
                Err(e) if self.imp == WgImpl::Kernel => {
                    return Err(e)
                        .context("creating the kernel WireGuard device (FLANNEL_WG_IMPL=kernel)")
                }
                Err(e) => {
                    tracing::warn!(
                        "the kernel cannot create WireGuard devices ({e}); using the embedded \
                         userspace WireGuard (same protocol; set FLANNEL_WG_IMPL=kernel to refuse)"
                    );
                    self.fell_back = true;
                }
            }
        }
        let u = userspace::start(name)?;
        self.devs[i].ctl = Some(Control::Userspace(u.uapi.clone()));
        self.devs[i].user = Some(u);
        Ok(())
    }

    async fn finish_link(&mut self, nl: &Netlink, i: usize, mut l: Link) -> anyhow::Result<()> {
        if l.mtu != self.mtu {
            nl.set_mtu(l.index, self.mtu).await?;
            l.mtu = self.mtu;
        }
        self.devs[i].link = Some(l);
        Ok(())
    }

    /// Device `i` holds our key and port; restores them if changed.
    async fn ensure_identity(&mut self, i: usize) -> anyhow::Result<()> {
        let key = self.key.context("no key loaded")?;
        let d = &self.devs[i];
        let ctl = d.ctl.as_ref().context("no control channel")?;
        let st = ctl.get().await?;
        if !st.holds_key(&key) || st.listen_port != d.port {
            if st.private_key.is_some() || st.public_key.is_some() {
                tracing::warn!(
                    "{} holds another key or port ({}); restoring ours",
                    d.name,
                    st.listen_port
                );
            }
            ctl.set_device(&key, d.port).await?;
        }
        Ok(())
    }

    /// Addresses, link up and the network route of device `i`.
    async fn ensure_addressing(
        &mut self,
        nl: &Netlink,
        i: usize,
        own: &Lease,
    ) -> anyhow::Result<()> {
        let Some(mut link) = self.devs[i].link.clone() else {
            return Ok(());
        };
        let mut want = Vec::new();
        if self.devs[i].v4 {
            if let (Some(s), Some(n)) = (own.subnet, self.network) {
                want.push((IpNetwork::new(s.network(), 32)?, n));
            }
        }
        if self.devs[i].v6 {
            if let (Some(s), Some(n)) = (own.ipv6_subnet, self.network_v6) {
                want.push((IpNetwork::new(s.network(), 128)?, n));
            }
        }
        let have = nl.addresses(link.index).await?;
        for a in &have {
            let wanted = want.iter().any(|(w, _)| w == a);
            if !wanted && !crate::subnet::is_link_local(a.ip()) {
                tracing::info!("removing stale address {a} from {}", link.name);
                nl.del_address(link.index, *a).await?;
            }
        }
        for (w, _) in &want {
            if !have.contains(w) {
                nl.add_address(link.index, *w).await?;
            }
        }
        if !link.up {
            nl.set_up(link.index).await?;
            link.up = true;
        }
        for (_, network) in &want {
            if !nl.has_device_route(*network, link.index).await? {
                nl.set_device_route(*network, link.index)
                    .await
                    .with_context(|| format!("routing {network} through {}", link.name))?;
            }
        }
        self.devs[i].link = Some(link);
        Ok(())
    }

    /// Pure: the WireGuard peer for a lease, on the plane that holds peers.
    fn peer(
        &self,
        ext: &ExternalInterface,
        lease: &Lease,
        v6: bool,
    ) -> Result<Option<(Key, WgPeer)>, String> {
        let v4_sub = lease.subnet.filter(|_| self.v4);
        let v6_sub = lease.ipv6_subnet.filter(|_| self.v6);
        let data = |d: Option<&BackendData>| -> Result<Option<WireguardData>, String> {
            match d {
                None => Ok(None),
                Some(BackendData::Wireguard(w)) => Ok(Some(*w)),
                Some(other) => Err(format!(
                    "backend-data of type {} where wireguard's was expected",
                    other.type_name()
                )),
            }
        };
        let d4 = if v4_sub.is_some() {
            data(Some(&lease.backend))?
        } else {
            None
        };
        let d6 = if v6_sub.is_some() {
            data(lease.backend_v6.as_ref().or(Some(&lease.backend)))?
        } else {
            None
        };
        let ep4 = |d: &WireguardData, own_port: u16| {
            lease
                .public_ip
                .map(|ip| SocketAddr::new(IpAddr::V4(ip), d.port.unwrap_or(own_port)))
        };
        let ep6 = |d: &WireguardData, own_port: u16| {
            lease
                .public_ipv6
                .map(|ip| SocketAddr::new(IpAddr::V6(ip), d.port.unwrap_or(own_port)))
        };
        let psk = self.conf.psk.map(Key);
        let keepalive = self.conf.keepalive;
        let made = |k: Key, endpoint: Option<SocketAddr>, nets: Vec<IpNetwork>| {
            let endpoint =
                endpoint.ok_or_else(|| "no public address for its endpoint".to_string())?;
            Ok(Some((
                k,
                WgPeer {
                    endpoint,
                    allowed: WgPeer::allowed_of(nets),
                    psk,
                    keepalive,
                },
            )))
        };
        if self.conf.mode == WgMode::Separate {
            return match (v6, d4, d6) {
                (false, Some(d), _) => made(
                    d.public_key,
                    ep4(&d, self.conf.listen_port),
                    v4_sub.into_iter().collect(),
                ),
                (true, _, Some(d)) => made(
                    d.public_key,
                    ep6(&d, self.conf.listen_port_v6),
                    v6_sub.into_iter().collect(),
                ),
                _ => Ok(None),
            };
        }
        if !self.owns_peers(v6) {
            return Ok(None);
        }
        let Some(any) = d4.or(d6) else {
            return Ok(None);
        };
        let nets: Vec<IpNetwork> = v4_sub.into_iter().chain(v6_sub).collect();
        let port = self.conf.listen_port;
        let use_v6 = match self.conf.mode {
            WgMode::Ipv4 => false,
            WgMode::Ipv6 => true,
            _ => select_v6(lease.public_ip, lease.public_ipv6, ext),
        };
        let endpoint = if use_v6 {
            ep6(&d6.unwrap_or(any), port)
        } else {
            ep4(&d4.unwrap_or(any), port)
        };
        made(any.public_key, endpoint, nets)
    }
}

/// `Mode: auto`: reach a peer over IPv6 only when its IPv4 is private and
/// both its IPv6 and ours are public (upstream's rule).
pub fn select_v6(ip4: Option<Ipv4Addr>, ip6: Option<Ipv6Addr>, ext: &ExternalInterface) -> bool {
    let Some(ip6) = ip6 else { return false };
    if ip4.is_some_and(|a| !a.is_private()) && ext.public_ip.is_some() {
        return false;
    }
    let ours_public = ext.public_ipv6.is_some_and(|a| !private6(a));
    !private6(ip6) && ours_public
}

/// Go's `IsPrivate` for IPv6: fc00::/7.
fn private6(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xfe00 == 0xfc00
}

impl Backend for Wireguard {
    fn type_name(&self) -> &'static str {
        "wireguard"
    }

    async fn prepare(&mut self, nl: &Netlink, ext: &ExternalInterface) -> anyhow::Result<Prepared> {
        let path = key::key_file();
        let (k, created) = key::load_or_create(&path)?;
        if created {
            tracing::info!("generated a new WireGuard key in {}", path.display());
        }
        self.key = Some(k);
        let base = self.conf.mtu.unwrap_or(ext.mtu);
        self.mtu = base
            .checked_sub(OVERHEAD)
            .filter(|m| *m >= 68)
            .with_context(|| {
                format!("MTU {base} leaves no room for WireGuard's {OVERHEAD} bytes")
            })?;
        for i in 0..self.devs.len() {
            self.ensure_device(nl, i).await?;
            self.ensure_identity(i).await?;
        }
        self.publish_probe();
        let public = k.public();
        let data = |port| {
            BackendData::Wireguard(WireguardData {
                public_key: public,
                port: Some(port),
            })
        };
        let p4 = self.dev_index(false).map(|i| self.devs[i].port);
        let p6 = self.dev_index(true).map(|i| self.devs[i].port);
        let first = p4.or(p6).context("neither IPv4 nor IPv6 is enabled")?;
        tracing::info!(
            "WireGuard public key {public} ({}), listening on {}",
            self.flavor().map(Flavor::name).unwrap_or("?"),
            [p4, p6]
                .iter()
                .flatten()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Prepared {
            mtu: self.mtu,
            data: data(first),
            data_v6: p6.map(data),
        })
    }

    async fn configure(
        &mut self,
        nl: &Netlink,
        _ext: &ExternalInterface,
        own: &Lease,
    ) -> anyhow::Result<bool> {
        let mut changed = false;
        for i in 0..self.devs.len() {
            changed |= self.ensure_device(nl, i).await?;
            self.ensure_identity(i).await?;
            self.ensure_addressing(nl, i, own).await?;
        }
        if changed {
            self.publish_probe();
        }
        Ok(changed)
    }

    fn wg_probe(&self) -> Option<Probe> {
        Some(self.probe.clone())
    }

    fn devices(&self, ext: &ExternalInterface, v6: bool) -> Devices {
        Devices {
            overlay: self
                .dev_index(v6)
                .and_then(|i| self.devs[i].link.as_ref())
                .map(|l| l.index),
            underlay: ext.index,
            network_route: true,
        }
    }

    fn entries(
        &self,
        ext: &ExternalInterface,
        lease: &Lease,
        v6: bool,
    ) -> Result<Option<PeerEntries>, String> {
        Ok(self.peer(ext, lease, v6)?.map(|p| PeerEntries {
            wg: Some(p),
            ..Default::default()
        }))
    }

    async fn observe_peers(&mut self, v6: bool) -> anyhow::Result<BTreeMap<Key, WgPeer>> {
        if !self.owns_peers(v6) {
            return Ok(BTreeMap::new());
        }
        let Some(ctl) = self.dev_index(v6).and_then(|i| self.devs[i].ctl.clone()) else {
            return Ok(BTreeMap::new());
        };
        Ok(ctl.get().await?.peers)
    }

    async fn apply_peers(&mut self, v6: bool, c: &Changes<Key, WgPeer>) -> Vec<String> {
        if c.is_empty() {
            return vec![];
        }
        let Some(ctl) = self.dev_index(v6).and_then(|i| self.devs[i].ctl.clone()) else {
            return vec![format!(
                "no WireGuard device for {} peers",
                if v6 { "IPv6" } else { "IPv4" }
            )];
        };
        ctl.set_peers(c).await
    }
}

#[cfg(test)]
mod tests;
