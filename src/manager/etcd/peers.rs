//! Peers from etcd: read everything, then watch from the next revision (no
//! gap), with progress notifications; compaction means re-read at once.

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use super::codec::parse_lease;
use super::{EtcdManager, WATCH_IDLE};
use crate::manager::LeaseEvent;
use crate::retry::{Backoff, Cause, Classify, Throttle};

/// How one read-then-watch round ended.
pub(super) enum WatchEnd {
    /// The lease-event receiver is gone.
    Closed,
    Compacted(i64),
    /// New connections (the node's address changed): read afresh at once.
    Reconnected,
    Broke(String, Cause),
}

impl EtcdManager {
    /// Reads all leases, sends them as a Snapshot, then follows the watch from
    /// the next revision (so nothing between the read and the watch is lost).
    pub(super) async fn watch_once(
        &self,
        tx: &mpsc::Sender<LeaseEvent>,
        backoff: &mut Backoff,
        log: &mut Throttle,
    ) -> WatchEnd {
        let prefix = self.subnets_prefix();
        let own = self.own().map(|o| o.key).unwrap_or_default();
        let own_name = own.strip_prefix(&prefix).unwrap_or("").to_string();
        let (items, rev) = match self.read_all().await {
            Ok(x) => x,
            Err(e) => return WatchEnd::Broke(format!("reading leases from etcd: {e}"), e.cause()),
        };
        if !own_name.is_empty() && !items.iter().any(|(n, _, _)| *n == own_name) {
            self.lost.notify_one();
        }
        let snap = items
            .iter()
            .filter(|(n, _, _)| *n != own_name)
            .map(|(n, v, _)| (n.clone(), parse_lease(n, v)))
            .collect();
        if tx.send(LeaseEvent::Snapshot(snap)).await.is_err() {
            return WatchEnd::Closed;
        }
        let mut c = self.client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_progress_notify()
            .with_start_revision(rev + 1);
        let mut stream = match c.watch(prefix.clone(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => return WatchEnd::Broke(format!("watching {prefix}: {e}"), e.cause()),
        };
        backoff.reset();
        log.ok();
        self.metrics.store.up();
        loop {
            let next = tokio::select! {
                r = tokio::time::timeout(WATCH_IDLE, stream.message()) => r,
                _ = self.restart.notified() => return WatchEnd::Reconnected,
            };
            let resp = match next {
                Err(_) => {
                    return WatchEnd::Broke(
                        format!("etcd watch silent for {WATCH_IDLE:?}"),
                        Cause::Unreachable,
                    )
                }
                Ok(Err(e)) => return WatchEnd::Broke(format!("etcd watch broke: {e}"), e.cause()),
                Ok(Ok(None)) => {
                    return WatchEnd::Broke("etcd ended the watch".into(), Cause::Unreachable)
                }
                Ok(Ok(Some(r))) => r,
            };
            if resp.compact_revision() > 0 {
                return WatchEnd::Compacted(resp.compact_revision());
            }
            if resp.canceled() {
                return WatchEnd::Broke(
                    format!("etcd cancelled the watch: {}", resp.cancel_reason()),
                    Cause::Unreachable,
                );
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                    continue;
                };
                if name == own_name {
                    // Gone, or rewritten by someone else: let the renewer read it.
                    let ours = self.own().is_some_and(|o| o.holds(kv.value()));
                    if ev.event_type() == EventType::Delete || !ours {
                        tracing::warn!("our lease {name} changed in etcd; checking it");
                        self.lost.notify_one();
                    }
                    continue;
                }
                let out = match ev.event_type() {
                    EventType::Put => {
                        LeaseEvent::Upsert(name.to_string(), parse_lease(name, kv.value()))
                    }
                    EventType::Delete => LeaseEvent::Remove(name.to_string()),
                };
                if tx.send(out).await.is_err() {
                    return WatchEnd::Closed;
                }
            }
        }
    }
}
