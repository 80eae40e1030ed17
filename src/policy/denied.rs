//! Denied traffic as metrics: every pod chain ends in `counter drop`; at each
//! scrape of /metrics the drop counters are read (`nft -j -t list table`: rules
//! and counters, no set elements) and turned into monotonic counters per pod
//! and per isolating policy. A chain rewritten (its policies changed) starts
//! its kernel counter from 0 again; that reset is folded in here, so the
//! exported series only grow. Nothing is read between scrapes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::compile::Owner;
use super::nft;
use crate::firewall::run::run_for;
use crate::metrics::{DeniedPodLabel, DeniedPolicyLabel, Metrics};

/// The drop rule's packet counter of each chain in an `nft -j` listing.
pub fn drops(json: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return out;
    };
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        let (Some(chain), Some(expr)) = (rule["chain"].as_str(), rule["expr"].as_array()) else {
            continue;
        };
        let drop = expr.iter().any(|e| e.get("drop").is_some());
        let packets = expr.iter().find_map(|e| e["counter"]["packets"].as_u64());
        if let (true, Some(n)) = (drop, packets) {
            out.insert(chain.to_string(), n);
        }
    }
    out
}

/// The chains' owners as last written, and what their counters last read.
#[derive(Default)]
pub struct Denied {
    owners: BTreeMap<String, Owner>,
    last: HashMap<String, u64>,
    pods: HashSet<DeniedPodLabel>,
    policies: HashSet<DeniedPolicyLabel>,
}

impl Denied {
    /// The chains now in the kernel after a write; `rewritten` ones (None:
    /// all, the table was written whole) count from 0 again.
    pub fn set_owners(&mut self, owners: BTreeMap<String, Owner>, rewritten: Option<&[String]>) {
        match rewritten {
            None => self.last.clear(),
            Some(r) => {
                for c in r {
                    self.last.remove(c);
                }
            }
        }
        self.last.retain(|c, _| owners.contains_key(c));
        self.owners = owners;
    }

    /// Whose `chain` is.
    pub fn owner(&self, chain: &str) -> Option<&Owner> {
        self.owners.get(chain)
    }

    /// Folds one reading in: each chain's growth (or, after a reset, its whole
    /// count) is added to its pod's and its policies' counters; series of pods
    /// and policies no longer there are removed.
    pub fn observe(&mut self, drops: &HashMap<String, u64>, m: &Metrics) {
        let mut pods = HashSet::new();
        let mut policies = HashSet::new();
        for (chain, o) in &self.owners {
            let pod = DeniedPodLabel {
                namespace: o.ns.clone(),
                pod: o.pod.clone(),
                direction: o.direction,
            };
            let now = drops.get(chain).copied();
            let before = self.last.get(chain).copied().unwrap_or(0);
            let grown = match now {
                Some(n) if n >= before => n - before,
                Some(n) => n,
                None => 0,
            };
            if let Some(n) = now {
                self.last.insert(chain.clone(), n);
            }
            m.policy_denied_pod.get_or_create(&pod).inc_by(grown);
            pods.insert(pod);
            for p in &o.policies {
                let l = DeniedPolicyLabel {
                    namespace: o.ns.clone(),
                    policy: p.clone(),
                    direction: o.direction,
                };
                m.policy_denied_policy.get_or_create(&l).inc_by(grown);
                policies.insert(l);
            }
        }
        for gone in self.pods.difference(&pods) {
            m.policy_denied_pod.remove(gone);
        }
        for gone in self.policies.difference(&policies) {
            m.policy_denied_policy.remove(gone);
        }
        self.pods = pods;
        self.policies = policies;
    }
}

/// Registers the read-at-scrape hook for `denied` on `metrics`.
pub fn export(denied: Arc<Mutex<Denied>>, metrics: &Arc<Metrics>) {
    let m = Arc::downgrade(metrics);
    metrics.on_scrape(
        "network-policy",
        Arc::new(move || {
            let (denied, m) = (denied.clone(), m.clone());
            Box::pin(async move {
                let Some(m) = m.upgrade() else { return };
                let args = ["-j", "-t", "list", "table", "inet", nft::TABLE];
                let read =
                    tokio::time::timeout(Duration::from_secs(2), run_for("nft", &args)).await;
                let Ok(Ok((true, json))) = read else { return };
                let d = drops(&json);
                if let Ok(mut st) = denied.lock() {
                    st.observe(&d, &m);
                }
            })
        }),
    );
}
