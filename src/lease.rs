//! Leases: a node's subnet and how to reach it, in compact form.
//!
//! Both subnet managers turn what they read (Node annotations, etcd values)
//! into `Lease`s; `PeerSet` keeps the valid ones and refuses conflicting or
//! hostile ones with one warning each.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::config::netconf::NetConf;
use crate::subnet;

/// Largest backend-data accepted from a peer.
pub const MAX_BACKEND_DATA: usize = 4096;

/// A 48-bit MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
            return Err(format!("{s:?} is not a MAC address"));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(m))
    }
}

impl Mac {
    /// A usable unicast VTEP MAC: not multicast, not all zeros.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// vxlan backend-data, exactly upstream's JSON: `{"VNI":1,"VtepMAC":"…"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: Mac,
}

/// wireguard backend-data: upstream's `{"PublicKey":"<base64>","Port":51820}`
/// (`Port` since v0.26.6; a peer without it listens on our own port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireguardData {
    pub public_key: crate::backend::wireguard::key::Key,
    /// None: not published (older upstream).
    pub port: Option<u16>,
}

#[derive(Serialize, Deserialize)]
struct WireguardJson {
    #[serde(rename = "PublicKey")]
    public_key: String,
    #[serde(rename = "Port", default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

/// Backend-specific part of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendData {
    Vxlan(VxlanData),
    HostGw,
    Wireguard(WireguardData),
    /// ipip publishes no data (`null`).
    Ipip,
    /// alloc publishes no backend type and no data.
    Alloc,
    /// extension: the PreStartupCommand's output, a JSON string (None: no command).
    Extension(Option<std::sync::Arc<str>>),
}

impl BackendData {
    pub fn type_name(&self) -> &'static str {
        match self {
            BackendData::Vxlan(_) => "vxlan",
            BackendData::HostGw => "host-gw",
            BackendData::Wireguard(_) => "wireguard",
            BackendData::Ipip => "ipip",
            BackendData::Alloc => "",
            BackendData::Extension(_) => "extension",
        }
    }

    /// Compact JSON as upstream writes it (`null` for host-gw).
    pub fn to_json(&self) -> String {
        match self {
            BackendData::Vxlan(d) => serde_json::to_string(d).unwrap_or_default(),
            BackendData::HostGw | BackendData::Ipip | BackendData::Alloc => "null".to_string(),
            BackendData::Extension(None) => "null".to_string(),
            BackendData::Extension(Some(out)) => serde_json::to_string(&**out).unwrap_or_default(),
            BackendData::Wireguard(d) => serde_json::to_string(&WireguardJson {
                public_key: d.public_key.to_string(),
                port: d.port,
            })
            .unwrap_or_default(),
        }
    }

    /// Parses peer-supplied backend data of type `ty`.
    pub fn parse(ty: &str, data: &str) -> Result<BackendData, String> {
        if data.len() > MAX_BACKEND_DATA {
            return Err(format!(
                "backend-data is {} bytes, over the {MAX_BACKEND_DATA}-byte limit",
                data.len()
            ));
        }
        match ty {
            "vxlan" => {
                let d: VxlanData = serde_json::from_str(data)
                    .map_err(|e| format!("backend-data {data:?} is invalid: {e}"))?;
                if !d.vtep_mac.is_unicast() {
                    return Err(format!("VtepMAC {} is not a unicast MAC", d.vtep_mac));
                }
                Ok(BackendData::Vxlan(d))
            }
            "host-gw" => Ok(BackendData::HostGw),
            "ipip" => Ok(BackendData::Ipip),
            "" => Ok(BackendData::Alloc),
            // Upstream's receivers decode a JSON string when the data is not empty.
            "extension" => match data.trim() {
                "" | "null" => Ok(BackendData::Extension(None)),
                t => serde_json::from_str::<String>(t)
                    .map(|s| BackendData::Extension(Some(s.into())))
                    .map_err(|e| format!("backend-data {data:?} is not a JSON string: {e}")),
            },
            "wireguard" => {
                let d: WireguardJson = serde_json::from_str(data)
                    .map_err(|e| format!("backend-data {data:?} is invalid: {e}"))?;
                let public_key = d
                    .public_key
                    .parse()
                    .map_err(|e| format!("PublicKey {:?} is invalid: {e}", d.public_key))?;
                Ok(BackendData::Wireguard(WireguardData {
                    public_key,
                    port: d.port.filter(|p| *p != 0),
                }))
            }
            other => Err(format!("unsupported backend type {other:?}")),
        }
    }
}

