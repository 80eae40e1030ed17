//! The one place that talks rtnetlink: links, addresses, and the
//! routes/neighbours/FDB entries of [`model::State`], read in one dump per kind
//! and changed with pipelined requests over a single socket.

use std::net::IpAddr;
use std::sync::Arc;

use futures::{stream, StreamExt, TryStreamExt};
use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoIpTunnel, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    Handle, LinkIpIp, LinkMessageBuilder, LinkUnspec, LinkVxlan, LinkWireguard, RouteMessageBuilder,
};

use super::model::{Dev, Diff, Observed, Route};
use crate::lease::Mac;
use crate::subnet;

/// How many requests are in flight at once on the socket.
const PIPELINE: usize = 256;

#[derive(Debug, thiserror::Error)]
#[error("netlink: {op} {target}: {source}")]
pub struct NetlinkError {
    pub op: &'static str,
    pub target: String,
    #[source]
    pub source: rtnetlink::Error,
}

impl NetlinkError {
    /// The kernel's errno, if the kernel answered with one.
    pub fn errno(&self) -> Option<i32> {
        match &self.source {
            rtnetlink::Error::NetlinkError(e) => e.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

fn nlerr(op: &'static str, target: impl ToString) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError {
        op,
        target: target.to_string(),
        source,
    }
}

/// VXLAN attributes that decide whether an existing device can be reused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanAttrs {
    pub vni: u32,
    pub local: Option<IpAddr>,
    pub underlay: Option<u32>,
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
}

/// What we need to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub up: bool,
    pub kind: Option<String>,
    pub vxlan: Option<VxlanAttrs>,
    /// An ipip link's endpoints (None: any).
    pub iptun: Option<(Option<IpAddr>, Option<IpAddr>)>,
}

fn parse_link(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
        vxlan: None,
        iptun: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Address(b) if b.len() == 6 => {
                l.mac = Some(Mac([b[0], b[1], b[2], b[3], b[4], b[5]]))
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut x = VxlanAttrs::default();
                            for a in v {
                                match a {
                                    InfoVxlan::Id(id) => x.vni = *id,
                                    InfoVxlan::Local(ip) => x.local = Some(IpAddr::V4(*ip)),
                                    InfoVxlan::Local6(ip) => x.local = Some(IpAddr::V6(*ip)),
                                    InfoVxlan::Link(i) => x.underlay = Some(*i),
                                    InfoVxlan::Port(p) => x.port = *p,
                                    InfoVxlan::Gbp => x.gbp = true,
                                    InfoVxlan::Learning(b) => x.learning = *b,
                                    _ => {}
                                }
                            }
                            l.vxlan = Some(x);
                        }
                        LinkInfo::Data(InfoData::IpTunnel(t)) => {
                            let (mut local, mut remote) = (None, None);
                            for a in t {
                                match a {
                                    InfoIpTunnel::Local(ip) if !ip.is_unspecified() => {
                                        local = Some(*ip)
                                    }
                                    InfoIpTunnel::Remote(ip) if !ip.is_unspecified() => {
                                        remote = Some(*ip)
                                    }
                                    _ => {}
                                }
                            }
                            l.iptun = Some((local, remote));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}

/// What to create a VXLAN device with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub attrs: VxlanAttrs,
    pub mac: Option<Mac>,
    pub mtu: Option<u32>,
}

/// The devices a [`model::State`]'s entries live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Devices {
    /// The flannel VXLAN device (absent for host-gw).
    pub overlay: Option<u32>,
    pub underlay: u32,
    /// The overlay device carries `<Network> dev <overlay>` (wireguard: one
    /// route for all peers, kept by the backend's device repair).
    pub network_route: bool,
}

impl Devices {
    fn index(&self, d: Dev) -> Option<u32> {
        match d {
            Dev::Overlay => self.overlay,
            Dev::Underlay => Some(self.underlay),
            Dev::Blackhole => None,
        }
    }
}

/// Which routes are ours: destinations inside `network` other than `own`.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    pub network: IpNetwork,
    pub own: IpNetwork,
    /// `--ip-blackhole-route`: `blackhole <own>` is ours too.
    pub blackhole: bool,
}

/// Results of applying a diff: how many requests went out, and which failed.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub done: usize,
    pub failed: Vec<NetlinkError>,
    /// Requests sent, by operation ("set route", "delete fdb", ...).
    pub sent: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    /// The socket's connection task: it ends when the socket fails, and every
    /// request after that fails too (see [`Netlink::alive`]).
    conn: Arc<tokio::task::JoinHandle<()>>,
}

