//! Lease events in, accepted peers out: folds what the store says into the
//! [`PeerSet`], warns once per refused peer, and keeps the refusal gauges.
//! Pure (no kernel, no store), so every rule here is unit-tested.
//!
//! An update that cannot be read (`backend-data='{'`, a truncated etcd value)
//! never removes a working peer: like upstream, the peer keeps its last good
//! lease until a readable update or its deletion arrives. Refusing a peer that
//! was never accepted stays as strict as for any new peer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::config::netconf::NetConf;
use crate::lease::{Lease, Outcome, PeerSet, Refusal};
use crate::manager::{LeaseEvent, PeerRead};
use crate::metrics::Metrics;

pub struct Intake {
    pub conf: NetConf,
    pub own: Lease,
    pub peers: PeerSet,
    /// What was last said about a peer (so each reason is warned about once).
    pub warned: HashMap<String, String>,
    /// Peers refused now, (name, IPv6?) → reason (flannel_peer_leases_refused).
    pub refused: HashMap<(String, bool), &'static str>,
    /// When the oldest change not yet in the kernel arrived.
    pub pending_since: Option<Instant>,
    pub metrics: Arc<Metrics>,
}

impl Intake {
    pub fn new(conf: NetConf, own: Lease, metrics: Arc<Metrics>) -> Intake {
        Intake {
            conf,
            own,
            peers: PeerSet::default(),
            warned: HashMap::new(),
            refused: HashMap::new(),
            pending_since: None,
            metrics,
        }
    }

    /// Says `why` about `key` unless it was the last thing said about it.
    pub fn warn_once(&mut self, key: &str, why: String, line: impl FnOnce(&str)) {
        if self.warned.get(key) != Some(&why) {
            line(&why);
            self.warned.insert(key.to_string(), why);
        }
    }

    fn note(&mut self, out: Outcome) -> bool {
        for (name, why) in out.refused {
            let reason = match why {
                Refusal::Invalid(_) => "invalid",
                Refusal::Conflict { .. } => "conflict",
                Refusal::Duplicate(_) => "duplicate",
            };
            self.refused.insert((name.clone(), false), reason);
            self.warn_once(&name.clone(), why.to_string(), |w| {
                tracing::warn!("skipping peer {name}: {w}")
            });
        }
        out.changed
    }

    fn upsert(&mut self, name: String, read: PeerRead) -> bool {
        match read {
            Ok(Some(lease)) => {
                self.refused.remove(&(name.clone(), false));
                let out = self.peers.upsert(&name, lease, &self.conf, &self.own);
                if out.refused.is_empty() {
                    self.warned.remove(&name);
                }
                self.note(out)
            }
            Ok(None) => self.remove(&name),
            Err(why) => self.malformed(name, why),
        }
    }

    /// An unreadable update: an accepted peer keeps its last good lease; any
    /// other peer is refused (and a waiting claim of it dropped).
    fn malformed(&mut self, name: String, why: String) -> bool {
        self.metrics.peer_updates_malformed.inc();
        self.refused.insert((name.clone(), false), "malformed");
        if self.peers.accepted().contains_key(&name) {
            self.warn_once(&name.clone(), why, |w| {
                tracing::warn!("peer {name}: unreadable update ({w}); keeping its last good lease")
            });
            return false;
        }
        self.warn_once(&name.clone(), why, |w| {
            tracing::warn!("skipping peer {name}: {w}")
        });
        let out = self.peers.remove(&name, &self.conf, &self.own);
        self.note(out)
    }

    fn remove(&mut self, name: &str) -> bool {
        self.warned.remove(name);
        self.refused.remove(&(name.to_string(), false));
        let out = self.peers.remove(name, &self.conf, &self.own);
        self.note(out)
    }

    /// Takes in one change from the store; true if the accepted peers changed.
    pub fn handle(&mut self, ev: LeaseEvent) -> bool {
        let changed = self.take(ev);
        if changed {
            self.pending_since.get_or_insert_with(Instant::now);
        }
        // A refusal changes no accepted peer, so it is published here (O(refused)).
        self.publish_refused();
        changed
    }

    fn take(&mut self, ev: LeaseEvent) -> bool {
        match ev {
            LeaseEvent::Upsert(name, read) => self.upsert(name, read),
            LeaseEvent::Remove(name) => self.remove(&name),
            LeaseEvent::Snapshot(items) => self.snapshot(items),
        }
    }

