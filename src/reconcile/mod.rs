//! The reconciler: lease events fold into the [`PeerSet`]; the backend says
//! what each peer owns in the kernel; one diff/apply path in two scopes — the
//! peers that changed, against what was applied (lease events: cost independent
//! of the cluster's size), or everything, against a fresh kernel dump (start-up,
//! netlink drift, failures, a slow safety timer). The drift monitor watches
//! netlink and asks for a full pass when the kernel deviates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::config::flags::Flags;
use crate::config::netconf::NetConf;
use crate::dataplane::model::{diff, Diff, PeerChange, PeerEntries, State, Tracker};
use crate::dataplane::netlink::{deviates, Devices, Netlink, Scope};
use crate::iface::{self, ExternalInterface};
use crate::lease::{Lease, Outcome, PeerSet, Refusal};
use crate::manager::{LeaseEvent, LeaseRequest, PeerRead};
use crate::metrics::Metrics;

/// Full re-check of the kernel even without events. Deviations are seen through
/// netlink events and a lost subscription is renewed, so this is only a backstop.
pub const SAFETY_RESYNC: Duration = Duration::from_secs(300);

/// What the drift monitor compares netlink events against: per family, the
/// wanted entries, their devices and the range of routes that are ours.
#[derive(Default)]
pub struct Watched {
    pub planes: Vec<(State, Devices, Scope)>,
}

/// One address family's dataplane: which routes are ours, and what the kernel
/// holds after our last successful apply, per peer.
pub struct Plane {
    pub v6: bool,
    pub scope: Scope,
    tracker: Tracker,
    /// False until a full check succeeded, and after any failure: the next pass
    /// is then a full one.
    known: bool,
    /// Before the first complete peer list: what the kernel holds, as far as
    /// additions ahead of the list are concerned.
    seen: Option<State>,
}

impl Plane {
    fn name(&self) -> &'static str {
        if self.v6 {
            "IPv6"
        } else {
            "IPv4"
        }
    }
}

