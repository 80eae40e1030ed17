//! The agent's life: choose the interface, prepare the backend, acquire and
//! publish the lease, write subnet.env, then reconcile forever.
//!
//! Reconciling: peer events update the [`PeerSet`]; the backend describes the
//! wanted kernel state; it is diffed against what was last applied (fast path,
//! after lease changes) or against a fresh kernel dump (after netlink drift
//! events, failures, and a slow safety timer); only the difference is applied.

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
use crate::dataplane::model::{diff, Observed, State};
use crate::dataplane::netlink::{deviates, Devices, Netlink, Scope};
use crate::firewall::{self, iptables::Iptables, nftables::Nftables, Wanted};
use crate::iface::{self, ExternalInterface};
use crate::lease::{Lease, Outcome, PeerSet};
use crate::manager::{LeaseEvent, LeaseRequest, PeerRead, SubnetManager};
use crate::metrics::Metrics;
use crate::subnet_env::SubnetEnv;

/// Full re-check of the kernel even without events. Deviations are seen through
/// netlink events and a lost subscription is renewed, so this is only a backstop.
const SAFETY_RESYNC: Duration = Duration::from_secs(300);

/// What the drift monitor compares netlink events against: per family, the
/// wanted entries, their devices and the range of routes that are ours.
#[derive(Default)]
struct Watched {
    planes: Vec<(State, Devices, Scope)>,
}

/// One address family's dataplane: which routes are ours, and what the kernel
/// holds after our last successful apply (None = unknown, re-read it).
struct Plane {
    v6: bool,
    scope: Scope,
    applied: Option<State>,
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
fn show(ips: &[Option<std::net::IpAddr>]) -> String {
    let v: Vec<String> = ips.iter().flatten().map(|i| i.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The families this node routes: enabled in the config and leased.
fn planes(conf: &NetConf, own: &Lease) -> Vec<Plane> {
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
            scope: Scope { network, own },
            applied: None,
            seen: None,
        })
        .collect()
}
/// Coalesces bursts of netlink events into one re-check.
const DRIFT_DEBOUNCE: Duration = Duration::from_millis(50);

pub struct Agent<M, B> {
    pub flags: Flags,
    pub conf: NetConf,
    pub manager: Arc<M>,
    pub backend: B,
    pub metrics: Arc<Metrics>,
    pub queue_depth: usize,
}

struct Reconciler<B> {
    nl: Netlink,
    backend: B,
    ext: ExternalInterface,
    /// For re-selecting the interface when its addresses change.
    flags: Flags,
    /// What we publish; changes with the node's address.
    req: LeaseRequest,
    /// Set when the node's address changed: the lease must be published again.
    republish: Option<LeaseRequest>,
    own: Lease,
    conf: NetConf,
    peers: PeerSet,
    /// Peers of the initial list so far (only until the first Snapshot).
    provisional: PeerSet,
    planes: Vec<Plane>,
    warned: HashMap<String, String>,
    metrics: Arc<Metrics>,
    watched: Arc<std::sync::RwLock<Watched>>,
    failures: u32,
}

impl<B: Backend> Reconciler<B> {
    fn note(&mut self, out: Outcome) -> bool {
        for (name, why) in out.refused {
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
                if self.warned.get(&name) != Some(&why) {
                    tracing::warn!("skipping peer {name}: {why}");
                    self.warned.insert(name.clone(), why);
                }
                let out = self.peers.remove(&name, &self.conf, &self.own);
                self.note(out)
            }
        }
    }

    fn handle(&mut self, ev: LeaseEvent) -> bool {
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
                let old = std::mem::take(&mut self.peers);
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
    async fn apply_preview(&mut self) {
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
            self.metrics.netlink_ops.add(report.done as u64);
            self.metrics.netlink_errors.add(report.failed.len() as u64);
            seen.absorb(&add);
            tracing::debug!(
                "programmed {} entries for {} peers ahead of the complete list ({} failed)",
                add.ops(),
                self.provisional.len(),
                report.failed.len()
            );
        }
    }

