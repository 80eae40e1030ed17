//! Kubernetes NetworkPolicy, enforced for this node's pods (`--network-policy`,
//! kube mode): pods, namespaces and policies are watched and folded into a
//! [`model::Cluster`] ([`watch`]), compiled into the nftables state this node
//! must hold ([`compile`]), and the difference to what was applied is written
//! in one transaction ([`nft`], [`driver`]). Someone changing our table is
//! noticed through the kernel's nftables notifications ([`table_watch`]) and
//! the table is written whole again; an object the kernel refuses is singled
//! out and left out ([`isolate`]) so the rest is still enforced.
//!
//! Before the first complete list of all three kinds the agent enforces
//! nothing (fails open: a node is never cut off by a policy it has not read);
//! afterwards, while the API server is away, the last programmed rules stay.

pub mod compile;
pub mod denied;
pub mod deny_log;
pub mod driver;
pub mod isolate;
pub mod labels;
pub mod lite;
pub mod model;
pub mod nflog;
pub mod nfnl;
pub mod nft;
pub mod table_watch;
pub mod watch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use kube::Client;

use crate::metrics::Metrics;
use compile::Desired;
use watch::State;

/// This node's policy table: what we last wrote and how to tell it intact.
struct Table {
    node: String,
    metrics: Arc<Metrics>,
    wake: Arc<tokio::sync::Notify>,
    tw: Option<table_watch::TableWatch>,
    /// The nftables generation that holds our last write (see table_watch).
    ours: Option<u32>,
    /// What we last wrote, while the table is known to hold it.
    applied: Option<Desired>,
    /// Its listing (counters left out), taken only when no generation is
    /// known (without the nftables watcher: listing a table of 15,000
    /// objects costs nft ~0.2 s, more than the change itself).
    seen: Option<String>,
    /// The table was written once (the first enforcement is logged).
    enforced: bool,
    failed: bool,
    refusals: isolate::Refusals,
    /// The pod chains' owners and drop counters, read at each scrape.
    denied: Arc<std::sync::Mutex<denied::Denied>>,
    /// `--policy-log-denied`: chains log their drops (nflog).
    log: bool,
    /// The pod chains last compiled, reused while unchanged.
    memo: compile::Memo,
    /// When freed memory was last handed back (after enforcing, at most once a second).
    trimmed: Instant,
}

impl Table {
    fn new(node: String, metrics: Arc<Metrics>, log: bool) -> Table {
        let wake = Arc::new(tokio::sync::Notify::new());
        // Someone else's change to our table (a rule, or one element of a set
        // or map) wakes us; without the watcher a flushed table is repaired on
        // the next change only.
        let tw = match table_watch::start(nft::TABLE, wake.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("network policy: cannot follow nftables changes ({e}); a changed table is repaired on the next change only");
                None
            }
        };
        let denied = Arc::new(std::sync::Mutex::new(denied::Denied::default()));
        denied::export(denied.clone(), &metrics);
        Table {
            node,
            metrics,
            denied,
            wake,
            tw,
            ours: None,
            applied: None,
            seen: None,
            enforced: false,
            failed: false,
            refusals: Default::default(),
            log,
            memo: Default::default(),
            trimmed: Instant::now(),
        }
    }

    /// Woken by an nftables notification: whether someone else changed the
    /// table after our last write (then it is written whole again).
    async fn tampered(&mut self) -> bool {
        if self.failed || self.applied.is_none() {
            return false;
        }
        let foreign = match (&self.tw, self.ours) {
            (Some(t), Some(g)) => t.foreign_since(g),
            _ => driver::listing().await != self.seen,
        };
        if foreign {
            self.applied = None;
        }
        foreign
    }

    /// Writes what `st` asks for: the difference to the last write, or the
    /// whole table; a refused whole table is narrowed down to the objects
    /// the kernel refuses, which are left out.
    async fn write(&mut self, st: &State) -> anyhow::Result<Desired> {
        let mut skip = self.refusals.skip(&st.cluster);
        let mut want =
            compile::compile_with(&st.cluster, &self.node, &skip, self.log, &mut self.memo);
        let mut result = driver::apply(&want, self.applied.as_ref()).await;
        if result.is_err() && self.applied.is_some() {
            // The difference did not apply to what the kernel holds: write it whole.
            self.applied = None;
            result = driver::apply(&want, None).await;
        }
        if let Err(e) = result {
            let t = Instant::now();
            let found = match isolate::offenders(&st.cluster, &self.node, &skip, self.log).await {
                Ok(found) => found,
                Err(why) => return Err(e.context(format!("{why:#}"))),
            };
            if found.is_empty() {
                return Err(e);
            }
            tracing::info!(
                "network policy: the table was refused ({}); singled out {} object(s) in {:?}",
                format!("{e:#}").lines().next().unwrap_or_default(),
                found.len(),
                t.elapsed()
            );
            for o in &found {
                self.refusals.refuse(&st.cluster, o);
            }
            skip = self.refusals.skip(&st.cluster);
            want = compile::compile_with(&st.cluster, &self.node, &skip, self.log, &mut self.memo);
            self.applied = None;
            driver::apply(&want, None).await?;
        }
        self.count_refused(st);
        Ok(want)
    }

    fn count_refused(&self, st: &State) {
        let r = &self.metrics.policy_refused;
        r.get_or_create(&crate::metrics::RefusedLabel {
            kind: "pod",
            reason: "kernel",
        })
        .set(self.refusals.pods() as i64);
        r.get_or_create(&crate::metrics::RefusedLabel {
            kind: "policy",
            reason: "kernel",
        })
        .set(self.refusals.policies() as i64);
        r.get_or_create(&crate::metrics::RefusedLabel {
            kind: "policy",
            reason: "invalid",
        })
        .set(st.refused.len() as i64);
    }

    /// Brings the kernel to what `st` asks for and records it; on failure
    /// the whole table is tried again on the next change or within a second.
    async fn enforce(&mut self, st: &State, pending: &mut Option<Instant>, restored: bool) {
        let started = Instant::now();
        let first = !self.enforced;
        let written = match self.write(st).await {
            // The watcher's generations tell our writes from others'.
            Ok(want) if self.tw.is_some() => Ok((want, None)),
            // Else what "intact" is checked against when woken.
            Ok(want) => match driver::listing().await {
                Some(l) => Ok((want, Some(l))),
                None => Err(anyhow::anyhow!(
                    "the policy table is not there after writing it"
                )),
            },
            Err(e) => Err(e),
        };
        let (want, listing) = match written {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("network policy: {e:#}");
                self.applied = None;
                self.failed = true;
                let w = self.wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    w.notify_one();
                });
                return;
            }
        };
        if first {
            tracing::info!(
                "network policy: enforcing {} policies over {} pods ({} nft objects, {:?})",
                st.cluster.policies.len(),
                st.cluster.pods.len(),
                want.objects(),
                started.elapsed()
            );
        } else if restored {
            tracing::warn!(
                "network policy: the {} table was changed by someone else; restored",
                nft::TABLE
            );
        }
        if let Some(since) = pending.take() {
            self.metrics
                .policy_latency
                .observe(since.elapsed().as_secs_f64());
        }
        self.metrics.policy_objects.set(want.objects() as i64);
        // Chains written again count their drops from 0.
        let rewritten: Option<Vec<String>> = self.applied.as_ref().map(|old| {
            want.chains
                .iter()
                .filter(|(c, r)| old.chains.get(*c) != Some(r))
                .map(|(c, _)| c.clone())
                .collect()
        });
        if let Ok(mut d) = self.denied.lock() {
            d.set_owners(want.owners.clone(), rewritten.as_deref());
        }
        tracing::debug!("network policy applied in {:?}", started.elapsed());
        self.applied = Some(want);
        // The lists' pages (first) and the last compile's temporaries are garbage now.
        if first || self.trimmed.elapsed() >= Duration::from_secs(1) {
            crate::reconcile::release_freed_memory();
            self.trimmed = Instant::now();
        }
        self.seen = listing;
        self.enforced = true;
        self.failed = false;
        self.ours = match &self.tw {
            Some(t) => t.barrier().await,
            None => None,
        };
        if self.ours.is_none() && self.seen.is_none() {
            // The watcher did not answer: judge by the listing instead.
            self.seen = driver::listing().await;
        }
    }
}

