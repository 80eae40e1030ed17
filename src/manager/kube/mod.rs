//! The Kubernetes subnet manager (`--kube-subnet-mgr`): the lease is the Node's
//! `spec.podCIDR`, published through `flannel.alpha.coreos.com/*` annotations on
//! the Node's status subresource; peers come from a watch over all Nodes.
//! `codec` holds the wire format (what a Node says, read without trusting it).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use futures::StreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::sync::mpsc;

use super::{LeaseEvent, LeaseRequest, PeerRead, SubnetManager};
use crate::config::netconf::NetConf;
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::retry::{self, Throttle};
use watch::Item;

/// The API server ends each watch after this long and the agent re-watches; with
/// [`READ_TIMEOUT`] it bounds how long a dead (half-open) connection goes unnoticed.
const WATCH_TIMEOUT_S: u32 = 60;
/// No byte from the API server for this long on any request: the connection is dead.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(75);

/// What the agent calls itself to the API server.
pub const USER_AGENT: &str = concat!("flanneld/", env!("CARGO_PKG_VERSION"), " (flannel-rs)");

mod codec;
mod list;
pub mod watch;

pub use codec::{assigned_public_ips, lease_from_node, names, pod_cidrs, NodeLite, NodeSpecLite};

pub struct KubeManager {
    /// Replaced when the node's address changes: connections from the old
    /// address are dead but would only time out after READ_TIMEOUT.
    /// The current client; replaced when the node's address changes, and every
    /// watch (the Node watch, the NetworkPolicy watches) follows the new one.
    clients: tokio::sync::watch::Sender<Client>,
    config: Config,
    node_name: String,
    prefix: String,
    net_config_path: PathBuf,
    set_unavailable: bool,
    queue_depth: usize,
    metrics: Arc<Metrics>,
    /// The Node as read for its assigned public IPs at start, reused by the
    /// first podCIDR check (one GET for both).
    first_read: std::sync::Mutex<Option<NodeLite>>,
}

/// Settings the kube manager takes from flags and the environment.
pub struct KubeSettings {
    pub kubeconfig: String,
    pub api_url: String,
    pub prefix: String,
    pub net_config_path: PathBuf,
    pub set_unavailable: bool,
}

impl KubeManager {
    pub async fn new(s: KubeSettings, metrics: Arc<Metrics>) -> anyhow::Result<KubeManager> {
        let mut config = if !s.kubeconfig.is_empty() {
            let kc = Kubeconfig::read_from(&s.kubeconfig)
                .with_context(|| format!("reading kubeconfig {}", s.kubeconfig))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .context("loading kubeconfig")?
        } else if !s.api_url.is_empty() {
            let url = s
                .api_url
                .parse()
                .with_context(|| format!("--kube-api-url {:?} is not a URL", s.api_url))?;
            Config::incluster().unwrap_or_else(|_| Config::new(url))
        } else {
            Config::incluster().context("not in a pod: set --kubeconfig-file or --kube-api-url")?
        };
        if !s.api_url.is_empty() {
            config.cluster_url = s
                .api_url
                .parse()
                .with_context(|| format!("--kube-api-url {:?} is not a URL", s.api_url))?;
        }
        config.read_timeout = Some(READ_TIMEOUT);
        // Our own waits decide when to retry (see crate::retry): kube-rs' layer
        // would retry 429/503/504 after 5 ms, 10 ms, ... up to 15 times first.
        config.default_retry = false;
        // Named in the API server's audit log and APF flow schemas.
        config.headers.push((
            hyper::header::USER_AGENT,
            hyper::header::HeaderValue::from_static(USER_AGENT),
        ));
        let client = Client::try_from(config.clone()).context("building the Kubernetes client")?;
        let node_name = node_name(&client).await?;
        let queue_depth = queue_depth(std::env::var("EVENT_QUEUE_DEPTH").ok().as_deref())?;
        if std::env::var("CONT_WHEN_CACHE_NOT_READY").as_deref() == Ok("true") {
            // Upstream exits when its informer has not synced in 10 minutes
            // unless this is set; flannel-rs never gives up on the first list
            // (it retries with backoff, not ready meanwhile), so both settings
            // behave the same here.
            tracing::info!("CONT_WHEN_CACHE_NOT_READY=true: accepted (the first Node list is waited for without a deadline)");
        }
        Ok(KubeManager {
            clients: tokio::sync::watch::Sender::new(client),
            config,
            node_name,
            prefix: s.prefix,
            net_config_path: s.net_config_path,
            set_unavailable: s.set_unavailable,
            queue_depth,
            metrics,
            first_read: std::sync::Mutex::new(None),
        })
    }

