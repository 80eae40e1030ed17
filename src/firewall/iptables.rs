//! The iptables driver: drives the host's flavour of `iptables`/`ip6tables`
//! ([`super::detect`]; they take /run/xtables.lock, as upstream does), so
//! `iptables-save` shows upstream's rules. Reads are `iptables -S`/`-C`; every
//! write is one `iptables-restore --noflush` transaction per table.

use anyhow::bail;

use super::detect::Tools;
use super::run::{run_for, run_with};
use super::{Action, Firewall, Rule, Wanted, FWD_COMMENT, KUBE_PROXY_MARK, MASQ_COMMENT};

pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
pub const FWD_CHAIN: &str = "FLANNEL-FWD";

/// Where a rule set lives and how it is hooked in.
#[derive(Debug, Clone, Copy)]
pub struct Chain {
    pub table: &'static str,
    pub parent: &'static str,
    pub chain: &'static str,
    pub comment: &'static str,
    /// Insert the jump first in the parent (masquerade) or append it (forward).
    pub insert: bool,
}

pub const MASQ: Chain = Chain {
    table: "nat",
    parent: "POSTROUTING",
    chain: MASQ_CHAIN,
    comment: MASQ_COMMENT,
    insert: true,
};
pub const FWD: Chain = Chain {
    table: "filter",
    parent: "FORWARD",
    chain: FWD_CHAIN,
    comment: FWD_COMMENT,
    insert: false,
};

