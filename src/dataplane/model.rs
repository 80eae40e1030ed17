//! What the kernel should hold, as plain data, and the difference to what it holds.
//!
//! Backends describe their entries as a [`State`]; the netlink layer reads the
//! kernel into the same shape; [`diff`] says what to add, replace and delete.
//! No I/O here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::backend::wireguard::key::Key;
use crate::lease::Mac;

/// A WireGuard peer on the overlay device, as the kernel (or the userspace
/// device) holds it: where it is, what it may send and receive, and the
/// cluster-wide PSK and keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WgPeer {
    pub endpoint: std::net::SocketAddr,
    /// The peer's subnet(s): one per family at most, in order, `None` last.
    pub allowed: [Option<IpNetwork>; 2],
    pub psk: Option<Key>,
    /// Seconds; 0 = off.
    pub keepalive: u16,
}

impl WgPeer {
    /// Allowed IPs in the canonical order (sorted, `None` last).
    pub fn allowed_of(mut nets: Vec<IpNetwork>) -> [Option<IpNetwork>; 2] {
        nets.sort();
        nets.dedup();
        let mut it = nets.into_iter();
        let a = [it.next(), it.next()];
        if it.next().is_some() {
            // More than one subnet per family is not a flannel peer; kept as
            // "differs" by the caller (it never equals a wanted peer).
            return [a[0], None];
        }
        a
    }
}

/// Which device a route leaves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dev {
    /// The flannel VXLAN device of the route's family.
    Overlay,
    /// The underlay interface (host-gw, DirectRouting).
    Underlay,
    /// No device: `blackhole <own subnet>` (`--ip-blackhole-route`).
    Blackhole,
}

/// A route to a peer's subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub via: IpAddr,
    pub dev: Dev,
    /// `onlink`: the gateway is on the device even though no address says so (vxlan).
    pub onlink: bool,
    /// Seen in the kernel under upstream's protocol (`proto boot`) and taken
    /// over on migration; never wanted, so the diff rewrites it as ours.
    pub adopted: bool,
}

impl Route {
    /// `blackhole <own subnet>`: what no pod address in it answers is dropped
    /// here instead of following the default route out of the node.
    pub fn blackhole(v6: bool) -> Route {
        Route {
            via: if v6 {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            },
            dev: Dev::Blackhole,
            onlink: false,
            adopted: false,
        }
    }
}

/// Entries keyed so that each key has at most one owner: a destination subnet,
/// a neighbour address, a MAC in the forwarding database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub routes: BTreeMap<IpNetwork, Route>,
    /// Permanent neighbours on the overlay device: peer VTEP address → VTEP MAC.
    pub neighs: BTreeMap<IpAddr, Mac>,
    /// FDB entries (`self permanent`) on the overlay device: VTEP MAC → peer public IP.
    pub fdb: BTreeMap<Mac, IpAddr>,
    /// WireGuard peers on the overlay device: public key → peer.
    pub wg: BTreeMap<Key, WgPeer>,
}

impl State {
    pub fn len(&self) -> usize {
        self.routes.len() + self.neighs.len() + self.fdb.len() + self.wg.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One kind's changes: `set` holds additions and replacements, `del` removals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes<K, V> {
    pub set: Vec<(K, V)>,
    pub del: Vec<(K, V)>,
}

impl<K, V> Default for Changes<K, V> {
    fn default() -> Self {
        Changes {
            set: vec![],
            del: vec![],
        }
    }
}

impl<K: Ord + Clone, V: PartialEq + Clone> Changes<K, V> {
    fn between(want: &BTreeMap<K, V>, have: &BTreeMap<K, V>) -> Self {
        let set = want
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let del = have
            .iter()
            .filter(|(k, _)| !want.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Changes { set, del }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.del.is_empty()
    }
}

/// What to do to turn `have` into `want`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub routes: Changes<IpNetwork, Route>,
    pub neighs: Changes<IpAddr, Mac>,
    pub fdb: Changes<Mac, IpAddr>,
    /// Stale FDB entries whose MAC stays wanted but whose destination differs
    /// are replaced in `fdb.set`; an FDB entry can also exist twice for one MAC
    /// (two destinations) — those extra ones land here.
    pub fdb_extra: Vec<(Mac, IpAddr)>,
    pub wg: Changes<Key, WgPeer>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
            && self.neighs.is_empty()
            && self.fdb.is_empty()
            && self.fdb_extra.is_empty()
            && self.wg.is_empty()
    }