/// One node's lease: the compact state kept per peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Option<IpNetwork>,
    pub ipv6_subnet: Option<IpNetwork>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend: BackendData,
    pub backend_v6: Option<BackendData>,
}

/// Why a peer lease was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(String),
    #[error("subnet {subnet} overlaps {with}")]
    Conflict { subnet: IpNetwork, with: String },
    #[error("{0}")]
    Duplicate(String),
}

/// Checks one family's subnet of a peer against the network.
fn check_subnet(
    n: &IpNetwork,
    pool: Option<&crate::config::netconf::Pool>,
    own: Option<&IpNetwork>,
) -> Result<(), Refusal> {
    let Some(pool) = pool else {
        return Err(Refusal::Invalid(format!(
            "subnet {n} is of a family this network does not enable"
        )));
    };
    if !subnet::is_canonical(n) {
        return Err(Refusal::Invalid(format!("subnet {n} has host bits set")));
    }
    if !subnet::is_proper_subnet(&pool.network, n) {
        return Err(Refusal::Invalid(format!(
            "subnet {n} is not a proper subnet of the network {}",
            pool.network
        )));
    }
    if let Some(own) = own {
        if subnet::overlaps(n, own) {
            return Err(Refusal::Conflict {
                subnet: *n,
                with: format!("this node's own subnet {own}"),
            });
        }
    }
    Ok(())
}

impl Lease {
    /// Validates a peer lease against the network and this node's own lease.
    pub fn validate_peer(&self, conf: &NetConf, own: &Lease) -> Result<(), Refusal> {
        if self.backend.type_name() != conf.backend.type_name() {
            return Err(Refusal::Invalid(format!(
                "backend type {:?} differs from this node's {:?}",
                self.backend.type_name(),
                conf.backend.type_name()
            )));
        }
        // A family this network does not enable is ignored, not refused: during a
        // rollout to (or from) dual-stack, peers still reach each other over the other.
        let v4 = self.subnet.filter(|_| conf.v4.is_some());
        let v6 = self.ipv6_subnet.filter(|_| conf.v6.is_some());
        if v4.is_none() && v6.is_none() {
            return Err(Refusal::Invalid(
                "no subnet in a family this network enables".into(),
            ));
        }
        if let (BackendData::Vxlan(mine), BackendData::Vxlan(theirs)) =
            (&own.backend, &self.backend)
        {
            if mine.vtep_mac == theirs.vtep_mac {
                return Err(Refusal::Duplicate(format!(
                    "VtepMAC {} is this node's own",
                    theirs.vtep_mac
                )));
            }
        }
        if let (BackendData::Wireguard(mine), BackendData::Wireguard(theirs)) =
            (&own.backend, &self.backend)
        {
            if mine.public_key == theirs.public_key {
                return Err(Refusal::Duplicate(format!(
                    "PublicKey {} is this node's own",
                    theirs.public_key
                )));
            }
        }
        if let Some(n) = &v4 {
            check_subnet(n, conf.v4.as_ref(), own.subnet.as_ref())?;
            let ip = self
                .public_ip
                .ok_or_else(|| Refusal::Invalid("no public IPv4 address".into()))?;
            if !usable_unicast(IpAddr::V4(ip)) {
                return Err(Refusal::Invalid(format!(
                    "public IP {ip} is not a usable unicast address"
                )));
            }
        }
        if let Some(n) = &v6 {
            check_subnet(n, conf.v6.as_ref(), own.ipv6_subnet.as_ref())?;
            let ip = self
                .public_ipv6
                .ok_or_else(|| Refusal::Invalid("no public IPv6 address".into()))?;
            if !usable_unicast(IpAddr::V6(ip)) {
                return Err(Refusal::Invalid(format!(
                    "public IPv6 {ip} is not a usable unicast address"
                )));
            }
        }
        Ok(())
    }
}

/// Not unspecified, loopback, multicast or broadcast.
pub fn usable_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast()),
    }
}

