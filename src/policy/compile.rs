//! What the kernel must hold to enforce the policies for this node's pods, as
//! plain data: named sets of peer addresses (one per distinct peer, shared by
//! every rule that names it), one chain per direction per selected local pod
//! (its policies' rules, inlined, so a named port resolves on that very pod),
//! and the verdict maps that send a packet to its pod's chain. No I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use super::model::{Cluster, Peer, PodInfo, Policy, PortRef, PortSpec, Rule};

/// A named set: its nft type and elements (as nft text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub kind: &'static str,
    pub elems: BTreeSet<String>,
}

/// The verdict maps (IPv4/IPv6 × ingress/egress): pod address → its chain.
pub const MAPS: [(&str, &str); 4] = [
    ("in4", "ipv4_addr"),
    ("in6", "ipv6_addr"),
    ("eg4", "ipv4_addr"),
    ("eg6", "ipv6_addr"),
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub sets: BTreeMap<String, Set>,
    /// Per-pod chains: name → rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Map name (see [`MAPS`]) → address → chain.
    pub maps: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// Whose each pod chain is (for the denied-traffic counters).
    pub owners: BTreeMap<String, Owner>,
}

/// The pod a chain guards, in which direction, under which policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub ns: String,
    pub pod: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// The policies (names, in the pod's namespace) that isolate it.
    pub policies: Vec<String>,
}

impl Desired {
    /// nft objects held: sets + set elements + chains + rules + map elements.
    pub fn objects(&self) -> usize {
        self.sets.values().map(|s| 1 + s.elems.len()).sum::<usize>()
            + self.chains.values().map(|r| 1 + r.len()).sum::<usize>()
            + self.maps.values().map(|m| m.len()).sum::<usize>()
    }
}

/// A short stable name from anything hashable by its Debug text (FNV-1a, 64 bit).
pub fn short_id(x: &impl std::fmt::Debug) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{x:?}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// nft's longest rule comment (`NFT_USERDATA_MAXLEN` for comments: 128).
pub const MAX_COMMENT: usize = 128;

/// A rule comment nft accepts: no quote or backslash, at most
/// [`MAX_COMMENT`] bytes — a longer one keeps its start and end and a hash
/// of the whole, so it stays unique and readable (a pod name may have 253
/// characters).
pub fn comment(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if clean.len() <= MAX_COMMENT {
        return clean;
    }
    let id = &short_id(&text)[..8];
    // Keep the tail (" ingress"/" egress") and as much of the head as fits.
    let tail: String = {
        let t: Vec<char> = clean.chars().rev().take(16).collect();
        t.into_iter().rev().collect()
    };
    let room = MAX_COMMENT - tail.len() - id.len() - 3;
    let mut head_end = room.min(clean.len());
    while !clean.is_char_boundary(head_end) {
        head_end -= 1;
    }
    format!("{}~{id}~{tail}", &clean[..head_end])
        .chars()
        .take(MAX_COMMENT)
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

impl Dir {
    /// The peer's side of the packet.
    fn peer_field(self) -> &'static str {
        match self {
            Dir::Ingress => "saddr",
            Dir::Egress => "daddr",
        }
    }
}

fn fam(v6: bool) -> &'static str {
    if v6 {
        "ip6"
    } else {
        "ip"
    }
}

struct Builder<'a> {
    cluster: &'a Cluster,
    out: Desired,
    /// Log denied attempts (nflog, rate-limited per chain).
    log: bool,
    /// The chains of the last compile (taken from when reused) and this one's.
    old: HashMap<String, Cached>,
    new: HashMap<String, Cached>,
    /// The sets the chain being built names.
    needs: Vec<Need>,
    /// Set contents of the last compile and this one's (see [`Memo`]).
    old_sets: HashMap<String, (u64, [BTreeSet<String>; 2])>,
    new_sets: HashMap<String, (u64, [BTreeSet<String>; 2])>,
}

/// A set a chain's rules name (filled anew on every compile: its members
/// are other pods).
#[derive(Debug, Clone)]
enum Need {
    Peer(Peer),
    Named(Option<Peer>, PortSpec, String),
}

/// One pod chain as compiled: reused as long as its inputs are the same.
#[derive(Debug, Clone)]
struct Cached {
    /// The hash of what it was built from (the pod, its policies, the log flag).
    print: u64,
    rules: Vec<String>,
    owner: Owner,
    needs: Vec<Need>,
}

/// The pod chains and sets of the last compile. A change to one pod or one
/// policy then rebuilds the chains of the pods it concerns only (a chain's
/// rules are a function of its pod and that pod's policies alone), and
/// refills only the sets whose members come from a namespace whose pods
/// changed (see [`Cluster::pods_print`]); the rest are taken as they were.
#[derive(Debug, Default)]
pub struct Memo {
    chains: HashMap<String, Cached>,
    sets: HashMap<String, (u64, [BTreeSet<String>; 2])>,
}