fn addr_of(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(v) => RouteAddress::Inet(v),
        IpAddr::V6(v) => RouteAddress::Inet6(v),
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn neigh_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v) => Some(IpAddr::V4(*v)),
        NeighbourAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        // FDB entries (AF_BRIDGE) carry the remote's address without a family.
        NeighbourAddress::Other(b) => match b.len() {
            4 => Some(IpAddr::V4(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
            16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(b);
                Some(IpAddr::V6(std::net::Ipv6Addr::from(a)))
            }
            _ => None,
        },
        _ => None,
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

impl Netlink {
    /// Opens a route netlink socket in the current network namespace.
    pub fn connect() -> std::io::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let conn = Arc::new(tokio::spawn(conn));
        Ok(Netlink { handle, conn })
    }

    /// Whether the connection still serves requests. When it does not, the
    /// owner opens a new one ([`Netlink::connect`]).
    pub fn alive(&self) -> bool {
        !self.conn.is_finished()
    }

    /// Ends the connection as a failed socket would (for tests of the recovery).
    #[doc(hidden)]
    pub fn break_connection(&self) {
        self.conn.abort();
    }

    async fn request(&self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut resp = self.handle.clone().request(req)?;
        while let Some(m) = resp.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
        Ok(())
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nlerr("dump", "links"))?;
        Ok(msgs.iter().map(parse_link).collect())
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        match self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
        {
            Ok(m) => Ok(m.as_ref().map(parse_link)),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.map(|c| -c.get()) == Some(libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(e) => Err(nlerr("get link", name)(e)),
        }
    }

    pub async fn create_vxlan(&self, s: &VxlanSpec) -> Result<(), NetlinkError> {
        let mut b = LinkVxlan::new(&s.name, s.attrs.vni)
            .learning(s.attrs.learning)
            .proxy(false)
            .rsc(false)
            .l2miss(false)
            .l3miss(false);
        if let Some(u) = s.attrs.underlay {
            b = b.dev(u);
        }
        match s.attrs.local {
            Some(IpAddr::V4(v)) => b = b.local(v),
            Some(IpAddr::V6(v)) => b = b.local6(v),
            None => {}
        }
        if s.attrs.port != 0 {
            b = b.port(s.attrs.port);
        }
        if s.attrs.gbp {
            b = b.gbp();
        }
        if let Some(m) = s.mac {
            b = b.address(m.0.to_vec());
        }
        if let Some(mtu) = s.mtu {
            b = b.mtu(mtu);
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(nlerr("create vxlan", &s.name))
    }

    /// `ip link add <name> type ipip local <local> mtu <mtu>` (fails where the
    /// kernel has no ipip module).
    pub async fn create_ipip(
        &self,
        name: &str,
        local: std::net::Ipv4Addr,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(LinkIpIp::new(name).local(local).mtu(mtu).build())
            .execute()
            .await
            .map_err(nlerr("create ipip", name))
    }

    /// Creates a kernel WireGuard link (fails with EOPNOTSUPP/ENODEV where the
    /// kernel has no wireguard module).
    pub async fn create_wireguard(&self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(LinkWireguard::new(name).mtu(mtu).build())
            .execute()
            .await
            .map_err(nlerr("create wireguard", name))
    }

    /// `ip route replace <dst> dev <index> scope link proto 70`: a whole
    /// network through a device (the wireguard backend's one route).
    pub async fn set_device_route(&self, dst: IpNetwork, index: u32) -> Result<(), NetlinkError> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(dst.ip());
        m.header.destination_prefix_length = dst.prefix();
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
        m.header.scope = RouteScope::Link;
        m.header.kind = RouteType::Unicast;
        m.attributes
            .push(RouteAttribute::Destination(addr_of(dst.network())));
        m.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|source| NetlinkError {
            op: "set route",
            target: dst.to_string(),
            source,
        })
    }

    /// Whether the main table routes exactly `dst` through device `index`.
    pub async fn has_device_route(&self, dst: IpNetwork, index: u32) -> Result<bool, NetlinkError> {
        let msg = if dst.is_ipv6() {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let mut routes = self.handle.route().get(msg).execute();
        while let Some(r) = routes.try_next().await.map_err(nlerr("dump", "routes"))? {
            if r.header.table != RouteHeader::RT_TABLE_MAIN
                || r.header.destination_prefix_length != dst.prefix()
            {
                continue;
            }
            let mut d = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(x) => d = route_ip(x),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if d == Some(dst.network()) && oif == Some(index) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nlerr("delete link", index))
    }

    pub async fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .up()
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nlerr("set up", index))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .mtu(mtu)
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nlerr("set mtu", index))
    }

    pub async fn set_mac(&self, index: u32, mac: Mac) -> Result<(), NetlinkError> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .address(mac.0.to_vec())
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nlerr("set mac", index))
    }

    /// Addresses on a link (prefix form, host bits kept).
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>, NetlinkError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nlerr("dump addresses of", index))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = ip.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                IpNetwork::new(ip, m.header.prefix_len).ok()
            })
            .collect())
    }

    pub async fn add_address(&self, index: u32, a: IpNetwork) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .add(index, a.ip(), a.prefix())
            .execute()
            .await
            .map_err(nlerr("add address", a))
    }

    pub async fn del_address(&self, index: u32, a: IpNetwork) -> Result<(), NetlinkError> {
        let mut m = AddressMessage::default();
        m.header.family = family(a.ip());
        m.header.prefix_len = a.prefix();
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(a.ip()));
        m.attributes.push(AddressAttribute::Address(a.ip()));
        self.handle
            .address()
            .del(m)
            .execute()
            .await
            .map_err(nlerr("delete address", a))
    }

    /// `ip route get <dst>`: the output interface and gateway, if any.
    pub async fn route_get(
        &self,
        dst: IpAddr,
    ) -> Result<Option<(u32, Option<IpAddr>)>, NetlinkError> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(dst);
        m.header.destination_prefix_length = subnet::width(dst);
        m.attributes.push(RouteAttribute::Destination(addr_of(dst)));
        let r = self.handle.route().get(m).execute().try_next().await;
        let r = match r {
            Ok(r) => r,
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.map(|c| -c.get()) == Some(libc::ENETUNREACH) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(nlerr("route get", dst)(e)),
        };
        Ok(r.and_then(|m| {
            let oif = m.attributes.iter().find_map(|a| {
                if let RouteAttribute::Oif(i) = a {
                    Some(*i)
                } else {
                    None
                }
            })?;
            let gw = m.attributes.iter().find_map(|a| {
                if let RouteAttribute::Gateway(g) = a {
                    route_ip(g)
                } else {
                    None
                }
            });
            Some((oif, gw))
        }))
    }

    /// Default-route interface index for the family of `like`.
    pub async fn default_route_link(&self, v6: bool) -> Result<Option<u32>, NetlinkError> {
        let msg = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(nlerr("dump", "routes"))?;
        Ok(routes
            .iter()
            .filter(|r| {
                r.header.destination_prefix_length == 0
                    && r.header.table == RouteHeader::RT_TABLE_MAIN
            })
            .find_map(|r| {
                r.attributes.iter().find_map(|a| {
                    if let RouteAttribute::Oif(i) = a {
                        Some(*i)
                    } else {
                        None
                    }
                })
            }))
    }

    /// Reads the entries this agent owns for one address family. Routes are
    /// ours by their protocol ([`ROUTE_PROTOCOL`]); an operator's route in the
    /// same range is left alone. With `adopt` (the first full check after
    /// start), when the kernel holds none of ours, upstream-shaped routes of
    /// upstream's protocol are taken over too (a node migrating from upstream
    /// flanneld: its stale peers' routes are removed, the rest rewritten as ours).
    pub async fn observe(
        &self,
        dev: Devices,
        scope: Scope,
        adopt: bool,
    ) -> Result<Observed, NetlinkError> {
        let v6 = scope.network.is_ipv6();
        let msg = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let mut obs = Observed::default();
        let mut upstream: Vec<(IpNetwork, Route)> = Vec::new();
        let mut ours = 0usize;
        let mut routes = self.handle.route().get(msg).execute();
        while let Some(r) = routes.try_next().await.map_err(nlerr("dump", "routes"))? {
            if r.header.table != RouteHeader::RT_TABLE_MAIN {
                continue;
            }
            if r.header.kind == RouteType::BlackHole {
                if scope.blackhole && is_own_blackhole(&r, scope) {
                    obs.state.routes.insert(scope.own, Route::blackhole(v6));
                }
                continue;
            }
            if r.header.kind != RouteType::Unicast {
                continue;
            }
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_ip(d),
                    RouteAttribute::Gateway(g) => gw = route_ip(g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let (Some(dst), Some(oif)) = (dst, oif) else {
                continue;
            };
            let Ok(net) = IpNetwork::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            if !subnet::is_proper_subnet(&scope.network, &net) || subnet::overlaps(&net, &scope.own)
            {
                continue;
            }
            let dev_kind = if Some(oif) == dev.overlay {
                Dev::Overlay
            } else if oif == dev.underlay && gw.is_some() {
                Dev::Underlay
            } else {
                continue;
            };
            let Some(via) = gw else { continue };
            let route = Route {
                via,
                dev: dev_kind,
                onlink: r.header.flags.contains(RouteFlags::Onlink),
                adopted: false,
            };
            if r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
                ours += 1;
                obs.state.routes.insert(net, route);
            } else if adopt && r.header.protocol == RouteProtocol::Boot {
                upstream.push((
                    net,
                    Route {
                        adopted: true,
                        ..route
                    },
                ));
            }
        }
        if ours == 0 && !upstream.is_empty() {
            tracing::info!(
                "taking over {} routes of upstream's shape in {} (first start after upstream flanneld)",
                upstream.len(),
                scope.network
            );
            obs.state.routes.extend(upstream);
        }
        let Some(overlay) = dev.overlay else {
            return Ok(obs);
        };
        let fam = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let mut neighs = self
            .handle
            .neighbours()
            .get()
            .set_address_family(fam)
            .execute();
        while let Some(n) = neighs
            .try_next()
            .await
            .map_err(nlerr("dump", "neighbours"))?
        {
            if n.header.ifindex != overlay || n.header.state != NeighbourState::Permanent {
                continue;
            }
            let (ip, mac) = neigh_fields(&n);
            if let (Some(ip), Some(mac)) = (ip, mac) {
                obs.state.neighs.insert(ip, mac);
            }
        }
        let mut fdb = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        while let Some(n) = fdb.try_next().await.map_err(nlerr("dump", "fdb"))? {
            if n.header.ifindex != overlay || !n.header.flags.contains(NeighbourFlags::Own) {
                continue;
            }
            let (ip, mac) = neigh_fields(&n);
            let (Some(ip), Some(mac)) = (ip, mac) else {
                continue;
            };
            if ip.is_ipv6() != v6 || mac.0 == [0; 6] {
                continue;
            }
            obs.fdb_all.push((mac, ip));
            obs.state.fdb.entry(mac).or_insert(ip);
        }
        Ok(obs)
    }

    fn route_msg(&self, dst: IpNetwork, r: Option<&Route>, dev: Devices) -> Option<RouteMessage> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(dst.ip());
        m.header.destination_prefix_length = dst.prefix();
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        // Our own protocol marks our routes (upstream writes RTPROT_BOOT, which
        // an operator's `ip route add` also gets); an adopted one is deleted
        // under the protocol it has.
        m.header.protocol = if r.is_some_and(|r| r.adopted) {
            RouteProtocol::Boot
        } else {
            RouteProtocol::Other(ROUTE_PROTOCOL)
        };
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes
            .push(RouteAttribute::Destination(addr_of(dst.network())));
        if r.is_some_and(|r| r.dev == Dev::Blackhole) {
            m.header.kind = RouteType::BlackHole;
            m.attributes
                .push(RouteAttribute::Priority(BLACKHOLE_METRIC));
            return Some(m);
        }
        if let Some(r) = r {
            m.attributes.push(RouteAttribute::Gateway(addr_of(r.via)));
            m.attributes.push(RouteAttribute::Oif(dev.index(r.dev)?));
            if r.onlink {
                m.header.flags.insert(RouteFlags::Onlink);
            }
        }
        Some(m)
    }

    fn neigh_msg(index: u32, ip: IpAddr, mac: Mac) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip);
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.kind = RouteType::Unspec;
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v) => NeighbourAddress::Inet(v),
            IpAddr::V6(v) => NeighbourAddress::Inet6(v),
        }));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        m
    }

    fn fdb_msg(index: u32, mac: Mac, dst: IpAddr) -> NeighbourMessage {
        let mut m = Self::neigh_msg(index, dst, mac);
        m.header.family = AddressFamily::Bridge;
        m.header.flags = NeighbourFlags::Own;
        m
    }

    /// Applies a diff: removals first, then neighbours and FDB entries, then the
    /// routes that use them. Failures are collected, not fatal: the next
    /// reconcile retries whatever is still missing.
    pub async fn apply(&self, d: &Diff, dev: Devices) -> ApplyReport {
        type Op = (RouteNetlinkMessage, u16, &'static str, String);
        let mut report = ApplyReport::default();
        let replace = NLM_F_CREATE | NLM_F_REPLACE;
        let mut dels: Vec<Op> = Vec::new();
        for (dst, r) in &d.routes.del {
            if let Some(m) = self.route_msg(*dst, Some(r), dev) {
                dels.push((
                    RouteNetlinkMessage::DelRoute(m),
                    0,
                    "delete route",
                    dst.to_string(),
                ));
            }
        }
        if let Some(o) = dev.overlay {
            for (ip, mac) in &d.neighs.del {
                dels.push((
                    RouteNetlinkMessage::DelNeighbour(Self::neigh_msg(o, *ip, *mac)),
                    0,
                    "delete neighbour",
                    ip.to_string(),
                ));
            }
            for (mac, ip) in d.fdb.del.iter().chain(d.fdb_extra.iter()) {
                dels.push((
                    RouteNetlinkMessage::DelNeighbour(Self::fdb_msg(o, *mac, *ip)),
                    0,
                    "delete fdb",
                    format!("{mac} dst {ip}"),
                ));
            }
        }
        let mut l2: Vec<Op> = Vec::new();
        if let Some(o) = dev.overlay {
            for (ip, mac) in &d.neighs.set {
                l2.push((
                    RouteNetlinkMessage::NewNeighbour(Self::neigh_msg(o, *ip, *mac)),
                    replace,
                    "set neighbour",
                    ip.to_string(),
                ));
            }
            for (mac, ip) in &d.fdb.set {
                l2.push((
                    RouteNetlinkMessage::NewNeighbour(Self::fdb_msg(o, *mac, *ip)),
                    replace,
                    "set fdb",
                    format!("{mac} dst {ip}"),
                ));
            }
        }
        let mut l3: Vec<Op> = Vec::new();
        for (dst, r) in &d.routes.set {
            if let Some(m) = self.route_msg(*dst, Some(r), dev) {
                l3.push((
                    RouteNetlinkMessage::NewRoute(m),
                    replace,
                    "set route",
                    dst.to_string(),
                ));
            }
        }
        for batch in [dels, l2, l3] {
            let results: Vec<_> = stream::iter(batch)
                .map(|(msg, flags, op, target)| async move {
                    let r = self.request(msg, flags).await;
                    (r, op, target)
                })
                .buffer_unordered(PIPELINE)
                .collect()
                .await;
            for (r, op, target) in results {
                report.done += 1;
                *report.sent.entry(op).or_default() += 1;
                if let Err(source) = r {
                    let e = NetlinkError { op, target, source };
                    // Deleting what is already gone is success.
                    if op.starts_with("delete")
                        && matches!(e.errno(), Some(libc::ENOENT) | Some(libc::ESRCH))
                    {
                        continue;
                    }
                    report.failed.push(e);
                }
            }
        }
        report
    }
}