pub struct Iptables {
    v4: Tools,
    v6: Tools,
    random_fully: bool,
    /// `-S <chain>` output right after our last write, per family and chain: a
    /// cheap "has anyone touched it" check.
    seen: std::collections::HashMap<(bool, &'static str), String>,
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

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// One argument as `iptables-restore` reads it (quoted when it has spaces).
fn restore_arg(a: &str) -> String {
    if a.contains(' ') {
        format!("\"{a}\"")
    } else {
        a.to_string()
    }
}

/// The `iptables-restore --noflush` payload that makes `c.chain` hold exactly
/// `rules` in one transaction: declaring the chain creates it or flushes it, the
/// rules follow, and the jump from the parent is added when `add_jump`. The
/// kernel swaps the table at COMMIT, so no packet sees a half-written chain.
pub fn fill_payload(c: &Chain, rules: &[Rule], random_fully: bool, add_jump: bool) -> String {
    let mut p = format!("*{}\n:{} - [0:0]\n", c.table, c.chain);
    for r in rules {
        let args: Vec<String> = rule_args(r, c.comment, random_fully)
            .iter()
            .map(|a| restore_arg(a))
            .collect();
        p.push_str(&format!("-A {} {}\n", c.chain, args.join(" ")));
    }
    if add_jump {
        let pos = if c.insert {
            format!("-I {} 1", c.parent)
        } else {
            format!("-A {}", c.parent)
        };
        p.push_str(&format!(
            "{pos} -m comment --comment \"{}\" -j {}\n",
            c.comment, c.chain
        ));
    }
    p.push_str("COMMIT\n");
    p
}

/// The payload that removes `c.chain` and every jump to it listed in
/// `parent_rules` (`iptables -S <parent>` output).
pub fn removal_payload(c: &Chain, parent_rules: &str) -> String {
    let mut p = format!("*{}\n", c.table);
    let jump = format!("-j {}", c.chain);
    for l in parent_rules.lines() {
        if let Some(rest) = l.strip_prefix(&format!("-A {} ", c.parent)) {
            if rest.ends_with(&jump) || rest.contains(&format!("{jump} ")) {
                p.push_str(&format!("-D {} {rest}\n", c.parent));
            }
        }
    }
    p.push_str(&format!("-F {}\n-X {}\nCOMMIT\n", c.chain, c.chain));
    p
}

impl Iptables {
    /// A driver for one flavour's tools; `fully_random_allowed` is false under
    /// `--ip-masq-fully-random-disable`.
    pub async fn new(v4: Tools, v6: Tools) -> Iptables {
        // --random-fully needs iptables >= 1.6.2 (Debian 12 has 1.8.9).
        let random_fully = match run_for(&v4.iptables, &["--version"]).await {
            Ok((true, v)) => {
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
            _ => false,
        };
        Iptables {
            v4,
            v6,
            random_fully,
            seen: Default::default(),
        }
    }

    async fn restore(t: &Tools, payload: &str) -> anyhow::Result<()> {
        let (ok, err) = run_with(&t.restore, &["--noflush", "-w", "5"], Some(payload)).await?;
        if !ok {
            bail!("{} --noflush: {}\n{payload}", t.restore, err.trim());
        }
        Ok(())
    }

    /// Removes `c.chain` and the jumps to it, if present. True if it did.
    pub async fn remove_chain(t: &Tools, c: &Chain) -> anyhow::Result<bool> {
        let (exists, _) = run_for(&t.iptables, &["-w", "5", "-t", c.table, "-S", c.chain]).await?;
        if !exists {
            return Ok(false);
        }
        let (_, parent) = run_for(&t.iptables, &["-w", "5", "-t", c.table, "-S", c.parent]).await?;
        Self::restore(t, &removal_payload(c, &parent)).await?;
        Ok(true)
    }

    /// Makes `c.chain` hold exactly `rules`, jumped to from `c.parent`.
    async fn ensure_chain(
        &mut self,
        v6: bool,
        c: &Chain,
        rules: &[Rule],
        fully_random: bool,
    ) -> anyhow::Result<bool> {
        let t = if v6 { &self.v6 } else { &self.v4 };
        if rules.is_empty() {
            // Not wanted (any more): remove what an earlier run left.
            return Self::remove_chain(t, c).await;
        }
        let jump = s(&["-m", "comment", "--comment", c.comment, "-j", c.chain]);
        let (listed, current) =
            run_for(&t.iptables, &["-w", "5", "-t", c.table, "-S", c.chain]).await?;
        let mut check: Vec<&str> = vec!["-w", "5", "-t", c.table, "-C", c.parent];
        check.extend(jump.iter().map(String::as_str));
        let (jumped, _) = run_for(&t.iptables, &check).await?;
        let key = (v6, c.chain);
        if listed && jumped && self.seen.get(&key) == Some(&current) {
            return Ok(false);
        }
        let payload = fill_payload(c, rules, self.random_fully && fully_random, !jumped);
        tracing::debug!("{} payload:\n{payload}", t.restore);
        Self::restore(t, &payload).await?;
        let (_, now) = run_for(&t.iptables, &["-w", "5", "-t", c.table, "-S", c.chain]).await?;
        self.seen.insert(key, now);
        Ok(true)
    }
}

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        match self.v4.flavour {
            super::detect::Flavour::Legacy => "iptables (legacy)",
            super::detect::Flavour::Nft => "iptables (nft)",
        }
    }

    async fn ensure(&mut self, want: &Wanted) -> anyhow::Result<bool> {
        let a = self
            .ensure_chain(want.v6, &MASQ, &want.masq, want.fully_random)
            .await?;
        let b = self
            .ensure_chain(want.v6, &FWD, &want.forward, want.fully_random)
            .await?;
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

    #[test]
    fn one_restore_transaction_fills_the_chain_and_adds_a_missing_jump() {
        let rules = masq_rules(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        );
        let p = fill_payload(&MASQ, &rules, false, true);
        assert_eq!(
            p,
            "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
             -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n\
             -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
             -A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE\n\
             -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN\n\
             -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE\n\
             -I POSTROUTING 1 -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             COMMIT\n"
        );
        let fwd = fill_payload(&FWD, &[], true, false);
        assert_eq!(fwd, "*filter\n:FLANNEL-FWD - [0:0]\nCOMMIT\n");
    }

    #[test]
    fn removal_deletes_every_jump_then_the_chain() {
        let parent = "-P FORWARD DROP\n\
            -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
            -A FORWARD -j KUBE-FORWARD\n\
            -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
            -A FORWARD -j FLANNEL-FWD-OTHER\n";
        assert_eq!(
            removal_payload(&FWD, parent),
            "*filter\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -F FLANNEL-FWD\n-X FLANNEL-FWD\nCOMMIT\n"
        );
    }
}
