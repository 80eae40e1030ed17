//! NetworkPolicy as plain data, and the API's selection semantics.
//!
//! Pods, namespaces and policies are folded into compact types here (from the
//! `k8s-openapi` objects, with every malformed part refused by name), and
//! [`select`] answers "which pods does this selector pick" exactly as the
//! `networking.k8s.io/v1` API defines it. No I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Namespace;

use super::lite::PodLite;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub use super::labels::{Interner, Labels, Sym};

/// A selector's `matchLabels`.
pub type MatchLabels = BTreeMap<String, String>;

/// The label every namespace carries since 1.21; older API servers lack it, so
/// it is added here and selectors on it match everywhere.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn parse(s: Option<&str>) -> Result<Proto, String> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Proto::Tcp),
            "UDP" => Ok(Proto::Udp),
            "SCTP" => Ok(Proto::Sctp),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }
    pub fn nft(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub proto: Proto,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodInfo {
    pub ns: String,
    pub name: String,
    pub node: Sym,
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    pub host_network: bool,
    pub ports: Vec<NamedPort>,
}

impl PodInfo {
    /// A pod that takes part in policy: not in a terminal phase, with an
    /// address of its own. A terminating pod (deletionTimestamp set) still
    /// runs through its grace period: it stays protected as a target and
    /// allowed as a peer until it is gone or Succeeded/Failed.
    pub fn from_api(p: &PodLite, texts: &mut Interner) -> Option<PodInfo> {
        let meta = &p.metadata;
        let spec = p.spec.as_ref()?;
        let status = p.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded") | Some("Failed")) {
            return None;
        }
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().filter_map(|i| i.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty() {
            ips.extend(
                status
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|i| i.parse::<IpAddr>().ok()),
            );
        }
        let ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|cp| {
                Some(NamedPort {
                    name: cp.name.clone()?,
                    port: u16::try_from(cp.container_port).ok().filter(|p| *p > 0)?,
                    proto: Proto::parse(cp.protocol.as_deref()).ok()?,
                })
            })
            .collect();
        Some(PodInfo {
            ns: meta.namespace.clone()?,
            name: meta.name.clone()?,
            node: texts.get(spec.node_name.as_deref().unwrap_or_default()),
            ips,
            labels: meta
                .labels
                .as_ref()
                .map(|l| Labels::interned(l, texts))
                .unwrap_or_default(),
            host_network: spec.host_network.unwrap_or(false),
            ports,
        })
    }

    /// The port number `name` has on this pod for `proto`.
    pub fn named_port(&self, name: &str, proto: Proto) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
}

/// A namespace's labels, with the name label added where the API server did not.
pub fn namespace_labels(ns: &Namespace) -> Option<(String, Labels)> {
    let name = ns.metadata.name.clone()?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels
        .entry(NAME_LABEL.into())
        .or_insert_with(|| name.clone());
    Some((name, labels.into_iter().collect()))
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Expr {
    pub key: String,
    pub op: Op,
    pub values: BTreeSet<String>,
}

/// A label selector; the empty one selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub labels: MatchLabels,
    pub exprs: Vec<Expr>,
}

impl Selector {
    pub fn from_api(s: &LabelSelector) -> Result<Selector, String> {
        let mut exprs = Vec::new();
        for e in s.match_expressions.iter().flatten() {
            let op = match e.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => return Err(format!("unknown selector operator {other:?}")),
            };
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            if matches!(op, Op::In | Op::NotIn) && values.is_empty() {
                return Err(format!(
                    "operator {} on {:?} needs values",
                    e.operator, e.key
                ));
            }
            exprs.push(Expr {
                key: e.key.clone(),
                op,
                values,
            });
        }
        exprs.sort();
        Ok(Selector {
            labels: s.match_labels.clone().unwrap_or_default(),
            exprs,
        })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v.as_str()))
            && self.exprs.iter().all(|e| {
                let v = labels.get(&e.key);
                match e.op {
                    Op::In => v.is_some_and(|v| e.values.contains(v)),
                    Op::NotIn => v.is_none_or(|v| !e.values.contains(v)),
                    Op::Exists => v.is_some(),
                    Op::DoesNotExist => v.is_none(),
                }
            })
    }
}

