//! etcd's wire format, as upstream writes it: subnet key names and lease
//! values (pure; hostile input is an error, never a panic).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use serde_json::Value;

use crate::lease::{BackendData, Lease};
use crate::manager::{LeaseRequest, PeerRead};

/// `10.244.1.0/24` → `10.244.1.0-24` (dual stack: `…&fd00::-64`).
pub fn key_name(v4: Option<IpNetwork>, v6: Option<IpNetwork>) -> String {
    let part = |n: IpNetwork| format!("{}-{}", n.network(), n.prefix());
    match (v4, v6) {
        (Some(a), Some(b)) => format!("{}&{}", part(a), part(b)),
        (Some(a), None) => part(a),
        (None, Some(b)) => part(b),
        (None, None) => String::new(),
    }
}

/// The inverse of [`key_name`]; `None` for anything that is not a subnet key.
pub fn parse_key_name(name: &str) -> Option<(Option<IpNetwork>, Option<IpNetwork>)> {
    let mut v4 = None;
    let mut v6 = None;
    for part in name.split('&') {
        let (addr, len) = part.rsplit_once('-')?;
        let n = IpNetwork::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
        let slot = if n.is_ipv4() { &mut v4 } else { &mut v6 };
        if slot.replace(n).is_some() {
            return None;
        }
    }
    // Only the canonical form upstream writes (network address, IPv4 first):
    // a key with host bits or another spelling would not be found again by it.
    (key_name(v4, v6) == name).then_some((v4, v6))
}

/// Upstream's lease value: `{"PublicIP":…,"PublicIPv6":…,"BackendType":…,"BackendData":…}`.
/// `BackendData` belongs to the IPv4 side: an IPv6-only lease carries only
/// `BackendV6Data`, as upstream writes it.
pub fn lease_value(req: &LeaseRequest, v4: bool) -> String {
    let ip = req
        .public_ip
        .filter(|_| v4)
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let ip6 = req
        .public_ipv6
        .map(|a| format!("\"{a}\""))
        .unwrap_or_else(|| "null".into());
    let mut s = format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":{ip6},"BackendType":"{}""#,
        req.data.type_name()
    );
    // Backends without data (host-gw, ipip, alloc): upstream omits the empty field.
    let data = req.data.to_json();
    if v4 && data != "null" {
        s.push_str(&format!(r#","BackendData":{data}"#));
    }
    if let Some(d) = req.data_v6.as_ref().map(BackendData::to_json) {
        if d != "null" {
            s.push_str(&format!(r#","BackendV6Data":{d}"#));
        }
    }
    s.push('}');
    s
}

/// Parses a peer's key name and value (pure; hostile input is an error, not a panic).
pub fn parse_lease(name: &str, value: &[u8]) -> PeerRead {
    let (v4, v6) = parse_key_name(name).ok_or_else(|| format!("key {name:?} is not a subnet"))?;
    if value.len() > 2 * crate::lease::MAX_BACKEND_DATA {
        return Err(format!("value is {} bytes, too large", value.len()));
    }
    let v: Value = serde_json::from_slice(value).map_err(|e| format!("value is not JSON: {e}"))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    let ty = field("BackendType")
        .and_then(Value::as_str)
        .ok_or("no BackendType")?;
    let data_text = |k: &str| {
        field(k)
            .map(|d| d.to_string())
            .unwrap_or_else(|| "null".into())
    };
    let backend_v6 = match (v6, field("BackendV6Data")) {
        (Some(_), Some(_)) => Some(BackendData::parse(ty, &data_text("BackendV6Data"))?),
        _ => None,
    };
    // An IPv6-only lease has no BackendData: its IPv6 data stands for it.
    let backend = match (field("BackendData"), &backend_v6) {
        (None, Some(d)) if v4.is_none() => d.clone(),
        _ => BackendData::parse(ty, &data_text("BackendData"))?,
    };
    let backend_v6 = backend_v6.or_else(|| v6.map(|_| backend.clone()));
    let public_ip = match field("PublicIP").and_then(Value::as_str) {
        Some(s) => Some(
            s.parse::<Ipv4Addr>()
                .map_err(|_| format!("PublicIP {s:?} is not an IPv4 address"))?,
        ),
        None => None,
    };
    let public_ipv6 = match field("PublicIPv6").and_then(Value::as_str) {
        Some(s) => Some(
            s.parse::<Ipv6Addr>()
                .map_err(|_| format!("PublicIPv6 {s:?} is not an IPv6 address"))?,
        ),
        None => None,
    };
    Ok(Some(Lease {
        subnet: v4,
        ipv6_subnet: v6,
        public_ip,
        public_ipv6,
        backend,
        backend_v6,
    }))
}
