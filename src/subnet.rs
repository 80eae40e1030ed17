//! Subnet arithmetic on `ipnetwork`, for both address families.
//!
//! Addresses are handled as `u128` so one implementation serves IPv4 and IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// Width of the family's addresses in bits.
pub fn width(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

pub fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address of `family` (taken from `like`) with numeric value `v`.
pub fn from_u128(like: IpAddr, v: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// Number of addresses in a prefix of `len` bits within `width` (saturating for /0 v6).
fn block(width: u8, len: u8) -> u128 {
    let host_bits = width.saturating_sub(len) as u32;
    if host_bits >= 128 {
        u128::MAX
    } else {
        1u128 << host_bits
    }
}

/// First and last address of `n`.
pub fn range(n: &IpNetwork) -> (u128, u128) {
    let start = to_u128(n.network());
    let size = block(width(n.ip()), n.prefix());
    (start, start.saturating_add(size - 1))
}

/// True if the address part of `n` has no host bits set.
pub fn is_canonical(n: &IpNetwork) -> bool {
    n.ip() == n.network()
}

/// `inner` lies entirely inside `outer` (same family).
pub fn contains_net(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    if outer.is_ipv4() != inner.is_ipv4() || inner.prefix() < outer.prefix() {
        return false;
    }
    outer.contains(inner.network())
}

/// `inner` is inside `outer` and strictly smaller: a proper subnet.
pub fn is_proper_subnet(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    contains_net(outer, inner) && inner.prefix() > outer.prefix()
}

/// The two networks share at least one address.
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    if a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    let (a0, a1) = range(a);
    let (b0, b1) = range(b);
    a0 <= b1 && b0 <= a1
}

/// IPv4 169.254/16 or IPv6 fe80::/10: addresses the kernel manages on its own.
pub fn is_link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => (v.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// The first usable address of a subnet (what goes into FLANNEL_SUBNET and on cni0).
pub fn gateway(n: &IpNetwork) -> IpAddr {
    from_u128(n.ip(), to_u128(n.network()) + 1)
}

/// Network `addr/len` with host bits cleared.
pub fn net(addr: IpAddr, len: u8) -> IpNetwork {
    let n = IpNetwork::new(addr, len).expect("prefix length checked by caller");
    IpNetwork::new(n.network(), len).expect("same prefix length")
}

/// A range of equally sized subnets: `[min, max]` in steps of `/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRange {
    pub min: IpAddr,
    pub max: IpAddr,
    pub len: u8,
}

impl SubnetRange {
    /// How many subnets the range holds (saturating).
    pub fn count(&self) -> u128 {
        let step = block(width(self.min), self.len);
        let (lo, hi) = (to_u128(self.min), to_u128(self.max));
        if hi < lo {
            0
        } else {
            ((hi - lo) / step).saturating_add(1)
        }
    }

    /// The subnets in order, lazily.
    pub fn iter(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        let step = block(width(self.min), self.len);
        let lo = to_u128(self.min);
        let hi = to_u128(self.max);
        let mut next = Some(lo);
        std::iter::from_fn(move || {
            let cur = next?;
            if cur > hi {
                return None;
            }
            next = cur.checked_add(step);
            Some(net(from_u128(self.min, cur), self.len))
        })
    }

    /// True if `n` is one of the range's subnets.
    pub fn holds(&self, n: &IpNetwork) -> bool {
        if n.prefix() != self.len || n.is_ipv4() != self.min.is_ipv4() || !is_canonical(n) {
            return false;
        }
        let v = to_u128(n.network());
        v >= to_u128(self.min) && v <= to_u128(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn containment_and_overlap() {
        assert!(contains_net(&n("10.244.0.0/16"), &n("10.244.3.0/24")));
        assert!(!contains_net(&n("10.244.0.0/16"), &n("10.245.0.0/24")));
        assert!(!contains_net(&n("10.244.0.0/16"), &n("10.0.0.0/8")));
        assert!(is_proper_subnet(&n("10.244.0.0/16"), &n("10.244.0.0/17")));
        assert!(!is_proper_subnet(&n("10.244.0.0/16"), &n("10.244.0.0/16")));
        assert!(!is_proper_subnet(&n("10.244.0.0/16"), &n("0.0.0.0/0")));
        assert!(overlaps(&n("10.244.1.0/24"), &n("10.244.0.0/16")));
        assert!(!overlaps(&n("10.244.1.0/24"), &n("10.244.2.0/24")));
        assert!(!overlaps(&n("10.244.1.0/24"), &n("fd00::/64")));
        assert!(overlaps(&n("fd00::/48"), &n("fd00:0:0:5::/64")));
        assert!(overlaps(&n("::/0"), &n("fd00::/64")));
    }

    #[test]
    fn gateway_and_canonical() {
        assert_eq!(gateway(&n("10.244.1.0/24")).to_string(), "10.244.1.1");
        assert_eq!(
            gateway(&n("fd00:10:244:1::/64")).to_string(),
            "fd00:10:244:1::1"
        );
        assert!(is_canonical(&n("10.244.1.0/24")));
        assert!(!is_canonical(&n("10.244.1.5/24")));
        assert_eq!(net("10.244.1.5".parse().unwrap(), 24), n("10.244.1.0/24"));
    }

    #[test]
    fn range_iteration() {
        let r = SubnetRange {
            min: "10.244.1.0".parse().unwrap(),
            max: "10.244.255.0".parse().unwrap(),
            len: 24,
        };
        assert_eq!(r.count(), 255);
        let v: Vec<_> = r.iter().collect();
        assert_eq!(v.len(), 255);
        assert_eq!(v[0], n("10.244.1.0/24"));
        assert_eq!(v[254], n("10.244.255.0/24"));
        assert!(r.holds(&n("10.244.7.0/24")));
        assert!(!r.holds(&n("10.244.0.0/24")));
        assert!(!r.holds(&n("10.244.7.0/25")));
        let top = SubnetRange {
            min: "255.255.255.0".parse().unwrap(),
            max: "255.255.255.0".parse().unwrap(),
            len: 24,
        };
        assert_eq!(top.iter().count(), 1);
        let v6 = SubnetRange {
            min: "fd00::".parse().unwrap(),
            max: "ffff:ffff:ffff:ffff::".parse().unwrap(),
            len: 64,
        };
        assert_eq!(v6.iter().take(3).count(), 3);
        assert!(v6.count() > 1 << 50);
    }
}
