//! The log lines of denied attempts (`--policy-log-denied`): which pod tried
//! to reach which, on what, and whose default deny refused it — bounded to
//! [`PER_SECOND`] lines a second over the kernel's own per-pod limit, the
//! rest counted and said in the next line.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::compile::Owner;
use super::model::Cluster;
use super::nflog::Denial;

/// At most this many lines a second.
pub const PER_SECOND: u32 = 20;

#[derive(Default)]
pub struct Said {
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

/// "ns/name (ip)" of the pod holding `ip`, or the address alone.
fn who(cluster: &Cluster, ip: IpAddr) -> String {
    match cluster
        .pods
        .values()
        .find(|p| !p.host_network && p.ips.contains(&ip))
    {
        Some(p) => format!("{}/{} ({ip})", p.ns, p.name),
        None => ip.to_string(),
    }
}

/// The line for one denial (pure).
pub fn line(d: &Denial, owner: Option<&Owner>, cluster: &Cluster) -> String {
    let what = match d.port {
        Some(p) => format!("{}/{p}", d.proto),
        None => d.proto.clone(),
    };
    let why = match owner {
        Some(o) => format!(
            "{} of {}/{}, isolated by {}",
            o.direction,
            o.ns,
            o.pod,
            if o.policies.is_empty() {
                "no policy".to_string()
            } else {
                o.policies.join(", ")
            }
        ),
        None => format!("chain {}", d.chain),
    };
    format!(
        "network policy denied: {} → {} {what}: {why}, no rule allows it",
        who(cluster, d.src),
        who(cluster, d.dst)
    )
}

impl Said {
    /// Logs `d` unless this second's lines are used up.
    pub fn denied(&mut self, d: &Denial, owner: Option<&Owner>, cluster: &Cluster) {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= PER_SECOND {
            self.suppressed += 1;
            return;
        }
        self.in_window += 1;
        let l = line(d, owner, cluster);
        match std::mem::take(&mut self.suppressed) {
            0 => tracing::info!("{l}"),
            n => tracing::info!("{l} ({n} more denials not logged)"),
        }
    }
}
