//! extension: upstream's prototyping backend. The dataplane is the operator's
//! commands, run with the lease data:
//! - `PreStartupCommand` before the lease: its output is this node's
//!   backend-data (a JSON string), which peers get on stdin;
//! - `PostStartupCommand` once the lease is known (`NETWORK`, `SUBNET`,
//!   `IPV6SUBNET`, `PUBLIC_IP`, `PUBLIC_IPV6` of this node);
//! - `SubnetAddCommand` / `SubnetRemoveCommand` per peer (`SUBNET`,
//!   `IPV6SUBNET`, `PUBLIC_IP`, `PUBLIC_IPV6` of the peer; its backend-data on
//!   stdin). A changed peer is removed with its old lease, then added.
//!
//! Unlike upstream (one try, then forgotten) a failed or timed-out command is
//! retried on the reconciler's schedule until it succeeds: what is "applied"
//! is what a command succeeded for, and a full pass compares every peer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use ipnetwork::IpNetwork;

use crate::config::netconf::{ExtensionConf, NetConf};
use crate::dataplane::model::PeerEntries;
use crate::dataplane::netlink::Netlink;
use crate::iface::ExternalInterface;
use crate::lease::{BackendData, Lease, PeerSet, MAX_BACKEND_DATA};

use super::{Backend, Prepared};

pub mod command;

/// Peers' commands run at once (a full pass over thousands of peers).
const PARALLEL: usize = 8;

/// What a peer's commands see of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub subnet: Option<IpNetwork>,
    pub ipv6_subnet: Option<IpNetwork>,
    pub public_ip: Option<std::net::Ipv4Addr>,
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    pub data: Option<Arc<str>>,
}

impl Peer {
    pub fn of(l: &Lease) -> Peer {
        let data = match &l.backend {
            BackendData::Extension(d) => d.clone(),
            _ => None,
        };
        Peer {
            subnet: l.subnet,
            ipv6_subnet: l.ipv6_subnet,
            public_ip: l.public_ip,
            public_ipv6: l.public_ipv6,
            data,
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let s = |v: Option<String>| v.unwrap_or_default();
        vec![
            ("SUBNET", s(self.subnet.map(|n| n.to_string()))),
            ("IPV6SUBNET", s(self.ipv6_subnet.map(|n| n.to_string()))),
            ("PUBLIC_IP", s(self.public_ip.map(|a| a.to_string()))),
            ("PUBLIC_IPV6", s(self.public_ipv6.map(|a| a.to_string()))),
        ]
    }
}

/// The commands one peer needs: remove what was added for `remove`, then add `add`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Steps {
    pub remove: Option<Peer>,
    pub add: Option<Peer>,
}

/// Pure: from what a command last succeeded for to what is wanted.
pub fn plan(want: Option<&Peer>, have: Option<&Peer>) -> Steps {
    if want == have {
        return Steps::default();
    }
    Steps {
        remove: have.cloned(),
        add: want.cloned(),
    }
}

pub struct Extension {
    conf: ExtensionConf,
    network: Option<IpNetwork>,
    v6: bool,
    post_done: bool,
    applied: BTreeMap<String, Peer>,
    failing: BTreeSet<String>,
}

impl Extension {
    pub fn new(conf: ExtensionConf, net: &NetConf) -> Extension {
        Extension {
            conf,
            network: net.v4.as_ref().map(|p| p.network),
            v6: net.v6.is_some(),
            post_done: false,
            applied: BTreeMap::new(),
            failing: BTreeSet::new(),
        }
    }

    /// Which peers a pass looks at.
    fn names(
        &self,
        peers: &PeerSet,
        touched: Option<&[(String, Option<Lease>)]>,
    ) -> BTreeSet<String> {
        match touched {
            None => peers
                .accepted()
                .keys()
                .chain(self.applied.keys())
                .cloned()
                .collect(),
            Some(t) => t
                .iter()
                .map(|(n, _)| n.clone())
                .chain(self.failing.iter().cloned())
                .collect(),
        }
    }
}

/// One peer's steps, run in order; what the peer holds afterwards.
enum Outcome {
    /// Both steps ran: the peer now holds `Some(add)` or nothing.
    Done(Option<Peer>),
    /// The removal failed: it still holds the old lease's work.
    Kept(String),
    /// The removal (if any) ran, the add failed: it holds nothing.
    Lost(String),
}

async fn run_steps(conf: &ExtensionConf, name: &str, s: Steps) -> Outcome {
    let exec = |cmd: &Option<String>, p: &Peer, what: &'static str| {
        let cmd = cmd.clone();
        let env = p.env();
        let data = p.data.as_deref().unwrap_or("").to_string();
        let timeout = conf.timeout;
        async move {
            let Some(cmd) = cmd else { return Ok(()) };
            match command::run(&cmd, &env, &data, timeout).await {
                Ok(out) => {
                    tracing::info!(
                        "{what} for peer {name}: ran; output: {}",
                        command::shorten(&out)
                    );
                    Ok(())
                }
                Err(e) => Err(format!("{what} for peer {name} failed: {e}")),
            }
        }
    };
    if let Some(old) = &s.remove {
        if let Err(e) = exec(&conf.subnet_remove, old, "SubnetRemoveCommand").await {
            return Outcome::Kept(e);
        }
    }
    match &s.add {
        None => Outcome::Done(None),
        Some(new) => match exec(&conf.subnet_add, new, "SubnetAddCommand").await {
            Ok(()) => Outcome::Done(Some(new.clone())),
            Err(e) => Outcome::Lost(e),
        },
    }
}

