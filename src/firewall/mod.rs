//! Masquerade (`--ip-masq`) and forward (`--iptables-forward-rules`) rules.
//!
//! [`rules`] says, as plain data, which rules upstream flanneld v0.20.2 installs
//! for a network and lease; a [`Firewall`] driver (iptables or nftables) makes
//! the kernel hold them and re-checks every `--iptables-resync` seconds.

use std::future::Future;
use std::time::Duration;

use ipnetwork::IpNetwork;

pub mod detect;
pub mod iptables;
pub mod nftables;
pub(crate) mod run;

pub const MASQ_COMMENT: &str = "flanneld masq";
pub const FWD_COMMENT: &str = "flanneld forward";
/// kube-proxy's masquerade mark: such traffic is left to kube-proxy.
pub const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// What to match and do, independent of the tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Return,
    Masquerade,
    Accept,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub mark: bool,
    pub src: Option<(bool, IpNetwork)>,
    pub dst: Option<(bool, IpNetwork)>,
    pub action: Action,
}

impl Rule {
    fn new(src: Option<(bool, IpNetwork)>, dst: Option<(bool, IpNetwork)>, action: Action) -> Rule {
        Rule {
            mark: false,
            src,
            dst,
            action,
        }
    }
}

/// Upstream's FLANNEL-POSTRTG rules, in order (`negated`, `net`).
pub fn masq_rules(network: IpNetwork, lease: IpNetwork) -> Vec<Rule> {
    let multicast: IpNetwork = if network.is_ipv4() {
        "224.0.0.0/4".parse().unwrap()
    } else {
        "ff00::/8".parse().unwrap()
    };
    vec![
        Rule {
            mark: true,
            src: None,
            dst: None,
            action: Action::Return,
        },
        Rule::new(
            Some((false, network)),
            Some((false, network)),
            Action::Return,
        ),
        Rule::new(
            Some((false, network)),
            Some((true, multicast)),
            Action::Masquerade,
        ),
        Rule::new(Some((true, network)), Some((false, lease)), Action::Return),
        Rule::new(
            Some((true, network)),
            Some((false, network)),
            Action::Masquerade,
        ),
    ]
}

/// Upstream's FLANNEL-FWD rules.
pub fn forward_rules(network: IpNetwork) -> Vec<Rule> {
    vec![
        Rule::new(Some((false, network)), None, Action::Accept),
        Rule::new(None, Some((false, network)), Action::Accept),
    ]
}

/// The rules wanted for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub v6: bool,
    pub masq: Vec<Rule>,
    pub forward: Vec<Rule>,
    /// MASQUERADE with `--random-fully` (off under `--ip-masq-fully-random-disable`).
    pub fully_random: bool,
}

impl Wanted {
    pub fn new(network: IpNetwork, lease: IpNetwork, ip_masq: bool, forward: bool) -> Wanted {
        Wanted {
            v6: network.is_ipv6(),
            masq: if ip_masq {
                masq_rules(network, lease)
            } else {
                vec![]
            },
            forward: if forward {
                forward_rules(network)
            } else {
                vec![]
            },
            fully_random: true,
        }
    }
}

/// A firewall driver. `ensure` is idempotent: it returns true if it had to change anything.
pub trait Firewall: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn ensure(&mut self, want: &Wanted) -> impl Future<Output = anyhow::Result<bool>> + Send;
}

/// What the firewall keepers need to know (from the flags and net-conf).
pub struct Setup {
    pub ip_masq: bool,
    pub forward: bool,
    pub fully_random: bool,
    pub nftables: bool,
    /// --iptables-mode: auto, legacy or nft.
    pub iptables_mode: String,
    pub resync: Duration,
}

