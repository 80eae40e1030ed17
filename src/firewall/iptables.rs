//! The iptables driver: drives the installed `iptables`/`ip6tables` (which take
//! /run/xtables.lock, as upstream does), so `iptables-save` shows upstream's rules.

use anyhow::{bail, Context};
use tokio::process::Command;

use super::{Action, Firewall, Rule, Wanted, FWD_COMMENT, KUBE_PROXY_MARK, MASQ_COMMENT};

pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
pub const FWD_CHAIN: &str = "FLANNEL-FWD";

/// Where a rule set lives and how it is hooked in.
#[derive(Clone, Copy)]
struct Chain {
    table: &'static str,
    parent: &'static str,
    chain: &'static str,
    comment: &'static str,
    /// Insert the jump first in the parent (masquerade) or append it (forward).
    insert: bool,
}

const MASQ: Chain = Chain {
    table: "nat",
    parent: "POSTROUTING",
    chain: MASQ_CHAIN,
    comment: MASQ_COMMENT,
    insert: true,
};
const FWD: Chain = Chain {
    table: "filter",
    parent: "FORWARD",
    chain: FWD_CHAIN,
    comment: FWD_COMMENT,
    insert: false,
};

pub struct Iptables {
    random_fully: bool,
    /// `-S <chain>` output right after our last write, per chain: a cheap
    /// "has anyone touched it" check.
    seen: std::collections::HashMap<&'static str, String>,
}

/// One rule as iptables arguments (after `-A <chain>`), in upstream's order.
pub fn rule_args(r: &Rule, comment: &str, random_fully: bool) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    if r.mark {
        a.extend(["-m", "mark", "--mark", KUBE_PROXY_MARK].map(String::from));
    }
    for (flag, m) in [("-s", r.src), ("-d", r.dst)] {
        if let Some((neg, net)) = m {
            if neg {
                a.push("!".into());
            }
            a.push(flag.into());
            a.push(net.to_string());
        }
    }
    a.extend(["-m", "comment", "--comment", comment].map(String::from));
    match r.action {
        Action::Return => a.extend(["-j", "RETURN"].map(String::from)),
        Action::Accept => a.extend(["-j", "ACCEPT"].map(String::from)),
        Action::Masquerade => {
            a.extend(["-j", "MASQUERADE"].map(String::from));
            if random_fully {
                a.push("--random-fully".into());
            }
        }
    }
    a
}

async fn run(bin: &str, args: &[String]) -> anyhow::Result<(bool, String)> {
    let o = Command::new(bin)
        .arg("-w")
        .arg("5")
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {bin}"))?;
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    Ok((o.status.success(), text))
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

impl Iptables {
    pub async fn new() -> Iptables {
        // --random-fully needs iptables ≥ 1.6.2 (Debian 12 has 1.8.9).
        let random_fully = match Command::new("iptables").arg("--version").output().await {
            Ok(o) => {
                let v = String::from_utf8_lossy(&o.stdout);
                let num: Vec<u32> = v
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("v0")
                    .trim_start_matches('v')
                    .split('.')
                    .filter_map(|x| x.parse().ok())
                    .collect();
                num.as_slice() >= [1, 6, 2].as_slice()
            }
            Err(_) => false,
        };
        Iptables {
            random_fully,
            seen: Default::default(),
        }
    }

    /// Makes `c.chain` hold exactly `rules`, jumped to from `c.parent`.
    async fn ensure_chain(&mut self, bin: &str, c: &Chain, rules: &[Rule]) -> anyhow::Result<bool> {
        let Chain {
            table,
            parent,
            chain,
            comment,
            insert,
        } = *c;
        let jump = s(&["-m", "comment", "--comment", comment, "-j", chain]);
        if rules.is_empty() {
            // Not wanted (any more): remove what an earlier run left.
            let mut changed = false;
            while run(
                bin,
                &[s(&["-t", table, "-D", parent]), jump.clone()].concat(),
            )
            .await?
            .0
            {
                changed = true;
            }
            if run(bin, &s(&["-t", table, "-F", chain])).await?.0 {
                run(bin, &s(&["-t", table, "-X", chain])).await?;
                changed = true;
            }
            return Ok(changed);
        }
        let mut changed = false;
        let (listed, current) = run(bin, &s(&["-t", table, "-S", chain])).await?;
        if !listed || self.seen.get(chain) != Some(&current) {
            if !listed {
                let (ok, err) = run(bin, &s(&["-t", table, "-N", chain])).await?;
                if !ok && !err.contains("exists") {
                    bail!("{bin} -t {table} -N {chain}: {err}");
                }
            }
            // Flush and rewrite: keeps upstream's order and drops rules of an earlier lease.
            let (ok, err) = run(bin, &s(&["-t", table, "-F", chain])).await?;
            if !ok {
                bail!("{bin} -t {table} -F {chain}: {err}");
            }
            for r in rules {
                let args = [
                    s(&["-t", table, "-A", chain]),
                    rule_args(r, comment, self.random_fully),
                ]
                .concat();
                let (ok, err) = run(bin, &args).await?;
                if !ok {
                    bail!("{bin} {}: {err}", args.join(" "));
                }
            }
            let (_, now) = run(bin, &s(&["-t", table, "-S", chain])).await?;
            self.seen.insert(chain, now);
            changed = true;
        }
        let (present, _) = run(
            bin,
            &[s(&["-t", table, "-C", parent]), jump.clone()].concat(),
        )
        .await?;
        if !present {
            let pos = if insert {
                s(&["-t", table, "-I", parent, "1"])
            } else {
                s(&["-t", table, "-A", parent])
            };
            let (ok, err) = run(bin, &[pos, jump].concat()).await?;
            if !ok {
                bail!("{bin}: adding the jump to {chain} in {parent}: {err}");
            }
            changed = true;
        }
        Ok(changed)
    }
}

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    async fn ensure(&mut self, want: &Wanted) -> anyhow::Result<bool> {
        let bin = if want.v6 { "ip6tables" } else { "iptables" };
        let a = self.ensure_chain(bin, &MASQ, &want.masq).await?;
        let b = self.ensure_chain(bin, &FWD, &want.forward).await?;
        Ok(a || b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::masq_rules;

    #[test]
    fn renders_upstreams_iptables_save_lines() {
        let rules = masq_rules(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        );
        let lines: Vec<String> = rules
            .iter()
            .map(|r| {
                format!(
                    "-A {MASQ_CHAIN} {}",
                    rule_args(r, MASQ_COMMENT, true).join(" ")
                )
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment flanneld masq -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment flanneld masq -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
                "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment flanneld masq -j RETURN",
                "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
            ]
        );
    }
}
