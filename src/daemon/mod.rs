//! The agent's start-up: choose the interface, prepare the backend, acquire and
//! publish the lease, write subnet.env, then put every long-lived task under
//! the [`Supervisor`] (firewall keepers, peer watch, lease keeper, drift
//! monitor) and hand the events to the [event loop](event_loop), which drives
//! the [`Reconciler`] forever.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::backend::Backend;
use crate::config::flags::Flags;
use crate::config::netconf::NetConf;
use crate::dataplane::model::State;
use crate::dataplane::netlink::Netlink;
use crate::firewall;
use crate::iface;
use crate::manager::{LeaseEvent, LeaseRequest, SubnetManager};
use crate::metrics::Metrics;
use crate::reconcile::intake::Intake;
use crate::reconcile::{
    follow_netlink, follow_wireguard, planes, release_freed_memory, show, Reconciler, Watched,
    SAFETY_RESYNC,
};
use crate::subnet_env::SubnetEnv;
use crate::supervisor::Supervisor;

pub mod event_loop;

pub struct Agent<M, B> {
    pub flags: Flags,
    pub conf: NetConf,
    pub manager: Arc<M>,
    pub backend: B,
    pub metrics: Arc<Metrics>,
    pub queue_depth: usize,
    /// Tasks started before the agent (the NetworkPolicy watches) join these.
    pub sup: Supervisor,
}

impl<M: SubnetManager, B: Backend> Agent<M, B> {
    /// Starts everything and runs until the agent cannot go on; returns why.
    pub async fn run(self) -> anyhow::Result<()> {
        let Agent {
            mut flags,
            conf,
            manager,
            mut backend,
            metrics,
            queue_depth,
            mut sup,
        } = self;
        let nl = Netlink::connect().context("opening netlink")?;
        let (a4, a6) = manager.assigned_public_ips().await;
        if let Some(ip) = a4 {
            tracing::info!("node-public-ip annotation: using {ip} as the public IP");
            flags.public_ip = Some(ip);
        }
        if let Some(ip) = a6 {
            tracing::info!("node-public-ipv6 annotation: using {ip} as the public IPv6");
            flags.public_ipv6 = Some(ip);
        }
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
        let mut planes = planes(&conf, &own, flags.ip_blackhole_route);
        // The leased families, whatever the backend: their masquerade/forward rules.
        let families: Vec<_> = planes
            .iter()
            .map(|p| (p.scope.network, p.scope.own))
            .collect();
        if !backend.routes_peers() {
            planes.clear();
        }
        let setup = firewall::Setup {
            ip_masq: flags.ip_masq,
            forward: flags.iptables_forward_rules,
            fully_random: !flags.ip_masq_fully_random_disable,
            nftables: conf.enable_nftables,
            iptables_mode: flags.iptables_mode.clone(),
            resync: Duration::from_secs(flags.iptables_resync),
        };
        for keeper in firewall::start(&setup, &families, metrics.clone())
            .await
            .context("setting up the masquerade/forward rules")?
        {
            sup.forever("firewall", keeper);
        }

        let (tx, events) = mpsc::channel(queue_depth.max(16));
        if !backend.watches_peers() {
            // No peers to know (alloc): an empty list, and the channel held open.
            sup.forever("peer-watch", async move {
                let _ = tx.send(LeaseEvent::Snapshot(Vec::new())).await;
                std::future::pending::<()>().await
            });
        } else {
            let (m, c) = (manager.clone(), conf.clone());
            sup.restartable("peer-watch", move || {
                let (m, c, tx) = (m.clone(), c.clone(), tx.clone());
                async move {
                    m.watch(&c, tx).await;
                    Ok(())
                }
            });
        }
        // The lease keeper is the one writer of our published lease.
        let (publish, published) = watch::channel(req.clone());
        {
            let (m, c, o) = (manager.clone(), conf.clone(), own.clone());
            sup.critical("lease-keeper", async move {
                m.keep_alive(&c, &o, published).await
            });
        }
        let watched = Arc::new(std::sync::RwLock::new(Watched {
            planes: planes
                .iter()
                .map(|p| (State::default(), backend.devices(&ext, p.v6), p.scope))
                .collect(),
            known: false,
        }));
        let (kick_tx, kicks) = mpsc::channel(1);
        if let Some(probe) = backend.wg_probe().filter(|_| !planes.is_empty()) {
            let (w, k, m) = (watched.clone(), kick_tx.clone(), metrics.clone());
            sup.restartable("wireguard-check", move || {
                follow_wireguard(w.clone(), probe.clone(), k.clone(), m.clone())
            });
        }
        if !planes.is_empty() {
            let v6 = planes.iter().any(|p| p.v6);
            let w = watched.clone();
            let mut renewed = false;
            sup.restartable("drift-monitor", move || {
                let run = follow_netlink(w.clone(), v6, kick_tx.clone(), renewed);
                renewed = true;
                run
            });
        }
        let r = Reconciler {
            nl,
            backend,
            ext,
            flags: flags.clone(),
            req,
            publish,
            intake: Intake::new(conf, own, metrics.clone()),
            planes,
            metrics: metrics.clone(),
            watched,
            fail_reason: String::new(),
        };
        let mut wired = Wired { r, manager };
        let inputs = event_loop::Inputs {
            events,
            kicks,
            safety: SAFETY_RESYNC,
        };
        Err(event_loop::run(&mut wired, inputs, &mut sup, metrics).await)
    }
}

/// The reconciler as the event loop sees it, with what readiness needs.
struct Wired<M, B> {
    r: Reconciler<B>,
    manager: Arc<M>,
}

impl<M: SubnetManager, B: Backend> event_loop::Passes for Wired<M, B> {
    fn handle(&mut self, ev: LeaseEvent) -> bool {
        self.r.handle(ev)
    }

    async fn reconcile(&mut self, full: bool) -> bool {
        self.r.reconcile(full).await
    }

    fn applied_known(&self) -> bool {
        self.r.applied_known()
    }

    fn first_ready(&mut self, sup: &mut Supervisor) {
        tracing::info!("dataplane ready: {} peers", self.r.intake.peers.len());
        release_freed_memory();
        self.r.metrics.set_ready();
        // Transient API errors are retried inside; what is left is a
        // configuration error (RBAC), worth a loud line but not an exit:
        // the dataplane works without the condition.
        let m = self.manager.clone();
        sup.oneshot("node-condition", async move { m.complete().await });
    }
}
