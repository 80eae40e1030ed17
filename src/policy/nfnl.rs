//! nfnetlink framing shared by the nftables watcher ([`super::table_watch`])
//! and the nflog listener ([`super::nflog`]): the messages of a datagram,
//! the attributes of a message, and a request. Pure; malformed input ends
//! the iteration, never panics.

/// One netlink message: its type, sequence number, sender's port and what
/// follows the 16-byte header.
pub struct Msg<'a> {
    pub ty: u16,
    pub seq: u32,
    pub port: u32,
    pub body: &'a [u8],
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The messages in one datagram, up to the first malformed one.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Msg<'_>> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 16 > buf.len() {
            return None;
        }
        let len = u32_at(buf, off) as usize;
        if len < 16 || off + len > buf.len() {
            return None;
        }
        let m = Msg {
            ty: u16::from_ne_bytes([buf[off + 4], buf[off + 5]]),
            seq: u32_at(buf, off + 8),
            port: u32_at(buf, off + 12),
            body: &buf[off + 16..off + len],
        };
        off += (len + 3) & !3;
        Some(m)
    })
}

/// The attributes (type without the nested/byte-order flags, value) in `b`,
/// up to the first malformed one.
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((ty, value))
    })
}

/// A request: header, the 4-byte nfgenmsg, then `attrs`.
pub fn request(ty: u16, flags: i32, seq: u32, nfgen: [u8; 4], attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&nfgen);
    for (t, v) in attrs {
        m.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        m.extend_from_slice(&t.to_ne_bytes());
        m.extend_from_slice(v);
        m.resize((m.len() + 3) & !3, 0);
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&ty.to_ne_bytes());
    m[6..8].copy_from_slice(&(flags as u16).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}
