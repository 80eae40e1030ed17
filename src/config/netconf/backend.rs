//! The `Backend` object of net-conf.json: each supported type's fields, and
//! one clear refusal (why, and what to use instead) for the types upstream
//! knows that flannel-rs declines.

use serde_json::Value;

use super::{
    err, BackendConf, ConfigError, ExtensionConf, Fields, IpipConf, VxlanConf, WgMode,
    WireguardConf,
};

/// The supported types, as the refusals name them.
const SUPPORTED: &str = "vxlan, host-gw, wireguard, ipip, alloc, extension";

/// Types upstream (v0.20.2–v0.28) registers that flannel-rs declines, with why
/// and the nearest supported one.
pub const DECLINED: &[(&str, &str)] = &[
    (
        "udp",
        "a userspace tunnel (every packet crosses the agent), deprecated upstream and built only for amd64; use \"vxlan\" (in-kernel encapsulation, same topology)",
    ),
    (
        "ipsec",
        "it needs strongSwan's charon daemon beside the agent, which flannel-rs does not ship (k3s dropped it for the same reason); use \"wireguard\" for encrypted pod traffic",
    ),
    (
        "aws-vpc",
        "it programs AWS VPC route tables through the cloud API, which flannel-rs does not call; use \"host-gw\" when the nodes share one L2 subnet, else \"vxlan\" (or the cloud's own CNI)",
    ),
    (
        "gce",
        "it programs GCE network routes through the cloud API, which flannel-rs does not call; use \"host-gw\" when the nodes share one L2 subnet, else \"vxlan\" (or the cloud's own CNI)",
    ),
    (
        "ali-vpc",
        "it programs Alibaba Cloud VPC route tables through the cloud API, which flannel-rs does not call; use \"host-gw\" when the nodes share one L2 subnet, else \"vxlan\"",
    ),
    (
        "tencent-vpc",
        "it programs Tencent Cloud VPC route tables through the cloud API, which flannel-rs does not call; use \"host-gw\" when the nodes share one L2 subnet, else \"vxlan\"",
    ),
];

/// Spellings upstream's registry also answered to.
fn canonical(t: &str) -> &str {
    match t {
        "awsvpc" => "aws-vpc",
        "alivpc" => "ali-vpc",
        "tencentvpc" => "tencent-vpc",
        t => t,
    }
}

pub(super) fn backend(v: Option<&Value>) -> Result<BackendConf, ConfigError> {
    let map = match v {
        None | Some(Value::Null) => {
            return Err(declined("udp", " (the default when Backend is missing)"))
        }
        Some(Value::Object(m)) => m,
        Some(other) => return Err(err("Backend", format!("expected an object, got {other}"))),
    };
    let f = Fields(map);
    // Upstream lower-cases the type before looking it up ("VXLAN" works).
    let ty = f.string("Type")?.unwrap_or("udp").to_ascii_lowercase();
    match canonical(&ty) {
        "vxlan" => Ok(BackendConf::Vxlan(vxlan(&f)?)),
        "host-gw" => Ok(BackendConf::HostGw),
        "wireguard" => Ok(BackendConf::Wireguard(wireguard(&f)?)),
        "ipip" => Ok(BackendConf::Ipip(IpipConf {
            direct_routing: f.bool("DirectRouting", false).map_err(|e| ConfigError {
                field: format!("Backend.{}", e.field),
                reason: e.reason,
            })?,
        })),
        "alloc" => Ok(BackendConf::Alloc),
        "extension" => Ok(BackendConf::Extension(extension(&f)?)),
        t => Err(declined(t, "")),
    }
}

/// The refusal of a type: why, and what to use instead.
fn declined(t: &str, note: &str) -> ConfigError {
    let reason = match DECLINED.iter().find(|(name, _)| *name == t) {
        Some((_, why)) => format!(
            "backend type {t:?}{note} is declined by flannel-rs: {why} (supported: {SUPPORTED})"
        ),
        None => format!("unknown backend type {t:?} (flannel-rs supports {SUPPORTED})"),
    };
    err("Backend.Type", reason)
}

