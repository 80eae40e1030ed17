//! Which iptables backend ("flavour") the rules go to: legacy (x_tables) or nft.
//!
//! Both flavours can hold rules at the same time and the kernel runs both, but
//! each flavour's tools see only their own: rules in the flavour the host does
//! not use are invisible to its `iptables-save` and ordered apart from its
//! kube-proxy rules. So, like kube-proxy's `iptables-wrapper`, we use the
//! flavour that already holds the host's rules: kube-proxy's/kubelet's marker
//! chains decide first, then the number of rules; nft when both are empty.
//! `--iptables-mode`/`FLANNELD_IPTABLES_MODE` overrides the choice.

use tokio::process::Command;

use super::run::run_for;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Legacy,
    Nft,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Legacy => "legacy",
            Flavour::Nft => "nft",
        }
    }
    pub fn other(self) -> Flavour {
        match self {
            Flavour::Legacy => Flavour::Nft,
            Flavour::Nft => Flavour::Legacy,
        }
    }
}

/// The commands of one flavour for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub flavour: Flavour,
    pub iptables: String,
    pub save: String,
    pub restore: String,
}

impl Tools {
    /// `iptables-legacy`, `ip6tables-nft-restore`, ... (Debian's and the image's names),
    /// or the plain names when the host's `iptables` is that flavour and has no suffixed ones.
    pub fn named(flavour: Flavour, v6: bool, suffixed: bool) -> Tools {
        let base = if v6 { "ip6tables" } else { "iptables" };
        let sfx = if suffixed {
            format!("-{}", flavour.name())
        } else {
            String::new()
        };
        Tools {
            flavour,
            iptables: format!("{base}{sfx}"),
            save: format!("{base}{sfx}-save"),
            restore: format!("{base}{sfx}-restore"),
        }
    }
}

/// What one flavour holds (None: its tools are missing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Probe {
    /// kube-proxy's `KUBE-IPTABLES-HINT` or kubelet's `KUBE-KUBELET-CANARY` chain.
    pub kube_marker: bool,
    /// Rules (`-A` lines) in all tables, both families.
    pub rules: usize,
}

impl Probe {
    pub fn of(save_output: &str) -> Probe {
        Probe {
            kube_marker: save_output.lines().any(|l| {
                l.starts_with(':')
                    && (l.contains("KUBE-IPTABLES-HINT") || l.contains("KUBE-KUBELET-CANARY"))
            }),
            rules: save_output.lines().filter(|l| l.starts_with("-A ")).count(),
        }
    }
}

/// Pure: the flavour to use and why.
pub fn choose(legacy: Option<Probe>, nft: Option<Probe>) -> Result<(Flavour, String), String> {
    match (legacy, nft) {
        (None, None) => {
            Err("neither iptables-legacy nor iptables-nft (nor iptables) is installed".into())
        }
        (Some(_), None) => Ok((
            Flavour::Legacy,
            "only the legacy tools are installed".into(),
        )),
        (None, Some(_)) => Ok((Flavour::Nft, "only the nft tools are installed".into())),
        (Some(l), Some(n)) => Ok(if n.kube_marker && !l.kube_marker {
            (
                Flavour::Nft,
                "kube-proxy's/kubelet's marker chains are in nft".into(),
            )
        } else if l.kube_marker && !n.kube_marker {
            (
                Flavour::Legacy,
                "kube-proxy's/kubelet's marker chains are in legacy".into(),
            )
        } else if l.rules > n.rules {
            (
                Flavour::Legacy,
                format!(
                    "legacy holds more rules ({} against {} in nft)",
                    l.rules, n.rules
                ),
            )
        } else {
            (
                Flavour::Nft,
                format!(
                    "nft holds as many or more rules ({} against {} in legacy)",
                    n.rules, l.rules
                ),
            )
        }),
    }
}

