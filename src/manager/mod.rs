//! Subnet managers: where this node's lease comes from and where peers are learnt.
//!
//! Both the Kubernetes manager and the etcd manager implement [`SubnetManager`];
//! the daemon never branches on which one it runs.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};

use tokio::sync::mpsc;

use crate::config::netconf::NetConf;
use crate::lease::{BackendData, Lease};

pub mod etcd;
pub mod kube;

/// An error from either store, however deep in a context chain, waits by what
/// the store said (see [`crate::retry`]); anything else is retried fast.
impl crate::retry::Classify for anyhow::Error {
    fn cause(&self) -> crate::retry::Cause {
        for e in self.chain() {
            if let Some(e) = e.downcast_ref::<::kube::Error>() {
                return e.cause();
            }
            if let Some(e) = e.downcast_ref::<etcd_client::Error>() {
                return e.cause();
            }
        }
        crate::retry::Cause::Unreachable
    }
}

/// What this node asks for: how peers reach it, and its backend's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
    pub data: BackendData,
    pub data_v6: Option<BackendData>,
}

/// A peer's lease as read: `Ok(None)` means "not (or no longer) a flannel peer",
/// `Err` is a reason to refuse it.
pub type PeerRead = Result<Option<Lease>, String>;

#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// The complete set of peers (initial list, or a re-list after the watch broke).
    Snapshot(Vec<(String, PeerRead)>),
    Upsert(String, PeerRead),
    Remove(String),
}

pub trait SubnetManager: Send + Sync + 'static {
    /// The network configuration (file in kube mode, `<prefix>/config` in etcd mode).
    fn network_config(&self) -> impl Future<Output = anyhow::Result<NetConf>> + Send;

    /// The public addresses the store assigns this node, read once at start
    /// (kube: the `node-public-ip` / `node-public-ipv6` annotations, upstream
    /// v0.25.2+); they replace `--public-ip` / `--public-ipv6`.
    fn assigned_public_ips(
        &self,
    ) -> impl Future<Output = (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>)> + Send {
        async { (None, None) }
    }

    /// Obtains this node's lease and publishes `req` with it. Waits (logging why)
    /// while no lease can be had yet.
    fn acquire(
        &self,
        conf: &NetConf,
        req: &LeaseRequest,
    ) -> impl Future<Output = anyhow::Result<Lease>> + Send;

    /// Streams peer leases into `tx` until `tx` closes. Reconnects by itself with
    /// the store backoff, re-reads everything after a reconnect (a Snapshot),
    /// and marks `metrics.store` down while the watch is broken.
    fn watch(
        &self,
        conf: &NetConf,
        tx: mpsc::Sender<LeaseEvent>,
    ) -> impl Future<Output = ()> + Send;

    /// Tells the world this node's dataplane is up (kube: NetworkUnavailable=False).
    fn complete(&self) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Keeps the own lease alive and published: the one writer of it after
    /// acquisition. Renews it (etcd; retried through outages) and publishes the
    /// latest value `req` holds whenever it changes (the node's address
    /// changed: kube `public-ip` annotations, etcd the value's `PublicIP`) —
    /// a newer value replaces one still being retried. Returns only when the
    /// lease cannot be kept (another node holds our subnet, our Node is gone);
    /// the agent then exits with that message.
    fn keep_alive(
        &self,
        conf: &NetConf,
        own: &Lease,
        req: tokio::sync::watch::Receiver<LeaseRequest>,
    ) -> impl Future<Output = anyhow::Error> + Send;
}