    /// A complete list replaces the set: current holders first (a re-list cannot
    /// hand a subnet to a claimant), an unreadable entry of an accepted peer
    /// keeps its last good lease, and a peer missing from the list is removed.
    fn snapshot(&mut self, items: Vec<(String, PeerRead)>) -> bool {
        let mut old = std::mem::take(&mut self.peers);
        // Everything the old set held is in the next pass's scope, with what it held.
        let before: Vec<(String, Option<Lease>)> = old
            .take_dirty()
            .into_iter()
            .chain(
                old.accepted()
                    .iter()
                    .map(|(n, l)| (n.clone(), Some(l.clone()))),
            )
            .collect();
        self.peers.mark_dirty(before);
        let (mut first, rest): (Vec<_>, Vec<_>) = items.into_iter().partition(|(n, r)| match r {
            Ok(Some(l)) => old.accepted().get(n) == Some(l),
            Err(_) => old.accepted().contains_key(n),
            Ok(None) => false,
        });
        first.extend(rest);
        self.warned.clear();
        self.refused.retain(|(_, v6), r| *v6 || *r == "unroutable");
        for (name, read) in first {
            match (read, old.accepted().get(&name)) {
                (Err(why), Some(last)) => {
                    self.upsert(name.clone(), Ok(Some(last.clone())));
                    self.malformed(name, why);
                }
                (read, _) => {
                    self.upsert(name, read);
                }
            }
        }
        true
    }

    /// Refusals still standing: a refused lease until its peer is accepted or
    /// gone, an unreadable update while its peer keeps its last lease, a peer
    /// the backend cannot serve while it is accepted.
    pub fn publish_refused(&mut self) {
        let accepted = self.peers.accepted();
        self.refused.retain(|(name, _), reason| match *reason {
            "unroutable" => accepted.contains_key(name),
            "malformed" => true,
            _ => !accepted.contains_key(name),
        });
        self.metrics.set_refused(self.refused.values());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::tests::{conf, lease};

    fn intake() -> Intake {
        let own = lease("10.244.0.0/24", "198.18.0.11", "52:82:d5:a1:90:4d");
        Intake::new(conf(), own, Arc::new(Metrics::default()))
    }

    fn n2() -> Lease {
        lease("10.244.1.0/24", "198.18.0.12", "52:82:d5:a1:90:02")
    }

    fn refused(i: &Intake, reason: &str) -> usize {
        i.refused.values().filter(|r| **r == reason).count()
    }

    #[test]
    fn an_unreadable_update_keeps_the_last_good_lease() {
        let mut i = intake();
        assert!(i.handle(LeaseEvent::Upsert("n2".into(), Ok(Some(n2())))));
        i.peers.take_dirty();
        // `kubectl annotate node n2 backend-data='{'`: n2 stays, nothing to program.
        let bad = LeaseEvent::Upsert("n2".into(), Err("backend-data: EOF".into()));
        assert!(!i.handle(bad.clone()));
        assert_eq!(i.peers.accepted().get("n2"), Some(&n2()));
        assert!(i.peers.take_dirty().is_empty());
        assert_eq!(refused(&i, "malformed"), 1);
        assert_eq!(i.metrics.peer_updates_malformed.get(), 1);
        // A re-list that still reads it badly keeps it too.
        i.handle(LeaseEvent::Snapshot(vec![(
            "n2".into(),
            Err("backend-data: EOF".into()),
        )]));
        assert_eq!(i.peers.accepted().get("n2"), Some(&n2()));
        assert_eq!(refused(&i, "malformed"), 1);
        // A readable update replaces it and ends the refusal.
        let mut moved = n2();
        moved.public_ip = Some("198.18.0.22".parse().unwrap());
        assert!(i.handle(LeaseEvent::Upsert("n2".into(), Ok(Some(moved.clone())))));
        assert_eq!(i.peers.accepted().get("n2"), Some(&moved));
        assert_eq!(refused(&i, "malformed"), 0);
        // Only a deletion removes it.
        i.handle(bad);
        assert!(i.handle(LeaseEvent::Remove("n2".into())));
        assert!(i.peers.accepted().is_empty());
        assert_eq!(refused(&i, "malformed"), 0);
    }

    #[test]
    fn an_unreadable_new_peer_is_refused_as_before() {
        let mut i = intake();
        assert!(!i.handle(LeaseEvent::Upsert("n3".into(), Err("bad".into()))));
        assert!(i.peers.accepted().is_empty());
        assert_eq!(refused(&i, "malformed"), 1);
        // Not listed any more: the refusal goes with it.
        i.handle(LeaseEvent::Snapshot(vec![]));
        assert_eq!(refused(&i, "malformed"), 0);
    }

    #[test]
    fn a_node_that_stops_being_a_flannel_peer_is_removed() {
        let mut i = intake();
        i.handle(LeaseEvent::Upsert("n2".into(), Ok(Some(n2()))));
        assert!(i.handle(LeaseEvent::Upsert("n2".into(), Ok(None))));
        assert!(i.peers.accepted().is_empty());
    }
}
