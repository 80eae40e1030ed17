//! What an operator pages on, as Prometheus metrics (the `prometheus-client`
//! crate): readiness, peers and refused peers by reason, event → kernel latency
//! and reconcile duration histograms, netlink operations and errors by kind,
//! firewall rewrites, store reconnects, lease renewals and expiry, build info.
//! docs/metrics.md lists every series.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

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

/// How long the dataplane may keep failing to reconcile before /readyz says so.
/// Transient refusals (a link down for a moment) heal well within it.
pub const DATAPLANE_BOUND: Duration = Duration::from_secs(10);

/// Since when reconcile passes have failed, and the last reason (None: the
/// last pass succeeded).
#[derive(Debug, Default)]
pub struct DataplaneHealth(std::sync::Mutex<Option<(tokio::time::Instant, String)>>);

impl DataplaneHealth {
    /// A pass failed: the streak starts now unless it already runs.
    pub fn failed(&self, why: impl Into<String>) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let since = g
            .as_ref()
            .map_or_else(tokio::time::Instant::now, |(t, _)| *t);
        *g = Some((since, why.into()));
    }
    pub fn ok(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    /// How long passes have been failing, and why.
    pub fn failing(&self) -> Option<(Duration, String)> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|(t, why)| (t.elapsed(), why.clone()))
    }
}

/// The supervisor's view of each long-lived task: up or not, and since when it
/// has kept failing (a run that ends soon after it started), with the last error.
#[derive(Debug, Default)]
pub struct TaskBoard(std::sync::Mutex<std::collections::BTreeMap<&'static str, TaskState>>);

#[derive(Debug, Clone, Default)]
pub struct TaskState {
    pub up: bool,
    pub failing: Option<(tokio::time::Instant, String)>,
}

impl TaskBoard {
    pub fn set(&self, name: &'static str, f: impl FnOnce(&mut TaskState)) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(g.entry(name).or_default());
    }
    pub fn snapshot(&self) -> Vec<(&'static str, TaskState)> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.iter().map(|(k, v)| (*k, v.clone())).collect()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabel {
    pub task: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// A refused policy object: `kind` pod or policy; `reason` kernel (nft
/// refused it) or invalid (the model cannot enforce it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    pub kind: &'static str,
    pub reason: &'static str,
}

/// Denied traffic at one local pod's default deny.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedPodLabel {
    pub namespace: String,
    pub pod: String,
    pub direction: &'static str,
}

/// Denied traffic at the pods a policy isolates.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedPolicyLabel {
    pub namespace: String,
    pub policy: String,
    pub direction: &'static str,
}

/// Work to do just before /metrics is rendered (e.g. reading kernel counters).
pub type ScrapeHook =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabel {
    pub scope: &'static str,
}

