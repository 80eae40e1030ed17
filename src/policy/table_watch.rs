//! Following the kernel's nftables notifications for our table, so that any
//! change made by someone else — a rule, a chain, or one element of a set or
//! verdict map (`nft flush map …`, `nft delete element …`, which a listing
//! with `-t` does not show) — is seen and undone.
//!
//! Every nftables transaction ends in a NEWGEN message carrying the new
//! generation id. The watcher records the generation of the last transaction
//! that touched our table. After each of its own writes the enforcer asks for
//! a *barrier*: a GETGEN request on the same socket, whose answer arrives
//! after every notification queued before it, and so names the generation
//! that includes our write. A later touching generation is someone else's.
//! (Process ids cannot tell: the agent runs without the host's pid namespace.)

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use super::nfnl;

/// nfnetlink's multicast group of nftables changes (NFNLGRP_NFTABLES).
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
/// Our GETGEN requests' sequence numbers: "FLNT" + a counter.
const SEQ_BASE: u32 = 0x464c_0000;

/// What one netlink message said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// An nftables change naming our table (a rule, chain, set, element …).
    Touched,
    /// A transaction ended with this generation.
    Generation(u32),
    /// The answer to our GETGEN with this sequence number.
    Answer { seq: u32, gen: u32 },
}

/// Pure: the notes in one datagram of nfnetlink messages.
pub fn scan(buf: &[u8], table: &[u8], our_port: u32) -> Vec<Note> {
    let mut out = Vec::new();
    for m in nfnl::messages(buf) {
        if m.ty >> 8 != NFNL_SUBSYS_NFTABLES {
            continue;
        }
        if m.ty & 0xff == NFT_MSG_NEWGEN {
            if let Some(gen) = gen_id(m.body) {
                if m.port == our_port && m.seq & 0xffff_0000 == SEQ_BASE {
                    out.push(Note::Answer { seq: m.seq, gen });
                } else {
                    out.push(Note::Generation(gen));
                }
            }
        } else if m.body.windows(table.len()).any(|w| w == table) {
            out.push(Note::Touched);
        }
    }
    out
}

/// NFTA_GEN_ID from a NEWGEN payload (nfgenmsg, then attributes).
fn gen_id(payload: &[u8]) -> Option<u32> {
    let (_, v) = nfnl::attrs(payload.get(4..)?).find(|(t, v)| *t == NFTA_GEN_ID && v.len() >= 4)?;
    Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

/// A GETGEN request with sequence number `seq` (nfgenmsg: AF_UNSPEC, version 0).
pub fn getgen(seq: u32) -> Vec<u8> {
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN;
    nfnl::request(ty, libc::NLM_F_REQUEST, seq, [0; 4], &[])
}

/// Generation `a` is after `b` (ids wrap).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The enforcer's side of the watcher.
pub struct TableWatch {
    /// Generation of the last transaction that touched our table.
    touched: Arc<AtomicU32>,
    /// Notifications were lost (ENOBUFS): nothing can be told apart.
    lost: Arc<AtomicBool>,
    barriers: mpsc::Sender<oneshot::Sender<u32>>,
}

impl TableWatch {
    /// The generation that includes everything written so far, or None if the
    /// watcher does not answer within a second.
    pub async fn barrier(&self) -> Option<u32> {
        let (tx, rx) = oneshot::channel();
        self.barriers.send(tx).await.ok()?;
        tokio::time::timeout(Duration::from_secs(1), rx)
            .await
            .ok()?
            .ok()
    }

    /// Whether someone else touched our table after generation `ours`
    /// (clears the lost flag: the caller restores either way).
    pub fn foreign_since(&self, ours: u32) -> bool {
        self.lost.swap(false, Ordering::Relaxed)
            || after(self.touched.load(Ordering::Relaxed), ours)
    }
}

/// The receive buffer a large transaction's notifications fit in: forced past
/// `net.core.rmem_max` (the agent has CAP_NET_ADMIN), else as large as allowed.
const RCVBUF: libc::c_int = 16 << 20;

fn roomy(s: &mut netlink_sys::Socket) {
    use std::os::fd::AsRawFd;
    let size = RCVBUF;
    // SAFETY: setsockopt on our own socket with a c_int value.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = s.set_rx_buf_sz(RCVBUF as usize);
    }
}