impl Memo {
    /// Chains held.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }
}

/// The nflog group denied attempts are sent to (`--policy-log-denied`).
pub const NFLOG_GROUP: u16 = 2045;

impl Builder<'_> {
    /// The two sets (IPv4, IPv6) of the addresses a pod peer picks; their names.
    fn peer_sets(&mut self, peer: &Peer) -> [String; 2] {
        self.needs.push(Need::Peer(peer.clone()));
        let id = short_id(peer);
        let names = [format!("p4-{id}"), format!("p6-{id}")];
        if self.out.sets.contains_key(&names[0]) {
            return names;
        }
        let spaces = self.cluster.peer_namespaces(peer);
        self.fill(&names, ["ipv4_addr", "ipv6_addr"], &spaces, |c, v4, v6| {
            for p in c.select(peer) {
                for ip in &p.ips {
                    if ip.is_ipv4() { &mut *v4 } else { &mut *v6 }.insert(ip.to_string());
                }
            }
        });
        names
    }

    /// Sets of (address . protocol . port) for a named port on the pods `peer`
    /// picks (None: every pod) — egress, where the name resolves per destination.
    fn named_sets(&mut self, peer: Option<&Peer>, spec: &PortSpec, name: &str) -> [String; 2] {
        self.needs
            .push(Need::Named(peer.cloned(), spec.clone(), name.to_string()));
        let id = short_id(&(peer, spec));
        let names = [format!("n4-{id}"), format!("n6-{id}")];
        if self.out.sets.contains_key(&names[0]) {
            return names;
        }
        let spaces: Vec<&str> = match peer {
            Some(p) => self.cluster.peer_namespaces(p),
            None => self.cluster.pod_namespaces().collect(),
        };
        let kinds = [
            "ipv4_addr . inet_proto . inet_service",
            "ipv6_addr . inet_proto . inet_service",
        ];
        self.fill(&names, kinds, &spaces, |c, v4, v6| {
            let pods: Box<dyn Iterator<Item = &PodInfo>> = match peer {
                Some(p) => c.select(p),
                None => Box::new(c.pods.values().filter(|p| !p.host_network)),
            };
            for p in pods {
                let Some(port) = p.named_port(name, spec.proto) else {
                    continue;
                };
                for ip in &p.ips {
                    let e = format!("{ip} . {} . {port}", spec.proto.nft());
                    if ip.is_ipv4() { &mut *v4 } else { &mut *v6 }.insert(e);
                }
            }
        });
        names
    }

    /// Puts the sets `names` into the output once per compile: as the last
    /// compile filled them if the pods of `spaces` (the namespaces their
    /// members come from) did not change since, else filled by `fill`.
    fn fill(
        &mut self,
        names: &[String; 2],
        kinds: [&'static str; 2],
        spaces: &[&str],
        fill: impl FnOnce(&Cluster, &mut BTreeSet<String>, &mut BTreeSet<String>),
    ) {
        let print = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (spaces, self.cluster.pods_print(spaces)).hash(&mut h);
            h.finish()
        };
        let [v4, v6] = match self.old_sets.remove(&names[0]) {
            Some((p, sets)) if p == print => sets,
            _ => {
                let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
                fill(self.cluster, &mut v4, &mut v6);
                [v4, v6]
            }
        };
        for (i, name) in names.iter().enumerate() {
            let elems = if i == 0 { &v4 } else { &v6 };
            self.out.sets.insert(
                name.clone(),
                Set {
                    kind: kinds[i],
                    elems: elems.clone(),
                },
            );
        }
        self.new_sets.insert(names[0].clone(), (print, [v4, v6]));
    }

    /// The peer conditions of a rule (an empty list: none can match).
    fn peer_conds(&mut self, dir: Dir, rule: &Rule) -> Vec<String> {
        if rule.peers.is_empty() {
            return vec![String::new()];
        }
        let f = dir.peer_field();
        let mut out = Vec::new();
        for peer in &rule.peers {
            match peer {
                Peer::Pods { .. } => {
                    let [s4, s6] = self.peer_sets(peer);
                    out.push(format!("ip {f} @{s4}"));
                    out.push(format!("ip6 {f} @{s6}"));
                }
                Peer::Block { cidr, except } => {
                    let fa = fam(cidr.is_ipv6());
                    let mut c = format!("{fa} {f} {cidr}");
                    let ex: Vec<String> = except
                        .iter()
                        .filter(|e| e.is_ipv6() == cidr.is_ipv6())
                        .map(|e| e.to_string())
                        .collect();
                    if !ex.is_empty() {
                        c.push_str(&format!(" {fa} {f} != {{ {} }}", ex.join(", ")));
                    }
                    out.push(c);
                }
            }
        }
        out
    }

    /// The lines one rule contributes to `pod`'s chain, each ending in `return`
    /// (allowed: back to the base chain, which checks the other direction).
    fn rule_lines(&mut self, dir: Dir, rule: &Rule, pod: &PodInfo) -> Vec<String> {
        let peers = self.peer_conds(dir, rule);
        let mut lines = Vec::new();
        let ports: Vec<Option<String>> = if rule.ports.is_empty() {
            vec![Some(String::new())]
        } else {
            rule.ports
                .iter()
                .map(|spec| {
                    let p = spec.proto.nft();
                    match &spec.port {
                        PortRef::Any => Some(format!("meta l4proto {p}")),
                        PortRef::Num(n, None) => Some(format!("meta l4proto {p} th dport {n}")),
                        PortRef::Num(n, Some(e)) => {
                            Some(format!("meta l4proto {p} th dport {n}-{e}"))
                        }
                        // Ingress: the name resolves on the selected pod itself.
                        PortRef::Name(name) if dir == Dir::Ingress => pod
                            .named_port(name, spec.proto)
                            .map(|n| format!("meta l4proto {p} th dport {n}")),
                        PortRef::Name(_) => None,
                    }
                })
                .collect()
        };
        for port in ports.iter().flatten() {
            for peer in &peers {
                lines.push(format!("{peer} {port} return").trim().replace("  ", " "));
            }
        }
        // Egress named ports: (destination . protocol . port) per destination pod.
        if dir == Dir::Egress {
            for spec in &rule.ports {
                let PortRef::Name(name) = &spec.port else {
                    continue;
                };
                let pod_peers: Vec<Option<&Peer>> = if rule.peers.is_empty() {
                    vec![None]
                } else {
                    // An ipBlock has no named ports: only pod peers can match.
                    rule.peers
                        .iter()
                        .filter(|p| matches!(p, Peer::Pods { .. }))
                        .map(Some)
                        .collect()
                };
                for peer in pod_peers {
                    let [s4, s6] = self.named_sets(peer, spec, name);
                    lines.push(format!("ip daddr . meta l4proto . th dport @{s4} return"));
                    lines.push(format!("ip6 daddr . meta l4proto . th dport @{s6} return"));
                }
            }
        }
        lines
    }

    fn pod_chain(&mut self, dir: Dir, pod: &PodInfo, policies: &[&Policy]) {
        let (prefix, maps) = match dir {
            Dir::Ingress => ("in", ["in4", "in6"]),
            Dir::Egress => ("eg", ["eg4", "eg6"]),
        };
        let chain = format!("{prefix}-{}", short_id(&(&pod.ns, &pod.name)));
        let print = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (dir == Dir::Ingress, pod, policies, self.log).hash(&mut h);
            h.finish()
        };
        let built = match self.old.remove(&chain) {
            Some(c) if c.print == print => {
                // The same inputs: the same rules; its sets are filled anew.
                for n in &c.needs {
                    match n {
                        Need::Peer(p) => drop(self.peer_sets(p)),
                        Need::Named(p, spec, name) => drop(self.named_sets(p.as_ref(), spec, name)),
                    }
                }
                self.needs.clear();
                c
            }
            _ => self.build_chain(dir, &chain, pod, policies, print),
        };
        self.out.owners.insert(chain.clone(), built.owner.clone());
        self.out.chains.insert(chain.clone(), built.rules.clone());
        for ip in &pod.ips {
            let m = maps[usize::from(ip.is_ipv6())];
            self.out
                .maps
                .entry(m)
                .or_default()
                .insert(ip.to_string(), chain.clone());
        }
        self.new.insert(chain, built);
    }

    /// `pod`'s chain for `dir` under `policies`, from scratch.
    fn build_chain(
        &mut self,
        dir: Dir,
        chain: &str,
        pod: &PodInfo,
        policies: &[&Policy],
        print: u64,
    ) -> Cached {
        self.needs.clear();
        let mut rules = Vec::new();
        for p in policies {
            let list = match dir {
                Dir::Ingress => p.ingress.as_ref(),
                Dir::Egress => p.egress.as_ref(),
            };
            for r in list.into_iter().flatten() {
                rules.extend(self.rule_lines(dir, r, pod));
            }
        }
        let what = if dir == Dir::Ingress {
            "ingress"
        } else {
            "egress"
        };
        if self.log {
            // The prefix names the chain: the agent knows whose it is.
            rules.push(format!(
                "limit rate 10/second burst 20 packets log prefix \"{chain}\" group {NFLOG_GROUP} snaplen 96"
            ));
        }
        rules.push(format!(
            "counter drop comment \"{}\"",
            comment(&format!("{}/{} {what}", pod.ns, pod.name))
        ));
        Cached {
            print,
            rules,
            owner: Owner {
                ns: pod.ns.clone(),
                pod: pod.name.clone(),
                direction: what,
                policies: policies.iter().map(|p| p.name.clone()).collect(),
            },
            needs: std::mem::take(&mut self.needs),
        }
    }
}