    /// The current client (for the NetworkPolicy watches).
    pub fn client(&self) -> Client {
        self.clients.borrow().clone()
    }

    /// The current client, and every later one (for the NetworkPolicy watches).
    pub fn clients(&self) -> tokio::sync::watch::Receiver<Client> {
        self.clients.subscribe()
    }

    /// New connections (from the node's current address) for every later
    /// request, and a fresh list for the watch.
    fn reconnect(&self) -> anyhow::Result<()> {
        let c = Client::try_from(self.config.clone()).context("building the Kubernetes client")?;
        self.clients.send_replace(c);
        Ok(())
    }

    pub fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Waits, event-driven, until the Node has the podCIDRs the config needs.
    /// The API being away is waited out; a forbidden watch is fatal.
    async fn wait_pod_cidrs(
        &self,
        conf: &NetConf,
    ) -> anyhow::Result<(Option<IpNetwork>, Option<IpNetwork>)> {
        let lite: Api<NodeLite> = Api::all(self.client());
        // A registered Node that has its podCIDRs needs no watch: one GET (and
        // only `get` on nodes) does — the one made at start for the public IPs
        // if there was one. Any error here is left to the watch below.
        let first = self
            .first_read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let read = match first {
            Some(n) => Ok(Some(n)),
            None => lite.get_opt(&self.node_name).await,
        };
        if let Ok(Some(n)) = read {
            let spec = n.spec.unwrap_or_default();
            if let Ok((v4, v6)) = pod_cidrs(
                spec.pod_cidr.as_deref(),
                spec.pod_cidrs.as_deref().unwrap_or(&[]),
            ) {
                if (conf.v4.is_none() || v4.is_some()) && (conf.v6.is_none() || v6.is_some()) {
                    return Ok((v4, v6));
                }
            }
        }
        let fields = format!("metadata.name={}", self.node_name);
        let mut stream = std::pin::pin!(watch::follow(lite, Some(&fields), WATCH_TIMEOUT_S));
        let mut log = Throttle::new(format!("waiting for node {}", self.node_name));
        let mut told = false;
        let mut found = false;
        while let Some(item) = stream.next().await {
            let n = match item {
                Item::Found(n) | Item::Applied(n) => {
                    found = true;
                    n
                }
                Item::Listing => {
                    found = false;
                    continue;
                }
                Item::Failed(f) => {
                    log.fail(&format_args!("{}; retrying in {:.1?}", f.why, f.delay));
                    continue;
                }
                Item::Listed if !found && !told => {
                    tracing::info!(
                        "waiting for node {} to be registered and assigned a podCIDR",
                        self.node_name
                    );
                    told = true;
                    continue;
                }
                _ => continue,
            };
            log.ok();
            let spec = n.spec.unwrap_or_default();
            let (v4, v6) = pod_cidrs(
                spec.pod_cidr.as_deref(),
                spec.pod_cidrs.as_deref().unwrap_or(&[]),
            )
            .map_err(|e| anyhow::anyhow!("node {}: {e}", self.node_name))?;
            if (conf.v4.is_none() || v4.is_some()) && (conf.v6.is_none() || v6.is_some()) {
                return Ok((v4, v6));
            }
            if !told {
                tracing::info!(
                    "waiting for node {} to be assigned a podCIDR",
                    self.node_name
                );
                told = true;
            }
        }
        bail!("the watch of node {} ended", self.node_name)
    }