    /// Whether every family's last apply succeeded (so diffs can start from it).
    fn applied_known(&self) -> bool {
        self.planes.iter().all(|p| p.applied.is_some())
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
            p.applied = None;
        }
    }

    /// One pass. `full` re-reads the kernel and repairs devices.
    async fn reconcile(&mut self, full: bool) -> bool {
        let started = Instant::now();
        if full {
            self.reselect().await;
            match self.backend.configure(&self.nl, &self.ext, &self.own).await {
                Ok(true) => {
                    tracing::warn!("the flannel device was re-created; re-programming all peers");
                    for p in &mut self.planes {
                        p.applied = None;
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("repairing the backend device: {e:#}");
                    return false;
                }
            }
        }
        let wants: Vec<(State, Devices)> = self
            .planes
            .iter()
            .map(|p| {
                let (want, skipped) = self.backend.desired(&self.ext, &self.peers, p.v6);
                for (name, why) in skipped {
                    let key = if p.v6 { format!("{name} (IPv6)") } else { name };
                    if self.warned.get(&key) != Some(&why) {
                        tracing::warn!("not routing to peer {key}: {why}");
                        self.warned.insert(key, why);
                    }
                }
                (want, self.backend.devices(&self.ext, p.v6))
            })
            .collect();
        // Published before applying, so the echoes of our own changes match it.
        {
            let mut w = self.watched.write().unwrap_or_else(|e| e.into_inner());
            let same = w.planes.len() == wants.len()
                && w.planes
                    .iter()
                    .zip(&wants)
                    .all(|(a, b)| a.0 == b.0 && a.1 == b.1);
            if !same {
                w.planes = wants
                    .iter()
                    .zip(&self.planes)
                    .map(|((s, d), p)| (s.clone(), *d, p.scope))
                    .collect();
            }
        }
        let mut ok = true;
        for (i, (want, devices)) in wants.into_iter().enumerate() {
            ok &= self.reconcile_plane(i, want, devices, full, started).await;
        }
        self.metrics.peers.set(self.peers.len() as u64);
        self.metrics.reconciles.inc();
        self.metrics
            .reconcile_micros
            .add(started.elapsed().as_micros() as u64);
        ok
    }

    /// Brings one family's entries to `want`.
    async fn reconcile_plane(
        &mut self,
        i: usize,
        want: State,
        devices: Devices,
        full: bool,
        started: Instant,
    ) -> bool {
        let plane = &self.planes[i];
        let have = match (&plane.applied, full) {
            (Some(s), false) => Observed {
                fdb_all: s.fdb.iter().map(|(m, i)| (*m, *i)).collect(),
                state: s.clone(),
            },
            _ => match self.nl.observe(devices, plane.scope).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!("reading the kernel's {} state: {e}", plane.name());
                    return false;
                }
            },
        };
        let d = diff(&want, &have);
        if !d.is_empty() {
            tracing::debug!("diff (full={full}): {d:?}");
        }
        let mut ok = true;
        if !d.is_empty() {
            let report = self.nl.apply(&d, devices).await;
            self.metrics.netlink_ops.add(report.done as u64);
            self.metrics.netlink_errors.add(report.failed.len() as u64);
            for e in report.failed.iter().take(5) {
                tracing::warn!("{e}");
            }
            if report.failed.len() > 5 {
                tracing::warn!("... and {} more netlink errors", report.failed.len() - 5);
            }
            ok = report.failed.is_empty();
            if d.ops() > 1000 {
                release_freed_memory();
            }
            tracing::info!(
                "programmed {} peers ({}): {} changes ({} routes, {} neighbours, {} fdb) in {:?}{}",
                self.peers.len(),
                plane.name(),
                d.ops(),
                d.routes.set.len() + d.routes.del.len(),
                d.neighs.set.len() + d.neighs.del.len(),
                d.fdb.set.len() + d.fdb.del.len() + d.fdb_extra.len(),
                started.elapsed(),
                if full { " (full check)" } else { "" }
            );
        }
        self.planes[i].applied = ok.then_some(want);
        ok
    }
}