/// Pods and policies left out of the table (refused by the kernel), by
/// namespace and name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Skip {
    pub pods: BTreeSet<(String, String)>,
    pub policies: BTreeSet<(String, String)>,
}

impl Skip {
    pub fn pod(&self, p: &PodInfo) -> bool {
        self.pods.contains(&(p.ns.clone(), p.name.clone()))
    }

    pub fn policy(&self, p: &Policy) -> bool {
        self.policies.contains(&(p.ns.clone(), p.name.clone()))
    }
}

fn with_maps(cluster: &Cluster, log: bool) -> Builder<'_> {
    let mut b = Builder {
        cluster,
        out: Desired::default(),
        log,
        old: HashMap::new(),
        new: HashMap::new(),
        needs: Vec::new(),
        old_sets: HashMap::new(),
        new_sets: HashMap::new(),
    };
    for (m, _) in MAPS {
        b.out.maps.insert(m, BTreeMap::new());
    }
    b
}

/// The pods on `node` that policy can protect (pod network, addressed).
pub fn local_pods<'a>(cluster: &'a Cluster, node: &'a str) -> impl Iterator<Item = &'a PodInfo> {
    cluster
        .pods
        .values()
        .filter(move |p| &*p.node == node && !p.host_network && !p.ips.is_empty())
}