/// "a, b" of the present addresses, or "none".
pub fn show(ips: &[Option<std::net::IpAddr>]) -> String {
    let v: Vec<String> = ips.iter().flatten().map(|i| i.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The families this node routes: enabled in the config and leased.
pub fn planes(conf: &NetConf, own: &Lease, blackhole: bool) -> Vec<Plane> {
    let v4 = conf
        .v4
        .as_ref()
        .zip(own.subnet)
        .map(|(p, s)| (false, p.network, s));
    let v6 = conf
        .v6
        .as_ref()
        .zip(own.ipv6_subnet)
        .map(|(p, s)| (true, p.network, s));
    v4.into_iter()
        .chain(v6)
        .map(|(v6, network, own)| Plane {
            v6,
            scope: Scope {
                network,
                own,
                blackhole,
            },
            tracker: Tracker::default(),
            known: false,
            seen: None,
        })
        .collect()
}
pub mod schedule;

pub struct Reconciler<B> {
    pub nl: Netlink,
    pub backend: B,
    pub ext: ExternalInterface,
    /// For re-selecting the interface when its addresses change.
    pub flags: Flags,
    /// What we publish; changes with the node's address.
    pub req: LeaseRequest,
    /// Set when the node's address changed: the lease must be published again.
    pub republish: Option<LeaseRequest>,
    pub own: Lease,
    pub conf: NetConf,
    pub peers: PeerSet,
    /// Peers of the initial list so far (only until the first Snapshot).
    pub provisional: PeerSet,
    pub planes: Vec<Plane>,
    pub warned: HashMap<String, String>,
    /// Peers refused now, (name, IPv6?) → reason (flannel_peer_leases_refused).
    pub refused: HashMap<(String, bool), &'static str>,
    /// When the oldest change not yet in the kernel arrived.
    pub pending_since: Option<Instant>,
    pub metrics: Arc<Metrics>,
    pub watched: Arc<std::sync::RwLock<Watched>>,
}

impl<B: Backend> Reconciler<B> {
    fn note(&mut self, out: Outcome) -> bool {
        for (name, why) in out.refused {
            let reason = match why {
                Refusal::Invalid(_) => "invalid",
                Refusal::Conflict { .. } => "conflict",
                Refusal::Duplicate(_) => "duplicate",
            };
            self.refused.insert((name.clone(), false), reason);
            let why = why.to_string();
            if self.warned.get(&name) != Some(&why) {
                tracing::warn!("skipping peer {name}: {why}");
                self.warned.insert(name, why);
            }
        }
        out.changed
    }

    fn upsert(&mut self, name: String, read: PeerRead) -> bool {
        match read {
            Ok(Some(lease)) => {
                let out = self.peers.upsert(&name, lease, &self.conf, &self.own);
                if out.refused.is_empty() {
                    self.warned.remove(&name);
                }
                self.note(out)
            }
            Ok(None) => {
                self.warned.remove(&name);
                let out = self.peers.remove(&name, &self.conf, &self.own);
                self.note(out)
            }
            Err(why) => {
                self.refused.insert((name.clone(), false), "malformed");
                if self.warned.get(&name) != Some(&why) {
                    tracing::warn!("skipping peer {name}: {why}");
                    self.warned.insert(name.clone(), why);
                }
                let out = self.peers.remove(&name, &self.conf, &self.own);
                self.note(out)
            }
        }
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
            LeaseEvent::Remove(name) => {
                self.warned.remove(&name);
                let out = self.peers.remove(&name, &self.conf, &self.own);
                self.note(out)
            }
            LeaseEvent::Preview(items) => {
                // Only gathered here; conflicts are settled by the Snapshot.
                for (name, read) in items {
                    if let Ok(Some(lease)) = read {
                        self.provisional.upsert(&name, lease, &self.conf, &self.own);
                    }
                }
                false
            }
            LeaseEvent::Snapshot(items) => {
                self.provisional = PeerSet::default();
                for p in &mut self.planes {
                    p.seen = None;
                }
                // Current holders first, so a re-list cannot hand a subnet to a claimant.
                let mut old = std::mem::take(&mut self.peers);
                // Everything the old set held is in the next pass's scope, with
                // what it held (a peer missing from the new list is removed).
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
                let (mut first, rest): (Vec<_>, Vec<_>) = items.into_iter().partition(
                    |(n, r)| matches!(r, Ok(Some(l)) if old.accepted().get(n) == Some(l)),
                );
                first.extend(rest);
                self.warned.clear();
                for (name, read) in first {
                    self.upsert(name, read);
                }
                true
            }
        }
    }

    /// Programs the peers of the initial list seen so far, additions only: no entry
    /// the kernel already holds is replaced and nothing is removed, so a conflicting
    /// lease cannot displace a good one before the complete list decides. Failures
    /// are left to the full check that follows the list.
    pub async fn apply_preview(&mut self) {
        for i in 0..self.planes.len() {
            let (v6, scope) = (self.planes[i].v6, self.planes[i].scope);
            let devices = self.backend.devices(&self.ext, v6);
            if self.planes[i].seen.is_none() {
                match self.nl.observe(devices, scope).await {
                    Ok(o) => self.planes[i].seen = Some(o.state),
                    Err(e) => {
                        tracing::debug!("not programming ahead of the list: {e}");
                        return;
                    }
                }
            }
            let (want, _) = self.backend.desired(&self.ext, &self.provisional, v6);
            let Some(seen) = self.planes[i].seen.as_mut() else {
                continue;
            };
            let add = crate::dataplane::model::additions(&want, seen);
            if add.is_empty() {
                continue;
            }
            let report = self.nl.apply(&add, devices).await;
            self.metrics.count_netlink(&report);
            seen.absorb(&add);
            tracing::debug!(
                "programmed {} entries for {} peers ahead of the complete list ({} failed)",
                add.ops(),
                self.provisional.len(),
                report.failed.len()
            );
        }
    }

    /// Whether every family's kernel state is known (so changes can be diffed
    /// against what was applied instead of a kernel dump).
    pub fn applied_known(&self) -> bool {
        self.planes.iter().all(|p| p.known)
    }

    /// On a full check: has the selected interface (or its address) changed?
    /// Then everything follows the new one: the VXLAN device's `local`, the
    /// desired routes, and (through `republish`) the published lease. A pinned
    /// `--public-ip` stays what it is (select() takes it from the flag).
    async fn reselect(&mut self) {
        let (v4, v6) = (self.conf.v4.is_some(), self.conf.v6.is_some());
        let ext = match iface::select(&self.nl, &self.flags, v4, v6).await {
            Ok(e) => e,
            Err(e) => {
                // E.g. between an address's removal and its successor's arrival:
                // keep the old selection; the next event brings another check.
                tracing::debug!("re-selecting the interface: {e}");
                return;
            }
        };
        if ext == self.ext {
            return;
        }
        tracing::warn!(
            "the node's interface changed: {} ({}) -> {} ({}); following it",
            self.ext.name,
            show(&[
                self.ext.public_ip.map(Into::into),
                self.ext.public_ipv6.map(Into::into)
            ]),
            ext.name,
            show(&[
                ext.public_ip.map(Into::into),
                ext.public_ipv6.map(Into::into)
            ]),
        );
        let req = LeaseRequest {
            public_ip: ext.public_ip.filter(|_| v4),
            public_ipv6: ext.public_ipv6.filter(|_| v6),
            ..self.req.clone()
        };
        if req != self.req {
            self.own.public_ip = req.public_ip;
            self.own.public_ipv6 = req.public_ipv6;
            self.req = req.clone();
            self.republish = Some(req);
        }
        self.ext = ext;
        for p in &mut self.planes {
            p.known = false;
        }
    }

    /// One pass, in one of two scopes over the same diff and apply:
    /// - full (start-up, netlink drift, failures, the safety timer): repair the
    ///   devices, dump the kernel and diff every peer's entries against it;
    /// - incremental (lease events): diff only the peers whose accepted lease
    ///   changed since the last pass against what was applied — the cost of one
    ///   changed peer does not grow with the cluster.
    pub async fn reconcile(&mut self, full: bool) -> bool {
        let started = Instant::now();
        let touched = self.peers.take_dirty();
        let mut full = full || !self.applied_known();
        if full {
            self.reselect().await;
            match self.backend.configure(&self.nl, &self.ext, &self.own).await {
                Ok(true) => {
                    tracing::warn!("the flannel device was re-created; re-programming all peers");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("repairing the backend device: {e:#}");
                    for p in &mut self.planes {
                        p.known = false;
                    }
                    return false;
                }
            }
            full = true;
        }
        let mut ok = true;
        for i in 0..self.planes.len() {
            ok &= if full {
                self.full_plane(i, started).await
            } else {
                self.scoped_plane(i, &touched, started).await
            };
        }
        self.metrics.peers.set(self.peers.len() as i64);
        self.metrics.observe_reconcile(full, started.elapsed());
        if ok {
            if let Some(since) = self.pending_since.take() {
                self.metrics
                    .event_to_kernel
                    .observe(since.elapsed().as_secs_f64());
            }
        }
        self.publish_refused();
        ok
    }

    /// Refusals still standing: a refused lease until its peer is accepted or
    /// gone, a peer the backend cannot serve while it is accepted.
    fn publish_refused(&mut self) {
        let accepted = self.peers.accepted();
        self.refused
            .retain(|(name, _), reason| (*reason == "unroutable") == accepted.contains_key(name));
        self.metrics.set_refused(self.refused.values());
    }

    /// One peer's entries in one family; a peer the backend cannot serve is
    /// warned about once and owns nothing.
    fn peer_entries(&mut self, name: &str, v6: bool) -> Option<PeerEntries> {
        let lease = self.peers.accepted().get(name)?;
        match self.backend.entries(&self.ext, lease, v6) {
            Ok(e) => {
                self.refused.remove(&(name.to_string(), v6));
                e
            }
            Err(why) => {
                self.refused.insert((name.to_string(), v6), "unroutable");
                let key = if v6 {
                    format!("{name} (IPv6)")
                } else {
                    name.to_string()
                };
                if self.warned.get(&key) != Some(&why) {
                    tracing::warn!("not routing to peer {key}: {why}");
                    self.warned.insert(key, why);
                }
                None
            }
        }
    }

    /// Every peer against a fresh kernel dump; resets the plane's tracker.
    async fn full_plane(&mut self, i: usize, started: Instant) -> bool {
        let (v6, scope) = (self.planes[i].v6, self.planes[i].scope);
        let devices = self.backend.devices(&self.ext, v6);
        let names: Vec<String> = self.peers.accepted().keys().cloned().collect();
        let mut want = State::default();
        for name in names {
            if let Some(e) = self.peer_entries(&name, v6) {
                e.add_to(&mut want);
            }
        }
        if scope.blackhole {
            want.routes
                .insert(scope.own, crate::dataplane::model::Route::blackhole(v6));
        }
        // Published before applying, so the echoes of our own changes match it.
        {
            let mut w = self.watched.write().unwrap_or_else(|e| e.into_inner());
            if w.planes[i].0 != want || w.planes[i].1 != devices {
                w.planes[i] = (want.clone(), devices, scope);
            }
        }
        let have = match self.nl.observe(devices, scope).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!("reading the kernel's {} state: {e}", self.planes[i].name());
                self.planes[i].known = false;
                return false;
            }
        };
        let d = diff(&want, &have);
        let ok = self.apply(i, &d, devices, started, true).await;
        if ok {
            self.planes[i].tracker.reset(want);
        }
        self.planes[i].known = ok;
        ok
    }

    /// Only the `touched` peers' entries (what they owned under their previous
    /// lease, and what they own now), against what was applied.
    async fn scoped_plane(
        &mut self,
        i: usize,
        touched: &[(String, Option<Lease>)],
        started: Instant,
    ) -> bool {
        if touched.is_empty() {
            return true;
        }
        let v6 = self.planes[i].v6;
        let devices = self.backend.devices(&self.ext, v6);
        let changes: Vec<PeerChange> = touched
            .iter()
            .map(|(name, before)| PeerChange {
                old: before
                    .as_ref()
                    .and_then(|l| self.backend.entries(&self.ext, l, v6).ok().flatten()),
                new: self.peer_entries(name, v6),
            })
            .collect();
        let d = self.planes[i].tracker.scoped(&changes);
        {
            let mut w = self.watched.write().unwrap_or_else(|e| e.into_inner());
            let st = &mut w.planes[i].0;
            // All removals first: a key may pass from one changed peer to another.
            for old in changes.iter().filter_map(|c| c.old) {
                old.remove_from(st);
            }
            for new in changes.iter().filter_map(|c| c.new) {
                new.add_to(st);
            }
        }
        let ok = self.apply(i, &d, devices, started, false).await;
        if ok {
            self.planes[i].tracker.commit(&d);
        } else {
            self.planes[i].known = false;
        }
        ok
    }

    /// The one apply path: sends `d`, counts it, logs what changed.
    async fn apply(
        &mut self,
        i: usize,
        d: &Diff,
        devices: Devices,
        started: Instant,
        full: bool,
    ) -> bool {
        if d.is_empty() {
            return true;
        }
        tracing::debug!("diff (full={full}): {d:?}");
        let report = self.nl.apply(d, devices).await;
        self.metrics.count_netlink(&report);
        for e in report.failed.iter().take(5) {
            tracing::warn!("{e}");
        }
        if report.failed.len() > 5 {
            tracing::warn!("... and {} more netlink errors", report.failed.len() - 5);
        }
        if d.ops() > 1000 {
            release_freed_memory();
        }
        tracing::info!(
            "programmed {} peers ({}): {} changes ({} routes, {} neighbours, {} fdb) in {:?}{}",
            self.peers.len(),
            self.planes[i].name(),
            d.ops(),
            d.routes.set.len() + d.routes.del.len(),
            d.neighs.set.len() + d.neighs.del.len(),
            d.fdb.set.len() + d.fdb.del.len() + d.fdb_extra.len(),
            started.elapsed(),
            if full { " (full check)" } else { "" }
        );
        report.failed.is_empty()
    }
}