/// Gives memory freed after a large burst (initial list pages, big diffs) back to
/// the OS, so the resident size reflects the compact state actually held.
fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap bookkeeping.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Watches netlink and kicks a full check when the kernel deviates from what we
/// want. If the subscription ends (e.g. its socket overflowed), it is renewed and
/// a full check is kicked, since events may have been lost.
fn spawn_drift_monitor(
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

impl<M: SubnetManager, B: Backend> Agent<M, B> {
    pub async fn run(self) -> anyhow::Result<()> {
        let Agent {
            flags,
            conf,
            manager,
            mut backend,
            metrics,
            queue_depth,
        } = self;
        let nl = Netlink::connect().context("opening netlink")?;
        let ext = iface::select(&nl, &flags, conf.v4.is_some(), conf.v6.is_some()).await?;
        tracing::info!(
            "using interface {} (index {}, MTU {}), addresses {}, public IPs {}",
            ext.name,
            ext.index,
            ext.mtu,
            show(&[
                ext.iface_addr.map(Into::into),
                ext.iface_addr6.map(Into::into)
            ]),
            show(&[
                ext.public_ip.map(Into::into),
                ext.public_ipv6.map(Into::into)
            ]),
        );
        let prepared = backend
            .prepare(&nl, &ext)
            .await
            .with_context(|| format!("preparing the {} backend", backend.type_name()))?;
        // Only the enabled families' addresses are published (upstream leaves the others empty).
        let req = LeaseRequest {
            public_ip: ext.public_ip.filter(|_| conf.v4.is_some()),
            public_ipv6: ext.public_ipv6.filter(|_| conf.v6.is_some()),
            data: prepared.data,
            data_v6: prepared.data_v6.filter(|_| conf.v6.is_some()),
        };
        let own = manager.acquire(&conf, &req).await?;
        tracing::info!(
            "lease acquired: {}",
            [own.subnet, own.ipv6_subnet]
                .iter()
                .flatten()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        backend
            .configure(&nl, &ext, &own)
            .await
            .context("configuring the backend device")?;
        let env = SubnetEnv {
            network: conf.v4.as_ref().map(|p| p.network),
            subnet: own.subnet,
            ipv6_network: conf.v6.as_ref().map(|p| p.network),
            ipv6_subnet: own.ipv6_subnet,
            mtu: Some(prepared.mtu),
            ipmasq: Some(flags.ip_masq),
        };
        env.write(&flags.subnet_file)?;
        tracing::info!("wrote {}", flags.subnet_file.display());
        let planes = planes(&conf, &own);
        for p in &planes {
            if flags.ip_masq || flags.iptables_forward_rules {
                let want = Wanted::new(
                    p.scope.network,
                    p.scope.own,
                    flags.ip_masq,
                    flags.iptables_forward_rules,
                );
                let resync = Duration::from_secs(flags.iptables_resync);
                let m = metrics.clone();
                if conf.enable_nftables {
                    tokio::spawn(firewall::keep(Nftables::new(), want, resync, m));
                } else {
                    let fw = Iptables::new().await;
                    tokio::spawn(firewall::keep(fw, want, resync, m));
                }
            }
        }

        let (tx, mut rx) = mpsc::channel(queue_depth.max(16));
        {
            let m = manager.clone();
            let c = conf.clone();
            tokio::spawn(async move { m.watch(&c, tx).await });
        }
        let mut lease_lost = {
            let m = manager.clone();
            let (o, r) = (own.clone(), req.clone());
            tokio::spawn(async move { m.keep_alive(&o, &r).await })
        };
        let watched = Arc::new(std::sync::RwLock::new(Watched::default()));
        let (kick_tx, mut kick_rx) = mpsc::channel(1);
        if !planes.is_empty() {
            let v6 = planes.iter().any(|p| p.v6);
            spawn_drift_monitor(watched.clone(), v6, kick_tx)?;
        }
        let mut r = Reconciler {
            nl,
            backend,
            ext,
            flags: flags.clone(),
            req: req.clone(),
            republish: None,
            own,
            conf,
            peers: PeerSet::default(),
            provisional: PeerSet::default(),
            planes,
            warned: HashMap::new(),
            metrics: metrics.clone(),
            watched,
            failures: 0,
        };
        let mut synced = false;
        let mut previewed = false;
        let mut completed = false;
        let far = || tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let mut full_at = far();
        let mut safety = tokio::time::interval(SAFETY_RESYNC);
        safety.tick().await;
        loop {
            let mut dirty = false;
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { anyhow::bail!("the peer watch stopped") };
                    // This event and what is already queued: one reconcile per burst.
                    let mut next = Some(ev);
                    while let Some(ev) = next.take() {
                        match ev {
                            LeaseEvent::Snapshot(_) => {
                                if !synced {
                                    full_at = tokio::time::Instant::now();
                                }
                                synced = true;
                            }
                            LeaseEvent::Preview(_) if synced => {
                                next = rx.try_recv().ok();
                                continue;
                            }
                            LeaseEvent::Preview(_) => previewed = true,
                            _ => {}
                        }
                        dirty |= r.handle(ev);
                        next = rx.try_recv().ok();
                    }
                }
                Some(()) = kick_rx.recv() => {
                    let soon = tokio::time::Instant::now() + DRIFT_DEBOUNCE;
                    if soon < full_at { full_at = soon; }
                }
                _ = tokio::time::sleep_until(full_at) => {}
                _ = safety.tick() => { full_at = tokio::time::Instant::now(); }
                lost = &mut lease_lost => {
                    return Err(match lost {
                        Ok(e) => e,
                        Err(e) => anyhow::anyhow!("the lease keeper failed: {e}"),
                    });
                }
            }
            if !synced {
                if std::mem::take(&mut previewed) {
                    r.apply_preview().await;
                }
                continue;
            }
            let full = tokio::time::Instant::now() >= full_at || !r.applied_known();
            if !(dirty || full) {
                continue;
            }
            if full {
                full_at = far();
            }
            let ok = r.reconcile(full).await;
            if let Some(req) = r.republish.take() {
                let (m, c) = (manager.clone(), r.conf.clone());
                tokio::spawn(async move {
                    match m.republish(&c, &req).await {
                        Ok(()) => tracing::info!("published the lease with the node's new address"),
                        Err(e) => tracing::error!("publishing the lease again: {e:#}"),
                    }
                });
            }
            if ok {
                r.failures = 0;
                if !completed {
                    completed = true;
                    tracing::info!("dataplane ready: {} peers", r.peers.len());
                    release_freed_memory();
                    metrics.ready.set(1);
                    let m = manager.clone();
                    // Transient API errors are retried inside; what is left is a
                    // configuration error (RBAC), worth a loud line but not an exit:
                    // the dataplane works without the condition.
                    tokio::spawn(async move {
                        if let Err(e) = m.complete().await {
                            tracing::error!("{e:#}");
                        }
                    });
                }
            } else {
                r.failures += 1;
                let backoff = Duration::from_millis(200 * 2u64.pow(r.failures.min(7)));
                full_at = tokio::time::Instant::now() + backoff.min(Duration::from_secs(30));
            }
        }
    }
}
