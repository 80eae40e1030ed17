//! flannel-rs: a Flannel-compatible node agent.
//!
//! Layout: [`config`] (flags, net-conf), [`subnet`] (arithmetic), [`lease`]
//! (compact peer leases and their validation), [`manager`] (where leases come
//! from), [`backend`] (what the kernel must hold per peer), [`dataplane`] (the
//! desired-state model, diff, and the netlink layer), [`daemon`] (the wiring),
//! [`health`] and [`metrics`], [`retry`] (the one backoff every store retry uses).

pub mod backend;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod dockeropts;
pub mod firewall;
pub mod health;
pub mod iface;
pub mod lease;
pub mod manager;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod retry;
pub mod subnet;
pub mod subnet_env;
pub mod supervisor;
