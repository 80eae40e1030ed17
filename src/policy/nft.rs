//! The policy table in nftables: `table inet flannel-policy`, written as a
//! whole ([`full`]) when it is missing or was tampered with, and otherwise
//! changed by the difference between two desired states ([`delta`]) — set
//! elements added and removed in place, only changed chains rewritten — in one
//! `nft -f` transaction either way.

use std::collections::{BTreeMap, BTreeSet};

use super::compile::{Desired, MAPS};

pub const TABLE: &str = "flannel-policy";

/// The base chains. `forward`: replies of allowed connections pass, IPv6
/// neighbour discovery passes, then a local pod's egress chain (by source
/// address) and ingress chain (by destination address) decide. Hooked on
/// forward, before flannel's masquerade (postrouting) and after kube-proxy's
/// iptables/nftables DNAT (prerouting), so it sees pod addresses on both sides.
///
/// `output`: kube-proxy in IPVS mode DNATs Service traffic at local-in and
/// sends it on through the output path, so pod → ClusterIP → pod never passes
/// forward (a real kernel shows it: tests/policy.rs, kernel_vm_*). Output
/// judges it the same way, after the DNAT (the backend as the pod it is);
/// the node's own traffic (a local source address: kubelet probes, the
/// host's clients) passes untouched, as in forward it never appears.
const BASE: &str = "  chain forward {
    type filter hook forward priority filter - 5; policy accept;
    ct state established,related accept
    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert, nd-redirect } accept
    ip saddr vmap @eg4
    ip6 saddr vmap @eg6
    ip daddr vmap @in4
    ip6 daddr vmap @in6
  }
  chain output {
    type filter hook output priority filter - 5; policy accept;
    ct state established,related accept
    fib saddr type local accept
    ip saddr vmap @eg4
    ip6 saddr vmap @eg6
    ip daddr vmap @in4
    ip6 daddr vmap @in6
  }
";

fn elems(e: &BTreeSet<String>) -> String {
    e.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// The whole table, replacing whatever is there, as one transaction.
pub fn full(d: &Desired) -> String {
    let mut s =
        format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    for (m, kind) in MAPS {
        s.push_str(&format!("  map {m} {{ type {kind} : verdict; }}\n"));
    }
    for (name, set) in &d.sets {
        s.push_str(&format!("  set {name} {{ type {}; }}\n", set.kind));
    }
    for name in d.chains.keys() {
        s.push_str(&format!("  chain {name} {{\n  }}\n"));
    }
    s.push_str(BASE);
    s.push_str("}\n");
    for (name, set) in &d.sets {
        if !set.elems.is_empty() {
            s.push_str(&format!(
                "add element inet {TABLE} {name} {{ {} }}\n",
                elems(&set.elems)
            ));
        }
    }
    for (name, rules) in &d.chains {
        for r in rules {
            s.push_str(&format!("add rule inet {TABLE} {name} {r}\n"));
        }
    }
    for (m, entries) in &d.maps {
        if !entries.is_empty() {
            let e: Vec<String> = entries
                .iter()
                .map(|(k, c)| format!("{k} : jump {c}"))
                .collect();
            s.push_str(&format!(
                "add element inet {TABLE} {m} {{ {} }}\n",
                e.join(", ")
            ));
        }
    }
    s
}

/// The commands that turn `old` into `new` (empty: nothing to do). Order keeps
/// every reference valid inside the transaction: new sets and chains first,
/// then elements and rules, then map entries, then what is gone.
pub fn delta(old: &Desired, new: &Desired) -> String {
    let mut s = String::new();
    let t = format!("inet {TABLE}");
    for (name, set) in &new.sets {
        if !old.sets.contains_key(name) {
            s.push_str(&format!("add set {t} {name} {{ type {}; }}\n", set.kind));
        }
    }
    let none = BTreeSet::new();
    for (name, set) in &new.sets {
        let before = old.sets.get(name).map(|s| &s.elems).unwrap_or(&none);
        let add: BTreeSet<String> = set.elems.difference(before).cloned().collect();
        if !add.is_empty() {
            s.push_str(&format!("add element {t} {name} {{ {} }}\n", elems(&add)));
        }
    }
    for (name, rules) in &new.chains {
        match old.chains.get(name) {
            Some(r) if r == rules => continue,
            Some(_) => s.push_str(&format!("flush chain {t} {name}\n")),
            None => s.push_str(&format!("add chain {t} {name}\n")),
        }
        for r in rules {
            s.push_str(&format!("add rule {t} {name} {r}\n"));
        }
    }
    let empty = BTreeMap::new();
    for (m, _) in MAPS {
        let (o, n) = (
            old.maps.get(m).unwrap_or(&empty),
            new.maps.get(m).unwrap_or(&empty),
        );
        let gone: Vec<&String> = o
            .iter()
            .filter(|(k, c)| n.get(*k) != Some(c))
            .map(|(k, _)| k)
            .collect();
        if !gone.is_empty() {
            let g: Vec<&str> = gone.iter().map(|k| k.as_str()).collect();
            s.push_str(&format!("delete element {t} {m} {{ {} }}\n", g.join(", ")));
        }
        let add: Vec<String> = n
            .iter()
            .filter(|(k, c)| o.get(*k) != Some(c))
            .map(|(k, c)| format!("{k} : jump {c}"))
            .collect();
        if !add.is_empty() {
            s.push_str(&format!("add element {t} {m} {{ {} }}\n", add.join(", ")));
        }
    }
    for name in old.chains.keys().filter(|c| !new.chains.contains_key(*c)) {
        s.push_str(&format!("delete chain {t} {name}\n"));
    }
    for (name, set) in &old.sets {
        match new.sets.get(name) {
            None => s.push_str(&format!("delete set {t} {name}\n")),
            Some(n) => {
                let del: BTreeSet<String> = set.elems.difference(&n.elems).cloned().collect();
                if !del.is_empty() {
                    s.push_str(&format!(
                        "delete element {t} {name} {{ {} }}\n",
                        elems(&del)
                    ));
                }
            }
        }
    }
    s
}

/// The table's removal (the feature turned off): nothing of ours stays.
pub fn removal() -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
}