impl Backend for Extension {
    fn type_name(&self) -> &'static str {
        "extension"
    }

    fn routes_peers(&self) -> bool {
        false
    }

    async fn prepare(
        &mut self,
        _nl: &Netlink,
        ext: &ExternalInterface,
    ) -> anyhow::Result<Prepared> {
        let data = match &self.conf.pre_startup {
            None => {
                tracing::info!("no PreStartupCommand configured");
                None
            }
            Some(cmd) => {
                let out = command::run(cmd, &[], "", self.conf.timeout)
                    .await
                    .map_err(|e| anyhow::anyhow!("PreStartupCommand failed: {e}"))?;
                tracing::info!("PreStartupCommand ran; output: {}", command::shorten(&out));
                let json = serde_json::to_string(&out).unwrap_or_default();
                if json.len() > MAX_BACKEND_DATA {
                    anyhow::bail!(
                        "PreStartupCommand's output is {} bytes as backend-data, over the {MAX_BACKEND_DATA}-byte limit peers accept",
                        json.len()
                    );
                }
                Some(Arc::from(out))
            }
        };
        let d = BackendData::Extension(data);
        Ok(Prepared {
            mtu: ext.mtu,
            data_v6: self.v6.then(|| d.clone()),
            data: d,
        })
    }

    /// Runs PostStartupCommand once, after the lease (a failure stops the
    /// agent at start, as upstream).
    async fn configure(
        &mut self,
        _nl: &Netlink,
        _ext: &ExternalInterface,
        own: &Lease,
    ) -> anyhow::Result<bool> {
        if self.post_done {
            return Ok(false);
        }
        if let Some(cmd) = &self.conf.post_startup {
            let mut env = Peer::of(own).env();
            env.push((
                "NETWORK",
                self.network.map(|n| n.to_string()).unwrap_or_default(),
            ));
            let out = command::run(cmd, &env, "", self.conf.timeout)
                .await
                .map_err(|e| anyhow::anyhow!("PostStartupCommand failed: {e}"))?;
            tracing::info!("PostStartupCommand ran; output: {}", command::shorten(&out));
        }
        self.post_done = true;
        Ok(false)
    }

    fn entries(
        &self,
        _ext: &ExternalInterface,
        _lease: &Lease,
        _v6: bool,
    ) -> Result<Option<PeerEntries>, String> {
        Ok(None)
    }

    async fn sync_peers(
        &mut self,
        peers: &PeerSet,
        touched: Option<&[(String, Option<Lease>)]>,
    ) -> Vec<String> {
        let work: Vec<(String, Steps)> = self
            .names(peers, touched)
            .into_iter()
            .filter_map(|name| {
                let want = peers.accepted().get(&name).map(Peer::of);
                let s = plan(want.as_ref(), self.applied.get(&name));
                (s != Steps::default()).then_some((name, s))
            })
            .collect();
        let conf = &self.conf;
        let outcomes: Vec<(String, Outcome)> = futures::stream::iter(work)
            .map(|(name, s)| async move {
                let o = run_steps(conf, &name, s).await;
                (name, o)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut failed = Vec::new();
        for (name, o) in outcomes {
            match o {
                Outcome::Done(held) => {
                    self.failing.remove(&name);
                    match held {
                        Some(p) => self.applied.insert(name, p),
                        None => self.applied.remove(&name),
                    };
                }
                Outcome::Kept(e) => {
                    self.failing.insert(name);
                    failed.push(e);
                }
                Outcome::Lost(e) => {
                    self.applied.remove(&name);
                    self.failing.insert(name);
                    failed.push(e);
                }
            }
        }
        // Only peers still accepted or still holding work are worth retrying.
        self.failing
            .retain(|n| peers.accepted().contains_key(n) || self.applied.contains_key(n));
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(subnet: &str, ip: &str, data: Option<&str>) -> Peer {
        Peer {
            subnet: Some(subnet.parse().unwrap()),
            ipv6_subnet: None,
            public_ip: Some(ip.parse().unwrap()),
            public_ipv6: None,
            data: data.map(Arc::from),
        }
    }

    #[test]
    fn plan_runs_only_what_changed() {
        let a = peer("10.244.2.0/24", "198.18.0.12", Some("mac-a"));
        let moved = peer("10.244.2.0/24", "198.18.0.99", Some("mac-a"));
        assert_eq!(plan(Some(&a), Some(&a)), Steps::default());
        assert_eq!(plan(None, None), Steps::default());
        assert_eq!(
            plan(Some(&a), None),
            Steps {
                remove: None,
                add: Some(a.clone())
            }
        );
        assert_eq!(
            plan(None, Some(&a)),
            Steps {
                remove: Some(a.clone()),
                add: None
            }
        );
        // A new address: the old work is undone with the old values, then redone.
        assert_eq!(
            plan(Some(&moved), Some(&a)),
            Steps {
                remove: Some(a.clone()),
                add: Some(moved.clone())
            }
        );
    }

    #[test]
    fn env_names_every_field_and_leaves_absent_ones_empty() {
        let p = peer("10.244.2.0/24", "198.18.0.12", None);
        let env: BTreeMap<_, _> = p.env().into_iter().collect();
        assert_eq!(env["SUBNET"], "10.244.2.0/24");
        assert_eq!(env["PUBLIC_IP"], "198.18.0.12");
        assert_eq!(env["IPV6SUBNET"], "");
        assert_eq!(env["PUBLIC_IPV6"], "");
    }
}