fn neigh_fields(n: &NeighbourMessage) -> (Option<IpAddr>, Option<Mac>) {
    let mut ip = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(d) => ip = neigh_ip(d),
            NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                mac = Some(Mac([b[0], b[1], b[2], b[3], b[4], b[5]]))
            }
            _ => {}
        }
    }
    (ip, mac)
}

/// The route protocol (`ip route` shows `proto 70`) that marks a route as this
/// agent's: routes in the Network's range without it are someone else's.
pub const ROUTE_PROTOCOL: u8 = 70;

/// The blackhole route's metric: the lowest priority there is, so it never
/// collides with (or, being written with NLM_F_REPLACE, replaces) the bridge's
/// connected route for the same subnet; it only decides where nothing else does.
pub const BLACKHOLE_METRIC: u32 = u32::MAX;

/// A blackhole route in the main table whose destination is exactly our subnet.
fn is_own_blackhole(r: &RouteMessage, scope: Scope) -> bool {
    r.header.table == RouteHeader::RT_TABLE_MAIN
        && r.header.kind == RouteType::BlackHole
        && r.header.destination_prefix_length == scope.own.prefix()
        && r.attributes.iter().any(|a| match a {
            RouteAttribute::Destination(d) => route_ip(d) == Some(scope.own.network()),
            _ => false,
        })
}