    pub fn ops(&self) -> usize {
        self.routes.set.len()
            + self.routes.del.len()
            + self.neighs.set.len()
            + self.neighs.del.len()
            + self.fdb.set.len()
            + self.fdb.del.len()
            + self.fdb_extra.len()
            + self.wg.set.len()
            + self.wg.del.len()
    }
}

/// The kernel's view; FDB entries may repeat a MAC with several destinations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub state: State,
    pub fdb_all: Vec<(Mac, IpAddr)>,
}

/// Computes the changes that make `have` equal `want`.
pub fn diff(want: &State, have: &Observed) -> Diff {
    let fdb = Changes::between(&want.fdb, &have.state.fdb);
    // Any further destination of a MAC beyond the one kept in `state.fdb` is extra.
    let fdb_extra = have
        .fdb_all
        .iter()
        .filter(|(m, ip)| have.state.fdb.get(m) != Some(ip))
        .filter(|(m, ip)| want.fdb.get(m) != Some(ip))
        .copied()
        .collect();
    Diff {
        routes: Changes::between(&want.routes, &have.state.routes),
        neighs: Changes::between(&want.neighs, &have.state.neighs),
        fdb,
        fdb_extra,
        wg: Changes::between(&want.wg, &have.state.wg),
    }
}

impl State {
    /// Records the `set` entries of `d` as held.
    pub fn absorb(&mut self, d: &Diff) {
        self.routes.extend(d.routes.set.iter().copied());
        self.neighs.extend(d.neighs.set.iter().copied());
        self.fdb.extend(d.fdb.set.iter().copied());
        self.wg.extend(d.wg.set.iter().copied());
    }
}

/// One peer's entries in one family: what that peer owns in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerEntries {
    pub route: Option<(IpNetwork, Route)>,
    pub neigh: Option<(IpAddr, Mac)>,
    pub fdb: Option<(Mac, IpAddr)>,
    pub wg: Option<(Key, WgPeer)>,
}

impl PeerEntries {
    pub fn add_to(&self, s: &mut State) {
        if let Some((k, v)) = self.route {
            s.routes.insert(k, v);
        }
        if let Some((k, v)) = self.neigh {
            s.neighs.insert(k, v);
        }
        if let Some((k, v)) = self.fdb {
            s.fdb.insert(k, v);
        }
        if let Some((k, v)) = self.wg {
            s.wg.insert(k, v);
        }
    }

    pub fn remove_from(&self, s: &mut State) {
        if let Some((k, _)) = self.route {
            s.routes.remove(&k);
        }
        if let Some((k, _)) = self.neigh {
            s.neighs.remove(&k);
        }
        if let Some((k, _)) = self.fdb {
            s.fdb.remove(&k);
        }
        if let Some((k, _)) = self.wg {
            s.wg.remove(&k);
        }
    }

    /// `from`'s values at this peer's keys, into `to`.
    fn copy_held(&self, from: &State, to: &mut State) {
        if let Some((k, _)) = self.route {
            if let Some(v) = from.routes.get(&k) {
                to.routes.insert(k, *v);
            }
        }
        if let Some((k, _)) = self.neigh {
            if let Some(v) = from.neighs.get(&k) {
                to.neighs.insert(k, *v);
            }
        }
        if let Some((k, _)) = self.fdb {
            if let Some(v) = from.fdb.get(&k) {
                to.fdb.insert(k, *v);
            }
        }
        if let Some((k, _)) = self.wg {
            if let Some(v) = from.wg.get(&k) {
                to.wg.insert(k, *v);
            }
        }
    }
}

/// One changed peer: the entries it owned before and the ones it owns now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerChange {
    pub old: Option<PeerEntries>,
    pub new: Option<PeerEntries>,
}