async fn exists(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The flavour of a plain `iptables`, from `iptables v1.8.9 (nf_tables)` / `(legacy)`;
/// before 1.8 there was only legacy.
async fn plain_flavour() -> Option<Flavour> {
    let out = run_for("iptables", &["--version"]).await.ok()?;
    if !out.0 {
        return None;
    }
    Some(if out.1.contains("nf_tables") {
        Flavour::Nft
    } else {
        Flavour::Legacy
    })
}

/// What a flavour's tools hold now, both families (None: not installed).
async fn probe(f: Flavour) -> Option<(Probe, bool)> {
    let (t4, t6) = (Tools::named(f, false, true), Tools::named(f, true, true));
    let suffixed = exists(&t4.iptables).await;
    let (t4, t6) = if suffixed {
        (t4, t6)
    } else if plain_flavour().await == Some(f) {
        (Tools::named(f, false, false), Tools::named(f, true, false))
    } else {
        return None;
    };
    let mut text = String::new();
    for t in [&t4, &t6] {
        if let Ok((true, out)) = run_for(&t.save, &[]).await {
            text.push_str(&out);
        }
    }
    Some((Probe::of(&text), suffixed))
}

/// The tools to use (IPv4, IPv6) and, when installed, the other flavour's (to
/// clear rules an earlier run left there). `mode`: auto, legacy or nft.
pub struct Choice {
    pub v4: Tools,
    pub v6: Tools,
    pub other: Option<(Tools, Tools)>,
    pub reason: String,
}

pub async fn detect(mode: &str) -> anyhow::Result<Choice> {
    let legacy = probe(Flavour::Legacy).await;
    let nft = probe(Flavour::Nft).await;
    let (flavour, reason) = match mode {
        "legacy" | "nft" => {
            let f = if mode == "legacy" {
                Flavour::Legacy
            } else {
                Flavour::Nft
            };
            let have = if f == Flavour::Legacy { legacy } else { nft };
            if have.is_none() {
                anyhow::bail!("--iptables-mode={mode}, but iptables-{mode} is not installed");
            }
            (f, format!("--iptables-mode={mode}"))
        }
        _ => choose(legacy.map(|p| p.0), nft.map(|p| p.0)).map_err(anyhow::Error::msg)?,
    };
    let tools = |f: Flavour| {
        let suffixed = if f == Flavour::Legacy { legacy } else { nft }.map(|p| p.1)?;
        Some((
            Tools::named(f, false, suffixed),
            Tools::named(f, true, suffixed),
        ))
    };
    let (v4, v6) = tools(flavour).expect("the chosen flavour is installed");
    Ok(Choice {
        v4,
        v6,
        other: tools(flavour.other()),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kube_marker: bool, rules: usize) -> Option<Probe> {
        Some(Probe { kube_marker, rules })
    }

    #[test]
    fn the_flavour_holding_the_hosts_rules_wins() {
        assert_eq!(choose(p(false, 0), p(false, 0)).unwrap().0, Flavour::Nft);
        assert_eq!(
            choose(p(false, 12), p(false, 3)).unwrap().0,
            Flavour::Legacy
        );
        assert_eq!(choose(p(false, 3), p(false, 3)).unwrap().0, Flavour::Nft);
        // kube-proxy's marker outranks a count (e.g. Docker's rules in the other flavour).
        assert_eq!(choose(p(true, 2), p(false, 40)).unwrap().0, Flavour::Legacy);
        assert_eq!(choose(p(false, 40), p(true, 2)).unwrap().0, Flavour::Nft);
        assert_eq!(choose(p(true, 5), p(true, 9)).unwrap().0, Flavour::Nft);
        assert_eq!(choose(None, p(false, 0)).unwrap().0, Flavour::Nft);
        assert_eq!(choose(p(false, 0), None).unwrap().0, Flavour::Legacy);
        assert!(choose(None, None).is_err());
        let (_, why) = choose(p(false, 12), p(false, 3)).unwrap();
        assert!(why.contains("12") && why.contains('3'), "{why}");
    }

    #[test]
    fn probe_reads_save_output() {
        let text = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j MASQUERADE\n-A POSTROUTING -s 10.0.0.0/8 -j RETURN\nCOMMIT\n# -A in a comment\n";
        assert_eq!(
            Probe::of(text),
            Probe {
                kube_marker: true,
                rules: 2
            }
        );
        // A rule that merely mentions the name is not the marker chain.
        assert!(!Probe::of("-A X -m comment --comment KUBE-IPTABLES-HINT -j RETURN\n").kube_marker);
    }

    #[test]
    fn tool_names() {
        let t = Tools::named(Flavour::Legacy, true, true);
        assert_eq!(
            (t.iptables.as_str(), t.save.as_str(), t.restore.as_str()),
            (
                "ip6tables-legacy",
                "ip6tables-legacy-save",
                "ip6tables-legacy-restore"
            )
        );
        let t = Tools::named(Flavour::Nft, false, false);
        assert_eq!(t.restore, "iptables-restore");
    }
}
