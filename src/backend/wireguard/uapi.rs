//! WireGuard's cross-platform configuration protocol (the text `wg` speaks to
//! userspace implementations over their control socket): pure encoding of a
//! peer diff and parsing of a `get` reply. No I/O here.

use std::collections::BTreeMap;
use std::fmt::Write;

use ipnetwork::IpNetwork;

use super::device::{DeviceState, PeerStats};
use super::key::Key;
use crate::dataplane::model::{Changes, WgPeer};

/// `set=1` lines for the device's own key and port.
pub fn set_device(private: &Key, port: u16) -> String {
    format!(
        "set=1\nprivate_key={}\nlisten_port={port}\n\n",
        private.hex()
    )
}

/// The `set=1` requests for a peer diff, in order: one removing every deleted
/// and every replaced peer, one adding the new and replaced ones. Replacing is
/// remove + add because boringtun cannot modify a peer in place (it panics:
/// "Modifying existing peers is not yet supported"), and removals get their
/// own request because boringtun does not reset `remove=true` at the next
/// `public_key=` line (it would remove the peers that follow too). Every
/// added peer carries all its attributes, so nothing leaks from the one before.
pub fn set_peers(c: &Changes<Key, WgPeer>) -> Vec<String> {
    let mut out = Vec::new();
    let gone: Vec<&Key> = c.del.iter().chain(&c.set).map(|(k, _)| k).collect();
    if !gone.is_empty() {
        let mut s = String::from("set=1\n");
        for k in gone {
            let _ = writeln!(s, "public_key={}\nremove=true", k.hex());
        }
        s.push('\n');
        out.push(s);
    }
    if !c.set.is_empty() {
        let mut s = String::from("set=1\n");
        for (k, p) in &c.set {
            let _ = writeln!(s, "public_key={}", k.hex());
            let psk = p.psk.unwrap_or(Key([0; 32]));
            let _ = writeln!(s, "preshared_key={}", psk.hex());
            let _ = writeln!(s, "endpoint={}", p.endpoint);
            let _ = writeln!(s, "persistent_keepalive_interval={}", p.keepalive);
            s.push_str("replace_allowed_ips=true\n");
            for n in p.allowed.iter().flatten() {
                let _ = writeln!(s, "allowed_ip={n}");
            }
        }
        s.push('\n');
        out.push(s);
    }
    out
}

/// The `errno=N` a reply ends with (0: success).
pub fn errno(reply: &str) -> Option<i32> {
    reply
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|v| v.trim().parse().ok())
}

/// Parses a `get=1` reply. Unknown keys are skipped; a malformed value fails.
pub fn parse_get(reply: &str) -> Result<DeviceState, String> {
    let mut st = DeviceState::default();
    let mut cur: Option<(Key, Acc)> = None;
    let done = |st: &mut DeviceState, cur: Option<(Key, Acc)>| {
        if let Some((k, a)) = cur {
            a.finish(k, st);
        }
    };
    for line in reply.lines() {
        let Some((key, val)) = line.split_once('=') else {
            continue;
        };
        match key {
            "private_key" => st.private_key = Some(Key::from_hex(val)?),
            "own_public_key" => st.public_key = Some(Key::from_hex(val)?),
            "listen_port" => st.listen_port = val.parse().map_err(|_| bad(line))?,
            "public_key" => {
                done(&mut st, cur.take());
                cur = Some((Key::from_hex(val)?, Acc::default()));
            }
            _ => {
                let Some((_, a)) = cur.as_mut() else { continue };
                match key {
                    "preshared_key" => {
                        let k = Key::from_hex(val)?;
                        a.psk = (k.0 != [0; 32]).then_some(k);
                    }
                    "endpoint" => a.endpoint = Some(val.parse().map_err(|_| bad(line))?),
                    "persistent_keepalive_interval" => {
                        a.keepalive = val.parse().map_err(|_| bad(line))?
                    }
                    "allowed_ip" => a.allowed.push(val.parse().map_err(|_| bad(line))?),
                    "last_handshake_time_sec" => {
                        a.stats.last_handshake_secs = val.parse().map_err(|_| bad(line))?
                    }
                    "rx_bytes" => a.stats.rx_bytes = val.parse().map_err(|_| bad(line))?,
                    "tx_bytes" => a.stats.tx_bytes = val.parse().map_err(|_| bad(line))?,
                    _ => {}
                }
            }
        }
    }
    done(&mut st, cur);
    Ok(st)
}