/// The kernel state we hold (after Calico felix's delta tracker): a change of
/// some peers is diffed against only those peers' keys, old and new — O(changed
/// peers × log N), whatever N — while a full check diffs everything against a
/// kernel dump and [`Tracker::reset`]s it. Both go through the same [`diff`] and
/// the same apply. Which peer owned what before is carried by the change itself
/// (from its previous lease), so nothing per peer is stored here.
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    applied: State,
}

impl Tracker {
    /// What the kernel holds (as far as we applied it).
    pub fn applied(&self) -> &State {
        &self.applied
    }

    /// The changes that bring the keys of the changed peers (old and new keys)
    /// to their new entries, and nothing else.
    pub fn scoped(&self, changes: &[PeerChange]) -> Diff {
        let mut want = State::default();
        let mut have = State::default();
        for c in changes {
            for e in c.old.iter().chain(&c.new) {
                e.copy_held(&self.applied, &mut have);
            }
        }
        for e in changes.iter().filter_map(|c| c.new.as_ref()) {
            e.add_to(&mut want);
        }
        let fdb_all = have.fdb.iter().map(|(m, i)| (*m, *i)).collect();
        diff(
            &want,
            &Observed {
                state: have,
                fdb_all,
            },
        )
    }

    /// Records that `d` was applied.
    pub fn commit(&mut self, d: &Diff) {
        for (k, _) in &d.routes.del {
            self.applied.routes.remove(k);
        }
        for (k, _) in &d.neighs.del {
            self.applied.neighs.remove(k);
        }
        for (k, _) in &d.fdb.del {
            self.applied.fdb.remove(k);
        }
        for (k, _) in &d.wg.del {
            self.applied.wg.remove(k);
        }
        self.applied.absorb(d);
    }

