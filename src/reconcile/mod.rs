//! The reconciler: lease events fold into the [`PeerSet`]; the backend says
//! what each peer owns in the kernel; one diff/apply path in two scopes — the
//! peers that changed, against what was applied (lease events: cost independent
//! of the cluster's size), or everything, against a fresh kernel dump (start-up,
//! netlink drift, failures, a slow safety timer). The drift monitor watches
//! netlink and asks for a full pass when the kernel deviates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::config::flags::Flags;
use crate::config::netconf::NetConf;
use crate::dataplane::model::{diff, Diff, PeerChange, PeerEntries, State, Tracker};
use crate::dataplane::netlink::{Devices, Netlink, Scope};
use crate::iface::ExternalInterface;
use crate::lease::Lease;
use crate::manager::{LeaseEvent, LeaseRequest};
use crate::metrics::Metrics;

/// Full re-check of the kernel even without events. Deviations are seen through
/// netlink events and a lost subscription is renewed, so this is only a backstop.
pub const SAFETY_RESYNC: Duration = Duration::from_secs(300);

/// What the drift monitor compares netlink events against: per family, the
/// wanted entries, their devices and the range of routes that are ours.
#[derive(Default)]
pub struct Watched {
    pub planes: Vec<(State, Devices, Scope)>,
    /// A full pass has published what is wanted (before it, an empty wanted
    /// state means "not known yet", not "nothing").
    pub known: bool,
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
    /// Until the first successful full check: upstream-shaped routes may be
    /// taken over (see [`Netlink::observe`]).
    adopt: bool,
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
            adopt: true,
        })
        .collect()
}
pub mod drift;
pub mod intake;
mod reselect;
pub mod schedule;

pub use drift::{follow_netlink, follow_wireguard};
use intake::Intake;

pub struct Reconciler<B> {
    pub nl: Netlink,
    pub backend: B,
    pub ext: ExternalInterface,
    /// For re-selecting the interface when its addresses change.
    pub flags: Flags,
    /// What we publish; changes with the node's address.
    pub req: LeaseRequest,
    /// The manager's lease keeper, the one writer of our lease, publishes the
    /// latest value sent here.
    pub publish: tokio::sync::watch::Sender<LeaseRequest>,
    /// Lease events folded into accepted peers.
    pub intake: Intake,
    pub planes: Vec<Plane>,
    pub metrics: Arc<Metrics>,
    pub watched: Arc<std::sync::RwLock<Watched>>,
    /// Why the last pass failed (for /readyz).
    pub fail_reason: String,
}

impl<B: Backend> Reconciler<B> {
    /// Takes in one change from the store; true if the accepted peers changed.
    pub fn handle(&mut self, ev: LeaseEvent) -> bool {
        self.intake.handle(ev)
    }

    /// Whether every family's kernel state is known (so changes can be diffed
    /// against what was applied instead of a kernel dump).
    pub fn applied_known(&self) -> bool {
        self.planes.iter().all(|p| p.known)
    }

    /// One pass, in one of two scopes over the same diff and apply:
    /// - full (start-up, netlink drift, failures, the safety timer): repair the
    ///   devices, dump the kernel and diff every peer's entries against it;
    /// - incremental (lease events): diff only the peers whose accepted lease
    ///   changed since the last pass against what was applied — the cost of one
    ///   changed peer does not grow with the cluster.
    pub async fn reconcile(&mut self, full: bool) -> bool {
        let ok = self.pass(full).await;
        if ok {
            self.metrics.dataplane.ok();
        } else {
            self.metrics.dataplane.failed(self.fail_reason.clone());
        }
        ok
    }

    /// A dead netlink connection (its socket failed) fails every request:
    /// replace it, and check everything over the new one.
    fn revive_netlink(&mut self) -> bool {
        if self.nl.alive() {
            return true;
        }
        match Netlink::connect() {
            Ok(nl) => {
                tracing::warn!("the netlink connection had ended; opened a new one");
                self.metrics
                    .task_restarts
                    .get_or_create(&crate::metrics::TaskLabel { task: "netlink" })
                    .inc();
                self.nl = nl;
                for p in &mut self.planes {
                    p.known = false;
                }
                true
            }
            Err(e) => {
                self.fail_reason = format!("opening a netlink socket: {e}");
                tracing::error!("{}", self.fail_reason);
                false
            }
        }
    }

