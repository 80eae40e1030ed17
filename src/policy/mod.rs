//! Kubernetes NetworkPolicy, enforced for this node's pods (`--network-policy`,
//! kube mode): pods, namespaces and policies are watched, folded into a
//! [`model::Cluster`], compiled into the nftables state this node must hold
//! ([`compile`]), and the difference to what was applied is written in one
//! transaction ([`nft`]). Someone flushing or deleting the table is noticed
//! through the kernel's nftables notifications and the table is written whole again.
//!
//! Before the first complete list of all three kinds the agent enforces
//! nothing (fails open: a node is never cut off by a policy it has not read);
//! afterwards, while the API server is away, the last programmed rules stay.

pub mod compile;
pub mod model;
pub mod nft;
pub mod table_watch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::Event;
use kube::{Api, Client};

use crate::manager::kube::watch::{self, Failure, Item};

use crate::firewall::run::{run_for, run_with};
use crate::metrics::Metrics;
use compile::Desired;
use model::{Cluster, PodInfo, Policy};

/// One change from any of the three watches (short-lived: size does not matter).
#[allow(clippy::large_enum_variant)]
enum Change {
    Pod(Event<Pod>),
    Namespace(Event<Namespace>),
    Policy(Event<NetworkPolicy>),
}

type Key = (String, String);

fn key(m: &kube::api::ObjectMeta) -> Option<Key> {
    Some((m.namespace.clone().unwrap_or_default(), m.name.clone()?))
}

/// The watched objects and the fresh lists being gathered after an (re)start.
#[derive(Default)]
struct State {
    cluster: Cluster,
    next_pods: Option<std::collections::BTreeMap<Key, PodInfo>>,
    next_ns: Option<std::collections::BTreeMap<String, model::Labels>>,
    next_pol: Option<std::collections::BTreeMap<Key, Policy>>,
    /// Which kinds have completed a first list (pods, namespaces, policies).
    listed: [bool; 3],
    /// Policies refused, with the reason last logged.
    refused: std::collections::HashMap<Key, String>,
}

impl State {
    fn policy(&mut self, np: &NetworkPolicy) -> Option<(Key, Policy)> {
        let k = key(&np.metadata)?;
        match Policy::from_api(np) {
            Ok(p) => {
                self.refused.remove(&k);
                Some((k, p))
            }
            Err(why) => {
                if self.refused.get(&k) != Some(&why) {
                    tracing::warn!("not enforcing NetworkPolicy {}/{}: {why}", k.0, k.1);
                    self.refused.insert(k, why);
                }
                None
            }
        }
    }

    /// Folds one change in; true if what policy sees may have changed.
    fn take(&mut self, c: Change) -> bool {
        match c {
            Change::Pod(e) => match e {
                Event::Init => self.next_pods = Some(Default::default()),
                Event::InitApply(p) => {
                    if let (Some(next), Some(k), Some(info)) = (
                        self.next_pods.as_mut(),
                        key(&p.metadata),
                        PodInfo::from_api(&p),
                    ) {
                        next.insert(k, info);
                    }
                }
                Event::InitDone => {
                    self.cluster.pods = self.next_pods.take().unwrap_or_default();
                    self.listed[0] = true;
                    return true;
                }
                Event::Apply(p) => {
                    let Some(k) = key(&p.metadata) else {
                        return false;
                    };
                    match PodInfo::from_api(&p) {
                        Some(info) if self.cluster.pods.get(&k) == Some(&info) => return false,
                        Some(info) => self.cluster.pods.insert(k, info),
                        None => self.cluster.pods.remove(&k),
                    };
                    return true;
                }
                Event::Delete(p) => {
                    return key(&p.metadata)
                        .is_some_and(|k| self.cluster.pods.remove(&k).is_some());
                }
            },
            Change::Namespace(e) => match e {
                Event::Init => self.next_ns = Some(Default::default()),
                Event::InitApply(n) => {
                    if let (Some(next), Some((k, l))) =
                        (self.next_ns.as_mut(), model::namespace_labels(&n))
                    {
                        next.insert(k, l);
                    }
                }
                Event::InitDone => {
                    self.cluster.namespaces = self.next_ns.take().unwrap_or_default();
                    self.listed[1] = true;
                    return true;
                }
                Event::Apply(n) => {
                    let Some((k, l)) = model::namespace_labels(&n) else {
                        return false;
                    };
                    return self.cluster.namespaces.insert(k, l.clone()) != Some(l);
                }
                Event::Delete(n) => {
                    return n
                        .metadata
                        .name
                        .as_ref()
                        .is_some_and(|k| self.cluster.namespaces.remove(k).is_some());
                }
            },
            Change::Policy(e) => match e {
                Event::Init => self.next_pol = Some(Default::default()),
                Event::InitApply(np) => {
                    if let Some((k, p)) = self.policy(&np) {
                        if let Some(next) = self.next_pol.as_mut() {
                            next.insert(k, p);
                        }
                    }
                }
                Event::InitDone => {
                    self.cluster.policies = self.next_pol.take().unwrap_or_default();
                    self.listed[2] = true;
                    return true;
                }
                Event::Apply(np) => {
                    let k = key(&np.metadata);
                    return match self.policy(&np) {
                        Some((k, p)) => self.cluster.policies.insert(k, p.clone()) != Some(p),
                        // Refused: enforce nothing of it (rather than an old version).
                        None => k.is_some_and(|k| self.cluster.policies.remove(&k).is_some()),
                    };
                }
                Event::Delete(np) => {
                    return key(&np.metadata)
                        .is_some_and(|k| self.cluster.policies.remove(&k).is_some());
                }
            },
        }
        false
    }