/// A netlink change: `op` set or delete, `kind` route, neighbour or fdb.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NetlinkLabels {
    pub op: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabel {
    pub tool: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabel {
    pub store: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub implementation: &'static str,
}

/// Reasons a peer is refused (label values of `flannel_peer_leases_refused`).
pub const REFUSAL_REASONS: [&str; 5] = [
    "invalid",
    "conflict",
    "duplicate",
    "malformed",
    "unroutable",
];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets: 0.25 ms to ~8 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    /// Lease held and dataplane programmed.
    programmed: std::sync::atomic::AtomicBool,
    /// flannel_ready, set from [`Metrics::readiness`] at each scrape.
    ready: Gauge,
    pub peers: Gauge,
    /// Peers refused now, by reason.
    pub peers_refused: Family<ReasonLabel, Gauge>,
    /// From a peer change arriving to the kernel holding it.
    pub event_to_kernel: Histogram,
    pub reconcile: HistogramFamily<ScopeLabel>,
    pub netlink_ops: Family<NetlinkLabels, Counter>,
    pub netlink_errors: Family<NetlinkLabels, Counter>,
    pub firewall_writes: Family<ToolLabel, Counter>,
    pub firewall_errors: Family<ToolLabel, Counter>,
    pub store_reconnects: Counter,
    pub lease_renewals: Counter,
    /// Unix time our lease expires (etcd only: kube leases do not expire).
    pub lease_expiry: Family<StoreLabel, Gauge<f64, AtomicU64>>,
    /// From a pod/namespace/policy change arriving to the policy table holding it.
    pub policy_latency: Histogram,
    /// nft objects in the policy table (sets, elements, chains, rules, map entries).
    pub policy_objects: Gauge,
    /// Pods and policies left out of the policy table now, by kind and reason.
    pub policy_refused: Family<RefusedLabel, Gauge>,
    /// Packets dropped by local pods' default deny, per pod and per policy.
    pub policy_denied_pod: Family<DeniedPodLabel, Counter>,
    pub policy_denied_policy: Family<DeniedPolicyLabel, Counter>,
    scrape_hooks: std::sync::Mutex<std::collections::BTreeMap<&'static str, ScrapeHook>>,
    /// Long-lived tasks: 1 while running (flannel_task_up).
    pub task_up: Family<TaskLabel, Gauge>,
    /// Times the supervisor restarted a task that had ended.
    pub task_restarts: Family<TaskLabel, Counter>,
    /// Peer leases whose update was unreadable, so their last good lease is kept.
    pub peer_updates_malformed: Counter,
    /// Seconds the dataplane has been failing to reconcile (0: it is not).
    dataplane_failing: Gauge<f64, AtomicU64>,
    /// Event loop turns: stays flat while the agent idles (no polling).
    pub loop_wakeups: Counter,
    pub store: StoreHealth,
    pub dataplane: DataplaneHealth,
    pub tasks: TaskBoard,
    pub wireguard: WgMetrics,
}