/// Who a rule lets in (ingress `from`) or out to (egress `to`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Pods: `ns` None = the policy's own namespace (`policy_ns`, empty
    /// when `ns` is set); a selector None = all.
    Pods {
        policy_ns: String,
        ns: Option<Selector>,
        pods: Option<Selector>,
    },
    Block {
        cidr: IpNetwork,
        except: Vec<IpNetwork>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortRef {
    Any,
    Num(u16, Option<u16>),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub proto: Proto,
    pub port: PortRef,
}

/// One rule: empty `peers` = everyone, empty `ports` = every port and protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    pub ns: String,
    pub name: String,
    pub selector: Selector,
    /// None: the policy does not cover this direction (policyTypes).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

fn peer(policy_ns: &str, p: &NetworkPolicyPeer) -> Result<Peer, String> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err("ipBlock together with a selector in one peer".into());
        }
        let cidr: IpNetwork = b
            .cidr
            .parse()
            .map_err(|_| format!("bad ipBlock cidr {:?}", b.cidr))?;
        let except = b
            .except
            .iter()
            .flatten()
            .map(|e| e.parse().map_err(|_| format!("bad ipBlock except {e:?}")))
            .collect::<Result<Vec<IpNetwork>, _>>()?;
        // Canonical: the network address (the API allows host bits in some versions).
        let canon = |n: IpNetwork| IpNetwork::new(n.network(), n.prefix()).unwrap_or(n);
        return Ok(Peer::Block {
            cidr: canon(cidr),
            except: except.into_iter().map(canon).collect(),
        });
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return Err("a peer with neither selector nor ipBlock".into());
    }
    Ok(Peer::Pods {
        // Only a peer without a namespace selector is confined to the
        // policy's namespace; with one, the same selectors pick the same pods
        // from any policy, and share one set.
        policy_ns: if p.namespace_selector.is_some() {
            String::new()
        } else {
            policy_ns.to_string()
        },
        ns: p
            .namespace_selector
            .as_ref()
            .map(Selector::from_api)
            .transpose()?,
        pods: p
            .pod_selector
            .as_ref()
            .map(Selector::from_api)
            .transpose()?,
    })
}

fn port(p: &NetworkPolicyPort) -> Result<PortSpec, String> {
    let proto = Proto::parse(p.protocol.as_deref())?;
    let end = p
        .end_port
        .map(|e| u16::try_from(e).map_err(|_| format!("bad endPort {e}")))
        .transpose()?;
    let port = match &p.port {
        None => PortRef::Any,
        Some(IntOrString::Int(n)) => {
            let n = u16::try_from(*n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("bad port {n}"))?;
            if end.is_some_and(|e| e < n) {
                return Err(format!("endPort below port {n}"));
            }
            PortRef::Num(n, end)
        }
        Some(IntOrString::String(s)) => match s.parse::<u16>() {
            Ok(n) if n > 0 => PortRef::Num(n, end),
            _ => PortRef::Name(s.clone()),
        },
    };
    Ok(PortSpec { proto, port })
}

fn rules<'a>(
    ns: &str,
    items: impl Iterator<
        Item = (
            Option<&'a Vec<NetworkPolicyPeer>>,
            Option<&'a Vec<NetworkPolicyPort>>,
        ),
    >,
) -> Result<Vec<Rule>, String> {
    items
        .map(|(peers, ports)| {
            Ok(Rule {
                peers: peers
                    .into_iter()
                    .flatten()
                    .map(|p| peer(ns, p))
                    .collect::<Result<_, String>>()?,
                ports: ports
                    .into_iter()
                    .flatten()
                    .map(port)
                    .collect::<Result<_, String>>()?,
            })
        })
        .collect()
}

