//! The etcd subnet manager (`--etcd-endpoints`): leases under
//! `<prefix>/subnets/` in upstream's keys and JSON. Rooms: this file holds the
//! settings, the client's lifecycle and the [`SubnetManager`] face; `codec`
//! the wire format, `lease` acquisition, renewal and publishing of our own
//! key (the one writer of it), `watch` the read-then-watch of peers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use tokio::sync::{mpsc, watch, Notify};

use super::{LeaseEvent, LeaseRequest, SubnetManager};
use crate::config::netconf::NetConf;
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::retry::{self, Backoff, Cause, Classify, Throttle};

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

pub(crate) mod codec;
mod lease;
mod peers;

pub use codec::{key_name, lease_value, parse_key_name, parse_lease};
use lease::{Keep, Own};
use peers::WatchEnd;

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

/// A live etcd that sheds load (`ResourceExhausted`: "too many requests"; an
/// `Unavailable` the server itself sends: "etcdserver: ...", e.g. no leader)
/// waits as an overloaded API server does; no connection is retried fast.
impl Classify for etcd_client::Error {
    fn cause(&self) -> Cause {
        if let etcd_client::Error::GRpcStatus(s) = self {
            use tonic::Code;
            let live = match s.code() {
                Code::ResourceExhausted => true,
                Code::Unavailable => s.message().starts_with("etcdserver:"),
                _ => false,
            };
            if live {
                return Cause::Overloaded { retry_after: None };
            }
        }
        Cause::Unreachable
    }
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
                    let d = backoff.delay_for(e.cause());
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
                    let d = backoff.delay_for(e.cause());
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
                WatchEnd::Broke(why, cause) => {
                    self.metrics.store_reconnects.inc();
                    self.metrics.store.down(why.clone());
                    let d = backoff.delay_for(cause);
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

pub(super) fn taken(why: String) -> anyhow::Error {
    anyhow::anyhow!("{why}; exiting so that a restart acquires a new subnet")
}

#[cfg(test)]
mod tests;