/// Whether a netlink notification shows the kernel deviating from `want`: an
/// entry we want was removed or changed, or the device went away or down.
/// The echoes of our own changes match `want` and are not deviations, so they
/// cost no kernel re-read.
pub fn deviates(
    msg: &RouteNetlinkMessage,
    want: &super::model::State,
    dev: Devices,
    scope: Scope,
) -> bool {
    let overlay = dev.overlay.unwrap_or(0);
    match msg {
        // Any change to our device or the underlay (down/up, MAC, deleted, an
        // address added or removed): the kernel drops routes through a link that
        // goes down without one deletion message per route, so re-check it all.
        RouteNetlinkMessage::DelLink(l) | RouteNetlinkMessage::NewLink(l) => {
            l.header.index == overlay || l.header.index == dev.underlay
        }
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
            a.header.index == overlay || a.header.index == dev.underlay
        }
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
            if r.header.table != RouteHeader::RT_TABLE_MAIN {
                return false;
            }
            let (mut dst, mut gw, mut oif) = (None, None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_ip(d),
                    RouteAttribute::Gateway(g) => gw = route_ip(g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if r.header.kind == RouteType::BlackHole {
                // Only ours (`--ip-blackhole-route`) matters, and only its removal.
                return scope.blackhole
                    && is_own_blackhole(r, scope)
                    && matches!(msg, RouteNetlinkMessage::DelRoute(_))
                    && want.routes.contains_key(&scope.own);
            }
            let Some(net) =
                dst.and_then(|d| IpNetwork::new(d, r.header.destination_prefix_length).ok())
            else {
                return false;
            };
            // The whole network through the overlay device (wireguard's one
            // route) removed or rerouted: the device's repair puts it back.
            if net == scope.network && dev.overlay.is_some() {
                return match msg {
                    RouteNetlinkMessage::DelRoute(_) => oif == dev.overlay,
                    _ => false,
                } && dev.network_route;
            }
            if !subnet::is_proper_subnet(&scope.network, &net) || subnet::overlaps(&net, &scope.own)
            {
                return false;
            }
            let wanted = want.routes.get(&net);
            if matches!(msg, RouteNetlinkMessage::DelRoute(_)) {
                return wanted.is_some();
            }
            let dev_kind = if oif.is_some() && oif == dev.overlay {
                Some(Dev::Overlay)
            } else if oif == Some(dev.underlay) {
                Some(Dev::Underlay)
            } else {
                None
            };
            let seen = gw.zip(dev_kind).map(|(via, d)| Route {
                via,
                dev: d,
                onlink: r.header.flags.contains(RouteFlags::Onlink),
                adopted: false,
            });
            let mine = r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL);
            // One of ours that we do not want, or a wanted destination whose
            // route differs from ours; someone else's route elsewhere is theirs.
            match wanted {
                Some(w) => seen.as_ref() != Some(w) || !mine,
                None => mine && dev_kind.is_some(),
            }
        }
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            if n.header.ifindex != overlay {
                return false;
            }
            let del = matches!(msg, RouteNetlinkMessage::DelNeighbour(_));
            let (ip, mac) = neigh_fields(n);
            let (Some(ip), Some(mac)) = (ip, mac) else {
                return del;
            };
            if n.header.family == AddressFamily::Bridge {
                let ours = want.fdb.get(&mac) == Some(&ip);
                return if del { ours } else { !ours && mac.0 != [0; 6] };
            }
            if del {
                return want.neighs.contains_key(&ip);
            }
            n.header.state == NeighbourState::Permanent && want.neighs.get(&ip) != Some(&mac)
                || n.header.state != NeighbourState::Permanent && want.neighs.contains_key(&ip)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose task ended (as when its socket fails) is seen as dead,
    /// fails requests, and a new one serves them: what the reconciler's
    /// `revive_netlink` relies on before every pass. Reads links only.
    #[tokio::test]
    async fn a_dead_connection_is_seen_and_a_new_one_works() {
        let nl = Netlink::connect().unwrap();
        assert!(nl.alive());
        assert!(!nl.links().await.unwrap().is_empty());
        nl.break_connection();
        tokio::task::yield_now().await;
        assert!(!nl.alive(), "an ended connection still looks alive");
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), nl.links()).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "a request on a dead connection did not fail"
        );
        let fresh = Netlink::connect().unwrap();
        assert!(fresh.alive());
        assert!(!fresh.links().await.unwrap().is_empty());
    }
}
