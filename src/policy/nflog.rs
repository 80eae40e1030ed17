//! Denied connection attempts, logged (`--policy-log-denied`): each pod chain's
//! drop is preceded by a rate-limited `log group 2045 prefix "<chain>"`
//! (at most 10 a second per chain, in the kernel); the kernel sends those
//! packets' first bytes to nflog group 2045, which this listener binds. Each
//! becomes a [`Denial`] (the chain and the packet's addresses, protocol and
//! port) for the control loop, which names the pods.

use std::net::IpAddr;

use tokio::sync::mpsc;

use super::compile::NFLOG_GROUP;
use super::nfnl;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
/// Bytes of each packet copied to us: the IP and transport headers.
const COPY_RANGE: u32 = 96;

/// One denied packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The pod chain that dropped it (the log prefix).
    pub chain: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `tcp`, `udp`, `sctp`, `icmp`, … or the protocol number.
    pub proto: String,
    /// Destination port (TCP, UDP, SCTP).
    pub port: Option<u16>,
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// Pure: addresses, protocol and destination port of an IP packet's start.
pub fn flow(p: &[u8]) -> Option<(IpAddr, IpAddr, u8, Option<u16>)> {
    let (src, dst, proto, l4) = match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let s: [u8; 4] = p[12..16].try_into().ok()?;
            let d: [u8; 4] = p[16..20].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), p[9], p.get(ihl..)?)
        }
        6 if p.len() >= 40 => {
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), p[6], &p[40..])
        }
        _ => return None,
    };
    let port = match proto {
        6 | 17 | 132 if l4.len() >= 4 => Some(u16::from_be_bytes([l4[2], l4[3]])),
        _ => None,
    };
    Some((src, dst, proto, port))
}

/// Pure: the denials in one datagram from nflog.
pub fn denials(buf: &[u8]) -> Vec<Denial> {
    let mut out = Vec::new();
    for m in nfnl::messages(buf) {
        if m.ty != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET || m.body.len() < 4 {
            continue;
        }
        let (mut chain, mut payload) = (None, None);
        for (t, v) in nfnl::attrs(&m.body[4..]) {
            match t {
                NFULA_PREFIX => {
                    let v = v.split(|b| *b == 0).next().unwrap_or_default();
                    chain = std::str::from_utf8(v).ok().map(str::to_string);
                }
                NFULA_PAYLOAD => payload = Some(v),
                _ => {}
            }
        }
        if let (Some(chain), Some((src, dst, proto, port))) = (chain, payload.and_then(flow)) {
            out.push(Denial {
                chain,
                src,
                dst,
                proto: proto_name(proto),
                port,
            });
        }
    }
    out
}

/// One nflog config request for our group (nfgenmsg: AF_UNSPEC, version 0,
/// res_id = the group, big endian), with one attribute.
fn config(seq: u32, attr: u16, value: &[u8]) -> Vec<u8> {
    let g = NFLOG_GROUP.to_be_bytes();
    let ty = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG;
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK;
    nfnl::request(ty, flags, seq, [0, 0, g[0], g[1]], &[(attr, value)])
}

/// The error code of a netlink ack (0: success), if `buf` starts with one.
fn ack(buf: &[u8]) -> Option<i32> {
    let ty = u16::from_ne_bytes([*buf.get(4)?, *buf.get(5)?]);
    (ty == libc::NLMSG_ERROR as u16)
        .then(|| buf.get(16..20))
        .flatten()
        .map(|e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
}

/// Binds nflog group [`NFLOG_GROUP`] and sends each denial to `tx` until the
/// receiver is gone. Err: the group cannot be bound (another listener holds
/// it, or the kernel has no nfnetlink_log).
pub async fn start(tx: mpsc::Sender<Denial>) -> std::io::Result<()> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, SocketAddr};
    let mut sock = netlink_sys::TokioSocket::new(NETLINK_NETFILTER)?;
    sock.socket_mut().bind_auto()?;
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    for (seq, (attr, value)) in [
        (NFULA_CFG_CMD, vec![NFULNL_CFG_CMD_BIND]),
        (NFULA_CFG_MODE, mode),
    ]
    .into_iter()
    .enumerate()
    {
        sock.send_to(
            &config(seq as u32 + 1, attr, &value),
            &SocketAddr::new(0, 0),
        )
        .await?;
        let (buf, _) =
            tokio::time::timeout(std::time::Duration::from_secs(1), sock.recv_from_full())
                .await
                .map_err(|_| std::io::Error::other("no answer from nfnetlink_log"))??;
        match ack(&buf) {
            Some(0) | None => {}
            Some(e) => return Err(std::io::Error::from_raw_os_error(-e)),
        }
    }
    tokio::spawn(async move {
        loop {
            let r = tokio::select! {
                // The control loop is gone (a restart): let the group go.
                _ = tx.closed() => return,
                r = sock.recv_from_full() => r,
            };
            match r {
                Ok((buf, _)) => {
                    for d in denials(&buf) {
                        // Full: the loop is busy; this one goes unlogged.
                        let _ = tx.try_send(d);
                    }
                }
                // ENOBUFS: some were lost; they are rate-limited log lines.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, v: &[u8]) -> Vec<u8> {
        let mut a = ((4 + v.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(v);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn packet(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![2, 0, 0x07, 0xfd];
        body.extend(attr(1, &[0x08, 0x00, 1, 0]));
        body.extend(attr(NFULA_PREFIX, format!("{prefix}\0").as_bytes()));
        body.extend(attr(NFULA_PAYLOAD, payload));
        let len = 16 + body.len();
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend(body);
        m
    }

    #[test]
    fn a_logged_tcp_syn_and_sctp_init_become_denials() {
        // IPv4 TCP 10.244.1.5:40000 → 10.244.0.3:8080.
        let mut v4 = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 244, 1, 5, 10, 244, 0, 3,
        ];
        v4.extend_from_slice(&[0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 0]);
        // IPv6 SCTP fd00::5 → fd00::3 port 9000.
        let mut v6 = vec![0x60, 0, 0, 0, 0, 12, 132, 64];
        v6.extend_from_slice(&"fd00::5".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"fd00::3".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x9c, 0x40, 0x23, 0x28]);
        let mut buf = packet("in-0123", &v4);
        buf.extend(packet("eg-4567", &v6));
        let d = denials(&buf);
        assert_eq!(
            d,
            vec![
                Denial {
                    chain: "in-0123".into(),
                    src: "10.244.1.5".parse().unwrap(),
                    dst: "10.244.0.3".parse().unwrap(),
                    proto: "tcp".into(),
                    port: Some(8080),
                },
                Denial {
                    chain: "eg-4567".into(),
                    src: "fd00::5".parse().unwrap(),
                    dst: "fd00::3".parse().unwrap(),
                    proto: "sctp".into(),
                    port: Some(9000),
                },
            ]
        );
        // Truncated or foreign input yields nothing, and never panics.
        assert!(denials(&buf[..30]).is_empty());
        assert!(denials(&[0xff; 64]).is_empty());
        assert_eq!(flow(&[0x45, 0, 0]), None);
        assert_eq!(config(1, NFULA_CFG_CMD, &[1]).len(), 28);
    }
}