    /// Folds the list/watch of all Nodes into lease events until the receiver
    /// is gone. A list or a (re)started watch marks the store up; a failure
    /// marks it down, with the reason, for /readyz.
    async fn follow(
        &self,
        stream: impl futures::Stream<Item = Item<NodeLite>>,
        tx: &mpsc::Sender<LeaseEvent>,
        log: &mut Throttle,
    ) {
        let mut stream = std::pin::pin!(stream);
        let mut broken = false;
        // The list being read: (created, name, lease) of every other Node.
        let mut listed: Vec<(String, String, PeerRead)> = Vec::new();
        let read = |n: &NodeLite| -> (String, PeerRead) {
            let name = n.metadata.name.clone().unwrap_or_default();
            let empty = BTreeMap::new();
            let ann = n.metadata.annotations.as_ref().unwrap_or(&empty);
            let spec = n.spec.as_ref();
            let cidr = spec.and_then(|s| s.pod_cidr.as_deref());
            let cidrs = spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or(&[]);
            (name, lease_from_node(&self.prefix, ann, cidr, cidrs))
        };
        while let Some(item) = stream.next().await {
            let out = match item {
                Item::Listing => {
                    listed.clear();
                    None
                }
                Item::Found(n) => {
                    // With its creation time: on a subnet conflict the older Node wins.
                    let created = n
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.to_string())
                        .unwrap_or_default();
                    let (name, lease) = read(&n);
                    if name != self.node_name {
                        listed.push((created, name, lease));
                    }
                    None
                }
                Item::Listed => {
                    let mut items = std::mem::take(&mut listed);
                    items.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
                    self.store_up(log, &mut broken);
                    Some(LeaseEvent::Snapshot(
                        items.into_iter().map(|(_, n, l)| (n, l)).collect(),
                    ))
                }
                Item::Applied(n) => {
                    let (name, lease) = read(&n);
                    (name != self.node_name).then_some(LeaseEvent::Upsert(name, lease))
                }
                Item::Deleted(n) => {
                    let name = n.metadata.name.unwrap_or_default();
                    (name != self.node_name).then_some(LeaseEvent::Remove(name))
                }
                Item::Watching => {
                    self.store_up(log, &mut broken);
                    None
                }
                Item::Failed(f) => {
                    if !std::mem::replace(&mut broken, true) {
                        self.metrics.store_reconnects.inc();
                    }
                    self.metrics.store.down(f.why.clone());
                    if f.relist && f.delay.is_zero() {
                        tracing::warn!("watching nodes: {}; re-listing now", f.why);
                    } else {
                        let next = if f.relist {
                            "listing"
                        } else {
                            "resuming the watch"
                        };
                        log.fail(&format_args!("{}; {next} in {:.1?}", f.why, f.delay));
                    }
                    None
                }
            };
            if let Some(ev) = out {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
    }

    fn store_up(&self, log: &mut Throttle, broken: &mut bool) {
        *broken = false;
        log.ok();
        self.metrics.store.up();
    }

    /// Patches the Node's annotations to carry `req`, only where they differ;
    /// returns the public addresses published (an `-overwrite` annotation wins).
    async fn publish(
        &self,
        conf: &NetConf,
        req: &LeaseRequest,
    ) -> anyhow::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
        let nodes: Api<Node> = Api::all(self.client());
        let what = format!("getting node {}", self.node_name);
        // Our own Node gone means it was deleted under us: no retry brings it back.
        let node = retry::until_ok(
            &what,
            |e| fatal(e) || is_code(e, 404),
            || nodes.get(&self.node_name),
        )
        .await
        .map_err(|e| gone_or_config_error(e, &what, &self.node_name))?;
        let have = node.metadata.annotations.clone().unwrap_or_default();
        let (want, pub4, pub6) = self.wanted_annotations(&have, conf, req);
        let differ: BTreeMap<&String, &String> = want
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(*v))
            .collect();
        if differ.is_empty() {
            tracing::info!(
                "node {} already carries this lease's annotations",
                self.node_name
            );
        } else {
            let patch = serde_json::json!({ "metadata": { "annotations": differ } });
            let what = format!("publishing annotations on node {}", self.node_name);
            let (pp, patch) = (PatchParams::default(), Patch::Strategic(&patch));
            retry::until_ok(
                &what,
                |e| fatal(e) || is_code(e, 404),
                || nodes.patch_status(&self.node_name, &pp, &patch),
            )
            .await
            .map_err(|e| gone_or_config_error(e, &what, &self.node_name))?;
            tracing::info!("published lease annotations on node {}", self.node_name);
        }
        Ok((pub4, pub6))
    }

    fn key(&self, n: &str) -> String {
        format!("{}{n}", self.prefix)
    }

    /// The annotations this node must carry, given what it carries now.
    fn wanted_annotations(
        &self,
        have: &BTreeMap<String, String>,
        conf: &NetConf,
        req: &LeaseRequest,
    ) -> (BTreeMap<String, String>, Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let mut want = BTreeMap::new();
        want.insert(self.key(names::SUBNET_MANAGER), "true".to_string());
        want.insert(
            self.key(names::BACKEND_TYPE),
            req.data.type_name().to_string(),
        );
        let mut pub4 = req.public_ip;
        let mut pub6 = req.public_ipv6;
        if conf.v4.is_some() {
            want.insert(self.key(names::BACKEND_DATA), req.data.to_json());
            if let Some(o) = have.get(&self.key(names::PUBLIC_IP_OVERWRITE)) {
                match o.parse::<Ipv4Addr>() {
                    Ok(ip) => pub4 = Some(ip),
                    Err(_) => tracing::warn!(
                        "ignoring {}: {o:?} is not an IPv4 address",
                        self.key(names::PUBLIC_IP_OVERWRITE)
                    ),
                }
            }
            if let Some(ip) = pub4 {
                want.insert(self.key(names::PUBLIC_IP), ip.to_string());
            }
        }
        if conf.v6.is_some() {
            want.insert(
                self.key(names::BACKEND_V6_DATA),
                req.data_v6.as_ref().unwrap_or(&req.data).to_json(),
            );
            if let Some(o) = have.get(&self.key(names::PUBLIC_IPV6_OVERWRITE)) {
                match o.parse::<Ipv6Addr>() {
                    Ok(ip) => pub6 = Some(ip),
                    Err(_) => tracing::warn!(
                        "ignoring {}: {o:?} is not an IPv6 address",
                        self.key(names::PUBLIC_IPV6_OVERWRITE)
                    ),
                }
            }
            if let Some(ip) = pub6 {
                want.insert(self.key(names::PUBLIC_IPV6), ip.to_string());
            }
        }
        (want, pub4, pub6)
    }
}