    fn synced(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }
}

/// Counter values change with traffic; a listing without them says what the table holds.
fn without_counters(listing: &str) -> String {
    listing
        .lines()
        .map(|l| match l.find("counter packets") {
            Some(i) => {
                let rest = &l[i..];
                // "counter packets N bytes M" → "counter"
                let words: Vec<&str> = rest.split_whitespace().collect();
                format!(
                    "{}counter {}",
                    &l[..i],
                    words.get(5..).map(|w| w.join(" ")).unwrap_or_default()
                )
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What `nft -t` (sets without their elements) lists for our table, counters left out.
async fn listing() -> Option<String> {
    match run_for("nft", &["-t", "list", "table", "inet", nft::TABLE]).await {
        Ok((true, out)) => Some(without_counters(&out)),
        _ => None,
    }
}

/// Makes the kernel hold `want`: the difference to `applied` (what we last
/// wrote, when the table is known intact), else the whole table.
async fn apply(want: &Desired, applied: Option<&Desired>) -> anyhow::Result<()> {
    let script = match applied {
        Some(old) => nft::delta(old, want),
        None => nft::full(want),
    };
    tracing::debug!("network policy: {} nft commands", script.lines().count());
    if !script.is_empty() {
        let (ok, err) = run_with("nft", &["-f", "-"], Some(&script)).await?;
        if !ok {
            let head: String = script.lines().take(20).collect::<Vec<_>>().join("\n");
            anyhow::bail!("nft -f: {}\n{head}", err.trim());
        }
    }
    Ok(())
}

type Changes =
    futures::stream::SelectAll<futures::stream::BoxStream<'static, Result<Change, Failure>>>;

/// One kind's list/watch as the events [`State::take`] folds: a list is
/// Init, its items, InitDone; a failure is passed on to be logged (the
/// stream itself waits before its next request).
fn changes<K>(
    api: Api<K>,
    wrap: fn(Event<K>) -> Change,
) -> futures::stream::BoxStream<'static, Result<Change, Failure>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watch::follow(api, None, 60)
        .flat_map(move |item| {
            let out: Vec<Result<Change, Failure>> = match item {
                Item::Listed(v) => std::iter::once(Event::Init)
                    .chain(v.into_iter().map(Event::InitApply))
                    .chain(std::iter::once(Event::InitDone))
                    .map(|e| Ok(wrap(e)))
                    .collect(),
                Item::Applied(o) => vec![Ok(wrap(Event::Apply(o)))],
                Item::Deleted(o) => vec![Ok(wrap(Event::Delete(o)))],
                Item::Watching => vec![],
                Item::Failed(f) => vec![Err(f)],
            };
            futures::stream::iter(out)
        })
        .boxed()
}

/// The three watches, from one client.
fn watches(client: Client) -> Changes {
    futures::stream::select_all([
        changes(Api::<Pod>::all(client.clone()), Change::Pod),
        changes(Api::<Namespace>::all(client.clone()), Change::Namespace),
        changes(Api::<NetworkPolicy>::all(client), Change::Policy),
    ])
}

/// Watches pods, namespaces and policies and keeps this node's policy table.
/// The watches follow the manager's current client (a new one after the
/// node's address changed). Returns only if the watches end (the supervisor
/// runs it again).
pub async fn run(
    mut clients: tokio::sync::watch::Receiver<Client>,
    node: String,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut changes = watches(clients.borrow_and_update().clone());
    let wake = Arc::new(tokio::sync::Notify::new());
    // Someone else's change to our table (a rule, or one element of a set or
    // map) wakes us; without the watcher a flushed table is repaired on the
    // next change only.
    let tw = match table_watch::start(nft::TABLE, wake.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("network policy: cannot follow nftables changes ({e}); a changed table is repaired on the next change only");
            None
        }
    };
    // The nftables generation that holds our last write (see table_watch).
    let mut ours: Option<u32> = None;
    let mut st = State::default();
    let mut applied: Option<Desired> = None;
    let mut seen: Option<String> = None;
    let mut log = crate::retry::Throttle::new("watching pods, namespaces and network policies");
    let mut pending: Option<Instant> = None;
    let mut failed = false;
    tracing::info!("network policy: enforcing NetworkPolicy for the pods on {node} once pods, namespaces and policies are listed");
    loop {
        let mut recheck = false;
        tokio::select! {
            c = changes.next() => match c {
                Some(Ok(c)) => {
                    log.ok();
                    if st.take(c) {
                        pending.get_or_insert_with(Instant::now);
                    }
                    // Take in everything already queued before compiling once.
                    while let Some(Some(Ok(c))) = changes.next().now_or_never() {
                        if st.take(c) {
                            pending.get_or_insert_with(Instant::now);
                        }
                    }
                }
                Some(Err(f)) => {
                    log.fail(&format_args!("{}; retrying in {:.1?}", f.why, f.delay));
                    continue;
                }
                None => anyhow::bail!("the pod, namespace and policy watches ended"),
            },
            _ = wake.notified() => recheck = true,
            ch = clients.changed() => {
                if ch.is_err() {
                    anyhow::bail!("the Kubernetes client is gone");
                }
                tracing::info!("network policy: watching again from the node's new address");
                changes = watches(clients.borrow_and_update().clone());
                continue;
            }
        }
        if !st.synced() || (pending.is_none() && !recheck) {
            continue;
        }
        let mut restored = false;
        if recheck && pending.is_none() && !failed {
            // Woken by an nftables notification: someone else's change after
            // our last write, or (no generation known) a listing that differs.
            let foreign = match (&tw, ours) {
                (Some(t), Some(g)) => t.foreign_since(g),
                _ => listing().await != seen,
            };
            if applied.is_none() || !foreign {
                continue;
            }
            applied = None;
            restored = true;
        }
        let started = Instant::now();
        let want = compile::compile(&st.cluster, &node);
        let first = seen.is_none();
        let result = apply(&want, applied.as_ref()).await;
        if result.is_ok() {
            if let Some(since) = pending.take() {
                metrics
                    .policy_latency
                    .observe(since.elapsed().as_secs_f64());
            }
        }
        // What "intact" is checked against when a notification wakes us.
        let result = match result {
            Ok(()) => listing()
                .await
                .ok_or_else(|| anyhow::anyhow!("the policy table is not there after writing it")),
            Err(e) => Err(e),
        };
        match result {
            Ok(l) => {
                if first {
                    tracing::info!(
                        "network policy: enforcing {} policies over {} pods ({} nft objects, {:?})",
                        st.cluster.policies.len(),
                        st.cluster.pods.len(),
                        want.objects(),
                        started.elapsed()
                    );
                    // The first lists' pages are garbage now.
                    crate::reconcile::release_freed_memory();
                } else if restored {
                    tracing::warn!(
                        "network policy: the {} table was changed by someone else; restored",
                        nft::TABLE
                    );
                }
                if let Some(since) = pending.take() {
                    metrics
                        .policy_latency
                        .observe(since.elapsed().as_secs_f64());
                }
                metrics.policy_objects.set(want.objects() as i64);
                tracing::debug!("network policy applied in {:?}", started.elapsed());
                applied = Some(want);
                seen = Some(l);
                failed = false;
                ours = match &tw {
                    Some(t) => t.barrier().await,
                    None => None,
                };
            }
            Err(e) => {
                tracing::error!("network policy: {e:#}");
                applied = None;
                failed = true;
                // Retried on the next change or table event, and at latest in a second.
                let w = wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    w.notify_one();
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
