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
