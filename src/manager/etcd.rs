//! The etcd subnet manager (`--etcd-endpoints`): leases are keys
//! `<prefix>/subnets/<a.b.c.d>-<len>` holding upstream's JSON, bound to an etcd
//! lease of 24 h that is renewed `--subnet-lease-renew-margin` minutes before
//! it expires. Peers: one read of `<prefix>/subnets/`, then a watch from the
//! next revision, so nothing between the read and the watch is lost.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use ipnetwork::IpNetwork;
use rand::seq::IndexedRandom;
use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};

use super::{LeaseEvent, LeaseRequest, PeerRead, SubnetManager};
use crate::config::netconf::NetConf;
use crate::lease::{BackendData, Lease};
use crate::metrics::Metrics;
use crate::retry::{self, Backoff, Throttle};
use crate::subnet;
use crate::subnet_env::SubnetEnv;

/// Upstream's lease TTL.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How many free subnets to choose from at random (upstream's number).
const FREE_CANDIDATES: usize = 100;
/// The watch asks for progress notifications (etcd sends them every 10 minutes
/// by default); silence for longer means the watch is dead, whatever TCP says.
const WATCH_IDLE: Duration = Duration::from_secs(11 * 60);
/// HTTP/2 pings on the etcd connection (etcd refuses pings more often than every
/// 5 s): a dead or half-open connection is noticed within interval + timeout.
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// When to renew a lease of `ttl`: `margin` before it expires, as upstream
/// (`--subnet-lease-renew-margin`); at half-life when the margin is not shorter
/// than the TTL (only with a test TTL), and never more often than every second.
pub fn renew_interval(ttl: Duration, margin: Duration) -> Duration {
    let at = if margin < ttl { ttl - margin } else { ttl / 2 };
    at.max(Duration::from_secs(1))
}

pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub keyfile: String,
    pub certfile: String,
    pub cafile: String,
    pub username: String,
    pub password: String,
    pub subnet_file: PathBuf,
    pub renew_margin: Duration,
    /// Upstream's 24 h unless a test shortens it (FLANNEL_RS_LEASE_TTL_SECONDS).
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone)]
struct Own {
    key: String,
    lease_id: i64,
    /// The value we wrote: a Put of our key with any other value is someone else's.
    value: String,
    /// A value being published (the node's address changed): its echo is ours too.
    pending: Option<String>,
}

impl Own {
    fn new(key: String, lease_id: i64, value: String) -> Own {
        Own {
            key,
            lease_id,
            value,
            pending: None,
        }
    }

    fn holds(&self, value: &[u8]) -> bool {
        self.value.as_bytes() == value || self.pending.as_deref().map(str::as_bytes) == Some(value)
    }
}

pub struct EtcdManager {
    s: EtcdSettings,
    /// Replaced when the node's address changes (see `reconnect`).
    client: Mutex<Client>,
    opts: ConnectOptions,
    /// Tells the watch to drop its stream and read afresh.
    restart: Notify,
    own: Mutex<Option<Own>>,
    /// What we publish now (the node's address can change under the agent).
    req: Mutex<Option<LeaseRequest>>,
    lost: Notify,
    metrics: Arc<Metrics>,
}

/// `10.244.1.0/24` → `10.244.1.0-24` (dual stack: `…&fd00::-64`).
pub fn key_name(v4: Option<IpNetwork>, v6: Option<IpNetwork>) -> String {
    let part = |n: IpNetwork| format!("{}-{}", n.network(), n.prefix());
    match (v4, v6) {
        (Some(a), Some(b)) => format!("{}&{}", part(a), part(b)),
        (Some(a), None) => part(a),
        (None, Some(b)) => part(b),
        (None, None) => String::new(),
    }
}

/// The inverse of [`key_name`]; `None` for anything that is not a subnet key.
pub fn parse_key_name(name: &str) -> Option<(Option<IpNetwork>, Option<IpNetwork>)> {
    let mut v4 = None;
    let mut v6 = None;
    for part in name.split('&') {
        let (addr, len) = part.rsplit_once('-')?;
        let n = IpNetwork::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
        let slot = if n.is_ipv4() { &mut v4 } else { &mut v6 };
        if slot.replace(n).is_some() {
            return None;
        }
    }
    // Only the canonical form upstream writes (network address, IPv4 first):
    // a key with host bits or another spelling would not be found again by it.
    (key_name(v4, v6) == name).then_some((v4, v6))
}