/// Gives memory freed after a large burst (initial list pages, big diffs) back to
/// the OS, so the resident size reflects the compact state actually held.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap bookkeeping.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Watches netlink and kicks a full check when the kernel deviates from what we
/// want. If the subscription ends (e.g. its socket overflowed), it is renewed and
/// a full check is kicked, since events may have been lost.
pub fn spawn_drift_monitor(
    watched: Arc<std::sync::RwLock<Watched>>,
    v6: bool,
    kick: mpsc::Sender<()>,
) -> anyhow::Result<()> {
    use rtnetlink::MulticastGroup as G;
    let mut groups = vec![G::Link, G::Neigh, G::Ipv4Route, G::Ipv4Ifaddr];
    if v6 {
        groups.extend([G::Ipv6Route, G::Ipv6Ifaddr]);
    }
    let subscribe = move || rtnetlink::new_multicast_connection(&groups);
    let (conn, _handle, mut msgs) = subscribe().context("subscribing to netlink events")?;
    let mut conn_task = tokio::spawn(conn);
    tokio::spawn(async move {
        loop {
            while let Some((m, _)) = msgs.next().await {
                let NetlinkPayload::InnerMessage(msg) = m.payload else {
                    continue;
                };
                let drift = {
                    let w = watched.read().unwrap_or_else(|e| e.into_inner());
                    w.planes
                        .iter()
                        .any(|(want, dev, scope)| deviates(&msg, want, *dev, *scope))
                };
                if drift && kick.try_send(()).is_err() && kick.is_closed() {
                    return;
                }
            }
            conn_task.abort();
            tracing::warn!(
                "the netlink event subscription ended; renewing it and re-checking the kernel"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            match subscribe() {
                Ok((c, _h, m)) => {
                    conn_task = tokio::spawn(c);
                    msgs = m;
                }
                Err(e) => tracing::error!("renewing the netlink subscription: {e}"),
            }
            if kick.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}