/// WireGuard peer health (wireguard backend), from the devices' own counters.
#[derive(Default)]
pub struct WgMetrics {
    /// Peers by handshake state: `recent` (within 3 minutes), `stale`, `never`.
    pub peers: Family<StateLabel, Gauge>,
    pub rx_bytes: Gauge,
    pub tx_bytes: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// A handshake older than this means the peer is not talking (WireGuard
/// re-keys every 2 minutes while traffic flows).
pub const WG_HANDSHAKE_STALE_SECS: u64 = 180;

impl WgMetrics {
    /// Sets the gauges from one reading of every device.
    pub fn observe(&self, stats: &[crate::backend::wireguard::device::PeerStats]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (mut recent, mut stale, mut never) = (0, 0, 0);
        let (mut rx, mut tx) = (0u64, 0u64);
        for s in stats {
            match s.last_handshake_secs {
                0 => never += 1,
                t if now.saturating_sub(t) <= WG_HANDSHAKE_STALE_SECS => recent += 1,
                _ => stale += 1,
            }
            rx = rx.saturating_add(s.rx_bytes);
            tx = tx.saturating_add(s.tx_bytes);
        }
        for (state, n) in [("recent", recent), ("stale", stale), ("never", never)] {
            self.peers.get_or_create(&StateLabel { state }).set(n);
        }
        self.rx_bytes.set(rx.min(i64::MAX as u64) as i64);
        self.tx_bytes.set(tx.min(i64::MAX as u64) as i64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            programmed: Default::default(),
            ready: Gauge::default(),
            peers: Gauge::default(),
            peers_refused: Family::default(),
            event_to_kernel: latency_histogram(),
            reconcile: Family::new_with_constructor(latency_histogram),
            netlink_ops: Family::default(),
            netlink_errors: Family::default(),
            firewall_writes: Family::default(),
            firewall_errors: Family::default(),
            store_reconnects: Counter::default(),
            lease_renewals: Counter::default(),
            lease_expiry: Family::default(),
            policy_latency: latency_histogram(),
            policy_objects: Gauge::default(),
            policy_refused: Family::default(),
            policy_denied_pod: Family::default(),
            policy_denied_policy: Family::default(),
            scrape_hooks: Default::default(),
            task_up: Family::default(),
            task_restarts: Family::default(),
            peer_updates_malformed: Counter::default(),
            dataplane_failing: Gauge::default(),
            loop_wakeups: Counter::default(),
            store: StoreHealth::default(),
            dataplane: DataplaneHealth::default(),
            tasks: TaskBoard::default(),
            wireguard: WgMetrics::default(),
            registry: Registry::default(),
        };
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                implementation: "flannel-rs",
            })
            .set(1);
        r.register(
            "flannel_build_info",
            "Always 1; the labels name the build",
            build,
        );
        r.register(
            "flannel_ready",
            "1 when the lease is held, the dataplane programmed and the peer watch live (what /readyz says)",
            m.ready.clone(),
        );
        r.register(
            "flannel_peer_leases",
            "Peer leases accepted and programmed",
            m.peers.clone(),
        );
        r.register(
            "flannel_peer_leases_refused",
            "Peers refused now, by reason: invalid, conflict, duplicate, malformed (unreadable annotations or value), unroutable (the backend cannot serve it)",
            m.peers_refused.clone(),
        );
        for reason in REFUSAL_REASONS {
            m.peers_refused
                .get_or_create(&ReasonLabel { reason })
                .set(0);
        }
        r.register(
            "flannel_event_to_kernel_seconds",
            "From a peer change arriving from the store to the kernel holding it",
            m.event_to_kernel.clone(),
        );
        r.register(
            "flannel_reconcile_duration_seconds",
            "Reconcile passes: incremental (changed peers only) or full (kernel dump and diff)",
            m.reconcile.clone(),
        );
        r.register(
            "flannel_netlink_operations",
            "Netlink changes sent, by op (set, delete) and kind (route, neighbour, fdb, wgpeer)",
            m.netlink_ops.clone(),
        );
        r.register(
            "flannel_netlink_errors",
            "Netlink changes the kernel refused, by op and kind",
            m.netlink_errors.clone(),
        );
        r.register(
            "flannel_firewall_writes",
            "Masquerade/forward rule sets written (first install and every repair), by tool",
            m.firewall_writes.clone(),
        );
        r.register(
            "flannel_firewall_errors",
            "Failed checks or writes of the masquerade/forward rules, by tool",
            m.firewall_errors.clone(),
        );
        r.register(
            "flannel_store_reconnects",
            "Times the connection to the store (API server or etcd) broke and the peer watch was re-established",
            m.store_reconnects.clone(),
        );
        r.register(
            "flannel_lease_renewals",
            "Own lease renewals (etcd)",
            m.lease_renewals.clone(),
        );
        r.register(
            "flannel_lease_expiry_timestamp_seconds",
            "Unix time at which the own lease expires unless renewed (etcd; minus time() is the time left)",
            m.lease_expiry.clone(),
        );
        r.register(
            "flannel_policy_enforce_seconds",
            "From a pod, namespace or NetworkPolicy change arriving to the policy table holding it (--network-policy)",
            m.policy_latency.clone(),
        );
        r.register(
            "flannel_policy_nft_objects",
            "Objects in the policy table: sets, set elements, chains, rules, map entries (--network-policy)",
            m.policy_objects.clone(),
        );
        r.register(
            "flannel_policy_refused",
            "Pods and NetworkPolicies not enforced now: reason kernel (nft refused them; the rest is enforced) or invalid (--network-policy)",
            m.policy_refused.clone(),
        );
        r.register(
            "flannel_policy_denied_packets",
            "Packets (new connections and their retries) dropped by a local pod's default deny, by pod and direction (--network-policy; read from the kernel at scrape)",
            m.policy_denied_pod.clone(),
        );
        r.register(
            "flannel_policy_denied_by_policy_packets",
            "Packets dropped at the local pods a policy isolates (each pod's drops count for every policy selecting it in that direction) (--network-policy)",
            m.policy_denied_policy.clone(),
        );
        r.register(
            "flannel_task_up",
            "1 while the supervised task runs (peer-watch, lease-keeper, drift-monitor, firewall, network-policy, ...)",
            m.task_up.clone(),
        );
        r.register(
            "flannel_task_restarts",
            "Times the supervisor restarted a task that had ended or failed",
            m.task_restarts.clone(),
        );
        r.register(
            "flannel_peer_updates_malformed",
            "Peer updates that could not be read; the peer keeps its last good lease",
            m.peer_updates_malformed.clone(),
        );
        r.register(
            "flannel_dataplane_failing_seconds",
            "How long reconcile passes have been failing (0 when the last one succeeded); /readyz fails past 10 s",
            m.dataplane_failing.clone(),
        );
        r.register(
            "flannel_event_loop_wakeups",
            "Turns of the agent's event loop (flat at idle: nothing polls)",
            m.loop_wakeups.clone(),
        );
        r.register(
            "flannel_wireguard_peers",
            "WireGuard peers by handshake state: recent (within 180 s), stale, never (wireguard backend)",
            m.wireguard.peers.clone(),
        );
        r.register(
            "flannel_wireguard_received_bytes",
            "Bytes received from all WireGuard peers, as the devices count them (resets when a device is re-created)",
            m.wireguard.rx_bytes.clone(),
        );
        r.register(
            "flannel_wireguard_sent_bytes",
            "Bytes sent to all WireGuard peers, as the devices count them",
            m.wireguard.tx_bytes.clone(),
        );
        // Every label set exists from the start (at 0), so rate() and alerts work
        // before the first error.
        for op in ["set", "delete"] {
            for kind in ["route", "neighbour", "fdb", "wgpeer"] {
                let _ = m.netlink_ops.get_or_create(&NetlinkLabels { op, kind });
                let _ = m.netlink_errors.get_or_create(&NetlinkLabels { op, kind });
            }
        }
        for scope in ["incremental", "full"] {
            let _ = m.reconcile.get_or_create(&ScopeLabel { scope });
        }
        Metrics { registry: r, ..m }
    }

    /// /readyz: Ok when the lease is held, the dataplane programmed and the
    /// peer watch live; otherwise the reason.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.programmed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("lease or dataplane pending".into());
        }
        if let Some(why) = self.store.broken() {
            return Err(format!("peer watch broken: {why}"));
        }
        if let Some((d, why)) = self
            .dataplane
            .failing()
            .filter(|(d, _)| *d > DATAPLANE_BOUND)
        {
            return Err(format!(
                "the dataplane has not been reconciled for {}s: {why}",
                d.as_secs()
            ));
        }
        for (name, st) in self.tasks.snapshot() {
            if let Some((since, why)) = st.failing {
                if since.elapsed() > DATAPLANE_BOUND {
                    return Err(format!("task {name} keeps failing: {why}"));
                }
            }
        }
        Ok(())
    }

    /// Sets the work `name` runs before each scrape (a restarted task
    /// replaces its own).
    pub fn on_scrape(&self, name: &'static str, hook: ScrapeHook) {
        if let Ok(mut h) = self.scrape_hooks.lock() {
            h.insert(name, hook);
        }
    }

    /// Runs the scrape hooks (each bounded by its own timeout).
    pub async fn refresh(&self) {
        let hooks: Vec<ScrapeHook> = match self.scrape_hooks.lock() {
            Ok(h) => h.values().cloned().collect(),
            Err(_) => return,
        };
        for h in hooks {
            h().await;
        }
    }

    /// Marks the agent ready (lease held, dataplane programmed).
    pub fn set_ready(&self) {
        self.programmed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The exposition in OpenMetrics text (what Prometheus asks for).
    pub fn render_openmetrics(&self) -> String {
        self.ready.set(i64::from(self.readiness().is_ok()));
        self.dataplane_failing.set(
            self.dataplane
                .failing()
                .map_or(0.0, |(d, _)| d.as_secs_f64()),
        );
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    /// The exposition in Prometheus' classic text format 0.0.4 (curl, promtool,
    /// older scrapers): as OpenMetrics, but a counter's HELP and TYPE name its
    /// `_total` samples, and there is no `# EOF`.
    pub fn render(&self) -> String {
        to_text_format(&self.render_openmetrics())
    }

    /// Counts one apply: requests by op and kind, and the failed ones.
    pub fn count_netlink(&self, report: &crate::dataplane::netlink::ApplyReport) {
        let labels = |op: &'static str| {
            let (op, kind) = op.split_once(' ').unwrap_or((op, "other"));
            NetlinkLabels { op, kind }
        };
        for (op, n) in &report.sent {
            self.netlink_ops.get_or_create(&labels(op)).inc_by(*n);
        }
        for e in &report.failed {
            self.netlink_errors.get_or_create(&labels(e.op)).inc();
        }
    }

    pub fn observe_reconcile(&self, full: bool, took: Duration) {
        let scope = if full { "full" } else { "incremental" };
        self.reconcile
            .get_or_create(&ScopeLabel { scope })
            .observe(took.as_secs_f64());
    }

    /// Sets the refused-peer gauges from the current refusals' reasons.
    pub fn set_refused<'a>(&self, reasons: impl Iterator<Item = &'a &'static str>) {
        let mut counts = [0i64; REFUSAL_REASONS.len()];
        for r in reasons {
            if let Some(i) = REFUSAL_REASONS.iter().position(|x| x == r) {
                counts[i] += 1;
            }
        }
        for (reason, n) in REFUSAL_REASONS.iter().zip(counts) {
            self.peers_refused
                .get_or_create(&ReasonLabel { reason })
                .set(n);
        }
    }
}