    async fn pass(&mut self, full: bool) -> bool {
        let started = Instant::now();
        if !self.revive_netlink() {
            return false;
        }
        let touched = self.intake.peers.take_dirty();
        let mut full = full || !self.applied_known();
        if full {
            self.reselect().await;
            match self
                .backend
                .configure(&self.nl, &self.ext, &self.intake.own)
                .await
            {
                Ok(true) => {
                    tracing::warn!("the flannel device was re-created; re-programming all peers");
                }
                Ok(false) => {}
                Err(e) => {
                    self.fail_reason = format!("repairing the backend device: {e:#}");
                    tracing::error!("{}", self.fail_reason);
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
        ok &= self.sync_peers(full, &touched).await;
        self.metrics.peers.set(self.intake.peers.len() as i64);
        self.metrics.observe_reconcile(full, started.elapsed());
        if ok {
            if let Some(since) = self.intake.pending_since.take() {
                self.metrics
                    .event_to_kernel
                    .observe(since.elapsed().as_secs_f64());
            }
        }
        self.intake.publish_refused();
        ok
    }

    /// The backend's work outside the kernel's tables (extension's commands).
    async fn sync_peers(&mut self, full: bool, touched: &[(String, Option<Lease>)]) -> bool {
        let scope = (!full).then_some(touched);
        let failed = self.backend.sync_peers(&self.intake.peers, scope).await;
        for e in failed.iter().take(5) {
            tracing::warn!("{e}");
        }
        if failed.len() > 5 {
            tracing::warn!("... and {} more failed commands", failed.len() - 5);
        }
        match failed.first() {
            None => true,
            Some(e) => {
                self.fail_reason = format!("{} peer commands failed, e.g. {e}", failed.len());
                false
            }
        }
    }

    /// One peer's entries in one family; a peer the backend cannot serve is
    /// warned about once and owns nothing.
    fn peer_entries(&mut self, name: &str, v6: bool) -> Option<PeerEntries> {
        let lease = self.intake.peers.accepted().get(name)?;
        match self.backend.entries(&self.ext, lease, v6) {
            Ok(e) => {
                let k = (name.to_string(), v6);
                if self.intake.refused.get(&k) == Some(&"unroutable") {
                    self.intake.refused.remove(&k);
                }
                e
            }
            Err(why) => {
                self.intake
                    .refused
                    .insert((name.to_string(), v6), "unroutable");
                let key = if v6 {
                    format!("{name} (IPv6)")
                } else {
                    name.to_string()
                };
                self.intake.warn_once(&key.clone(), why, |w| {
                    tracing::warn!("not routing to peer {key}: {w}")
                });
                None
            }
        }
    }

    /// Every peer against a fresh kernel dump; resets the plane's tracker.
    async fn full_plane(&mut self, i: usize, started: Instant) -> bool {
        let (v6, scope) = (self.planes[i].v6, self.planes[i].scope);
        let devices = self.backend.devices(&self.ext, v6);
        let names: Vec<String> = self.intake.peers.accepted().keys().cloned().collect();
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
            w.known = true;
        }
        let have = match self.observe(i, devices, scope).await {
            Ok(o) => o,
            Err(e) => {
                self.fail_reason =
                    format!("reading the kernel's {} state: {e}", self.planes[i].name());
                tracing::error!("{}", self.fail_reason);
                self.planes[i].known = false;
                return false;
            }
        };
        let d = diff(&want, &have);
        let ok = self.apply(i, &d, devices, started, true).await;
        if ok {
            self.planes[i].tracker.reset(want);
            self.planes[i].adopt = false;
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
        let wg_failed = self.apply_wg(self.planes[i].v6, d).await;
        self.metrics.count_netlink(&report);
        for e in report.failed.iter().take(5) {
            tracing::warn!("{e}");
        }
        for e in wg_failed.iter().take(5) {
            tracing::warn!("{e}");
        }
        if let Some(e) = report.failed.first() {
            self.fail_reason = format!(
                "{} of {} kernel changes failed, e.g. {e}",
                report.failed.len() + wg_failed.len(),
                d.ops()
            );
        } else if let Some(e) = wg_failed.first() {
            self.fail_reason = format!(
                "{} of {} kernel changes failed, e.g. {e}",
                wg_failed.len(),
                d.ops()
            );
        }
        if report.failed.len() > 5 {
            tracing::warn!("... and {} more netlink errors", report.failed.len() - 5);
        }
        if d.ops() > 1000 {
            release_freed_memory();
        }
        let wg = d.wg.set.len() + d.wg.del.len();
        tracing::info!(
            "programmed {} peers ({}): {} changes ({} routes, {} neighbours, {} fdb{}) in {:?}{}",
            self.intake.peers.len(),
            self.planes[i].name(),
            d.ops(),
            d.routes.set.len() + d.routes.del.len(),
            d.neighs.set.len() + d.neighs.del.len(),
            d.fdb.set.len() + d.fdb.del.len() + d.fdb_extra.len(),
            if wg > 0 {
                format!(", {wg} wireguard peers")
            } else {
                String::new()
            },
            started.elapsed(),
            if full { " (full check)" } else { "" }
        );
        report.failed.is_empty() && wg_failed.is_empty()
    }

    /// The kernel's entries of one family as the diff sees them: rtnetlink's
    /// routes/neighbours/FDB, plus the backend's WireGuard peers.
    async fn observe(
        &mut self,
        i: usize,
        devices: Devices,
        scope: Scope,
    ) -> anyhow::Result<crate::dataplane::model::Observed> {
        let mut o = self
            .nl
            .observe(devices, scope, self.planes[i].adopt)
            .await?;
        o.state.wg = self.backend.observe_peers(self.planes[i].v6).await?;
        Ok(o)
    }

    /// The WireGuard part of a diff, counted like netlink requests.
    async fn apply_wg(&mut self, v6: bool, d: &Diff) -> Vec<String> {
        if d.wg.is_empty() {
            return vec![];
        }
        let failed = self.backend.apply_peers(v6, &d.wg).await;
        let count = |op: &'static str, n: usize| {
            self.metrics
                .netlink_ops
                .get_or_create(&crate::metrics::NetlinkLabels { op, kind: "wgpeer" })
                .inc_by(n as u64);
        };
        count("set", d.wg.set.len());
        count("delete", d.wg.del.len());
        if !failed.is_empty() {
            self.metrics
                .netlink_errors
                .get_or_create(&crate::metrics::NetlinkLabels {
                    op: "set",
                    kind: "wgpeer",
                })
                .inc_by(failed.len() as u64);
        }
        failed
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
