//! The agent's start-up: choose the interface, prepare the backend, acquire and
//! publish the lease, write subnet.env, start the firewall keepers, the peer
//! watch, the lease keeper and the drift monitor — then hand every event to the
//! [`Reconciler`] (src/reconcile.rs) forever.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::config::flags::Flags;
use crate::config::netconf::NetConf;
use crate::dataplane::model::State;
use crate::dataplane::netlink::Netlink;
use crate::firewall;
use crate::iface;
use crate::lease::PeerSet;
use crate::manager::{LeaseEvent, LeaseRequest, SubnetManager};
use crate::metrics::Metrics;
use crate::reconcile::{
    planes, release_freed_memory,
    schedule::{Pass, Schedule},
    show, spawn_drift_monitor, Reconciler, Watched, SAFETY_RESYNC,
};
use crate::subnet_env::SubnetEnv;

pub struct Agent<M, B> {
    pub flags: Flags,
    pub conf: NetConf,
    pub manager: Arc<M>,
    pub backend: B,
    pub metrics: Arc<Metrics>,
    pub queue_depth: usize,
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
        let planes = planes(&conf, &own, flags.ip_blackhole_route);
        let setup = firewall::Setup {
            ip_masq: flags.ip_masq,
            forward: flags.iptables_forward_rules,
            fully_random: !flags.ip_masq_fully_random_disable,
            nftables: conf.enable_nftables,
            iptables_mode: flags.iptables_mode.clone(),
            resync: Duration::from_secs(flags.iptables_resync),
        };
        let families: Vec<_> = planes
            .iter()
            .map(|p| (p.scope.network, p.scope.own))
            .collect();
        firewall::start(&setup, &families, metrics.clone())
            .await
            .context("setting up the masquerade/forward rules")?;

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
        let watched = Arc::new(std::sync::RwLock::new(Watched {
            planes: planes
                .iter()
                .map(|p| (State::default(), backend.devices(&ext, p.v6), p.scope))
                .collect(),
        }));
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
            refused: HashMap::new(),
            pending_since: None,
            metrics: metrics.clone(),
            watched,
        };
        let mut synced = false;
        let mut previewed = false;
        let mut completed = false;
        let mut schedule = Schedule::default();
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
                                    schedule.full_now();
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
                Some(()) = kick_rx.recv() => schedule.drift(),
                _ = sleep_until(schedule.deadline()) => {}
                _ = safety.tick() => schedule.full_now(),
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
            let Some(pass) = schedule.decide(dirty, r.applied_known()) else {
                continue;
            };
            let ok = r.reconcile(pass == Pass::Full).await;
            schedule.done(ok);
            if let Some(req) = r.republish.take() {
                let (m, c) = (manager.clone(), r.conf.clone());
                tokio::spawn(async move {
                    match m.republish(&c, &req).await {
                        Ok(()) => tracing::info!("published the lease with the node's new address"),
                        Err(e) => tracing::error!("publishing the lease again: {e:#}"),
                    }
                });
            }
            if ok && !completed {
                completed = true;
                tracing::info!("dataplane ready: {} peers", r.peers.len());
                release_freed_memory();
                metrics.set_ready();
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
        }
    }
}

/// Sleeps until `at`, or forever when nothing is due.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