/// OpenMetrics text → Prometheus text format 0.0.4 (for what this registry holds).
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for l in openmetrics.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = l.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(l));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let m = Metrics::default();
        m.peers.set(3);
        m.netlink_ops
            .get_or_create(&NetlinkLabels {
                op: "set",
                kind: "fdb",
            })
            .inc_by(9);
        m.event_to_kernel.observe(0.003);
        m.observe_reconcile(false, Duration::from_millis(2));
        m.set_refused(["conflict", "conflict", "malformed"].iter());
        let t = m.render();
        assert!(t.contains("\nflannel_peer_leases 3\n"), "{t}");
        assert!(
            t.contains("flannel_netlink_operations_total{op=\"set\",kind=\"fdb\"} 9\n"),
            "{t}"
        );
        assert!(
            t.contains("flannel_event_to_kernel_seconds_bucket{le=\"0.004\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("flannel_event_to_kernel_seconds_count 1\n"),
            "{t}"
        );
        assert!(
            t.contains("flannel_reconcile_duration_seconds_count{scope=\"incremental\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("flannel_peer_leases_refused{reason=\"conflict\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("flannel_peer_leases_refused{reason=\"invalid\"} 0\n"),
            "{t}"
        );
        assert!(t.contains("flannel_build_info{version=\""), "{t}");
        assert!(
            t.contains("# TYPE flannel_netlink_operations_total counter\n"),
            "{t}"
        );
        assert!(!t.contains("# EOF"));
        let om = m.render_openmetrics();
        assert!(
            om.contains("# TYPE flannel_netlink_operations counter\n") && om.ends_with("# EOF\n")
        );
    }

    #[test]
    fn ready_follows_the_watch() {
        let m = Metrics::default();
        assert!(m.render().contains("\nflannel_ready 0\n"));
        m.set_ready();
        assert!(m.render().contains("\nflannel_ready 1\n"));
        m.store.down("connection refused");
        assert!(m.render().contains("\nflannel_ready 0\n"));
        assert!(m.readiness().unwrap_err().contains("connection refused"));
    }

    #[tokio::test(start_paused = true)]
    async fn ready_follows_the_dataplane_past_the_bound() {
        let m = Metrics::default();
        m.set_ready();
        m.dataplane.failed("1 of 3 kernel changes failed");
        tokio::time::advance(Duration::from_secs(5)).await;
        m.dataplane.failed("2 of 3 kernel changes failed");
        assert!(m.readiness().is_ok(), "a short failure is not unreadiness");
        tokio::time::advance(Duration::from_secs(6)).await;
        let why = m.readiness().unwrap_err();
        assert!(why.contains("not been reconciled for 11s: 2 of 3"), "{why}");
        assert!(m.render().contains("flannel_dataplane_failing_seconds 11"));
        m.dataplane.ok();
        assert!(m.readiness().is_ok());
        assert!(m.render().contains("\nflannel_dataplane_failing_seconds 0"));
    }
}
