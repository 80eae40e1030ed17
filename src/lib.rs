//! flannel-rs: a Flannel-compatible node agent.

pub mod config;
pub mod dataplane;
pub mod lease;
pub mod subnet;
pub mod subnet_env;
