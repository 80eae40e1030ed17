//! The drift monitor: follows netlink notifications and kicks a full check
//! when the kernel deviates from what the reconciler wants (our own changes'
//! echoes match the wanted state and cost nothing).

use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use tokio::sync::mpsc;

use super::Watched;
use crate::dataplane::netlink::deviates;

/// Watches netlink and kicks a full check when the kernel deviates from what
/// we want. Returns an error when the subscription ends (e.g. its socket
/// overflowed): the supervisor runs it again, and a run that is not the first
/// (`renewed`) kicks a full check at once, since events may have been lost.
pub async fn follow_netlink(
    watched: Arc<std::sync::RwLock<Watched>>,
    v6: bool,
    kick: mpsc::Sender<()>,
    renewed: bool,
) -> anyhow::Result<()> {
    use rtnetlink::MulticastGroup as G;
    let mut groups = vec![G::Link, G::Neigh, G::Ipv4Route, G::Ipv4Ifaddr];
    if v6 {
        groups.extend([G::Ipv6Route, G::Ipv6Ifaddr]);
    }
    let (conn, _handle, mut msgs) =
        rtnetlink::new_multicast_connection(&groups).context("subscribing to netlink events")?;
    let conn = tokio::spawn(conn);
    // Aborted with this run, however it ends.
    let _conn = AbortOnDrop(conn);
    if renewed {
        let _ = kick.try_send(());
    }
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
            return Ok(());
        }
    }
    anyhow::bail!("the netlink event subscription ended (events may have been lost)")
}

/// Aborts a spawned task when dropped.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the kernel WireGuard devices are read: the kernel sends no
/// notification when a peer, key or port changes (`wg set`), so this one check
/// reads each device (one genetlink dump of its peers) and compares it with what
/// is wanted — drift is repaired within this interval plus one pass. Userspace
/// devices change only through the agent: they are read only for the gauges.
pub const WG_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The peer gauges (handshakes, bytes) are refreshed every this many checks.
pub const WG_STATS_EVERY: u32 = 10;

/// Reads the WireGuard devices every [`WG_CHECK`] and kicks a full check when
/// one holds other peers, another key or another port than wanted. Also keeps
/// the peers' handshake and byte gauges. A read that fails (the device is
/// being re-created) is a deviation too.
pub async fn follow_wireguard(
    watched: Arc<std::sync::RwLock<Watched>>,
    probe: crate::backend::wireguard::Probe,
    kick: mpsc::Sender<()>,
    metrics: Arc<crate::metrics::Metrics>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(WG_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut turn: u32 = 0;
    loop {
        tick.tick().await;
        turn = turn.wrapping_add(1);
        let stats_turn = turn % WG_STATS_EVERY == 1;
        let devices = probe
            .devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut drift = false;
        let mut stats = Vec::new();
        if !stats_turn && devices.iter().all(|d| !d.check) {
            continue;
        }
        for d in devices.into_iter().filter(|d| d.check || stats_turn) {
            let st = match d.ctl.get().await {
                Ok(st) => st,
                Err(e) => {
                    tracing::debug!("reading a WireGuard device: {e:#}");
                    drift = true;
                    continue;
                }
            };
            let peers_differ = {
                let w = watched.read().unwrap_or_else(|e| e.into_inner());
                // Until the first full pass, nothing is known to be wanted: the
                // devices' peers (adopted across a restart) are not drift.
                w.known
                    && w.planes
                        .iter()
                        .filter(|(_, _, scope)| scope.network.is_ipv6() == d.v6)
                        .any(|(want, _, _)| want.wg != st.peers)
            };
            if d.check && (peers_differ || !st.holds_key(&d.private) || st.listen_port != d.port) {
                drift = true;
            }
            stats.extend(st.stats.into_values());
        }
        if stats_turn {
            metrics.wireguard.observe(&stats);
        }
        if drift && kick.try_send(()).is_err() && kick.is_closed() {
            return Ok(());
        }
    }
}