impl Policy {
    /// The policy as the API defines it, or why it cannot be enforced.
    pub fn from_api(np: &NetworkPolicy) -> Result<Policy, String> {
        let ns = np.metadata.namespace.clone().ok_or("no namespace")?;
        let name = np.metadata.name.clone().ok_or("no name")?;
        let spec = np.spec.as_ref().ok_or("no spec")?;
        let selector = spec
            .pod_selector
            .as_ref()
            .map(Selector::from_api)
            .transpose()?
            .unwrap_or_default();
        // policyTypes default: Ingress, plus Egress when egress rules exist.
        let types: Vec<String> = spec.policy_types.clone().unwrap_or_else(|| {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.is_some() {
                t.push("Egress".into());
            }
            t
        });
        let ingress = types
            .iter()
            .any(|t| t == "Ingress")
            .then(|| {
                rules(
                    &ns,
                    spec.ingress
                        .iter()
                        .flatten()
                        .map(|r| (r.from.as_ref(), r.ports.as_ref())),
                )
            })
            .transpose()?;
        let egress = types
            .iter()
            .any(|t| t == "Egress")
            .then(|| {
                rules(
                    &ns,
                    spec.egress
                        .iter()
                        .flatten()
                        .map(|r| (r.to.as_ref(), r.ports.as_ref())),
                )
            })
            .transpose()?;
        Ok(Policy {
            ns,
            name,
            selector,
            ingress,
            egress,
        })
    }

    /// Whether the policy applies to `pod` (its namespace and selector; never a
    /// hostNetwork pod, whose address is the node's).
    pub fn selects(&self, pod: &PodInfo) -> bool {
        !pod.host_network && pod.ns == self.ns && self.selector.matches(&pod.labels)
    }
}

/// The cluster as policy sees it.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// (namespace, name) → pod.
    pub pods: BTreeMap<(String, String), PodInfo>,
    /// namespace → labels (with the name label).
    pub namespaces: BTreeMap<String, Labels>,
    /// (namespace, name) → policy.
    pub policies: BTreeMap<(String, String), Policy>,
    /// Revisions of the pods: per namespace (bumped by [`Cluster::put_pod`]
    /// and [`Cluster::remove_pod`]) and of the whole map (bumped by
    /// [`Cluster::set_pods`]). What was computed from a namespace's pods
    /// holds while its revision does.
    pub pod_revs: BTreeMap<String, u64>,
    pub pods_epoch: u64,
}

impl Cluster {
    /// Adds or replaces a pod; false if it was there as it is.
    pub fn put_pod(&mut self, key: (String, String), pod: PodInfo) -> bool {
        if self.pods.get(&key) == Some(&pod) {
            return false;
        }
        *self.pod_revs.entry(key.0.clone()).or_default() += 1;
        self.pods.insert(key, pod);
        true
    }

    /// Removes a pod; false if it was not there.
    pub fn remove_pod(&mut self, key: &(String, String)) -> bool {
        if self.pods.remove(key).is_none() {
            return false;
        }
        *self.pod_revs.entry(key.0.clone()).or_default() += 1;
        true
    }

    /// Replaces every pod (a fresh list).
    pub fn set_pods(&mut self, pods: BTreeMap<(String, String), PodInfo>) {
        self.pods = pods;
        self.pods_epoch += 1;
        self.pod_revs.clear();
    }

    /// A fingerprint of the pods of `spaces`: equal while none of them changed.
    pub fn pods_print(&self, spaces: &[&str]) -> (u64, Vec<u64>) {
        let revs = spaces
            .iter()
            .map(|n| self.pod_revs.get(*n).copied().unwrap_or(0))
            .collect();
        (self.pods_epoch, revs)
    }