/// Upstream's lease value: `{"PublicIP":…,"PublicIPv6":…,"BackendType":…,"BackendData":…}`.
/// `BackendData` belongs to the IPv4 side: an IPv6-only lease carries only
/// `BackendV6Data`, as upstream writes it.
pub fn lease_value(req: &LeaseRequest, v4: bool) -> String {
    let ip = req
        .public_ip
        .filter(|_| v4)
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let ip6 = req
        .public_ipv6
        .map(|a| format!("\"{a}\""))
        .unwrap_or_else(|| "null".into());
    let mut s = format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":{ip6},"BackendType":"{}""#,
        req.data.type_name()
    );
    // host-gw has no backend data; upstream omits the empty field.
    if let (true, BackendData::Vxlan(_)) = (v4, req.data) {
        s.push_str(&format!(r#","BackendData":{}"#, req.data.to_json()));
    }
    if let Some(d @ BackendData::Vxlan(_)) = req.data_v6 {
        s.push_str(&format!(r#","BackendV6Data":{}"#, d.to_json()));
    }
    s.push('}');
    s
}

/// Parses a peer's key name and value (pure; hostile input is an error, not a panic).
pub fn parse_lease(name: &str, value: &[u8]) -> PeerRead {
    let (v4, v6) = parse_key_name(name).ok_or_else(|| format!("key {name:?} is not a subnet"))?;
    if value.len() > 2 * crate::lease::MAX_BACKEND_DATA {
        return Err(format!("value is {} bytes, too large", value.len()));
    }
    let v: Value = serde_json::from_slice(value).map_err(|e| format!("value is not JSON: {e}"))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    let ty = field("BackendType")
        .and_then(Value::as_str)
        .ok_or("no BackendType")?;
    let data_text = |k: &str| {
        field(k)
            .map(|d| d.to_string())
            .unwrap_or_else(|| "null".into())
    };
    let backend_v6 = match (v6, field("BackendV6Data")) {
        (Some(_), Some(_)) => Some(BackendData::parse(ty, &data_text("BackendV6Data"))?),
        _ => None,
    };
    // An IPv6-only lease has no BackendData: its IPv6 data stands for it.
    let backend = match (field("BackendData"), backend_v6) {
        (None, Some(d)) if v4.is_none() => d,
        _ => BackendData::parse(ty, &data_text("BackendData"))?,
    };
    let backend_v6 = backend_v6.or(v6.map(|_| backend));
    let public_ip = match field("PublicIP").and_then(Value::as_str) {
        Some(s) => Some(
            s.parse::<Ipv4Addr>()
                .map_err(|_| format!("PublicIP {s:?} is not an IPv4 address"))?,
        ),
        None => None,
    };
    let public_ipv6 = match field("PublicIPv6").and_then(Value::as_str) {
        Some(s) => Some(
            s.parse::<Ipv6Addr>()
                .map_err(|_| format!("PublicIPv6 {s:?} is not an IPv6 address"))?,
        ),
        None => None,
    };
    Ok(Some(Lease {
        subnet: v4,
        ipv6_subnet: v6,
        public_ip,
        public_ipv6,
        backend,
        backend_v6,
    }))
}

/// Errors no retry heals: refused credentials or permissions, or a TLS
/// certificate one side rejects. Everything else (refused connections,
/// timeouts, no leader) is transient.
fn fatal(e: &etcd_client::Error) -> bool {
    if let etcd_client::Error::GRpcStatus(s) = e {
        use tonic::Code;
        return matches!(s.code(), Code::PermissionDenied)
            || (matches!(s.code(), Code::InvalidArgument | Code::Unauthenticated)
                && s.message().contains("authentication failed"));
    }
    fatal_transport(&format!("{e:?}"))
}

/// A TLS failure no retry heals: a certificate one side rejects. A handshake
/// cut short (EOF, reset: etcd restarting, a load balancer without a backend)
/// is transient.
fn fatal_transport(debug: &str) -> bool {
    let text = debug.to_ascii_lowercase();
    [
        "certificate",
        "unknownissuer",
        "badsignature",
        "notvalidforname",
        "bad_certificate",
        "unknown_ca",
    ]
    .iter()
    .any(|w| text.contains(w))
}

impl EtcdManager {
    pub async fn new(s: EtcdSettings, metrics: Arc<Metrics>) -> anyhow::Result<EtcdManager> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(KEEPALIVE.0, KEEPALIVE.1)
            .with_keep_alive_while_idle(true)
            .with_tcp_keepalive(Duration::from_secs(30))
            // A member cut off from its cluster's leader refuses (and cancels
            // watches) instead of serving stale data.
            .with_require_leader(true);
        if !s.username.is_empty() {
            // etcd's simple tokens expire (--auth-token-ttl, 300 s by default).
            opts = opts
                .with_user(s.username.clone(), s.password.clone())
                .with_auto_token_refresh(true);
        }
        if !s.cafile.is_empty() || !s.certfile.is_empty() {
            let mut tls = TlsOptions::new();
            if !s.cafile.is_empty() {
                let ca = std::fs::read(&s.cafile)
                    .with_context(|| format!("reading --etcd-cafile {}", s.cafile))?;
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if !s.certfile.is_empty() {
                let cert = std::fs::read(&s.certfile)
                    .with_context(|| format!("reading --etcd-certfile {}", s.certfile))?;
                let key = std::fs::read(&s.keyfile)
                    .with_context(|| format!("reading --etcd-keyfile {}", s.keyfile))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        let endpoints = s.endpoints.clone();
        let what = format!("connecting to etcd at {}", endpoints.join(","));
        let client = retry::until_ok(&what, fatal, || {
            let (e, o) = (endpoints.clone(), opts.clone());
            async move {
                let mut c = Client::connect(e, Some(o)).await?;
                c.status().await?;
                Ok(c)
            }
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{what}: {e} (a configuration error: check --etcd-cafile, --etcd-certfile, \
                 --etcd-keyfile, --etcd-username and --etcd-password)"
            )
        })?;
        tracing::info!("connected to etcd at {}", s.endpoints.join(","));
        Ok(EtcdManager {
            s,
            client: Mutex::new(client),
            opts,
            restart: Notify::new(),
            own: Mutex::new(None),
            req: Mutex::new(None),
            lost: Notify::new(),
            metrics,
        })
    }

    fn client(&self) -> Client {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// New connections from the node's current address: the old ones are dead
    /// but would only be noticed by the keep-alive timeout.
    async fn reconnect(&self) -> anyhow::Result<()> {
        let c = Client::connect(self.s.endpoints.clone(), Some(self.opts.clone()))
            .await
            .with_context(|| format!("reconnecting to etcd at {}", self.s.endpoints.join(",")))?;
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = c;
        self.restart.notify_one();
        Ok(())
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.s.prefix.trim_end_matches('/'))
    }

    /// All subnet keys with their lease ids, oldest first, and the revision of the read.
    async fn read_all(&self) -> anyhow::Result<(Vec<(String, Vec<u8>, i64)>, i64)> {
        let mut c = self.client();
        let r = c
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        let p = self.subnets_prefix();
        let items = r
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = kv.key_str().ok()?;
                Some((
                    k.strip_prefix(&p)?.to_string(),
                    kv.value().to_vec(),
                    kv.lease(),
                ))
            })
            .collect();
        Ok((items, rev))
    }

    /// Creates `key` only if absent, bound to a fresh lease. Ok(false) = someone holds it.
    async fn create(&self, name: &str, value: &str) -> anyhow::Result<Option<i64>> {
        let mut c = self.client();
        let lease = c
            .lease_grant(self.s.lease_ttl.as_secs() as i64, None)
            .await?
            .id();
        let key = format!("{}{name}", self.subnets_prefix());
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        match c.txn(txn).await {
            Ok(r) if r.succeeded() => Ok(Some(lease)),
            r => {
                // Not ours after all (or unknown): the granted lease must not linger.
                let _ = c.lease_revoke(lease).await;
                Ok(r.map(|_| None)?)
            }
        }
    }

    async fn try_acquire(
        &self,
        conf: &NetConf,
        req: &LeaseRequest,
    ) -> anyhow::Result<Option<(Lease, Own)>> {
        let (pool4, pool6) = (conf.v4.as_ref(), conf.v6.as_ref());
        if pool4.is_none() && pool6.is_none() {
            bail!("the network configuration enables neither IPv4 nor IPv6");
        }
        let value = lease_value(req, pool4.is_some());
        // Both enabled families present and inside SubnetMin..SubnetMax; no other family.
        let fits = |v4: Option<IpNetwork>, v6: Option<IpNetwork>| {
            let one = |n: Option<IpNetwork>, p: Option<&crate::config::netconf::Pool>| match p {
                Some(p) => n.is_some_and(|n| p.range().holds(&n)),
                None => n.is_none(),
            };
            one(v4, pool4) && one(v6, pool6)
        };
        let (items, _) = self.read_all().await?;
        let mut c = self.client();
        let lease_of = |v4: Option<IpNetwork>, v6: Option<IpNetwork>| Lease {
            subnet: v4,
            ipv6_subnet: v6,
            public_ip: req.public_ip,
            public_ipv6: req.public_ipv6,
            backend: req.data,
            backend_v6: req.data_v6,
        };
        // (1) A lease that already carries our public address (IPv4, or IPv6 when IPv4 is off).
        let ours = |l: &Lease| {
            if pool4.is_some() {
                req.public_ip.is_some() && l.public_ip == req.public_ip
            } else {
                req.public_ipv6.is_some() && l.public_ipv6 == req.public_ipv6
            }
        };
        for (name, val, lease_id) in &items {
            let Ok(Some(l)) = parse_lease(name, val) else {
                continue;
            };
            if !ours(&l) {
                continue;
            }
            let key = format!("{}{name}", self.subnets_prefix());
            if !fits(l.subnet, l.ipv6_subnet) {
                tracing::info!(
                    "deleting our old lease {name}: it does not fit the network configuration"
                );
                c.delete(key, None).await?;
                continue;
            }
            let (v4, v6) = (l.subnet, l.ipv6_subnet);
            if *lease_id == 0 {
                // A reservation: permanent; keep it without a lease, refresh the value.
                tracing::info!("using the reservation {name} for this node");
                if val.as_slice() != value.as_bytes() {
                    c.put(key.clone(), value.clone(), None).await?;
                }
                return Ok(Some((lease_of(v4, v6), Own::new(key, 0, value.clone()))));
            }
            let new_lease = c
                .lease_grant(self.s.lease_ttl.as_secs() as i64, None)
                .await?
                .id();
            let txn = Txn::new()
                .when(vec![Compare::lease(
                    key.clone(),
                    CompareOp::Equal,
                    *lease_id,
                )])
                .and_then(vec![TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(new_lease)),
                )]);
            if c.txn(txn).await?.succeeded() {
                let _ = c.lease_revoke(*lease_id).await;
                tracing::info!("reusing our lease {name}");
                return Ok(Some((
                    lease_of(v4, v6),
                    Own::new(key, new_lease, value.clone()),
                )));
            }
            let _ = c.lease_revoke(new_lease).await;
            return Ok(None);
        }
        let taken: Vec<IpNetwork> = items
            .iter()
            .filter_map(|(n, _, _)| parse_key_name(n))
            .flat_map(|(v4, v6)| v4.into_iter().chain(v6))
            .collect();
        let free = |n: &IpNetwork| !taken.iter().any(|t| subnet::overlaps(t, n));
        let free_opt = |n: Option<IpNetwork>| n.is_none_or(|n| free(&n));
        let claim = |v4: Option<IpNetwork>, v6: Option<IpNetwork>| {
            let name = key_name(v4, v6);
            let value = value.clone();
            async move {
                let id = self.create(&name, &value).await?;
                anyhow::Ok(id.map(|id| {
                    (
                        lease_of(v4, v6),
                        Own::new(
                            format!("{}{name}", self.subnets_prefix()),
                            id,
                            value.clone(),
                        ),
                    )
                }))
            }
        };
        // (2) The subnets from the previous subnet.env.
        if let Ok(Some(prev)) = SubnetEnv::read(&self.s.subnet_file) {
            let v4 = prev.subnet.filter(|_| pool4.is_some());
            let v6 = prev.ipv6_subnet.filter(|_| pool6.is_some());
            if fits(v4, v6) && free_opt(v4) && free_opt(v6) {
                let got = claim(v4, v6).await?;
                if got.is_some() {
                    tracing::info!("re-acquired the previous subnet {}", key_name(v4, v6));
                }
                return Ok(got);
            }
        }
        // (3) A random one of the first free subnets, per family.
        let pick = |p: Option<&crate::config::netconf::Pool>| -> anyhow::Result<Option<IpNetwork>> {
            let Some(p) = p else { return Ok(None) };
            let candidates: Vec<IpNetwork> = p
                .range()
                .iter()
                .filter(|n| free(n))
                .take(FREE_CANDIDATES)
                .collect();
            match candidates.choose(&mut rand::rng()) {
                Some(n) => Ok(Some(*n)),
                None => bail!(
                    "no free subnet left in {} (SubnetMin {}, SubnetMax {})",
                    p.network,
                    p.subnet_min,
                    p.subnet_max
                ),
            }
        };
        let (v4, v6) = (pick(pool4)?, pick(pool6)?);
        claim(v4, v6).await
    }

    /// flannel_lease_expiry_timestamp_seconds: a lease just granted or renewed
    /// lives one TTL from now.
    fn note_expiry(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics
            .lease_expiry
            .get_or_create(&crate::metrics::StoreLabel { store: "etcd" })
            .set((now + self.s.lease_ttl).as_secs_f64());
    }

    fn own(&self) -> Option<Own> {
        self.own.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Extends our etcd lease; false when etcd no longer knows it (expired or revoked).
    async fn renew(&self, lease_id: i64) -> anyhow::Result<bool> {
        let mut c = self.client();
        let once = async {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease_id).await?;
            keeper.keep_alive().await?;
            let r = stream.message().await?;
            anyhow::Ok(r.is_some_and(|r| r.ttl() > 0))
        };
        tokio::time::timeout(Duration::from_secs(10), once)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?
    }

    /// Reads our key and settles who holds it: still ours (kept as is, or moved
    /// onto a new etcd lease when our value sits there without our lease), gone
    /// (re-created, create-if-absent), or another node's. Errors are transient.
    async fn reclaim(&self, own: &Own, req: &LeaseRequest) -> anyhow::Result<Keep> {
        let name = own
            .key
            .strip_prefix(&self.subnets_prefix())
            .unwrap_or(&own.key)
            .to_string();
        let v4 = parse_key_name(&name).is_some_and(|(v4, _)| v4.is_some());
        let value = lease_value(req, v4);
        let mut c = self.client();
        let r = c.get(own.key.clone(), None).await?;
        let Some(kv) = r.kvs().first() else {
            return match self.create(&name, &value).await? {
                Some(id) => {
                    tracing::warn!("our lease {name} was gone from etcd; re-created it");
                    Ok(Keep::Kept(Own::new(own.key.clone(), id, value.clone())))
                }
                None => Err(anyhow::anyhow!(
                    "{name} was created by someone else meanwhile; re-reading"
                )),
            };
        };
        match holder(&name, kv.value(), req) {
            Holder::Other(who) => Ok(Keep::Taken(format!(
                "our subnet {name} is now held by another node ({who})"
            ))),
            Holder::Us if kv.lease() == own.lease_id || kv.lease() == 0 => Ok(Keep::Kept(
                Own::new(own.key.clone(), kv.lease(), value.clone()),
            )),
            Holder::Us => {
                // Our value on a lease that is not (or no longer) ours: move it to a new one.
                let id = c
                    .lease_grant(self.s.lease_ttl.as_secs() as i64, None)
                    .await?
                    .id();
                let txn = Txn::new()
                    .when(vec![Compare::mod_revision(
                        own.key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then(vec![TxnOp::put(
                        own.key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(id)),
                    )]);
                if c.txn(txn).await?.succeeded() {
                    tracing::warn!(
                        "our lease {name} was on a lost etcd lease; moved it to a new one"
                    );
                    Ok(Keep::Kept(Own::new(own.key.clone(), id, value.clone())))
                } else {
                    let _ = c.lease_revoke(id).await;
                    Err(anyhow::anyhow!(
                        "{name} changed while reclaiming it; re-reading"
                    ))
                }
            }
        }
    }

    /// One renewal round: renew (or, when `check` or the lease is gone, reclaim),
    /// retrying transient errors with the store backoff. Never treats a failed
    /// request as a lost lease.
    async fn keep(&self, own: &Own, req: &LeaseRequest, check: bool) -> Keep {
        let mut backoff = Backoff::default();
        let mut log = Throttle::new(format!("renewing our lease {}", own.key));
        loop {
            let step = async {
                if !check && own.lease_id != 0 && self.renew(own.lease_id).await? {
                    return anyhow::Ok(Keep::Kept(own.clone()));
                }
                self.reclaim(own, req).await
            };
            match step.await {
                Ok(k) => {
                    log.ok();
                    return k;
                }
                Err(e) => {
                    let d = backoff.next_delay();
                    log.fail(&format_args!("{e:#}; retrying in {d:.1?}"));
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

/// The outcome of a renewal round.
enum Keep {
    Kept(Own),
    /// Another node holds our subnet: the agent exits (see `keep_alive`).
    Taken(String),
}

/// Who a subnet key's value belongs to.
#[derive(Debug, PartialEq, Eq)]
enum Holder {
    Us,
    /// Another node (its public address, or why the value is not ours).
    Other(String),
}

/// Ours when it is a valid lease carrying our public address (IPv4; IPv6 when
/// the lease has no IPv4 side) — the same test acquisition uses to reuse a lease.
fn holder(name: &str, value: &[u8], req: &LeaseRequest) -> Holder {
    match parse_lease(name, value) {
        Ok(Some(l)) => {
            let ours = if l.subnet.is_some() {
                req.public_ip.is_some() && l.public_ip == req.public_ip
            } else {
                req.public_ipv6.is_some() && l.public_ipv6 == req.public_ipv6
            };
            if ours {
                Holder::Us
            } else {
                let ip = l.public_ip.map(|i| i.to_string());
                let ip6 = l.public_ipv6.map(|i| i.to_string());
                Holder::Other(format!("public IP {}", ip.or(ip6).unwrap_or_default()))
            }
        }
        Ok(None) => Holder::Other("no lease value".into()),
        Err(why) => Holder::Other(format!("unreadable value: {why}")),
    }
}

impl SubnetManager for EtcdManager {
    async fn network_config(&self) -> anyhow::Result<NetConf> {
        let key = format!("{}/config", self.s.prefix.trim_end_matches('/'));
        let mut backoff = Backoff::default();
        let mut log = Throttle::new(format!("reading {key}"));
        let mut told = false;
        loop {
            let mut c = self.client();
            match c.get(key.clone(), None).await {
                Ok(r) => {
                    log.ok();
                    backoff.reset();
                    if let Some(kv) = r.kvs().first() {
                        let text = String::from_utf8_lossy(kv.value());
                        return NetConf::parse(&text)
                            .with_context(|| format!("network configuration in {key}"));
                    }
                    if !told {
                        tracing::warn!("waiting for the network configuration at {key}");
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) if fatal(&e) => return Err(e).with_context(|| format!("reading {key}")),
                Err(e) => {
                    let d = backoff.next_delay();
                    log.fail(&format_args!("{e}; retrying in {d:.1?}"));
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    async fn acquire(&self, conf: &NetConf, req: &LeaseRequest) -> anyhow::Result<Lease> {
        let mut backoff = Backoff::default();
        let mut log = Throttle::new("acquiring a lease");
        let mut races = 0;
        loop {
            match self.try_acquire(conf, req).await {
                Ok(Some((lease, own))) => {
                    log.ok();
                    tracing::info!("leased {} (etcd lease {:x})", own.key, own.lease_id);
                    *self.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(own);
                    *self.req.lock().unwrap_or_else(|e| e.into_inner()) = Some(req.clone());
                    return Ok(lease);
                }
                Ok(None) => {
                    races += 1;
                    if races >= 50 {
                        bail!("could not acquire a subnet lease: lost the race for one 50 times");
                    }
                    tracing::info!("another node took the subnet first; trying again");
                }
                // Running out of subnets does not heal by waiting.
                Err(e) if e.to_string().starts_with("no free subnet") => return Err(e),
                Err(e) => {
                    let d = backoff.next_delay();
                    log.fail(&format_args!("{e:#}; retrying in {d:.1?}"));
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    async fn watch(&self, _conf: &NetConf, tx: mpsc::Sender<LeaseEvent>) {
        let mut backoff = Backoff::default();
        let mut log = Throttle::new("watching leases in etcd");
        loop {
            match self.watch_once(&tx, &mut backoff, &mut log).await {
                WatchEnd::Closed => return,
                WatchEnd::Compacted(rev) => {
                    // Our revision is gone: re-read now (one read per compaction), never wait.
                    self.metrics.store_reconnects.inc();
                    tracing::warn!(
                        "etcd compacted the watched revisions (at {rev}); re-reading now"
                    );
                }
                WatchEnd::Reconnected => {
                    tracing::info!(
                        "etcd watch: reconnected from the node's new address; re-reading"
                    );
                }
                WatchEnd::Broke(why) => {
                    self.metrics.store_reconnects.inc();
                    self.metrics.store.down(why.clone());
                    let d = backoff.next_delay();
                    log.fail(&format_args!("{why}; re-reading in {d:.1?}"));
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    async fn complete(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Renews our lease `--subnet-lease-renew-margin` before it expires,
    /// re-checks it at once when the watch saw our key change or vanish, and
    /// publishes the latest value of `latest` (the node's address changed) —
    /// the one writer of our key. Returns only when another node holds our
    /// subnet: like upstream, the agent then exits, and its restart acquires a
    /// new subnet cleanly (routes, device address and subnet.env all change).
    async fn keep_alive(
        &self,
        _conf: &NetConf,
        _own: &Lease,
        mut latest: watch::Receiver<LeaseRequest>,
    ) -> anyhow::Error {
        let every = renew_interval(self.s.lease_ttl, self.s.renew_margin);
        if self.own().is_some_and(|o| o.lease_id != 0) {
            self.note_expiry();
        }
        let renewal = tokio::time::sleep(every);
        tokio::pin!(renewal);
        loop {
            let check = tokio::select! {
                _ = &mut renewal => {
                    renewal.as_mut().reset(tokio::time::Instant::now() + every);
                    false
                }
                _ = self.lost.notified() => true,
                ch = latest.changed() => {
                    if ch.is_err() {
                        // The agent is ending; nothing more to publish.
                        return std::future::pending().await;
                    }
                    if let Err(e) = self.publish_latest(&mut latest).await {
                        return e;
                    }
                    continue;
                }
            };
            let Some(own) = self.own() else {
                return anyhow::anyhow!("no lease is held");
            };
            if own.lease_id == 0 && !check {
                continue; // a reservation never expires
            }
            let req = self.published(&latest);
            match self.keep(&own, &req, check).await {
                Keep::Kept(o) => self.kept(&own, o),
                Keep::Taken(why) => return taken(why),
            }
        }
    }
}

fn taken(why: String) -> anyhow::Error {
    anyhow::anyhow!("{why}; exiting so that a restart acquires a new subnet")
}

impl EtcdManager {
    /// What our key carries now (the last value published).
    fn published(&self, latest: &watch::Receiver<LeaseRequest>) -> LeaseRequest {
        self.req
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| latest.borrow().clone())
    }

    /// Records a renewal round's outcome.
    fn kept(&self, before: &Own, o: Own) {
        let held = o.lease_id != 0;
        if o.lease_id == before.lease_id {
            self.metrics.lease_renewals.inc();
            tracing::info!("renewed lease {} (etcd lease {:x})", o.key, o.lease_id);
        }
        *self.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
        if held {
            self.note_expiry();
        }
    }

    /// Publishes the newest request on our key (from new connections: the old
    /// ones left from an address that is gone). Transient errors are retried
    /// with the store backoff, and a newer request replaces the one being
    /// retried. Our key no longer holding our value (its etcd lease expired,
    /// someone rewrote it) is settled as a renewal check would, then published
    /// again; Err only when another node holds our subnet.
    async fn publish_latest(
        &self,
        latest: &mut watch::Receiver<LeaseRequest>,
    ) -> Result<(), anyhow::Error> {
        let mut backoff = Backoff::default();
        let mut log = Throttle::new("publishing our lease with the node's new address");
        loop {
            let want = latest.borrow_and_update().clone();
            let prev = self.published(latest);
            let Some(own) = self.own() else {
                return Err(anyhow::anyhow!("no lease is held"));
            };
            if want == prev {
                return Ok(());
            }
            let step = async {
                self.reconnect().await?;
                if let Some(o) = self.write_value(&own, &want).await? {
                    return anyhow::Ok(Some(o));
                }
                match self.reclaim(&own, &prev).await? {
                    Keep::Kept(o) => {
                        *self.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
                        Ok(None)
                    }
                    Keep::Taken(why) => Err(Taken(why).into()),
                }
            };
            let r = tokio::select! {
                r = step => r,
                _ = latest.changed() => continue,
            };
            match r {
                Ok(Some(o)) => {
                    log.ok();
                    *self.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
                    *self.req.lock().unwrap_or_else(|e| e.into_inner()) = Some(want);
                    tracing::info!("published the lease with the node's new address");
                }
                Ok(None) => {} // settled; publish again
                Err(e) => {
                    if let Some(t) = e.downcast_ref::<Taken>() {
                        return Err(taken(t.0.clone()));
                    }
                    let d = backoff.next_delay();
                    log.fail(&format_args!("{e:#}; retrying in {d:.1?}"));
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = latest.changed() => {}
                    }
                }
            }
        }
    }

    /// Writes `req`'s value on our key and etcd lease if the key still holds
    /// our value. Ok(None): it does not, or etcd no longer knows our lease.
    async fn write_value(&self, own: &Own, req: &LeaseRequest) -> anyhow::Result<Option<Own>> {
        let name = own
            .key
            .strip_prefix(&self.subnets_prefix())
            .unwrap_or(&own.key)
            .to_string();
        let v4 = parse_key_name(&name).is_some_and(|(v4, _)| v4.is_some());
        let value = lease_value(req, v4);
        // Its echo in the watch is ours from now on.
        let mut marked = own.clone();
        marked.pending = Some(value.clone());
        *self.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(marked);
        let opts = (own.lease_id != 0).then(|| PutOptions::new().with_lease(own.lease_id));
        let txn = Txn::new()
            .when(vec![Compare::value(
                own.key.clone(),
                CompareOp::Equal,
                own.value.clone(),
            )])
            .and_then(vec![TxnOp::put(own.key.clone(), value.clone(), opts)]);
        let mut c = self.client();
        match c.txn(txn).await {
            Ok(r) if r.succeeded() => Ok(Some(Own::new(own.key.clone(), own.lease_id, value))),
            Ok(_) => Ok(None),
            Err(e) if lease_not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Another node holds our subnet (ends the agent).
#[derive(Debug)]
struct Taken(String);

impl std::fmt::Display for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Taken {}

/// etcd's answer to a request on a lease it no longer has (expired, revoked).
fn lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

/// How one read-then-watch round ended.
enum WatchEnd {
    /// The lease-event receiver is gone.
    Closed,
    Compacted(i64),
    /// New connections (the node's address changed): read afresh at once.
    Reconnected,
    Broke(String),
}

impl EtcdManager {
    /// Reads all leases, sends them as a Snapshot, then follows the watch from
    /// the next revision (so nothing between the read and the watch is lost).
    async fn watch_once(
        &self,
        tx: &mpsc::Sender<LeaseEvent>,
        backoff: &mut Backoff,
        log: &mut Throttle,
    ) -> WatchEnd {
        let prefix = self.subnets_prefix();
        let own = self.own().map(|o| o.key).unwrap_or_default();
        let own_name = own.strip_prefix(&prefix).unwrap_or("").to_string();
        let (items, rev) = match self.read_all().await {
            Ok(x) => x,
            Err(e) => return WatchEnd::Broke(format!("reading leases from etcd: {e}")),
        };
        if !own_name.is_empty() && !items.iter().any(|(n, _, _)| *n == own_name) {
            self.lost.notify_one();
        }
        let snap = items
            .iter()
            .filter(|(n, _, _)| *n != own_name)
            .map(|(n, v, _)| (n.clone(), parse_lease(n, v)))
            .collect();
        if tx.send(LeaseEvent::Snapshot(snap)).await.is_err() {
            return WatchEnd::Closed;
        }
        let mut c = self.client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_progress_notify()
            .with_start_revision(rev + 1);
        let mut stream = match c.watch(prefix.clone(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => return WatchEnd::Broke(format!("watching {prefix}: {e}")),
        };
        backoff.reset();
        log.ok();
        self.metrics.store.up();
        loop {
            let next = tokio::select! {
                r = tokio::time::timeout(WATCH_IDLE, stream.message()) => r,
                _ = self.restart.notified() => return WatchEnd::Reconnected,
            };
            let resp = match next {
                Err(_) => return WatchEnd::Broke(format!("etcd watch silent for {WATCH_IDLE:?}")),
                Ok(Err(e)) => return WatchEnd::Broke(format!("etcd watch broke: {e}")),
                Ok(Ok(None)) => return WatchEnd::Broke("etcd ended the watch".into()),
                Ok(Ok(Some(r))) => r,
            };
            if resp.compact_revision() > 0 {
                return WatchEnd::Compacted(resp.compact_revision());
            }
            if resp.canceled() {
                return WatchEnd::Broke(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                ));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                    continue;
                };
                if name == own_name {
                    // Gone, or rewritten by someone else: let the renewer read it.
                    let ours = self.own().is_some_and(|o| o.holds(kv.value()));
                    if ev.event_type() == EventType::Delete || !ours {
                        tracing::warn!("our lease {name} changed in etcd; checking it");
                        self.lost.notify_one();
                    }
                    continue;
                }
                let out = match ev.event_type() {
                    EventType::Put => {
                        LeaseEvent::Upsert(name.to_string(), parse_lease(name, kv.value()))
                    }
                    EventType::Delete => LeaseEvent::Remove(name.to_string()),
                };
                if tx.send(out).await.is_err() {
                    return WatchEnd::Closed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{Mac, VxlanData};

    #[test]
    fn renewal_time_follows_the_margin() {
        let h = Duration::from_secs(3600);
        assert_eq!(renew_interval(24 * h, h), 23 * h);
        // A margin not shorter than the TTL (a test TTL): half-life.
        assert_eq!(
            renew_interval(Duration::from_secs(8), h),
            Duration::from_secs(4)
        );
        assert_eq!(
            renew_interval(Duration::from_secs(2), h),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn our_key_is_ours_only_with_our_address() {
        let d = BackendData::Vxlan(VxlanData {
            vni: 1,
            vtep_mac: "2e:b8:0a:81:03:b7".parse::<Mac>().unwrap(),
        });
        let req = LeaseRequest {
            public_ip: Some("198.18.0.11".parse().unwrap()),
            public_ipv6: None,
            data: d,
            data_v6: None,
        };
        let mine = lease_value(&req, true);
        assert_eq!(holder("10.244.1.0-24", mine.as_bytes(), &req), Holder::Us);
        // Another MAC (our device re-created) is still us: same address.
        let other_mac = mine.replace("2e:b8", "2e:b9");
        assert_eq!(
            holder("10.244.1.0-24", other_mac.as_bytes(), &req),
            Holder::Us
        );
        let theirs = mine.replace("198.18.0.11", "198.18.0.99");
        assert_eq!(
            holder("10.244.1.0-24", theirs.as_bytes(), &req),
            Holder::Other("public IP 198.18.0.99".into())
        );
        assert!(matches!(
            holder("10.244.1.0-24", b"garbage", &req),
            Holder::Other(_)
        ));
    }

    #[test]
    fn only_configuration_errors_are_fatal() {
        use tonic::{Code, Status};
        let s = |c, m: &str| etcd_client::Error::GRpcStatus(Status::new(c, m));
        assert!(fatal(&s(
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password"
        )));
        assert!(fatal(&s(
            Code::PermissionDenied,
            "etcdserver: permission denied"
        )));
        assert!(!fatal(&s(Code::Unavailable, "etcdserver: no leader")));
        assert!(!fatal(&s(
            Code::Unauthenticated,
            "etcdserver: invalid auth token"
        )));
        assert!(!fatal(&etcd_client::Error::WatchError(
            "watch stream closed".into()
        )));
    }

    #[test]
    fn key_names_round_trip() {
        let v4: IpNetwork = "10.244.1.0/24".parse().unwrap();
        let v6: IpNetwork = "fd00:10:244:1::/64".parse().unwrap();
        assert_eq!(key_name(Some(v4), None), "10.244.1.0-24");
        assert_eq!(
            key_name(Some(v4), Some(v6)),
            "10.244.1.0-24&fd00:10:244:1::-64"
        );
        assert_eq!(parse_key_name("10.244.1.0-24"), Some((Some(v4), None)));
        assert_eq!(
            parse_key_name("10.244.1.0-24&fd00:10:244:1::-64"),
            Some((Some(v4), Some(v6)))
        );
        for bad in [
            "",
            "10.244.1.0",
            "10.244.1.0-99",
            "x-24",
            "10.244.1.0-24&10.244.2.0-24",
            "-",
        ] {
            assert_eq!(parse_key_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn values_have_upstreams_form() {
        let d = BackendData::Vxlan(VxlanData {
            vni: 1,
            vtep_mac: "2e:b8:0a:81:03:b7".parse::<Mac>().unwrap(),
        });
        let req = |data: BackendData, data_v6: Option<BackendData>| LeaseRequest {
            public_ip: Some("198.18.0.11".parse().unwrap()),
            public_ipv6: data_v6.map(|_| "fd00:198:18::11".parse().unwrap()),
            data,
            data_v6,
        };
        assert_eq!(
            lease_value(&req(d, None), true),
            r#"{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"2e:b8:0a:81:03:b7"}}"#
        );
        assert_eq!(
            lease_value(&req(BackendData::HostGw, None), true),
            r#"{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        let v = lease_value(&req(d, None), true);
        let l = parse_lease("10.244.1.0-24", v.as_bytes()).unwrap().unwrap();
        assert_eq!(l.public_ip, Some("198.18.0.11".parse().unwrap()));
        assert_eq!(l.backend, d);

        // Dual stack: both data fields; the key names both subnets.
        let d6 = BackendData::Vxlan(VxlanData {
            vni: 1,
            vtep_mac: "66:00:00:00:00:02".parse::<Mac>().unwrap(),
        });
        let v = lease_value(&req(d, Some(d6)), true);
        assert_eq!(
            v,
            r#"{"PublicIP":"198.18.0.11","PublicIPv6":"fd00:198:18::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"2e:b8:0a:81:03:b7"},"BackendV6Data":{"VNI":1,"VtepMAC":"66:00:00:00:00:02"}}"#
        );
        let l = parse_lease("10.244.1.0-24&fd00:10:244:1::-64", v.as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(
            (l.backend, l.backend_v6, l.ipv6_subnet),
            (d, Some(d6), Some("fd00:10:244:1::/64".parse().unwrap()))
        );

        // IPv6 only: upstream writes no BackendData and a zero PublicIP.
        let v = lease_value(&req(d6, Some(d6)), false);
        assert_eq!(
            v,
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::11","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"66:00:00:00:00:02"}}"#
        );
        let l = parse_lease("fd00:10:244:1::-64", v.as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!((l.subnet, l.backend, l.backend_v6), (None, d6, Some(d6)));
    }

    #[test]
    fn hostile_values_are_errors() {
        for (k, v) in [
            ("10.244.1.0-24", "{"),
            (
                "10.244.1.0-24",
                r#"{"PublicIP":"x","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"2e:b8:0a:81:03:b7"}}"#,
            ),
            (
                "10.244.1.0-24",
                r#"{"PublicIP":"198.18.0.1","BackendType":"vxlan","BackendData":"nope"}"#,
            ),
            ("10.244.1.0-24", r#"{"PublicIP":"198.18.0.1"}"#),
            (
                "garbage",
                r#"{"PublicIP":"198.18.0.1","BackendType":"host-gw"}"#,
            ),
        ] {
            assert!(parse_lease(k, v.as_bytes()).is_err(), "{k} {v}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(k in "[0-9a-f.:&-]{0,30}", v in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            // Accepted only for a key that names a subnet, and then the key
            // written for that lease is the key it was read from.
            if let Ok(Some(l)) = parse_lease(&k, &v) {
                proptest::prop_assert_eq!(key_name(l.subnet, l.ipv6_subnet), k.clone());
            }
        }
    }

    #[tokio::test]
    async fn a_cut_tls_handshake_is_transient() {
        // What a client sees while etcd restarts behind a TLS port: the
        // connection is accepted and closed mid-handshake.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            for _ in 0..50 {
                if let Ok((s, _)) = l.accept().await {
                    drop(s);
                }
            }
        });
        let opts = ConnectOptions::new()
            .with_tls(TlsOptions::new())
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2));
        let r = async {
            let mut c = Client::connect([format!("https://127.0.0.1:{port}")], Some(opts)).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(())
        };
        let e = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("bounded")
            .unwrap_err();
        server.abort();
        assert!(!fatal(&e), "a cut handshake was taken as fatal: {e:?}");
        assert!(fatal_transport("invalid peer certificate: UnknownIssuer"));
        assert!(fatal_transport("received fatal alert: BadCertificate"));
    }

    /// A real etcd on loopback (Debian's etcd-server), ended when dropped.
    struct Etcd {
        child: std::process::Child,
        url: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn etcd(extra: &[&str]) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (cp, pp) = (free(), free());
        let url = format!("http://127.0.0.1:{cp}");
        let peer = format!("http://127.0.0.1:{pp}");
        let child = std::process::Command::new("etcd")
            .args(["--data-dir", dir.path().to_str().unwrap()])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("etcd (Debian's etcd-server, installed by scripts/install-deps.sh)");
        let e = Etcd {
            child,
            url,
            _dir: dir,
        };
        for _ in 0..100 {
            if let Ok(mut c) = Client::connect([e.url.clone()], None).await {
                if c.status().await.is_ok() {
                    return e;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd did not start");
    }

    fn settings(url: &str) -> EtcdSettings {
        EtcdSettings {
            endpoints: vec![url.to_string()],
            prefix: "/coreos.com/network".into(),
            keyfile: String::new(),
            certfile: String::new(),
            cafile: String::new(),
            username: String::new(),
            password: String::new(),
            subnet_file: std::path::PathBuf::from("/nonexistent/subnet.env"),
            renew_margin: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(3600),
        }
    }

    fn request(ip: &str) -> LeaseRequest {
        LeaseRequest {
            public_ip: Some(ip.parse().unwrap()),
            public_ipv6: None,
            data: BackendData::Vxlan(VxlanData {
                vni: 1,
                vtep_mac: "52:82:d5:a1:90:4d".parse().unwrap(),
            }),
            data_v6: None,
        }
    }

    #[tokio::test]
    #[ignore = "needs etcd (scripts/install-deps.sh installs it); scripts/test.sh runs it as root"]
    async fn a_failed_create_leaves_no_etcd_lease_behind() {
        let e = etcd(&["--max-request-bytes", "2048"]).await;
        let m = EtcdManager::new(settings(&e.url), Arc::new(Metrics::default()))
            .await
            .unwrap();
        // The transaction fails (too large for this etcd) after the grant.
        let r = m.create("10.244.1.0-24", &"x".repeat(4096)).await;
        assert!(r.is_err(), "{r:?}");
        let mut c = Client::connect([e.url.clone()], None).await.unwrap();
        let leases = c.leases().await.unwrap();
        assert!(leases.leases().is_empty(), "leaked: {:?}", leases.leases());
    }

    #[tokio::test]
    #[ignore = "needs etcd (scripts/install-deps.sh installs it); scripts/test.sh runs it as root"]
    async fn publishing_after_our_etcd_lease_expired_takes_a_new_one() {
        let e = etcd(&[]).await;
        let m = Arc::new(
            EtcdManager::new(settings(&e.url), Arc::new(Metrics::default()))
                .await
                .unwrap(),
        );
        let mut c = Client::connect([e.url.clone()], None).await.unwrap();
        c.put(
            "/coreos.com/network/config",
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
            None,
        )
        .await
        .unwrap();
        let conf = m.network_config().await.unwrap();
        let own = m.acquire(&conf, &request("198.18.0.11")).await.unwrap();
        let held = m.own().unwrap();
        // Gone behind the agent's back (expired while etcd was unreachable).
        c.lease_revoke(held.lease_id).await.unwrap();
        let (tx, rx) = watch::channel(request("198.18.0.11"));
        let keeper = {
            let (m, conf, own) = (m.clone(), conf.clone(), own.clone());
            tokio::spawn(async move { m.keep_alive(&conf, &own, rx).await })
        };
        tx.send_replace(request("198.18.0.31"));
        let mut published = None;
        for _ in 0..100 {
            let r = c.get(held.key.clone(), None).await.unwrap();
            if let Some(kv) = r.kvs().first() {
                if kv.value_str().unwrap().contains("198.18.0.31") && kv.lease() != 0 {
                    published = Some(kv.lease());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        keeper.abort();
        let lease = published.expect("the new address was never published");
        assert_ne!(lease, held.lease_id);
        let ttl = c.lease_time_to_live(lease, None).await.unwrap();
        assert!(ttl.ttl() > 0, "published on a dead lease");
    }
}