fn extension(f: &Fields) -> Result<ExtensionConf, ConfigError> {
    let rename = |e: ConfigError| ConfigError {
        field: format!("Backend.{}", e.field),
        reason: e.reason,
    };
    let cmd = |name: &str| -> Result<Option<String>, ConfigError> {
        Ok(f.string(name)
            .map_err(rename)?
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from))
    };
    let d = ExtensionConf::default();
    let timeout = match f.uint("CommandTimeout", 3600).map_err(rename)? {
        None | Some(0) => d.timeout,
        Some(s) => std::time::Duration::from_secs(s),
    };
    Ok(ExtensionConf {
        pre_startup: cmd("PreStartupCommand")?,
        post_startup: cmd("PostStartupCommand")?,
        subnet_add: cmd("SubnetAddCommand")?,
        subnet_remove: cmd("SubnetRemoveCommand")?,
        timeout,
    })
}

pub(super) fn vxlan(f: &Fields) -> Result<VxlanConf, ConfigError> {
    let field = |name: &str| format!("Backend.{name}");
    let rename = |e: ConfigError| ConfigError {
        field: field(&e.field),
        reason: e.reason,
    };
    let vni = f.uint("VNI", (1 << 24) - 1).map_err(rename)?.unwrap_or(1) as u32;
    let port = f.uint("Port", 65535).map_err(rename)?.unwrap_or(0) as u16;
    let mtu = match f.uint("MTU", 65535).map_err(rename)? {
        None | Some(0) => None,
        Some(m) if m < 68 => {
            return Err(err(
                &field("MTU"),
                format!("{m} is below the IPv4 minimum of 68"),
            ))
        }
        Some(m) => Some(m as u32),
    };
    let mac_prefix = match f.string("MacPrefix").map_err(rename)? {
        None | Some("") => None,
        Some(s) => Some(parse_mac_prefix(s).map_err(|r| err(&field("MacPrefix"), r))?),
    };
    Ok(VxlanConf {
        vni,
        port,
        gbp: f.bool("GBP", false).map_err(rename)?,
        learning: f.bool("Learning", false).map_err(rename)?,
        direct_routing: f.bool("DirectRouting", false).map_err(rename)?,
        mtu,
        mac_prefix,
    })
}

fn wireguard(f: &Fields) -> Result<WireguardConf, ConfigError> {
    let field = |name: &str| format!("Backend.{name}");
    let rename = |e: ConfigError| ConfigError {
        field: field(&e.field),
        reason: e.reason,
    };
    let d = WireguardConf::default();
    let port = |name: &str, default: u16| -> Result<u16, ConfigError> {
        match f.uint(name, 65535).map_err(rename)? {
            None | Some(0) => Ok(default),
            Some(p) => Ok(p as u16),
        }
    };
    let psk = match f.string("PSK").map_err(rename)? {
        None | Some("") => None,
        Some(s) => Some(
            crate::backend::wireguard::key::decode(s)
                .map_err(|r| err(&field("PSK"), format!("not a WireGuard key: {r}")))?,
        ),
    };
    let mode = match f.string("Mode").map_err(rename)? {
        None | Some("") | Some("separate") => WgMode::Separate,
        Some("auto") => WgMode::Auto,
        Some("ipv4") => WgMode::Ipv4,
        Some("ipv6") => WgMode::Ipv6,
        Some(m) => {
            return Err(err(
                &field("Mode"),
                format!("{m:?} is not one of separate, auto, ipv4, ipv6"),
            ))
        }
    };
    let mtu = match f.uint("MTU", 65535).map_err(rename)? {
        None | Some(0) => None,
        Some(m) if m < 148 => {
            return Err(err(
                &field("MTU"),
                format!("{m} leaves less than IPv4's 68 bytes after WireGuard's 80-byte overhead"),
            ))
        }
        Some(m) => Some(m as u32),
    };
    Ok(WireguardConf {
        psk,
        listen_port: port("ListenPort", d.listen_port)?,
        listen_port_v6: port("ListenPortV6", d.listen_port_v6)?,
        keepalive: f
            .uint("PersistentKeepaliveInterval", 65535)
            .map_err(rename)?
            .unwrap_or(0) as u16,
        mode,
        mtu,
    })
}

fn parse_mac_prefix(s: &str) -> Result<Vec<u8>, String> {
    let bytes: Result<Vec<u8>, _> = s.split(':').map(|b| u8::from_str_radix(b, 16)).collect();
    match bytes {
        Ok(b) if !b.is_empty() && b.len() <= 5 && s.split(':').all(|p| p.len() == 2) => {
            if b[0] & 1 == 1 {
                Err(format!("{s:?} is a multicast prefix"))
            } else {
                Ok(b)
            }
        }
        _ => Err(format!("{s:?} is not a MAC prefix like 0E:2A")),
    }
}