    /// The pods a pod peer picks: in the policy's namespace (no namespace
    /// selector) or in the namespaces the selector picks; by pod selector or all.
    /// HostNetwork pods are never picked (their address is the node's).
    /// Only the picked namespaces' pods are looked at (the map is ordered by
    /// namespace), so the cost grows with those pods, not with the cluster.
    pub fn select<'a>(&'a self, peer: &'a Peer) -> Box<dyn Iterator<Item = &'a PodInfo> + 'a> {
        let Peer::Pods { pods, .. } = peer else {
            return Box::new(std::iter::empty());
        };
        Box::new(
            self.peer_namespaces(peer)
                .into_iter()
                .flat_map(move |n| self.pods_in(n))
                .filter(move |p| {
                    !p.host_network && pods.as_ref().is_none_or(|s| s.matches(&p.labels))
                }),
        )
    }

    /// The namespaces whose pods a pod peer can pick.
    pub fn peer_namespaces<'a>(&'a self, peer: &'a Peer) -> Vec<&'a str> {
        match peer {
            Peer::Pods {
                policy_ns,
                ns: None,
                ..
            } => vec![policy_ns.as_str()],
            Peer::Pods { ns: Some(sel), .. } => self
                .pod_namespaces()
                .filter(|n| match self.namespaces.get(*n) {
                    Some(l) => sel.matches(l),
                    // A pod seen before its namespace: the name label at least.
                    None => sel.matches(&Labels::from_iter([(
                        NAME_LABEL.to_string(),
                        n.to_string(),
                    )])),
                })
                .collect(),
            Peer::Block { .. } => vec![],
        }
    }

    /// The pods of namespace `ns`.
    pub fn pods_in<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a PodInfo> + 'a {
        self.pods
            .range((ns.to_string(), String::new())..)
            .take_while({
                let ns = ns.to_string();
                move |((n, _), _)| *n == ns
            })
            .map(|(_, p)| p)
    }

    /// The namespaces that have pods, each once (a skip over the ordered map:
    /// one lookup per namespace).
    pub fn pod_namespaces(&self) -> impl Iterator<Item = &str> + '_ {
        let mut next = self.pods.keys().next();
        std::iter::from_fn(move || {
            let (ns, _) = next?;
            // The smallest name after every key of `ns`.
            let after = (format!("{ns}\0"), String::new());
            next = self.pods.range(after..).next().map(|(k, _)| k);
            Some(ns.as_str())
        })
    }

    /// The policies of namespace `ns`.
    pub fn policies_in<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a Policy> + 'a {
        let ns = ns.to_string();
        self.policies
            .range((ns.clone(), String::new())..)
            .take_while(move |((n, _), _)| *n == ns)
            .map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(json: serde_json::Value) -> Selector {
        Selector::from_api(&serde_json::from_value(json).unwrap()).unwrap()
    }

    #[test]
    fn selector_semantics() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(Selector::default().matches(&l), "empty selects all");
        assert!(sel(serde_json::json!({"matchLabels": {"app": "web"}})).matches(&l));
        assert!(!sel(serde_json::json!({"matchLabels": {"app": "db"}})).matches(&l));
        let e = |op: &str, vals: &[&str]| {
            sel(
                serde_json::json!({"matchExpressions": [{"key": "tier", "operator": op, "values": vals}]}),
            )
        };
        assert!(e("In", &["front", "back"]).matches(&l));
        assert!(!e("NotIn", &["front"]).matches(&l));
        assert!(
            e("NotIn", &["front"]).matches(&labels(&[])),
            "NotIn matches a missing key"
        );
        assert!(e("Exists", &[]).matches(&l));
        assert!(!e("DoesNotExist", &[]).matches(&l));
        assert!(Selector::from_api(
            &serde_json::from_value(
                serde_json::json!({"matchExpressions": [{"key": "a", "operator": "In"}]})
            )
            .unwrap()
        )
        .is_err());
    }

    #[test]
    fn policy_types_default_and_empty_rules() {
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "deny", "namespace": "a"},
            "spec": {"podSelector": {}}
        }))
        .unwrap();
        let p = Policy::from_api(&np).unwrap();
        assert_eq!(
            p.ingress,
            Some(vec![]),
            "no ingress rules: deny all ingress"
        );
        assert_eq!(p.egress, None, "egress untouched without Egress");
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "namespace": "a"},
            "spec": {"podSelector": {}, "egress": [{}], "ingress": [{"ports": [{"port": "http"}, {"port": 53, "protocol": "UDP", "endPort": 60}]}]}
        }))
        .unwrap();
        let p = Policy::from_api(&np).unwrap();
        assert_eq!(
            p.egress.as_ref().unwrap()[0],
            Rule {
                peers: vec![],
                ports: vec![]
            },
            "empty rule allows all"
        );
        let ports = &p.ingress.as_ref().unwrap()[0].ports;
        assert_eq!(
            ports[0],
            PortSpec {
                proto: Proto::Tcp,
                port: PortRef::Name("http".into())
            }
        );
        assert_eq!(
            ports[1],
            PortSpec {
                proto: Proto::Udp,
                port: PortRef::Num(53, Some(60))
            }
        );
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        for spec in [
            serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "nope"}}]}]}),
            serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}),
            serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}),
            serde_json::json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}),
        ] {
            let np: NetworkPolicy = serde_json::from_value(
                serde_json::json!({"metadata": {"name": "x", "namespace": "a"}, "spec": spec}),
            )
            .unwrap();
            assert!(Policy::from_api(&np).is_err());
        }
    }

    fn pod(ns: &str, name: &str, ip: &str, l: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            ns: ns.into(),
            name: name.into(),
            node: "n1".into(),
            ips: vec![ip.parse().unwrap()],
            labels: labels(l),
            host_network: false,
            ports: vec![],
        }
    }

    #[test]
    fn peer_selection_by_namespace_and_pod() {
        let mut c = Cluster::default();
        for p in [
            pod("a", "web", "10.0.0.1", &[("app", "web")]),
            pod("a", "db", "10.0.0.2", &[("app", "db")]),
            pod("b", "web", "10.0.1.1", &[("app", "web")]),
            pod("c", "web", "10.0.2.1", &[("app", "web")]),
        ] {
            c.pods.insert((p.ns.clone(), p.name.clone()), p);
        }
        let mut host = pod("a", "hostnet", "198.18.0.11", &[("app", "web")]);
        host.host_network = true;
        c.pods.insert(("a".into(), "hostnet".into()), host);
        c.namespaces
            .insert("a".into(), labels(&[(NAME_LABEL, "a"), ("team", "x")]));
        c.namespaces
            .insert("b".into(), labels(&[(NAME_LABEL, "b"), ("team", "x")]));
        // No name label (API server before 1.21): namespace_labels adds it.
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "c"}})).unwrap();
        let (n, l) = namespace_labels(&ns).unwrap();
        c.namespaces.insert(n, l);
        let ips = |p: Peer| -> Vec<String> {
            let mut v: Vec<String> = c.select(&p).map(|p| p.ips[0].to_string()).collect();
            v.sort();
            v
        };
        let web = Some(sel(serde_json::json!({"matchLabels": {"app": "web"}})));
        let team = Some(sel(serde_json::json!({"matchLabels": {"team": "x"}})));
        let named_c = Some(sel(serde_json::json!({"matchLabels": {NAME_LABEL: "c"}})));
        let peer = |ns: Option<Selector>, pods: Option<Selector>| Peer::Pods {
            policy_ns: "a".into(),
            ns,
            pods,
        };
        assert_eq!(
            ips(peer(None, web.clone())),
            ["10.0.0.1"],
            "pod selector alone: own namespace, never hostNetwork"
        );
        assert_eq!(
            ips(peer(team.clone(), None)),
            ["10.0.0.1", "10.0.0.2", "10.0.1.1"]
        );
        assert_eq!(
            ips(peer(team, web.clone())),
            ["10.0.0.1", "10.0.1.1"],
            "both: pods in those namespaces"
        );
        assert_eq!(
            ips(peer(Some(Selector::default()), web)),
            ["10.0.0.1", "10.0.1.1", "10.0.2.1"]
        );
        assert_eq!(
            ips(peer(named_c, None)),
            ["10.0.2.1"],
            "the name label without the API server's help"
        );
    }
}