/// The accepted peer leases, keyed by peer name (node name or etcd key).
///
/// First come, first served: a lease whose subnet overlaps an accepted peer's
/// is refused, so a second Node claiming an existing podCIDR cannot hijack it.
/// When the holder goes away, refused claimants are reconsidered.
///
/// Accepted subnets never overlap, so an index by start address answers "does
/// this subnet overlap an accepted one" with one range lookup; VTEP MACs are
/// indexed too. Adding N peers is O(N log N).
#[derive(Debug, Default, Clone)]
pub struct PeerSet {
    accepted: BTreeMap<String, Lease>,
    /// Valid on their own but conflicting with an accepted peer.
    waiting: BTreeMap<String, Lease>,
    /// Accepted subnets: (is_v6, first address) → (last address, peer name).
    by_subnet: BTreeMap<(bool, u128), (u128, String)>,
    by_ident: HashMap<Ident, String>,
    /// Peers whose accepted lease changed since the last [`PeerSet::take_dirty`],
    /// with the lease they had accepted before (None: none): its keys are what
    /// the peer owned in the kernel.
    dirty: BTreeMap<String, Option<Lease>>,
}

/// What changed in the accepted set after an update.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub changed: bool,
    pub refused: Vec<(String, Refusal)>,
}

fn subnets(l: &Lease) -> impl Iterator<Item = IpNetwork> {
    l.subnet.into_iter().chain(l.ipv6_subnet)
}

/// What identifies a node's tunnel endpoint, one owner each: a VTEP MAC (one
/// FDB entry) or a WireGuard public key (one peer on the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ident {
    Mac(Mac),
    Key(crate::backend::wireguard::key::Key),
}

impl std::fmt::Display for Ident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ident::Mac(m) => write!(f, "VtepMAC {m}"),
            Ident::Key(k) => write!(f, "PublicKey {k}"),
        }
    }
}

fn idents(l: &Lease) -> impl Iterator<Item = Ident> + '_ {
    [Some(&l.backend), l.backend_v6.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|b| match b {
            BackendData::Vxlan(d) => Some(Ident::Mac(d.vtep_mac)),
            BackendData::Wireguard(d) => Some(Ident::Key(d.public_key)),
            _ => None,
        })
}

impl PeerSet {
    pub fn accepted(&self) -> &BTreeMap<String, Lease> {
        &self.accepted
    }

    pub fn len(&self) -> usize {
        self.accepted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty()
    }

    /// The peers whose accepted lease changed (added, replaced or dropped) since
    /// the last call: the scope of the next incremental reconcile.
    pub fn take_dirty(&mut self) -> Vec<(String, Option<Lease>)> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    /// Puts `names` in the next incremental reconcile's scope (a re-list that
    /// replaced the whole set must also remove peers it no longer holds).
    pub fn mark_dirty(&mut self, before: impl IntoIterator<Item = (String, Option<Lease>)>) {
        for (name, lease) in before {
            self.dirty.entry(name).or_insert(lease);
        }
    }

    fn accept(&mut self, name: String, lease: Lease) {
        self.unaccept(&name);
        self.dirty.entry(name.clone()).or_insert(None);
        for n in subnets(&lease) {
            let (lo, hi) = subnet::range(&n);
            self.by_subnet.insert((n.is_ipv6(), lo), (hi, name.clone()));
        }
        for m in idents(&lease) {
            self.by_ident.insert(m, name.clone());
        }
        self.accepted.insert(name, lease);
    }

    fn unaccept(&mut self, name: &str) -> Option<Lease> {
        let lease = self.accepted.remove(name)?;
        self.dirty
            .entry(name.to_string())
            .or_insert_with(|| Some(lease.clone()));
        for n in subnets(&lease) {
            self.by_subnet.remove(&(n.is_ipv6(), subnet::range(&n).0));
        }
        for m in idents(&lease) {
            if self.by_ident.get(&m).map(String::as_str) == Some(name) {
                self.by_ident.remove(&m);
            }
        }
        Some(lease)
    }