    /// After a full check: the kernel now holds `applied`.
    pub fn reset(&mut self, applied: State) {
        self.applied = applied;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(i: u8) -> Mac {
        Mac([0x52, 0, 0, 0, 0, i])
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }
    fn vx(i: u8) -> Route {
        Route {
            via: ip(&format!("10.244.{i}.0")),
            dev: Dev::Overlay,
            onlink: true,
            adopted: false,
        }
    }

    fn state(peers: &[u8]) -> State {
        let mut s = State::default();
        for &i in peers {
            s.routes.insert(net(&format!("10.244.{i}.0/24")), vx(i));
            s.neighs.insert(ip(&format!("10.244.{i}.0")), mac(i));
            s.fdb.insert(mac(i), ip(&format!("198.18.0.{i}")));
        }
        s
    }

    fn observed(s: State) -> Observed {
        let fdb_all = s.fdb.iter().map(|(m, i)| (*m, *i)).collect();
        Observed { state: s, fdb_all }
    }

    #[test]
    fn equal_states_need_nothing() {
        assert!(diff(&state(&[2, 3, 4]), &observed(state(&[2, 3, 4]))).is_empty());
    }

    #[test]
    fn adds_and_removes_only_the_difference() {
        let d = diff(&state(&[2, 3, 5]), &observed(state(&[2, 3, 4])));
        assert_eq!(d.routes.set, vec![(net("10.244.5.0/24"), vx(5))]);
        assert_eq!(d.routes.del, vec![(net("10.244.4.0/24"), vx(4))]);
        assert_eq!(d.neighs.set.len(), 1);
        assert_eq!(d.neighs.del.len(), 1);
        assert_eq!(d.fdb.set, vec![(mac(5), ip("198.18.0.5"))]);
        assert_eq!(d.fdb.del, vec![(mac(4), ip("198.18.0.4"))]);
        assert_eq!(d.ops(), 6);
    }

    #[test]
    fn changed_values_are_replaced() {
        let mut have = state(&[2]);
        have.fdb.insert(mac(2), ip("198.18.0.99"));
        have.neighs.insert(ip("10.244.2.0"), mac(9));
        have.routes.insert(
            net("10.244.2.0/24"),
            Route {
                via: ip("198.18.0.2"),
                dev: Dev::Underlay,
                onlink: false,
                adopted: false,
            },
        );
        let d = diff(&state(&[2]), &observed(have));
        assert_eq!(d.fdb.set, vec![(mac(2), ip("198.18.0.2"))]);
        assert!(d.fdb.del.is_empty());
        assert_eq!(d.neighs.set, vec![(ip("10.244.2.0"), mac(2))]);
        assert_eq!(d.routes.set, vec![(net("10.244.2.0/24"), vx(2))]);
        assert_eq!(d.ops(), 3);
    }

    #[test]
    fn duplicate_fdb_destinations_are_removed() {
        let want = state(&[2]);
        let mut have = observed(state(&[2]));
        have.fdb_all.push((mac(2), ip("198.18.0.77")));
        let d = diff(&want, &have);
        assert_eq!(d.fdb_extra, vec![(mac(2), ip("198.18.0.77"))]);
        assert_eq!(d.ops(), 1);
    }

    #[test]
    fn empty_want_deletes_everything_owned() {
        let d = diff(&State::default(), &observed(state(&[2, 3])));
        assert_eq!(d.ops(), 6);
        assert!(d.routes.set.is_empty());
    }

    /// Applies `d` to a simulated kernel.
    fn apply(kernel: &mut State, d: &Diff) {
        for (k, _) in &d.routes.del {
            kernel.routes.remove(k);
        }
        for (k, _) in &d.neighs.del {
            kernel.neighs.remove(k);
        }
        for (k, _) in &d.fdb.del {
            kernel.fdb.remove(k);
        }
        for (k, _) in &d.wg.del {
            kernel.wg.remove(k);
        }
        kernel.absorb(d);
    }

    fn entries(peer: u8, subnet: u8, mac_n: u8, host: u8) -> PeerEntries {
        let _ = peer;
        PeerEntries {
            route: Some((net(&format!("10.244.{subnet}.0/24")), vx(subnet))),
            neigh: Some((ip(&format!("10.244.{subnet}.0")), mac(mac_n))),
            fdb: Some((mac(mac_n), ip(&format!("198.18.0.{host}")))),
            // A WireGuard peer keyed like the FDB entry (one owner per key too).
            wg: Some((
                Key([mac_n; 32]),
                WgPeer {
                    endpoint: std::net::SocketAddr::new(ip(&format!("198.18.0.{host}")), 51820),
                    allowed: [Some(net(&format!("10.244.{subnet}.0/24"))), None],
                    psk: None,
                    keepalive: 0,
                },
            )),
        }
    }

    proptest::proptest! {
        /// Scoped diffs applied event by event reach the state one full diff
        /// reaches, and touch only the changed peers' keys.
        #[test]
        fn scoped_diffs_agree_with_a_full_diff(
            events in proptest::collection::vec((0u8..8, proptest::option::of((0u8..12, 0u8..12, 1u8..4))), 1..60),
        ) {
            let mut kernel = State::default();
            let mut tracker = Tracker::default();
            let mut owned: std::collections::BTreeMap<u8, PeerEntries> = Default::default();
            // Keys stay unique as the peer set guarantees: a subnet or MAC held by
            // another peer is refused.
            let mut current: std::collections::BTreeMap<u8, PeerEntries> = Default::default();
            for (peer, lease) in events {
                let new = lease.map(|(sn, m, h)| entries(peer, sn, m, h)).filter(|e| {
                    !current.iter().any(|(p, o)| *p != peer && (o.route.unwrap().0 == e.route.unwrap().0 || o.fdb.unwrap().0 == e.fdb.unwrap().0))
                });
                match new {
                    Some(e) => current.insert(peer, e),
                    None => current.remove(&peer),
                };
                let old = match new {
                    Some(e) => owned.insert(peer, e),
                    None => owned.remove(&peer),
                };
                let d = tracker.scoped(&[PeerChange { old, new }]);
                proptest::prop_assert!(d.ops() <= 8, "one peer's change touched {} entries", d.ops());
                apply(&mut kernel, &d);
                tracker.commit(&d);
                proptest::prop_assert_eq!(tracker.applied(), &kernel);
            }
            let mut want = State::default();
            for e in current.values() {
                e.add_to(&mut want);
            }
            proptest::prop_assert_eq!(&kernel, &want);
            proptest::prop_assert!(diff(&want, &observed(kernel.clone())).is_empty());
        }
    }
}
