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
use tokio::sync::{mpsc, Notify};

use super::{LeaseEvent, LeaseRequest, PeerRead, SubnetManager};
use crate::config::netconf::NetConf;
use crate::lease::{BackendData, Lease};
use crate::metrics::Metrics;
use crate::subnet;
use crate::subnet_env::SubnetEnv;

/// Upstream's lease TTL.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How many free subnets to choose from at random (upstream's number).
const FREE_CANDIDATES: usize = 100;

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
}

#[derive(Debug, Clone)]
struct Own {
    key: String,
    lease_id: i64,
}

pub struct EtcdManager {
    s: EtcdSettings,
    client: Client,
    own: Mutex<Option<Own>>,
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
    (v4.is_some() || v6.is_some()).then_some((v4, v6))
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

/// Retries `f` with backoff (0.5 s → 10 s), logging each failure with `what`.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(500);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!("{what}: {e:#}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

impl EtcdManager {
    pub async fn new(s: EtcdSettings, metrics: Arc<Metrics>) -> anyhow::Result<EtcdManager> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        if !s.username.is_empty() {
            opts = opts.with_user(s.username.clone(), s.password.clone());
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
        let client = retry(
            &format!("connecting to etcd at {}", endpoints.join(",")),
            || {
                let (e, o) = (endpoints.clone(), opts.clone());
                async move {
                    let mut c = Client::connect(e, Some(o)).await?;
                    c.status().await?;
                    Ok(c)
                }
            },
        )
        .await;
        tracing::info!("connected to etcd at {}", s.endpoints.join(","));
        Ok(EtcdManager {
            s,
            client,
            own: Mutex::new(None),
            lost: Notify::new(),
            metrics,
        })
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.s.prefix.trim_end_matches('/'))
    }

    /// All subnet keys with their lease ids, oldest first, and the revision of the read.
    async fn read_all(&self) -> anyhow::Result<(Vec<(String, Vec<u8>, i64)>, i64)> {
        let mut c = self.client.clone();
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
        let mut c = self.client.clone();
        let lease = c.lease_grant(LEASE_TTL.as_secs() as i64, None).await?.id();
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
        if c.txn(txn).await?.succeeded() {
            Ok(Some(lease))
        } else {
            let _ = c.lease_revoke(lease).await;
            Ok(None)
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
        let mut c = self.client.clone();
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
                return Ok(Some((lease_of(v4, v6), Own { key, lease_id: 0 })));
            }
            let new_lease = c.lease_grant(LEASE_TTL.as_secs() as i64, None).await?.id();
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
                    Own {
                        key,
                        lease_id: new_lease,
                    },
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
                        Own {
                            key: format!("{}{name}", self.subnets_prefix()),
                            lease_id: id,
                        },
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

    /// Puts our key back after it vanished (expired, deleted by hand).
    async fn restore(&self, own: &Own, req: &LeaseRequest) -> anyhow::Result<Own> {
        let name = own
            .key
            .strip_prefix(&self.subnets_prefix())
            .unwrap_or(&own.key)
            .to_string();
        let v4 = parse_key_name(&name).is_some_and(|(v4, _)| v4.is_some());
        let value = lease_value(req, v4);
        match self.create(&name, &value).await? {
            Some(id) => Ok(Own {
                key: own.key.clone(),
                lease_id: id,
            }),
            None => {
                bail!("our subnet {name} was taken by another node; restart to acquire a new one")
            }
        }
    }
}

impl SubnetManager for EtcdManager {
    async fn network_config(&self) -> anyhow::Result<NetConf> {
        let key = format!("{}/config", self.s.prefix.trim_end_matches('/'));
        let mut told = false;
        loop {
            let mut c = self.client.clone();
            match c.get(key.clone(), None).await {
                Ok(r) => match r.kvs().first() {
                    Some(kv) => {
                        let text = String::from_utf8_lossy(kv.value());
                        return NetConf::parse(&text)
                            .with_context(|| format!("network configuration in {key}"));
                    }
                    None => {
                        if !told {
                            tracing::warn!("waiting for the network configuration at {key}");
                            told = true;
                        }
                    }
                },
                Err(e) => tracing::warn!("reading {key}: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn acquire(&self, conf: &NetConf, req: &LeaseRequest) -> anyhow::Result<Lease> {
        for _attempt in 0..50 {
            match self.try_acquire(conf, req).await {
                Ok(Some((lease, own))) => {
                    tracing::info!("leased {} (etcd lease {:x})", own.key, own.lease_id);
                    *self.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(own);
                    return Ok(lease);
                }
                Ok(None) => tracing::info!("another node took the subnet first; trying again"),
                Err(e) => {
                    tracing::warn!("acquiring a lease: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        bail!("could not acquire a subnet lease after 50 attempts")
    }

    async fn watch(&self, _conf: &NetConf, tx: mpsc::Sender<LeaseEvent>) {
        let prefix = self.subnets_prefix();
        let mut delay = Duration::from_millis(500);
        loop {
            let own_name = self
                .own
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|o| o.key.clone());
            let own_name = own_name
                .as_deref()
                .and_then(|k| k.strip_prefix(&prefix))
                .unwrap_or("")
                .to_string();
            let (items, rev) = match self.read_all().await {
                Ok(x) => x,
                Err(e) => {
                    self.metrics.watch_restarts.inc();
                    tracing::warn!("reading leases from etcd: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                    continue;
                }
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
                return;
            }
            let mut c = self.client.clone();
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(rev + 1);
            let mut stream = match c.watch(prefix.clone(), Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    self.metrics.watch_restarts.inc();
                    tracing::warn!("watching {prefix}: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            delay = Duration::from_millis(500);
            loop {
                let resp = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("etcd watch broke: {e}; re-reading");
                        break;
                    }
                };
                if resp.canceled() || resp.compact_revision() > 0 {
                    tracing::warn!(
                        "etcd watch cancelled (compacted at {}); re-reading",
                        resp.compact_revision()
                    );
                    break;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                        continue;
                    };
                    if name == own_name {
                        if ev.event_type() == EventType::Delete {
                            tracing::warn!("our lease {name} was removed from etcd; restoring it");
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
                        return;
                    }
                }
            }
            self.metrics.watch_restarts.inc();
            tokio::time::sleep(delay).await;
        }
    }

    async fn complete(&self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn keep_alive(&self, _own: &Lease, req: &LeaseRequest) {
        let renew_every = LEASE_TTL
            .saturating_sub(self.s.renew_margin)
            .max(Duration::from_secs(60));
        loop {
            let lost = tokio::select! {
                _ = tokio::time::sleep(renew_every) => false,
                _ = self.lost.notified() => true,
            };
            let Some(own) = self.own.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
                return;
            };
            if own.lease_id == 0 && !lost {
                continue; // a reservation never expires
            }
            let renewed = async {
                if !lost {
                    let mut c = self.client.clone();
                    let (mut keeper, mut stream) = c.lease_keep_alive(own.lease_id).await?;
                    keeper.keep_alive().await?;
                    if let Some(r) = stream.message().await? {
                        if r.ttl() > 0 {
                            return Ok::<Own, anyhow::Error>(own.clone());
                        }
                    }
                }
                self.restore(&own, req).await
            };
            match renewed.await {
                Ok(o) => {
                    self.metrics.lease_renewals.inc();
                    tracing::info!("renewed lease {} (etcd lease {:x})", o.key, o.lease_id);
                    *self.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
                }
                Err(e) => {
                    tracing::error!("renewing our lease: {e:#}; retrying in 10s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    self.lost.notify_one();
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
            let _ = parse_lease(&k, &v);
        }
    }
}