/// `EVENT_QUEUE_DEPTH`: the capacity of the channel from the Node watch to the
/// reconciler (upstream: of its event channel); unset or ≤ 0 → 5000, as upstream,
/// which also refuses a non-integer.
pub fn queue_depth(v: Option<&str>) -> anyhow::Result<usize> {
    match v.map(str::trim) {
        None | Some("") => Ok(5000),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n > 0 => Ok(n as usize),
            Ok(_) => Ok(5000),
            Err(e) => bail!("env EVENT_QUEUE_DEPTH={s} format error: {e}"),
        },
    }
}

/// NODE_NAME, else the nodeName of the pod POD_NAME in POD_NAMESPACE.
async fn node_name(client: &Client) -> anyhow::Result<String> {
    if let Ok(n) = std::env::var("NODE_NAME") {
        if !n.is_empty() {
            return Ok(n);
        }
    }
    let (Ok(pod), Ok(ns)) = (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) else {
        bail!("set NODE_NAME, or POD_NAME and POD_NAMESPACE, so flanneld knows its node");
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // The pod runs this very process, so "not found" means POD_NAME is wrong.
    let p = retry::until_ok(
        &format!("getting pod {ns}/{pod}"),
        |e| fatal(e) || is_code(e, 404),
        || pods.get(&pod),
    )
    .await
    .map_err(|e| config_error(e, &format!("getting pod {ns}/{pod}")))?;
    p.spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .with_context(|| format!("pod {ns}/{pod} has no nodeName"))
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Errors no retry heals: a request the API server calls malformed or
/// unprocessable. Everything else is retried: connection errors, timeouts, 5xx,
/// 429, and also 401/403 — a restarted API server answers 403 for its first
/// second, until its RBAC cache has synced; while it lasts, the hint naming
/// the permissions is logged every 10 s.
fn fatal(e: &kube::Error) -> bool {
    [400, 405, 413, 415, 422].iter().any(|c| is_code(e, *c))
}

/// One clear message for an error that stops the agent.
fn config_error(e: kube::Error, what: &str) -> anyhow::Error {
    let hint = if is_code(&e, 404) {
        " (set NODE_NAME, or POD_NAME and POD_NAMESPACE to this pod's)"
    } else if is_code(&e, 403) {
        " (RBAC: flanneld's ClusterRole needs get on pods, get/list/watch on nodes and patch on nodes/status, as in deploy/kube-flannel.yml)"
    } else if is_code(&e, 401) {
        " (the API server refused the credentials: check the service account token or --kubeconfig-file)"
    } else {
        ""
    };
    anyhow::anyhow!("{what}: {e}{hint}")
}

/// As [`config_error`], but a 404 says our Node was deleted.
fn gone_or_config_error(e: kube::Error, what: &str, node: &str) -> anyhow::Error {
    if is_code(&e, 404) {
        return anyhow::anyhow!(
            "{what}: node {node} no longer exists (deleted?); cannot publish this node's lease"
        );
    }
    config_error(e, what)
}

impl SubnetManager for KubeManager {
    async fn network_config(&self) -> anyhow::Result<NetConf> {
        Ok(NetConf::from_file(&self.net_config_path)?)
    }

    async fn assigned_public_ips(&self) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let lite: Api<NodeLite> = Api::all(self.client());
        let node = match lite.get_opt(&self.node_name).await {
            Ok(Some(n)) => n,
            // As upstream: without the Node now, no assigned address (the
            // lease itself waits for the Node and its podCIDR).
            Ok(None) => return (None, None),
            Err(e) => {
                tracing::warn!(
                    "reading node {} for its {}{} annotation: {e}",
                    self.node_name,
                    self.prefix,
                    names::NODE_PUBLIC_IP
                );
                return (None, None);
            }
        };
        let (ips, warnings) = assigned_public_ips(node.metadata.annotations.as_ref(), &self.prefix);
        for w in warnings {
            tracing::warn!("{w}");
        }
        *self.first_read.lock().unwrap_or_else(|e| e.into_inner()) = Some(node);
        ips
    }

    async fn acquire(&self, conf: &NetConf, req: &LeaseRequest) -> anyhow::Result<Lease> {
        let (v4, v6) = self.wait_pod_cidrs(conf).await?;
        for (n, pool, fam) in [(v4, &conf.v4, "Network"), (v6, &conf.v6, "IPv6Network")] {
            if let (Some(n), Some(p)) = (n, pool) {
                if !crate::subnet::is_proper_subnet(&p.network, &n) {
                    bail!(
                        "node {}'s podCIDR {n} is not inside the {fam} {}",
                        self.node_name,
                        p.network
                    );
                }
            }
        }
        let (pub4, pub6) = self.publish(conf, req).await?;
        Ok(Lease {
            subnet: v4.filter(|_| conf.v4.is_some()),
            ipv6_subnet: v6.filter(|_| conf.v6.is_some()),
            public_ip: pub4,
            public_ipv6: pub6,
            backend: req.data.clone(),
            backend_v6: req.data_v6.clone(),
        })
    }

    async fn watch(&self, conf: &NetConf, tx: mpsc::Sender<LeaseEvent>) {
        let _ = conf;
        let mut clients = self.clients();
        let mut log = Throttle::new("watching nodes");
        // One list (from the watch cache), then the watch resumes across broken
        // connections; what changed while the API server was away arrives as
        // events, or, after a 410, in the Snapshot of a new list.
        loop {
            // From the current client (a new one after an address change).
            let api: Api<NodeLite> = Api::all(clients.borrow_and_update().clone());
            let stream = watch::follow(api, None, WATCH_TIMEOUT_S);
            tokio::select! {
                _ = self.follow(stream, &tx, &mut log) => return, // the reconciler is gone
                _ = clients.changed() => {
                    tracing::info!("watching nodes: reconnecting from the node's new address");
                }
            }
        }
    }

    async fn complete(&self) -> anyhow::Result<()> {
        if !self.set_unavailable {
            return Ok(());
        }
        let nodes: Api<Node> = Api::all(self.client());
        let what = format!("getting node {}", self.node_name);
        let node = retry::until_ok(&what, fatal, || nodes.get(&self.node_name))
            .await
            .map_err(|e| config_error(e, &what))?;
        let already = node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| {
                c.type_ == "NetworkUnavailable"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("FlannelIsUp")
            });
        if already {
            return Ok(());
        }
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let patch = serde_json::json!({ "status": { "conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        let what = format!(
            "setting NetworkUnavailable=False on node {}",
            self.node_name
        );
        let (pp, patch) = (PatchParams::default(), Patch::Strategic(&patch));
        retry::until_ok(&what, fatal, || {
            nodes.patch_status(&self.node_name, &pp, &patch)
        })
        .await
        .map_err(|e| config_error(e, &what))?;
        tracing::info!(
            "set NetworkUnavailable=False (FlannelIsUp) on node {}",
            self.node_name
        );
        Ok(())
    }

    /// The podCIDR lease never expires; this is the one writer of our
    /// annotations after start-up: it publishes the newest request (from a new
    /// client: the old connections left from an address that is gone), a newer
    /// one replacing one still being retried. Our Node gone (404) ends the agent.
    async fn keep_alive(
        &self,
        conf: &NetConf,
        _own: &Lease,
        mut latest: tokio::sync::watch::Receiver<LeaseRequest>,
    ) -> anyhow::Error {
        loop {
            if latest.changed().await.is_err() {
                return std::future::pending().await; // the agent is ending
            }
            loop {
                let req = latest.borrow_and_update().clone();
                if let Err(e) = self.reconnect() {
                    tracing::error!("{e:#}");
                }
                tokio::select! {
                    r = self.publish(conf, &req) => match r {
                        Ok(_) => {
                            tracing::info!("published the lease with the node's new address");
                            break;
                        }
                        Err(e) => return e,
                    },
                    ch = latest.changed() => {
                        if ch.is_err() {
                            return std::future::pending().await;
                        }
                        // A newer address: publish that one instead.
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
