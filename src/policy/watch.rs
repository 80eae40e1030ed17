//! The three watches (pods, namespaces, policies) folded into one
//! [`Cluster`]: a fresh list replaces what a kind held, single changes are
//! applied in place, and a policy the model cannot enforce is refused (warned
//! once per version) rather than enforced partly.

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::Event;
use kube::{Api, Client};

use super::lite::PodLite as Pod;
use super::model::{self, Cluster, PodInfo, Policy};
use crate::manager::kube::watch::{self, Failure, Item};

/// One change from any of the three watches (short-lived: size does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Change {
    Pod(Event<Pod>),
    Namespace(Event<Namespace>),
    Policy(Event<NetworkPolicy>),
}

pub type Key = (String, String);

pub fn key(m: &kube::api::ObjectMeta) -> Option<Key> {
    Some((m.namespace.clone().unwrap_or_default(), m.name.clone()?))
}

/// The watched objects and the fresh lists being gathered after an (re)start.
#[derive(Default)]
pub struct State {
    pub cluster: Cluster,
    next_pods: Option<BTreeMap<Key, PodInfo>>,
    next_ns: Option<BTreeMap<String, model::Labels>>,
    next_pol: Option<BTreeMap<Key, Policy>>,
    /// Which kinds have completed a first list (pods, namespaces, policies).
    listed: [bool; 3],
    /// Policies refused, with the reason last logged.
    pub refused: HashMap<Key, String>,
    /// The texts of pods' labels and node names, shared.
    texts: model::Interner,
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
    pub fn take(&mut self, c: Change) -> bool {
        match c {
            Change::Pod(e) => match e {
                Event::Init => self.next_pods = Some(Default::default()),
                Event::InitApply(p) => {
                    if let (Some(next), Some(k), Some(info)) = (
                        self.next_pods.as_mut(),
                        key(&p.metadata),
                        PodInfo::from_api(&p, &mut self.texts),
                    ) {
                        next.insert(k, info);
                    }
                }
                Event::InitDone => {
                    self.cluster
                        .set_pods(self.next_pods.take().unwrap_or_default());
                    self.listed[0] = true;
                    return true;
                }
                Event::Apply(p) => {
                    let Some(k) = key(&p.metadata) else {
                        return false;
                    };
                    return match PodInfo::from_api(&p, &mut self.texts) {
                        Some(info) => self.cluster.put_pod(k, info),
                        None => self.cluster.remove_pod(&k),
                    };
                }
                Event::Delete(p) => {
                    return key(&p.metadata).is_some_and(|k| self.cluster.remove_pod(&k));
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
                    return key(&np.metadata).is_some_and(|k| {
                        self.refused.remove(&k);
                        self.cluster.policies.remove(&k).is_some()
                    });
                }
            },
        }
        false
    }

    pub fn synced(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }
}

pub type Changes =
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
            futures::stream::iter(match item {
                Item::Listing => Some(Ok(wrap(Event::Init))),
                Item::Found(o) => Some(Ok(wrap(Event::InitApply(o)))),
                Item::Listed => Some(Ok(wrap(Event::InitDone))),
                Item::Applied(o) => Some(Ok(wrap(Event::Apply(o)))),
                Item::Deleted(o) => Some(Ok(wrap(Event::Delete(o)))),
                Item::Watching => None,
                Item::Failed(f) => Some(Err(f)),
            })
        })
        .boxed()
}

/// The three watches, from one client.
pub fn watches(client: Client) -> Changes {
    futures::stream::select_all([
        changes(Api::<Pod>::all(client.clone()), Change::Pod),
        changes(Api::<Namespace>::all(client.clone()), Change::Namespace),
        changes(Api::<NetworkPolicy>::all(client), Change::Policy),
    ])
}
