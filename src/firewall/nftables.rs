//! The nftables driver (net-conf `"EnableNFTables": true`, as newer upstream):
//! its own table `flannel-ipv4` / `flannel-ipv6`, replaced atomically with one
//! `nft -f` transaction.

use anyhow::bail;

use super::run::{run_for, run_with};

use super::{Action, Firewall, Rule, Wanted, FWD_COMMENT, MASQ_COMMENT};

pub struct Nftables {
    /// `nft list table` output right after our last write.
    seen: Option<String>,
}

impl Nftables {
    pub fn new() -> Nftables {
        Nftables { seen: None }
    }
}

impl Default for Nftables {
    fn default() -> Self {
        Self::new()
    }
}

pub fn table_name(v6: bool) -> &'static str {
    if v6 {
        "flannel-ipv6"
    } else {
        "flannel-ipv4"
    }
}

fn rule_text(r: &Rule, fam: &str, comment: &str, fully_random: bool) -> String {
    let mut t = String::new();
    if r.mark {
        t.push_str("meta mark & 0x4000 == 0x4000 ");
    }
    for (dir, m) in [("saddr", r.src), ("daddr", r.dst)] {
        if let Some((neg, net)) = m {
            t.push_str(&format!(
                "{fam} {dir} {}{net} ",
                if neg { "!= " } else { "" }
            ));
        }
    }
    t.push_str(match r.action {
        Action::Return => "return",
        Action::Accept => "accept",
        Action::Masquerade if fully_random => "masquerade fully-random",
        Action::Masquerade => "masquerade",
    });
    t.push_str(&format!(" comment \"{comment}\""));
    t
}

/// The whole transaction: create-if-missing, delete, re-create — atomic in nft.
pub fn script(want: &Wanted) -> String {
    let fam = if want.v6 { "ip6" } else { "ip" };
    let table = table_name(want.v6);
    let mut s = format!("table {fam} {table} {{}}\ndelete table {fam} {table}\n");
    if want.masq.is_empty() && want.forward.is_empty() {
        return s;
    }
    s.push_str(&format!("table {fam} {table} {{\n"));
    if !want.masq.is_empty() {
        s.push_str(
            "  chain postrtg {\n    type nat hook postrouting priority srcnat; policy accept;\n",
        );
        for r in &want.masq {
            s.push_str(&format!(
                "    {}\n",
                rule_text(r, fam, MASQ_COMMENT, want.fully_random)
            ));
        }
        s.push_str("  }\n");
    }
    if !want.forward.is_empty() {
        s.push_str(
            "  chain forward {\n    type filter hook forward priority filter; policy accept;\n",
        );
        for r in &want.forward {
            s.push_str(&format!(
                "    {}\n",
                rule_text(r, fam, FWD_COMMENT, want.fully_random)
            ));
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

async fn list(v6: bool) -> anyhow::Result<Option<String>> {
    let fam = if v6 { "ip6" } else { "ip" };
    let (ok, out) = run_for("nft", &["list", "table", fam, table_name(v6)]).await?;
    Ok(ok.then_some(out))
}

/// Deletes our table of one family if it exists (leftovers when iptables mode is used).
pub async fn remove(v6: bool) -> anyhow::Result<bool> {
    if list(v6).await?.is_none() {
        return Ok(false);
    }
    let fam = if v6 { "ip6" } else { "ip" };
    let (ok, err) = run_for("nft", &["delete", "table", fam, table_name(v6)]).await?;
    if !ok {
        bail!("nft delete table {fam} {}: {}", table_name(v6), err.trim());
    }
    Ok(true)
}

impl Firewall for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    async fn ensure(&mut self, want: &Wanted) -> anyhow::Result<bool> {
        let current = list(want.v6).await?;
        if current.is_some() && current == self.seen {
            return Ok(false);
        }
        let text = script(want);
        let (ok, err) = run_with("nft", &["-f", "-"], Some(&text)).await?;
        if !ok {
            bail!("nft -f: {}\n{text}", err.trim());
        }
        self.seen = list(want.v6).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_has_the_equivalent_rules() {
        let w = Wanted::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            true,
            true,
        );
        let s = script(&w);
        assert!(s.starts_with("table ip flannel-ipv4 {}\ndelete table ip flannel-ipv4\n"));
        assert!(s.contains("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment \"flanneld masq\""));
        assert!(s.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return"));
        assert!(s.contains("meta mark & 0x4000 == 0x4000 return"));
        assert!(s.contains("ip daddr 10.244.0.0/16 accept comment \"flanneld forward\""));
        let mut w = w;
        w.fully_random = false;
        let s = script(&w);
        assert!(s.contains("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade comment"));
        assert!(!s.contains("fully-random"));
    }
}