/// The policies that select `pod`, those in `skip` left out.
pub fn selecting<'a>(cluster: &'a Cluster, pod: &PodInfo, skip: &Skip) -> Vec<&'a Policy> {
    cluster
        .policies_in(&pod.ns)
        .filter(|p| p.selects(pod) && !skip.policy(p))
        .collect()
}

impl Builder<'_> {
    /// `pod`'s chains under `policies` (those that select it).
    fn pod(&mut self, pod: &PodInfo, policies: &[&Policy]) {
        let ingress: Vec<&Policy> = policies
            .iter()
            .copied()
            .filter(|p| p.ingress.is_some())
            .collect();
        let egress: Vec<&Policy> = policies
            .iter()
            .copied()
            .filter(|p| p.egress.is_some())
            .collect();
        if !ingress.is_empty() {
            self.pod_chain(Dir::Ingress, pod, &ingress);
        }
        if !egress.is_empty() {
            self.pod_chain(Dir::Egress, pod, &egress);
        }
    }
}

/// The desired state for the pods on `node`.
pub fn compile(cluster: &Cluster, node: &str) -> Desired {
    compile_skipping(cluster, node, &Skip::default(), false)
}

/// The desired state for the pods on `node`, without the pods and policies
/// in `skip`; `log`: denied attempts are logged (nflog).
pub fn compile_skipping(cluster: &Cluster, node: &str, skip: &Skip, log: bool) -> Desired {
    compile_with(cluster, node, skip, log, &mut Memo::default())
}

/// [`compile_skipping`], reusing the chains of the last compile in `memo`
/// whose pod and policies did not change (and keeping this one's there).
pub fn compile_with(
    cluster: &Cluster,
    node: &str,
    skip: &Skip,
    log: bool,
    memo: &mut Memo,
) -> Desired {
    let mut b = with_maps(cluster, log);
    b.old = std::mem::take(&mut memo.chains);
    b.old_sets = std::mem::take(&mut memo.sets);
    for pod in local_pods(cluster, node).filter(|p| !skip.pod(p)) {
        let policies = selecting(cluster, pod, skip);
        b.pod(pod, &policies);
    }
    memo.chains = b.new;
    memo.sets = b.new_sets;
    b.out
}

/// The table holding only `pod`'s chains under `policies` (to single out
/// what the kernel refuses).
pub fn compile_one(cluster: &Cluster, pod: &PodInfo, policies: &[&Policy], log: bool) -> Desired {
    let mut b = with_maps(cluster, log);
    b.pod(pod, policies);
    b.out
}

/// The addresses of a desired map (for tests and debugging).
pub fn mapped(d: &Desired, map: &str) -> BTreeSet<IpAddr> {
    d.maps
        .get(map)
        .map(|m| m.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default()
}