fn bad(line: &str) -> String {
    format!("unreadable line {line:?}")
}

#[derive(Default)]
struct Acc {
    psk: Option<Key>,
    endpoint: Option<std::net::SocketAddr>,
    keepalive: u16,
    allowed: Vec<IpNetwork>,
    stats: PeerStats,
}

impl Acc {
    fn finish(self, k: Key, st: &mut DeviceState) {
        st.stats.insert(k, self.stats);
        // A peer without an endpoint was not written by us: kept as a peer
        // that matches nothing we want (so the diff replaces or removes it).
        let endpoint = self
            .endpoint
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        st.peers.insert(
            k,
            WgPeer {
                endpoint,
                allowed: WgPeer::allowed_of(self.allowed),
                psk: self.psk,
                keepalive: self.keepalive,
            },
        );
    }
}

/// Peers by key (what a parsed reply holds), for tests and callers.
pub type Peers = BTreeMap<Key, WgPeer>;

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u8, psk: Option<Key>) -> (Key, WgPeer) {
        (
            Key([i; 32]),
            WgPeer {
                endpoint: format!("192.0.2.{i}:51820").parse().unwrap(),
                allowed: [Some(format!("10.244.{i}.0/24").parse().unwrap()), None],
                psk,
                keepalive: 25,
            },
        )
    }

    /// What `set_peers` writes, a userspace device echoes in `get` (as
    /// boringtun and wireguard-go do): parsing it gives the same peers back.
    #[test]
    fn set_then_get_round_trips() {
        let c = Changes {
            set: vec![peer(2, Some(Key([9; 32]))), peer(3, None)],
            del: vec![peer(4, None)],
        };
        let reqs = set_peers(&c);
        assert_eq!(reqs.len(), 2);
        for r in &reqs {
            assert!(r.starts_with("set=1\n") && r.ends_with("\n\n"), "{r}");
        }
        // First: every removed and replaced peer removed, nothing else in it.
        for i in [2u8, 3, 4] {
            assert!(reqs[0].contains(&format!("public_key={}\nremove=true\n", Key([i; 32]).hex())));
        }
        assert!(!reqs[0].contains("endpoint="));
        // Then the additions, with no removal among them.
        assert!(!reqs[1].contains("remove="));
        // The reply a device gives to get=1 for those peers: their lines as
        // written, without the set-only directives.
        let body: String = reqs[1]
            .lines()
            .filter(|l| !l.starts_with("set=") && !l.starts_with("replace_allowed_ips"))
            .filter(|l| !l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        let mut reply = format!(
            "own_public_key={}\nlisten_port=51820\n{body}",
            Key([1; 32]).hex()
        );
        reply.push_str("rx_bytes=10\ntx_bytes=20\nlast_handshake_time_sec=1700000000\nerrno=0\n\n");
        let st = parse_get(&reply).unwrap();
        assert_eq!(st.public_key, Some(Key([1; 32])));
        assert_eq!(st.listen_port, 51820);
        let want: Peers = c.set.iter().copied().collect();
        assert_eq!(st.peers, want);
        assert_eq!(st.stats[&Key([3; 32])].tx_bytes, 20);
        assert_eq!(errno(&reply), Some(0));
        // Removals only: one request.
        assert_eq!(
            set_peers(&Changes {
                set: vec![],
                del: vec![peer(5, None)]
            })
            .len(),
            1
        );
    }

    #[test]
    fn hostile_replies_fail_or_are_skipped_never_panic() {
        assert!(parse_get("public_key=zz\n").is_err());
        assert!(parse_get(&format!(
            "public_key={}\nendpoint=nowhere\n",
            Key([1; 32]).hex()
        ))
        .is_err());
        assert!(parse_get("garbage\n=\nlisten_port=1\n").is_ok());
        assert_eq!(errno("errno=-22\n\n"), Some(-22));
        assert_eq!(errno(""), None);
    }
}
