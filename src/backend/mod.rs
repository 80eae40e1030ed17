//! Backends: how traffic to a peer's subnet leaves this node.
//!
//! A backend prepares its devices and then only *describes* what the kernel must
//! hold for a set of peers ([`Backend::desired`]); the daemon diffs that against
//! the kernel and applies the difference through the one netlink layer.

use std::collections::BTreeMap;
use std::future::Future;

use crate::config::netconf::{BackendConf, NetConf};
use crate::dataplane::model::{Changes, PeerEntries, State, WgPeer};
use crate::dataplane::netlink::{Devices, Netlink};
use crate::iface::ExternalInterface;
use crate::lease::{BackendData, Lease, PeerSet};

pub mod alloc;
pub mod extension;
pub mod hostgw;
pub mod ipip;
pub mod vxlan;
pub mod wireguard;

use wireguard::key::Key;

/// What a prepared backend publishes with the lease, and the MTU for pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub mtu: u32,
    /// backend-data: the IPv4 device's (or, IPv6-only, the IPv6 device's).
    pub data: BackendData,
    /// backend-v6-data, when IPv6 is enabled.
    pub data_v6: Option<BackendData>,
}

/// A peer the backend cannot serve, and why (logged once by the daemon).
pub type Skipped = Vec<(String, String)>;

pub trait Backend: Send + 'static {
    fn type_name(&self) -> &'static str;

    /// Whether peers' traffic is routed through kernel entries the reconciler
    /// diffs (planes, drift monitor). alloc and extension: no.
    fn routes_peers(&self) -> bool {
        true
    }

    /// Whether the agent needs the peers at all (alloc: no, as upstream).
    fn watches_peers(&self) -> bool {
        true
    }

    /// Backends whose per-peer work is not kernel entries (extension's
    /// commands) bring it in line with the accepted peers here: every peer
    /// (`touched` None: a full pass), or the touched ones and any still
    /// failing. Returns one message per failure; the pass then fails and is
    /// retried on the reconciler's schedule.
    fn sync_peers(
        &mut self,
        _peers: &PeerSet,
        _touched: Option<&[(String, Option<Lease>)]>,
    ) -> impl Future<Output = Vec<String>> + Send {
        async { Vec::new() }
    }

    /// Creates or adopts the backend's devices (before the lease is known: the
    /// lease publishes their addresses).
    fn prepare(
        &mut self,
        nl: &Netlink,
        ext: &ExternalInterface,
    ) -> impl Future<Output = anyhow::Result<Prepared>> + Send;

    /// Makes the devices carry this node's lease (addresses, link up). Idempotent:
    /// also used to repair them. Returns true if a device had to be re-created.
    /// Backends without devices of their own have nothing to do.
    fn configure(
        &mut self,
        _nl: &Netlink,
        _ext: &ExternalInterface,
        _own: &Lease,
    ) -> impl Future<Output = anyhow::Result<bool>> + Send {
        async { Ok(false) }
    }

    /// The devices one family's entries live on (default: the underlay only).
    fn devices(&self, ext: &ExternalInterface, _v6: bool) -> Devices {
        Devices {
            overlay: None,
            underlay: ext.index,
            network_route: false,
        }
    }

    /// Pure: the entries one peer owns in one family (None: nothing in this
    /// family), or why the backend cannot serve it.
    fn entries(
        &self,
        ext: &ExternalInterface,
        lease: &Lease,
        v6: bool,
    ) -> Result<Option<PeerEntries>, String>;

    /// The WireGuard peers one family's device holds (entries kept outside
    /// rtnetlink); none for backends without them.
    fn observe_peers(
        &mut self,
        _v6: bool,
    ) -> impl Future<Output = anyhow::Result<BTreeMap<Key, WgPeer>>> + Send {
        async { Ok(BTreeMap::new()) }
    }

    /// Applies the WireGuard part of a diff; one message per failure.
    fn apply_peers(
        &mut self,
        _v6: bool,
        _c: &Changes<Key, WgPeer>,
    ) -> impl Future<Output = Vec<String>> + Send {
        async { Vec::new() }
    }

    /// What the WireGuard drift check reads (wireguard only).
    fn wg_probe(&self) -> Option<wireguard::Probe> {
        None
    }

    /// Pure: the entries of one family the kernel must hold for `peers`.
    fn desired(&self, ext: &ExternalInterface, peers: &PeerSet, v6: bool) -> (State, Skipped) {
        let mut s = State::default();
        let mut skipped = Vec::new();
        for (name, lease) in peers.accepted() {
            match self.entries(ext, lease, v6) {
                Ok(Some(e)) => e.add_to(&mut s),
                Ok(None) => {}
                Err(why) => skipped.push((name.clone(), why)),
            }
        }
        (s, skipped)
    }
}