    fn conflict(&self, name: &str, lease: &Lease) -> Option<Refusal> {
        // One VTEP MAC, one FDB entry (one public key, one WireGuard peer): a
        // second claimant would steal the first's traffic.
        for m in idents(lease) {
            if let Some(other) = self.by_ident.get(&m).filter(|o| o.as_str() != name) {
                return Some(Refusal::Duplicate(format!(
                    "{m} is already used by peer {other}"
                )));
            }
        }
        for n in subnets(lease) {
            let (lo, hi) = subnet::range(&n);
            let v6 = n.is_ipv6();
            // Other peers' accepted subnets never overlap one another, so the one
            // starting last at or before our end is their only candidate; this
            // peer's own current subnet (which a changed lease may overlap, or
            // start after) is passed over.
            if let Some((&(_, start), (end, other))) = self
                .by_subnet
                .range((v6, 0)..=(v6, hi))
                .rev()
                .find(|(_, (_, o))| o != name)
            {
                if *end >= lo {
                    let held = self.accepted.get(other).and_then(|l| {
                        subnets(l).find(|s| s.is_ipv6() == v6 && subnet::range(s).0 == start)
                    });
                    let with = held
                        .map(|h| format!("peer {other}'s subnet {h}"))
                        .unwrap_or_else(|| format!("peer {other}'s subnet"));
                    return Some(Refusal::Conflict { subnet: n, with });
                }
            }
        }
        None
    }

    /// Adds or replaces `name`'s lease. Invalid or conflicting leases are refused
    /// (and any earlier accepted lease of the same name is dropped).
    pub fn upsert(&mut self, name: &str, mut lease: Lease, conf: &NetConf, own: &Lease) -> Outcome {
        // Only the families this network enables are kept (and checked for overlaps).
        if conf.v4.is_none() {
            lease.subnet = None;
        }
        if conf.v6.is_none() {
            lease.ipv6_subnet = None;
            lease.backend_v6 = None;
        }
        let mut out = Outcome::default();
        if self.accepted.get(name) == Some(&lease) {
            return out;
        }
        self.waiting.remove(name);
        if let Err(r) = lease.validate_peer(conf, own) {
            out.changed = self.unaccept(name).is_some();
            out.refused.push((name.to_string(), r));
            if out.changed {
                self.promote_waiting(conf, own, &mut out);
            }
            return out;
        }
        if let Some(r) = self.conflict(name, &lease) {
            out.changed = self.unaccept(name).is_some();
            out.refused.push((name.to_string(), r));
            self.waiting.insert(name.to_string(), lease);
            if out.changed {
                self.promote_waiting(conf, own, &mut out);
            }
            return out;
        }
        let had = self.accepted.contains_key(name);
        self.accept(name.to_string(), lease);
        out.changed = true;
        // A changed lease may have freed room for a waiting peer.
        if had {
            self.promote_waiting(conf, own, &mut out);
        }
        out
    }

    /// Removes `name`; a peer waiting for its subnet may take it now.
    pub fn remove(&mut self, name: &str, conf: &NetConf, own: &Lease) -> Outcome {
        let mut out = Outcome::default();
        self.waiting.remove(name);
        if self.unaccept(name).is_some() {
            out.changed = true;
            self.promote_waiting(conf, own, &mut out);
        }
        out
    }

