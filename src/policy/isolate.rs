//! When nft refuses the whole table, which object is it? The table is checked
//! with `nft -c` (the kernel judges, nothing is written) for halves of this
//! node's pods until one pod's chains are refused alone, then for that pod
//! under a plain deny-all (its own objects) and under halves of its policies.
//! The offender — a pod or a policy — is left out with one warning, and the
//! rest of the node's policy is written.
//!
//! A check costs one `nft -c` of a table (milliseconds to tens of them); one
//! offender costs about log2(local pods) + log2(its policies) + 2 checks.

use std::collections::HashMap;

use super::compile::{self, Desired, Skip};
use super::driver;
use super::model::{Cluster, PodInfo, Policy, Selector};
use super::watch::Key;

/// At most this many offenders are singled out per failed write (past that,
/// something other than single objects is wrong and the table is retried).
const MAX_OFFENDERS: usize = 16;

/// What the kernel refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offender {
    /// The pod's own chains are refused (under any policy).
    Pod(Key),
    /// The policy is refused (for the pod it was found on).
    Policy(Key, Key),
}

/// Pods and policies left out because the kernel refused them, each with the
/// version refused: a changed object is tried again.
#[derive(Default)]
pub struct Refusals {
    pods: HashMap<Key, PodInfo>,
    policies: HashMap<Key, Policy>,
}

impl Refusals {
    /// What to leave out of `cluster` now; entries whose object changed or is
    /// gone are dropped (tried again).
    pub fn skip(&mut self, cluster: &Cluster) -> Skip {
        self.pods.retain(|k, p| cluster.pods.get(k) == Some(p));
        self.policies
            .retain(|k, p| cluster.policies.get(k) == Some(p));
        Skip {
            pods: self.pods.keys().cloned().collect(),
            policies: self.policies.keys().cloned().collect(),
        }
    }

    /// Records `o` (found in `cluster`) and warns once.
    pub fn refuse(&mut self, cluster: &Cluster, o: &Offender) {
        match o {
            Offender::Pod(k) => {
                if let Some(p) = cluster.pods.get(k) {
                    tracing::warn!(
                        "network policy: nft refuses the chains of pod {}/{}; that pod is not protected by policy until it changes (the rest of the node's policy is enforced)",
                        k.0,
                        k.1
                    );
                    self.pods.insert(k.clone(), p.clone());
                }
            }
            Offender::Policy(k, pod) => {
                if let Some(p) = cluster.policies.get(k) {
                    tracing::warn!(
                        "network policy: nft refuses NetworkPolicy {}/{} (found on pod {}/{}); not enforcing it until it changes (the rest is enforced)",
                        k.0,
                        k.1,
                        pod.0,
                        pod.1
                    );
                    self.policies.insert(k.clone(), p.clone());
                }
            }
        }
    }

    pub fn pods(&self) -> usize {
        self.pods.len()
    }

    pub fn policies(&self) -> usize {
        self.policies.len()
    }
}

fn pod_key(p: &PodInfo) -> Key {
    (p.ns.clone(), p.name.clone())
}

fn policy_key(p: &Policy) -> Key {
    (p.ns.clone(), p.name.clone())
}

/// A policy that selects every pod of `ns` and allows nothing: a pod's chains
/// with no rule of any real policy.
fn deny_all(ns: &str) -> Policy {
    Policy {
        ns: ns.to_string(),
        name: String::new(),
        selector: Selector::default(),
        ingress: Some(vec![]),
        egress: Some(vec![]),
    }
}

/// Narrows `items` (whose `table` is assumed refused) to one item whose
/// table is refused alone.
async fn bisect<T: Clone>(
    mut items: Vec<T>,
    table: impl Fn(&[T]) -> Desired,
) -> anyhow::Result<Option<T>> {
    while items.len() > 1 {
        let rest = items.split_off(items.len() / 2);
        if !refused(&table(&items)).await? {
            items = rest;
        }
    }
    Ok(match items.pop() {
        Some(x) if refused(&table(std::slice::from_ref(&x))).await? => Some(x),
        _ => None,
    })
}

async fn refused(d: &Desired) -> anyhow::Result<bool> {
    Ok(!driver::accepts(d).await?)
}

/// The pod or policy behind the kernel refusing `pod`'s chains.
async fn on_pod(
    cluster: &Cluster,
    pod: &PodInfo,
    skip: &Skip,
    log: bool,
) -> anyhow::Result<Offender> {
    let deny = deny_all(&pod.ns);
    if refused(&compile::compile_one(cluster, pod, &[&deny], log)).await? {
        return Ok(Offender::Pod(pod_key(pod)));
    }
    let policies = compile::selecting(cluster, pod, skip);
    let found = bisect(policies, |some: &[&Policy]| {
        compile::compile_one(cluster, pod, some, log)
    })
    .await?;
    Ok(match found {
        Some(p) => Offender::Policy(policy_key(p), pod_key(pod)),
        // Only a combination is refused: leave the pod out.
        None => Offender::Pod(pod_key(pod)),
    })
}

/// The offenders that make nft refuse the table for `cluster` on `node`
/// (beyond `skip`), until the rest is accepted. Err: nft cannot be run, or
/// the refusal is not down to single pods or policies.
pub async fn offenders(
    cluster: &Cluster,
    node: &str,
    skip: &Skip,
    log: bool,
) -> anyhow::Result<Vec<Offender>> {
    let mut skip = skip.clone();
    let mut found = Vec::new();
    for _ in 0..MAX_OFFENDERS {
        if !refused(&compile::compile_skipping(cluster, node, &skip, log)).await? {
            return Ok(found);
        }
        let local: Vec<&PodInfo> = compile::local_pods(cluster, node)
            .filter(|p| !skip.pod(p))
            .collect();
        let only = |some: &[&PodInfo]| {
            let mut s = skip.clone();
            s.pods.extend(
                local
                    .iter()
                    .filter(|p| !some.iter().any(|q| q.ns == p.ns && q.name == p.name))
                    .map(|p| pod_key(p)),
            );
            s
        };
        let pod = bisect(local.clone(), |some: &[&PodInfo]| {
            compile::compile_skipping(cluster, node, &only(some), log)
        })
        .await?;
        let Some(pod) = pod else {
            anyhow::bail!("nft refuses the policy table, but not for any one pod's chains");
        };
        let o = on_pod(cluster, pod, &skip, log).await?;
        match &o {
            Offender::Pod(k) => skip.pods.insert(k.clone()),
            Offender::Policy(k, _) => skip.policies.insert(k.clone()),
        };
        found.push(o);
    }
    anyhow::bail!("nft refuses the policy table for more than {MAX_OFFENDERS} objects")
}