/// Watches pods, namespaces and policies and keeps this node's policy table.
/// The watches follow the manager's current client (a new one after the
/// node's address changed). Returns only if the watches end (the supervisor
/// runs it again).
pub async fn run(
    mut clients: tokio::sync::watch::Receiver<Client>,
    node: String,
    metrics: Arc<Metrics>,
    log_denied: bool,
) -> anyhow::Result<()> {
    let mut changes = watch::watches(clients.borrow_and_update().clone());
    let mut table = Table::new(node.clone(), metrics, log_denied);
    let (denials_tx, mut denials) = tokio::sync::mpsc::channel::<nflog::Denial>(64);
    let mut said = deny_log::Said::default();
    if log_denied {
        match nflog::start(denials_tx).await {
            Ok(()) => tracing::info!(
                "network policy: logging denied connection attempts (nflog group {})",
                compile::NFLOG_GROUP
            ),
            Err(e) => tracing::warn!(
                "network policy: cannot log denied attempts: nflog group {}: {e} (is another program bound to it, or is nfnetlink_log missing?); enforcing without the log",
                compile::NFLOG_GROUP
            ),
        }
    } else {
        drop(denials_tx);
    }
    let wake = table.wake.clone();
    let mut st = State::default();
    let mut log = crate::retry::Throttle::new("watching pods, namespaces and network policies");
    let mut pending: Option<Instant> = None;
    tracing::info!("network policy: enforcing NetworkPolicy for the pods on {node} once pods, namespaces and policies are listed");
    loop {
        let mut recheck = false;
        tokio::select! {
            c = changes.next() => match c {
                Some(Ok(c)) => {
                    log.ok();
                    let mut changed = st.take(c);
                    // Take in everything already queued before compiling once.
                    while let Some(Some(Ok(c))) = changes.next().now_or_never() {
                        changed |= st.take(c);
                    }
                    if changed {
                        pending.get_or_insert_with(Instant::now);
                    }
                }
                Some(Err(f)) => {
                    log.fail(&format_args!("{}; retrying in {:.1?}", f.why, f.delay));
                    continue;
                }
                None => anyhow::bail!("the pod, namespace and policy watches ended"),
            },
            _ = wake.notified() => recheck = true,
            Some(d) = denials.recv() => {
                if let Ok(den) = table.denied.lock() {
                    said.denied(&d, den.owner(&d.chain), &st.cluster);
                }
                continue;
            }
            ch = clients.changed() => {
                if ch.is_err() {
                    anyhow::bail!("the Kubernetes client is gone");
                }
                tracing::info!("network policy: watching again from the node's new address");
                changes = watch::watches(clients.borrow_and_update().clone());
                continue;
            }
        }
        if !st.synced() || (pending.is_none() && !recheck) {
            continue;
        }
        let mut restored = false;
        if recheck && pending.is_none() && !table.failed {
            if !table.tampered().await {
                continue;
            }
            restored = true;
        }
        table.enforce(&st, &mut pending, restored).await;
    }
}

#[cfg(test)]
mod tests;