    fn promote_waiting(&mut self, conf: &NetConf, own: &Lease, out: &mut Outcome) {
        if self.waiting.is_empty() {
            return;
        }
        let names: Vec<String> = self.waiting.keys().cloned().collect();
        for n in names {
            let lease = self.waiting[&n].clone();
            if self.conflict(&n, &lease).is_none() && lease.validate_peer(conf, own).is_ok() {
                self.waiting.remove(&n);
                self.accept(n, lease);
                out.changed = true;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn conf() -> NetConf {
        NetConf::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap()
    }

    pub(crate) fn lease(subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            subnet: Some(subnet.parse().unwrap()),
            ipv6_subnet: None,
            public_ip: Some(ip.parse().unwrap()),
            public_ipv6: None,
            backend: BackendData::Vxlan(VxlanData {
                vni: 1,
                vtep_mac: mac.parse().unwrap(),
            }),
            backend_v6: None,
        }
    }

    fn own() -> Lease {
        lease("10.244.1.0/24", "198.18.0.11", "52:82:d5:a1:90:4d")
    }

    #[test]
    fn backend_data_json_is_upstreams() {
        let d = BackendData::Vxlan(VxlanData {
            vni: 1,
            vtep_mac: "82:cd:b6:82:3c:70".parse().unwrap(),
        });
        assert_eq!(d.to_json(), r#"{"VNI":1,"VtepMAC":"82:cd:b6:82:3c:70"}"#);
        assert_eq!(BackendData::parse("vxlan", &d.to_json()).unwrap(), d);
        assert_eq!(BackendData::HostGw.to_json(), "null");
        assert!(BackendData::parse("vxlan", "{").is_err());
        assert!(BackendData::parse("vxlan", r#"{"VNI":1,"VtepMAC":"zz"}"#).is_err());
        assert!(BackendData::parse("vxlan", r#"{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}"#).is_err());
        assert!(BackendData::parse("vxlan", &" ".repeat(5000))
            .unwrap_err()
            .contains("limit"));
        assert!(BackendData::parse("udp", "{}").is_err());
    }

    #[test]
    fn hostile_leases_are_refused() {
        let c = conf();
        let o = own();
        let good = lease("10.244.2.0/24", "198.18.0.12", "52:82:d5:a1:90:4e");
        assert!(good.validate_peer(&c, &o).is_ok());
        for bad in [
            lease("10.245.2.0/24", "198.18.0.12", "52:82:d5:a1:90:4e"),
            lease("0.0.0.0/0", "198.18.0.12", "52:82:d5:a1:90:4e"),
            lease("10.244.0.0/16", "198.18.0.12", "52:82:d5:a1:90:4e"),
            lease("10.244.1.0/24", "198.18.0.12", "52:82:d5:a1:90:4e"),
            lease("10.244.0.0/20", "198.18.0.12", "52:82:d5:a1:90:4e"),
            lease("10.244.2.5/24", "198.18.0.12", "52:82:d5:a1:90:4e"),
            lease("10.244.2.0/24", "0.0.0.0", "52:82:d5:a1:90:4e"),
            lease("10.244.2.0/24", "224.0.0.1", "52:82:d5:a1:90:4e"),
            lease("10.244.2.0/24", "198.18.0.12", "52:82:d5:a1:90:4d"),
            Lease {
                backend: BackendData::HostGw,
                ..good.clone()
            },
        ] {
            assert!(bad.validate_peer(&c, &o).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostile_ipv6_leases_are_refused() {
        let c = NetConf::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let with6 = |l: Lease, n: &str, ip: &str| Lease {
            ipv6_subnet: Some(n.parse().unwrap()),
            public_ipv6: Some(ip.parse().unwrap()),
            backend_v6: Some(l.backend.clone()),
            ..l
        };
        let o = with6(own(), "fd00:10:244:1::/64", "fd00:198:18::11");
        let peer = lease("10.244.2.0/24", "198.18.0.12", "52:82:d5:a1:90:4e");
        assert!(with6(peer.clone(), "fd00:10:244:2::/64", "fd00:198:18::12")
            .validate_peer(&c, &o)
            .is_ok());
        for (n, ip) in [
            ("fd00:10:245::/64", "fd00:198:18::12"), // outside IPv6Network
            ("fd00:10:244:1::/64", "fd00:198:18::12"), // this node's own
            ("fd00:10:244::/56", "fd00:198:18::12"), // the whole network
            ("fd00:10:244:2::1/64", "fd00:198:18::12"), // host bits
            ("fd00:10:244:2::/64", "::"),
            ("fd00:10:244:2::/64", "ff02::1"),
        ] {
            let bad = with6(peer.clone(), n, ip);
            assert!(bad.validate_peer(&c, &o).is_err(), "{n} {ip}");
        }
        // In a network without IPv6 a dual-stack peer counts by its IPv4 part (a rollout
        // to dual-stack must not cut IPv4); with only IPv6 parts it is refused.
        let v4only = conf();
        let dual = with6(peer.clone(), "fd00:10:244:2::/64", "fd00:198:18::12");
        assert!(dual.validate_peer(&v4only, &own()).is_ok());
        let only6 = Lease {
            subnet: None,
            public_ip: None,
            ..dual
        };
        assert!(only6.validate_peer(&v4only, &own()).is_err());
    }

    #[test]
    fn dirty_set_names_changed_peers_with_what_they_held_before() {
        let (c, o) = (conf(), own());
        let mut set = PeerSet::default();
        let a = lease("10.244.2.0/24", "198.18.0.12", "52:00:00:00:00:02");
        let a2 = lease("10.244.2.0/24", "198.18.0.12", "52:00:00:00:00:22");
        set.upsert("a", a.clone(), &c, &o);
        assert_eq!(set.take_dirty(), vec![("a".to_string(), None)]);
        // Twice in one batch: the lease from before the batch is kept.
        set.upsert("a", a2.clone(), &c, &o);
        set.upsert(
            "a",
            lease("10.244.2.0/24", "198.18.0.12", "52:00:00:00:00:23"),
            &c,
            &o,
        );
        assert_eq!(set.take_dirty(), vec![("a".to_string(), Some(a))]);
        let _ = a2;
        assert!(set.take_dirty().is_empty());
        // A claimant waiting for a's subnet takes it when a leaves: both are dirty.
        let b = lease("10.244.2.0/24", "198.18.0.13", "52:00:00:00:00:03");
        set.upsert("b", b, &c, &o);
        assert!(
            set.take_dirty().is_empty(),
            "a refused claimant changes nothing"
        );
        set.remove("a", &c, &o);
        let d = set.take_dirty();
        assert_eq!(
            d.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(d[0].1.is_some() && d[1].1.is_none());
    }

    #[test]
    fn first_holder_keeps_subnet_until_it_leaves() {
        let (c, o) = (conf(), own());
        let mut set = PeerSet::default();
        assert!(
            set.upsert(
                "n2",
                lease("10.244.2.0/24", "198.18.0.12", "52:00:00:00:00:02"),
                &c,
                &o
            )
            .changed
        );
        let out = set.upsert(
            "evil",
            lease("10.244.2.0/24", "198.18.0.66", "52:00:00:00:00:66"),
            &c,
            &o,
        );
        assert!(!out.changed);
        assert_eq!(out.refused.len(), 1);
        assert_eq!(
            set.accepted()["n2"].public_ip.unwrap().to_string(),
            "198.18.0.12"
        );
        // Same lease again is a no-op.
        assert_eq!(
            set.upsert(
                "n2",
                lease("10.244.2.0/24", "198.18.0.12", "52:00:00:00:00:02"),
                &c,
                &o
            ),
            Outcome::default()
        );
        // When n2 leaves, the waiting claimant is accepted.
        let out = set.remove("n2", &c, &o);
        assert!(out.changed);
        assert!(set.accepted().contains_key("evil"));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn a_peer_widening_its_own_subnet_cannot_cover_another() {
        let mut s = PeerSet::default();
        let (c, o) = (conf(), own());
        s.upsert(
            "a",
            lease("10.244.4.0/24", "198.18.0.4", "52:00:00:00:00:04"),
            &c,
            &o,
        );
        s.upsert(
            "b",
            lease("10.244.5.0/24", "198.18.0.5", "52:00:00:00:00:05"),
            &c,
            &o,
        );
        // b's own /24 starts last below the new /23's end: a's must still be seen.
        let out = s.upsert(
            "b",
            lease("10.244.4.0/23", "198.18.0.5", "52:00:00:00:00:05"),
            &c,
            &o,
        );
        assert!(
            matches!(out.refused.as_slice(), [(n, Refusal::Conflict { .. })] if n == "b"),
            "{out:?}"
        );
        assert_eq!(s.accepted().len(), 1);
        assert!(s.accepted().contains_key("a"));
        // Narrowing (or keeping) its own subnet is no conflict with itself.
        let out = s.upsert(
            "a",
            lease("10.244.4.0/25", "198.18.0.4", "52:00:00:00:00:04"),
            &c,
            &o,
        );
        assert!(out.refused.is_empty() && out.changed, "{out:?}");
    }

    #[test]
    fn overlap_index_finds_every_kind_of_overlap() {
        let (c, o) = (conf(), own());
        let mut set = PeerSet::default();
        for i in 2..200u8 {
            let out = set.upsert(
                &format!("n{i}"),
                lease(
                    &format!("10.244.{i}.0/24"),
                    "198.18.0.12",
                    &format!("52:00:00:00:01:{i:02x}"),
                ),
                &c,
                &o,
            );
            assert!(out.changed && out.refused.is_empty());
        }
        // Wider subnets covering accepted ones, narrower ones inside them, and exact copies.
        for (i, sn) in [
            "10.244.0.0/17",
            "10.244.100.128/25",
            "10.244.50.0/24",
            "10.244.192.0/21",
        ]
        .iter()
        .enumerate()
        {
            let out = set.upsert(
                &format!("x{i}"),
                lease(sn, "198.18.0.99", &format!("52:00:00:00:02:{i:02x}")),
                &c,
                &o,
            );
            assert!(!out.changed, "{sn} was accepted");
            assert!(
                matches!(out.refused[0].1, Refusal::Conflict { .. }),
                "{sn}: {:?}",
                out.refused
            );
        }
        // Adjacent but disjoint is fine.
        assert!(set
            .upsert(
                "y",
                lease("10.244.200.0/24", "198.18.0.98", "52:00:00:00:03:00"),
                &c,
                &o
            )
            .refused
            .is_empty());
        assert_eq!(set.len(), 199);
        // The index follows removals and subnet changes.
        set.remove("n50", &c, &o);
        assert!(
            set.accepted().contains_key("x2"),
            "the waiting claimant of 10.244.50.0/24 takes it over"
        );
        set.upsert(
            "n60",
            lease("10.244.250.0/24", "198.18.0.12", "52:00:00:00:01:3c"),
            &c,
            &o,
        );
        assert!(set
            .upsert(
                "z",
                lease("10.244.60.0/24", "198.18.0.97", "52:00:00:00:04:00"),
                &c,
                &o
            )
            .refused
            .is_empty());
    }

    #[test]
    fn a_duplicate_vtep_mac_is_refused() {
        let (c, o) = (conf(), own());
        let mut set = PeerSet::default();
        set.upsert(
            "n2",
            lease("10.244.2.0/24", "198.18.0.12", "52:00:00:00:00:02"),
            &c,
            &o,
        );
        let out = set.upsert(
            "copy",
            lease("10.244.3.0/24", "198.18.0.13", "52:00:00:00:00:02"),
            &c,
            &o,
        );
        assert!(!out.changed);
        assert!(matches!(out.refused[0].1, Refusal::Duplicate(_)));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn a_peer_turning_bad_is_dropped() {
        let (c, o) = (conf(), own());
        let mut set = PeerSet::default();
        set.upsert(
            "n2",
            lease("10.244.2.0/24", "198.18.0.12", "52:00:00:00:00:02"),
            &c,
            &o,
        );
        let out = set.upsert(
            "n2",
            lease("10.99.0.0/24", "198.18.0.12", "52:00:00:00:00:02"),
            &c,
            &o,
        );
        assert!(out.changed);
        assert!(set.is_empty());
        // And moving to another valid subnet works.
        set.upsert(
            "n2",
            lease("10.244.3.0/24", "198.18.0.12", "52:00:00:00:00:02"),
            &c,
            &o,
        );
        assert_eq!(
            set.accepted()["n2"].subnet.unwrap().to_string(),
            "10.244.3.0/24"
        );
    }

    #[test]
    fn extension_and_alloc_data_round_trip_as_upstream_writes_them() {
        let d = BackendData::Extension(Some("52:54:00:12:34:56".into()));
        assert_eq!(d.to_json(), r#""52:54:00:12:34:56""#);
        assert_eq!(BackendData::parse("extension", &d.to_json()), Ok(d));
        // No PreStartupCommand: upstream writes nothing; null reads the same.
        for text in ["", "null", " null "] {
            assert_eq!(
                BackendData::parse("extension", text),
                Ok(BackendData::Extension(None))
            );
        }
        // Hostile text: output with quotes and newlines survives; non-strings are refused.
        let tricky = BackendData::Extension(Some("a\"b\nc".into()));
        assert_eq!(
            BackendData::parse("extension", &tricky.to_json()),
            Ok(tricky)
        );
        assert!(BackendData::parse("extension", r#"{"VtepMAC":"x"}"#).is_err());
        assert_eq!(BackendData::Alloc.type_name(), "");
        assert_eq!(BackendData::parse("", "null"), Ok(BackendData::Alloc));
        assert_eq!(BackendData::parse("ipip", "null"), Ok(BackendData::Ipip));
    }
}
