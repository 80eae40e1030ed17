//! Counters and gauges, rendered in Prometheus text format on /metrics.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1)
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why the peer watch is not live right now (None: it is).
#[derive(Debug, Default)]
pub struct StoreHealth(std::sync::Mutex<Option<String>>);

impl StoreHealth {
    /// The watch is broken: /readyz answers 503 with `why` until [`Self::up`].
    pub fn down(&self, why: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.into());
    }
    pub fn up(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    pub fn broken(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub peers: Counter,
    pub peers_refused: Counter,
    pub reconciles: Counter,
    /// Sum of reconcile durations in microseconds.
    pub reconcile_micros: Counter,
    pub netlink_ops: Counter,
    pub netlink_errors: Counter,
    pub watch_restarts: Counter,
    pub lease_renewals: Counter,
    pub ready: Counter,
    pub store: StoreHealth,
}

impl Metrics {
    /// /readyz: Ok when the lease is held, the dataplane programmed and the
    /// peer watch live; otherwise the reason.
    pub fn readiness(&self) -> Result<(), String> {
        if self.ready.get() != 1 {
            return Err("lease or dataplane pending".into());
        }
        match self.store.broken() {
            Some(why) => Err(format!("peer watch broken: {why}")),
            None => Ok(()),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one(
            "flannel_peer_leases",
            "gauge",
            "Peer leases programmed into the dataplane.",
            self.peers.get().to_string(),
        );
        one(
            "flannel_peer_leases_refused",
            "gauge",
            "Peer leases refused as invalid or conflicting.",
            self.peers_refused.get().to_string(),
        );
        one(
            "flannel_reconcile_total",
            "counter",
            "Reconcile passes run.",
            self.reconciles.get().to_string(),
        );
        one(
            "flannel_reconcile_duration_seconds_total",
            "counter",
            "Time spent in reconcile passes.",
            format!("{:.6}", self.reconcile_micros.get() as f64 / 1e6),
        );
        one(
            "flannel_netlink_operations_total",
            "counter",
            "Netlink change requests sent.",
            self.netlink_ops.get().to_string(),
        );
        one(
            "flannel_netlink_errors_total",
            "counter",
            "Netlink change requests that failed.",
            self.netlink_errors.get().to_string(),
        );
        one(
            "flannel_watch_restarts_total",
            "counter",
            "Times the connection to the store (API server or etcd) broke and the peer watch was re-established.",
            self.watch_restarts.get().to_string(),
        );
        one(
            "flannel_lease_renewals_total",
            "counter",
            "Own lease renewals.",
            self.lease_renewals.get().to_string(),
        );
        one(
            "flannel_ready",
            "gauge",
            "1 when the lease is held, the dataplane programmed and the peer watch live.",
            u64::from(self.readiness().is_ok()).to_string(),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.peers.set(3);
        m.netlink_ops.add(9);
        m.reconcile_micros.add(1_500_000);
        let t = m.render();
        assert!(t.contains("# TYPE flannel_peer_leases gauge\nflannel_peer_leases 3\n"));
        assert!(t.contains("flannel_netlink_operations_total 9\n"));
        assert!(t.contains("flannel_reconcile_duration_seconds_total 1.500000\n"));
    }
}