/// A keeper: runs forever, restoring the rules every `resync` (handled by the
/// supervisor as a task that must never end).
pub type Keeper = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Prepares one keeper per routed family (network, own subnet). In iptables mode
/// the flavour is chosen once, logged with its reason, and our chains are
/// cleared from the other flavour and our nftables tables removed (what an
/// earlier run or mode left); nftables mode removes our iptables chains.
pub async fn start(
    setup: &Setup,
    families: &[(IpNetwork, IpNetwork)],
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> anyhow::Result<Vec<Keeper>> {
    let mut keepers: Vec<Keeper> = Vec::new();
    if !setup.ip_masq && !setup.forward {
        return Ok(keepers);
    }
    let wanted = |(network, own): &(IpNetwork, IpNetwork)| {
        let mut w = Wanted::new(*network, *own, setup.ip_masq, setup.forward);
        w.fully_random = setup.fully_random;
        w
    };
    if setup.nftables {
        for f in families {
            let want = wanted(f);
            clear_iptables_leftovers(want.v6).await;
            keepers.push(Box::pin(keep(
                nftables::Nftables::new(),
                want,
                setup.resync,
                metrics.clone(),
            )));
        }
        return Ok(keepers);
    }
    let choice = detect::detect(&setup.iptables_mode).await?;
    tracing::info!(
        "iptables: using the {} tools ({}, {}): {}",
        choice.v4.flavour.name(),
        choice.v4.iptables,
        choice.v4.restore,
        choice.reason
    );
    for f in families {
        let want = wanted(f);
        let v6 = want.v6;
        if let Some((o4, o6)) = &choice.other {
            let other = if v6 { o6 } else { o4 };
            for c in [&iptables::MASQ, &iptables::FWD] {
                match iptables::Iptables::remove_chain(other, c).await {
                    Ok(true) => tracing::info!(
                        "removed {} from {} (left by an earlier run)",
                        c.chain,
                        other.iptables
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("clearing {} from {}: {e:#}", c.chain, other.iptables),
                }
            }
        }
        if let Ok(true) = nftables::remove(v6).await {
            tracing::info!(
                "removed the {} nftables table (left by nftables mode)",
                nftables::table_name(v6)
            );
        }
        let fw = iptables::Iptables::new(choice.v4.clone(), choice.v6.clone()).await;
        keepers.push(Box::pin(keep(fw, want, setup.resync, metrics.clone())));
    }
    Ok(keepers)
}

/// nftables mode: our iptables chains of an earlier iptables-mode run, in either flavour.
async fn clear_iptables_leftovers(v6: bool) {
    for f in [detect::Flavour::Legacy, detect::Flavour::Nft] {
        for suffixed in [true, false] {
            let t = detect::Tools::named(f, v6, suffixed);
            for c in [&iptables::MASQ, &iptables::FWD] {
                if let Ok(true) = iptables::Iptables::remove_chain(&t, c).await {
                    tracing::info!(
                        "removed {} from {} (left by iptables mode)",
                        c.chain,
                        t.iptables
                    );
                }
            }
        }
    }
}

/// Keeps `want` in place: now, then every `resync`.
pub async fn keep<F: Firewall>(
    mut fw: F,
    want: Wanted,
    resync: Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    let mut first = true;
    let mut tick = tokio::time::interval(resync);
    let tool = crate::metrics::ToolLabel { tool: fw.name() };
    let _ = metrics.firewall_writes.get_or_create(&tool);
    let _ = metrics.firewall_errors.get_or_create(&tool);
    loop {
        tick.tick().await;
        let fam = if want.v6 { "IPv6" } else { "IPv4" };
        match fw.ensure(&want).await {
            Ok(true) => {
                metrics.firewall_writes.get_or_create(&tool).inc();
                if first {
                    tracing::info!("{} {fam} rules installed", fw.name())
                } else {
                    tracing::warn!(
                        "{} {fam} rules were missing or changed; restored",
                        fw.name()
                    )
                }
            }
            Ok(false) => {}
            Err(e) => {
                metrics.firewall_errors.get_or_create(&tool).inc();
                tracing::error!("{} {fam} rules: {e:#}", fw.name());
            }
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_rule_order() {
        let r = masq_rules(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        );
        assert_eq!(r.len(), 5);
        assert!(r[0].mark);
        assert_eq!(r[2].action, Action::Masquerade);
        assert_eq!(r[3].dst.unwrap().1.to_string(), "10.244.1.0/24");
        assert_eq!(r[3].src, Some((true, "10.244.0.0/16".parse().unwrap())));
        let w = Wanted::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            false,
            true,
        );
        assert!(w.masq.is_empty());
        assert_eq!(w.forward.len(), 2);
    }
}
