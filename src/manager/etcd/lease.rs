//! Our own lease: acquisition (create-if-absent transactions), renewal,
//! reclaiming a key that vanished, and publishing a new value — the one
//! writer of our key after start-up.

use std::time::Duration;

use anyhow::bail;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use ipnetwork::IpNetwork;
use rand::seq::IndexedRandom;
use tokio::sync::watch;

use super::codec::{key_name, lease_value, parse_key_name, parse_lease};
use super::{taken, EtcdManager, FREE_CANDIDATES};
use crate::config::netconf::NetConf;
use crate::lease::Lease;
use crate::manager::LeaseRequest;
use crate::retry::{Backoff, Classify, Throttle};
use crate::subnet;
use crate::subnet_env::SubnetEnv;

#[derive(Debug, Clone)]
pub(super) struct Own {
    pub(super) key: String,
    pub(super) lease_id: i64,
    /// The value we wrote: a Put of our key with any other value is someone else's.
    pub(super) value: String,
    /// A value being published (the node's address changed): its echo is ours too.
    pub(super) pending: Option<String>,
}

impl Own {
    pub(super) fn new(key: String, lease_id: i64, value: String) -> Own {
        Own {
            key,
            lease_id,
            value,
            pending: None,
        }
    }

    pub(super) fn holds(&self, value: &[u8]) -> bool {
        self.value.as_bytes() == value || self.pending.as_deref().map(str::as_bytes) == Some(value)
    }
}

/// The key, among `others` (name, create revision), that claims a subnet
/// overlapping `name`'s and was created before revision `ours`: the one
/// `name` must yield to.
pub(super) fn yields_to(name: &str, ours: i64, others: &[(String, i64)]) -> Option<String> {
    let (v4, v6) = parse_key_name(name)?;
    let mine: Vec<IpNetwork> = v4.into_iter().chain(v6).collect();
    others
        .iter()
        .filter(|(n, rev)| n != name && *rev < ours)
        .find(|(n, _)| {
            parse_key_name(n).is_some_and(|(a, b)| {
                a.into_iter()
                    .chain(b)
                    .any(|t| mine.iter().any(|m| subnet::overlaps(&t, m)))
            })
        })
        .map(|(n, _)| n.clone())
}

impl EtcdManager {
    /// Creates `key` only if absent, bound to a fresh lease. Ok(None) = someone holds it.
    pub(super) async fn create(&self, name: &str, value: &str) -> anyhow::Result<Option<i64>> {
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
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        match c.txn(txn).await {
            Ok(r) if r.succeeded() => {
                // Two nodes may pick the same subnet at once under different
                // dual-stack keys (same IPv4, other IPv6): the key compare
                // cannot see that, so the later creation yields.
                let ours = r.header().map(|h| h.revision()).unwrap_or(0);
                let all = c
                    .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
                    .await?;
                let p = self.subnets_prefix();
                let others: Vec<(String, i64)> = all
                    .kvs()
                    .iter()
                    .filter_map(|kv| {
                        let k = kv.key_str().ok()?.strip_prefix(&p)?.to_string();
                        Some((k, kv.create_revision()))
                    })
                    .collect();
                if let Some(first) = yields_to(name, ours, &others) {
                    tracing::info!("{first} took an overlapping subnet first; giving {name} up");
                    let _ = c.delete(key, None).await;
                    let _ = c.lease_revoke(lease).await;
                    return Ok(None);
                }
                Ok(Some(lease))
            }
            r => {
                // Not ours after all (or unknown): the granted lease must not linger.
                let _ = c.lease_revoke(lease).await;
                Ok(r.map(|_| None)?)
            }
        }
    }

    pub(super) async fn try_acquire(
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
            backend: req.data.clone(),
            backend_v6: req.data_v6.clone(),
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
    pub(super) fn note_expiry(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics
            .lease_expiry
            .get_or_create(&crate::metrics::StoreLabel { store: "etcd" })
            .set((now + self.s.lease_ttl).as_secs_f64());
    }

    pub(super) fn own(&self) -> Option<Own> {
        self.own.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Extends our etcd lease; false when etcd no longer knows it (expired or revoked).
    pub(super) async fn renew(&self, lease_id: i64) -> anyhow::Result<bool> {
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

    /// Our key's name under the prefix, and the value `req` gives it.
    fn name_and_value(&self, own: &Own, req: &LeaseRequest) -> (String, String) {
        let name = own
            .key
            .strip_prefix(&self.subnets_prefix())
            .unwrap_or(&own.key)
            .to_string();
        let v4 = parse_key_name(&name).is_some_and(|(v4, _)| v4.is_some());
        let value = lease_value(req, v4);
        (name, value)
    }

    /// Reads our key and settles who holds it: still ours (kept as is, or moved
    /// onto a new etcd lease when our value sits there without our lease), gone
    /// (re-created, create-if-absent), or another node's. Errors are transient.
    pub(super) async fn reclaim(&self, own: &Own, req: &LeaseRequest) -> anyhow::Result<Keep> {
        let (name, value) = self.name_and_value(own, req);
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
    pub(super) async fn keep(&self, own: &Own, req: &LeaseRequest, check: bool) -> Keep {
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
                    let d = backoff.delay_for(e.cause());
                    log.fail(&format_args!("{e:#}; retrying in {d:.1?}"));
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

/// The outcome of a renewal round.
pub(super) enum Keep {
    Kept(Own),
    /// Another node holds our subnet: the agent exits (see `keep_alive`).
    Taken(String),
}

/// Who a subnet key's value belongs to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Holder {
    Us,
    /// Another node (its public address, or why the value is not ours).
    Other(String),
}

/// Ours when it is a valid lease carrying our public address (IPv4; IPv6 when
/// the lease has no IPv4 side) — the same test acquisition uses to reuse a lease.
pub(super) fn holder(name: &str, value: &[u8], req: &LeaseRequest) -> Holder {
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

impl EtcdManager {
    /// What our key carries now (the last value published).
    pub(super) fn published(&self, latest: &watch::Receiver<LeaseRequest>) -> LeaseRequest {
        self.req
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| latest.borrow().clone())
    }

    /// Records a renewal round's outcome.
    pub(super) fn kept(&self, before: &Own, o: Own) {
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
    pub(super) async fn publish_latest(
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
                    let d = backoff.delay_for(e.cause());
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
    pub(super) async fn write_value(
        &self,
        own: &Own,
        req: &LeaseRequest,
    ) -> anyhow::Result<Option<Own>> {
        let (_, value) = self.name_and_value(own, req);
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
