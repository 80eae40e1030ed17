//! Choosing the underlay ("external") interface and this node's public address,
//! in upstream's order: --iface, --iface-regex, --iface-can-reach, default route.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use crate::config::flags::Flags;
use crate::dataplane::netlink::{Link, Netlink, NetlinkError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// The interface's own IPv4 address (VXLAN `local`).
    pub iface_addr: Option<Ipv4Addr>,
    pub iface_addr6: Option<Ipv6Addr>,
    /// What peers use to reach this node (--public-ip or the interface address).
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    /// Connected prefixes of the interface: peers inside them are on-link.
    pub networks: Vec<IpNetwork>,
}

impl ExternalInterface {
    /// A peer is directly reachable (no gateway between) when its address lies in
    /// one of the underlay's connected prefixes — what `ip route get` reports as a
    /// route without gateway.
    pub fn on_link(&self, ip: IpAddr) -> bool {
        self.networks
            .iter()
            .any(|n| n.prefix() > 0 && n.contains(ip))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("invalid --iface-regex {0:?}: {1}")]
    Regex(String, regex::Error),
    #[error("{0}")]
    NotFound(String),
}

fn usable(a: &IpNetwork) -> bool {
    !a.ip().is_loopback() && !crate::subnet::is_link_local(a.ip())
}

/// Picks the interface. `want_v4`/`want_v6` say which families need an address.
pub async fn select(
    nl: &Netlink,
    flags: &Flags,
    want_v4: bool,
    want_v6: bool,
) -> Result<ExternalInterface, IfaceError> {
    let links = nl.links().await?;
    let mut with_addrs = Vec::with_capacity(links.len());
    for l in links {
        let addrs = nl.addresses(l.index).await?;
        with_addrs.push((l, addrs));
    }
    let mut chosen: Option<(usize, Option<IpAddr>)> = None;
    // As upstream: with no interface named, a public IP picks the interface
    // (and address) that owns it — the IPv4 one first.
    let named = !flags.iface.is_empty()
        || !flags.iface_regex.is_empty()
        || !flags.iface_can_reach.is_empty();
    let public = (flags.public_ip.map(IpAddr::V4).filter(|_| want_v4))
        .or(flags.public_ipv6.map(IpAddr::V6).filter(|_| want_v6));
    if let Some(ip) = public.filter(|_| !named) {
        let owner = with_addrs
            .iter()
            .position(|(_, a)| a.iter().any(|n| n.ip() == ip));
        match owner {
            Some(i) => chosen = Some((i, Some(ip))),
            None => {
                return Err(IfaceError::NotFound(format!(
                    "no interface has the public IP {ip} (--public-ip, --public-ipv6 or the node-public-ip annotation); \
                     it must be a local address unless --iface names the interface \
                     (behind NAT, set the public-ip-overwrite annotation instead)"
                )))
            }
        }
    }
    for cand in &flags.iface {
        if let Ok(ip) = cand.parse::<IpAddr>() {
            if let Some(i) = with_addrs
                .iter()
                .position(|(_, a)| a.iter().any(|n| n.ip() == ip))
            {
                chosen = Some((i, Some(ip)));
                break;
            }
        } else if let Some(i) = with_addrs.iter().position(|(l, _)| &l.name == cand) {
            chosen = Some((i, None));
            break;
        }
        tracing::warn!(
            "--iface {cand}: no such interface or address here; trying the next candidate"
        );
    }
    if chosen.is_none() && !flags.iface_regex.is_empty() {
        'outer: for re in &flags.iface_regex {
            let r = regex::Regex::new(re).map_err(|e| IfaceError::Regex(re.clone(), e))?;
            for (i, (l, addrs)) in with_addrs.iter().enumerate() {
                if let Some(a) = addrs
                    .iter()
                    .find(|a| usable(a) && r.is_match(&a.ip().to_string()))
                {
                    chosen = Some((i, Some(a.ip())));
                    break 'outer;
                }
                if r.is_match(&l.name) {
                    chosen = Some((i, None));
                    break 'outer;
                }
            }
        }
    }
    if chosen.is_none() && (!flags.iface.is_empty() || !flags.iface_regex.is_empty()) {
        return Err(IfaceError::NotFound(format!(
            "no interface matches --iface {:?} / --iface-regex {:?}",
            flags.iface, flags.iface_regex
        )));
    }
    if chosen.is_none() && !flags.iface_can_reach.is_empty() {
        let target: IpAddr = flags
            .iface_can_reach
            .parse()
            .map_err(|_| IfaceError::NotFound("bad --iface-can-reach".into()))?;
        let (oif, _) = nl.route_get(target).await?.ok_or_else(|| {
            IfaceError::NotFound(format!("no route to --iface-can-reach {target}"))
        })?;
        chosen = with_addrs
            .iter()
            .position(|(l, _)| l.index == oif)
            .map(|i| (i, None));
    }
    if chosen.is_none() {
        let idx = nl
            .default_route_link(!want_v4 && want_v6)
            .await?
            .ok_or_else(|| {
                IfaceError::NotFound("no default route; choose the interface with --iface".into())
            })?;
        chosen = with_addrs
            .iter()
            .position(|(l, _)| l.index == idx)
            .map(|i| (i, None));
    }
    let (i, pinned) =
        chosen.ok_or_else(|| IfaceError::NotFound("the chosen interface vanished".into()))?;
    let (link, addrs): &(Link, Vec<IpNetwork>) = &with_addrs[i];
    let v4 = match pinned {
        Some(IpAddr::V4(v)) => Some(v),
        _ => addrs.iter().filter(|a| usable(a)).find_map(|a| {
            if let IpAddr::V4(v) = a.ip() {
                Some(v)
            } else {
                None
            }
        }),
    };
    let v6 = match pinned {
        Some(IpAddr::V6(v)) => Some(v),
        _ => addrs.iter().filter(|a| usable(a)).find_map(|a| {
            if let IpAddr::V6(v) = a.ip() {
                Some(v)
            } else {
                None
            }
        }),
    };
    if want_v4 && v4.is_none() {
        return Err(IfaceError::NotFound(format!(
            "interface {} has no IPv4 address",
            link.name
        )));
    }
    if want_v6 && v6.is_none() {
        return Err(IfaceError::NotFound(format!(
            "interface {} has no IPv6 address",
            link.name
        )));
    }
    if link.mtu == 0 {
        return Err(IfaceError::NotFound(format!(
            "failed to determine MTU for {}",
            link.name
        )));
    }
    Ok(ExternalInterface {
        index: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        iface_addr: v4,
        iface_addr6: v6,
        public_ip: flags.public_ip.or(v4),
        public_ipv6: flags.public_ipv6.or(v6),
        networks: addrs
            .iter()
            .map(|a| crate::subnet::net(a.ip(), a.prefix()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_link_uses_connected_prefixes() {
        let e = ExternalInterface {
            index: 2,
            name: "eth0".into(),
            mtu: 1500,
            iface_addr: Some("198.18.0.11".parse().unwrap()),
            iface_addr6: None,
            public_ip: Some("198.18.0.11".parse().unwrap()),
            public_ipv6: None,
            networks: vec!["198.18.0.0/15".parse().unwrap()],
        };
        assert!(e.on_link("198.19.3.4".parse().unwrap()));
        assert!(!e.on_link("203.0.113.9".parse().unwrap()));
    }
}