/// Starts the watcher: every transaction touching `table` wakes `wake`.
pub fn start(table: &str, wake: Arc<Notify>) -> std::io::Result<TableWatch> {
    use netlink_sys::{
        protocols::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket,
    };
    let mut sock = TokioSocket::new(NETLINK_NETFILTER)?;
    // Writing a table of 15,000 objects queues as many notifications at once;
    // room for them keeps the generations (and so our own writes) known.
    roomy(sock.socket_mut());
    let port = sock.socket_mut().bind_auto()?.port_number();
    sock.socket_mut().add_membership(NFNLGRP_NFTABLES)?;
    let name = format!("{table}\0").into_bytes();
    let touched = Arc::new(AtomicU32::new(0));
    let lost = Arc::new(AtomicBool::new(false));
    let (barriers, mut requests) = mpsc::channel::<oneshot::Sender<u32>>(8);
    let (t, l) = (touched.clone(), lost.clone());
    tokio::spawn(async move {
        let mut waiting: Vec<(u32, oneshot::Sender<u32>)> = Vec::new();
        let mut seq = SEQ_BASE;
        let mut dirty = false;
        loop {
            tokio::select! {
                r = sock.recv_from_full() => match r {
                    Ok((buf, _)) => {
                        for n in scan(&buf, &name, port) {
                            match n {
                                Note::Touched => dirty = true,
                                Note::Generation(g) => {
                                    if std::mem::take(&mut dirty) {
                                        t.store(g, Ordering::Relaxed);
                                        wake.notify_one();
                                    }
                                }
                                Note::Answer { seq: s, gen } => {
                                    if let Some(i) = waiting.iter().position(|(q, _)| *q == s) {
                                        let (_, tx) = waiting.swap_remove(i);
                                        let _ = tx.send(gen);
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // ENOBUFS: notifications were lost; the table must be checked.
                        tracing::debug!("nftables notifications: {e}");
                        l.store(true, Ordering::Relaxed);
                        wake.notify_one();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                req = requests.recv() => {
                    let Some(tx) = req else { return };
                    seq = SEQ_BASE | (seq.wrapping_add(1) & 0xffff);
                    if sock.send_to(&getgen(seq), &SocketAddr::new(0, 0)).await.is_ok() {
                        waiting.retain(|(_, w)| !w.is_closed());
                        waiting.push((seq, tx));
                    }
                }
            }
        }
    });
    Ok(TableWatch {
        touched,
        lost,
        barriers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, seq: u32, port: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        let len = 16 + payload.len();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&port.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn newgen(gen: u32) -> Vec<u8> {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(&8u16.to_ne_bytes());
        p.extend_from_slice(&NFTA_GEN_ID.to_ne_bytes());
        p.extend_from_slice(&gen.to_be_bytes());
        p
    }

    #[test]
    fn a_transaction_on_our_table_and_the_answer_to_a_barrier() {
        let t = b"flannel-policy\0";
        let mut elem = vec![0, 0, 0, 0, 19, 0, 1, 0];
        elem.extend_from_slice(t);
        let mut buf = msg((10 << 8) | 14, 7, 999, &elem); // DELSETELEM by nft
        buf.extend(msg((10 << 8) | 15, 7, 999, &newgen(41)));
        buf.extend(msg((10 << 8) | 15, SEQ_BASE | 3, 55, &newgen(41)));
        assert_eq!(
            scan(&buf, t, 55),
            vec![
                Note::Touched,
                Note::Generation(41),
                Note::Answer {
                    seq: SEQ_BASE | 3,
                    gen: 41
                }
            ]
        );
        // Another table's change is not ours; truncated input ends the scan.
        let mut other = vec![0, 0, 0, 0];
        other.extend_from_slice(b"flannel-masq\0");
        assert_eq!(scan(&msg((10 << 8) | 6, 1, 9, &other), t, 55), vec![]);
        assert_eq!(scan(&buf[..buf.len() - 3], t, 55).len(), 2);
        assert_eq!(scan(&[1, 2, 3], t, 55), vec![]);
    }

    #[test]
    fn generations_compare_across_the_wrap() {
        assert!(after(5, 4) && !after(4, 4) && !after(3, 4));
        assert!(after(1, u32::MAX));
        assert_eq!(getgen(SEQ_BASE | 1).len(), 20);
    }
}
