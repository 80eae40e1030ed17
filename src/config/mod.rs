//! Configuration: command-line flags and net-conf.json.

pub mod flags;
pub mod netconf;