/// The link `name` as `fits` wants it: an existing one that fits is reused,
/// one that does not is deleted and `create`d again (the name is flannel's).
/// Returns the link and whether it is new.
pub async fn ensure_link<F, Fut>(
    nl: &Netlink,
    name: &str,
    fits: impl Fn(&crate::dataplane::netlink::Link) -> bool,
    create: F,
    what: &'static str,
) -> anyhow::Result<(crate::dataplane::netlink::Link, bool)>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), crate::dataplane::netlink::NetlinkError>>,
{
    use anyhow::Context;
    if let Some(l) = nl.link_by_name(name).await? {
        if fits(&l) {
            return Ok((l, false));
        }
        tracing::warn!(
            "{name} exists with other attributes (kind {:?}, vxlan {:?}, tunnel {:?}); re-creating it",
            l.kind,
            l.vxlan,
            l.iptun
        );
        nl.delete_link(l.index).await?;
    }
    match create().await {
        Ok(()) => {}
        // Someone else (another agent start racing us) created it meanwhile.
        Err(e) if e.errno() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e).context(what),
    }
    let l = nl
        .link_by_name(name)
        .await?
        .with_context(|| format!("{name} vanished after creation"))?;
    tracing::info!(
        "created {} (index {}, MAC {}, MTU {})",
        l.name,
        l.index,
        l.mac
            .map(|m| m.to_string())
            .unwrap_or_else(|| "none".into()),
        l.mtu
    );
    Ok((l, true))
}

/// Makes a device carry its family's lease the way upstream's do: the
/// subnet's network address as a host address (/32, /128: no broadcast
/// routes; the source of host-to-pod traffic), no other address of that
/// family but link-local ones, and the link up.
pub async fn carry_lease(
    nl: &Netlink,
    link: &mut crate::dataplane::netlink::Link,
    own: Option<ipnetwork::IpNetwork>,
    v6: bool,
) -> anyhow::Result<()> {
    if let Some(subnet) = own {
        let want = ipnetwork::IpNetwork::new(subnet.network(), if v6 { 128 } else { 32 })?;
        let have = nl.addresses(link.index).await?;
        let stale = |a: &ipnetwork::IpNetwork| {
            a.is_ipv6() == v6 && *a != want && !crate::subnet::is_link_local(a.ip())
        };
        for a in have.iter().filter(|a| stale(a)) {
            tracing::info!("removing stale address {a} from {}", link.name);
            nl.del_address(link.index, *a).await?;
        }
        if !have.contains(&want) {
            nl.add_address(link.index, want).await?;
        }
    }
    if !link.up {
        nl.set_up(link.index).await?;
        link.up = true;
    }
    Ok(())
}

/// Which backend the configuration asks for (built once at start).
#[allow(clippy::large_enum_variant)]
pub enum Any {
    Vxlan(vxlan::Vxlan),
    HostGw(hostgw::HostGw),
    Wireguard(wireguard::Wireguard),
    Ipip(ipip::Ipip),
    Alloc(alloc::Alloc),
    Extension(extension::Extension),
}

impl Any {
    pub fn from_conf(conf: &NetConf, wg_impl: crate::config::netconf::WgImpl) -> Any {
        match &conf.backend {
            BackendConf::Vxlan(v) => Any::Vxlan(vxlan::Vxlan::new(
                v.clone(),
                conf.v4.is_some(),
                conf.v6.is_some(),
            )),
            BackendConf::HostGw => Any::HostGw(hostgw::HostGw),
            BackendConf::Wireguard(w) => {
                Any::Wireguard(wireguard::Wireguard::new(w.clone(), conf, wg_impl))
            }
            BackendConf::Alloc => Any::Alloc(alloc::Alloc),
            BackendConf::Extension(e) => Any::Extension(extension::Extension::new(e.clone(), conf)),
            BackendConf::Ipip(c) => Any::Ipip(ipip::Ipip::new(c.clone())),
        }
    }
}
