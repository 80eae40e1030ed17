//! net-conf.json: the network configuration, with upstream flannel's defaults and checks.
//!
//! Go's encoding/json matches object keys case-insensitively, so `"network"`
//! works upstream; it works here too (an exact-case key wins).

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{Map, Value};

use crate::subnet::{self, SubnetRange};

mod backend;
pub use backend::DECLINED;

/// A net-conf field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("net-conf: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// The subnets one address family hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub network: IpNetwork,
    pub subnet_len: u8,
    pub subnet_min: IpAddr,
    pub subnet_max: IpAddr,
}

impl Pool {
    pub fn range(&self) -> SubnetRange {
        SubnetRange {
            min: self.subnet_min,
            max: self.subnet_max,
            len: self.subnet_len,
        }
    }
}

/// vxlan backend settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConf {
    pub vni: u32,
    /// 0 = the kernel's default (8472 on Linux).
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
    /// Override of the device MTU (newer upstream); None = underlay MTU − overhead.
    pub mtu: Option<u32>,
    /// First bytes of the VTEP MAC (newer upstream); None = random locally administered.
    pub mac_prefix: Option<Vec<u8>>,
}

impl Default for VxlanConf {
    fn default() -> Self {
        VxlanConf {
            vni: 1,
            port: 0,
            gbp: false,
            learning: false,
            direct_routing: false,
            mtu: None,
            mac_prefix: None,
        }
    }
}

/// Which devices the wireguard backend uses (upstream's `Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgMode {
    /// `flannel-wg` for IPv4, `flannel-wg-v6` for IPv6 (the default).
    Separate,
    /// One device `flannel-wg`; a peer is reached over IPv4 unless its IPv4 is
    /// private and both its IPv6 and ours are public.
    Auto,
    /// One device, peers reached over IPv4.
    Ipv4,
    /// One device, peers reached over IPv6.
    Ipv6,
}

/// Forcing the kernel or the userspace WireGuard (`FLANNEL_WG_IMPL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WgImpl {
    /// The kernel's, or userspace when the kernel cannot create the link.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

/// wireguard backend settings (upstream's names and defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConf {
    /// One base64 32-byte preshared key for the cluster (`PSK`).
    pub psk: Option<[u8; 32]>,
    pub listen_port: u16,
    pub listen_port_v6: u16,
    /// Seconds; 0 = off.
    pub keepalive: u16,
    pub mode: WgMode,
    /// Override of the underlay MTU the overhead is taken from (v0.21+ `MTU`).
    pub mtu: Option<u32>,
}

impl Default for WireguardConf {
    fn default() -> Self {
        WireguardConf {
            psk: None,
            listen_port: 51820,
            listen_port_v6: 51821,
            keepalive: 0,
            mode: WgMode::Separate,
            mtu: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConf {
    Vxlan(VxlanConf),
    HostGw,
    Wireguard(WireguardConf),
    Ipip(IpipConf),
    /// Leases only: no dataplane (someone else routes the pod subnets).
    Alloc,
    Extension(ExtensionConf),
}

/// ipip backend settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpipConf {
    /// host-gw routes to peers on the same L2 subnet, the tunnel to the rest.
    pub direct_routing: bool,
}

/// extension backend: upstream's four commands (each run by `sh -c`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionConf {
    pub pre_startup: Option<String>,
    pub post_startup: Option<String>,
    pub subnet_add: Option<String>,
    pub subnet_remove: Option<String>,
    /// How long one command may run before it is killed (`CommandTimeout`,
    /// seconds; flannel-rs only — upstream waits forever and ignores the key).
    pub timeout: std::time::Duration,
}

impl Default for ExtensionConf {
    fn default() -> Self {
        ExtensionConf {
            pre_startup: None,
            post_startup: None,
            subnet_add: None,
            subnet_remove: None,
            timeout: std::time::Duration::from_secs(30),
        }
    }
}

impl BackendConf {
    /// The name used in annotations and etcd values.
    pub fn type_name(&self) -> &'static str {
        match self {
            BackendConf::Vxlan(_) => "vxlan",
            BackendConf::HostGw => "host-gw",
            BackendConf::Wireguard(_) => "wireguard",
            BackendConf::Ipip(_) => "ipip",
            // Upstream's alloc publishes no backend type.
            BackendConf::Alloc => "",
            BackendConf::Extension(_) => "extension",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    pub v4: Option<Pool>,
    pub v6: Option<Pool>,
    pub backend: BackendConf,
    pub enable_nftables: bool,
}

/// Case-insensitive view of a JSON object, as Go decodes it.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).or_else(|| {
            self.0
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
    }
    fn string(&self, name: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(err(name, format!("expected a string, got {v}"))),
        }
    }
    fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(err(name, format!("expected true or false, got {v}"))),
        }
    }
    fn uint(&self, name: &str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= max => Ok(Some(v)),
                _ => Err(err(
                    name,
                    format!("{n} is not a whole number between 0 and {max}"),
                )),
            },
            Some(v) => Err(err(name, format!("expected a number, got {v}"))),
        }
    }
}

impl NetConf {
    /// Parses and validates net-conf JSON text.
    pub fn parse(text: &str) -> Result<NetConf, ConfigError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| err("net-conf.json", format!("invalid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(err("net-conf.json", "expected a JSON object"));
        };
        let f = Fields(&map);
        let enable_v4 = f.bool("EnableIPv4", true)?;
        let enable_v6 = f.bool("EnableIPv6", false)?;
        if !enable_v4 && !enable_v6 {
            return Err(err(
                "EnableIPv4",
                "both EnableIPv4 and EnableIPv6 are false; enable at least one family",
            ));
        }
        if f.get("Networks").is_some() || f.get("IPv6Networks").is_some() {
            return Err(err(
                "Networks",
                "multiple networks are not supported by flannel-rs; use Network",
            ));
        }
        let v4 = if enable_v4 {
            Some(pool(&f, Family::V4)?)
        } else {
            None
        };
        let v6 = if enable_v6 {
            Some(pool(&f, Family::V6)?)
        } else {
            None
        };
        let backend = backend::backend(f.get("Backend"))?;
        if matches!(backend, BackendConf::Ipip(_)) && (v6.is_some() || v4.is_none()) {
            return Err(err(
                "EnableIPv6",
                "the ipip backend carries IPv4 only (as upstream's); use vxlan or wireguard for IPv6",
            ));
        }
        let enable_nftables = f.bool("EnableNFTables", false)?;
        Ok(NetConf {
            v4,
            v6,
            backend,
            enable_nftables,
        })
    }

    pub fn from_file(path: &std::path::Path) -> Result<NetConf, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(
                "net-conf.json",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Self::parse(&text)
    }
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

struct FamilyNames {
    network: &'static str,
    len: &'static str,
    min: &'static str,
    max: &'static str,
    width: u8,
    default_len: u8,
    /// Largest prefix that still leaves room for four subnets of the smallest size.
    max_prefix: u8,
    max_len: u8,
}

impl Family {
    fn names(self) -> FamilyNames {
        match self {
            Family::V4 => FamilyNames {
                network: "Network",
                len: "SubnetLen",
                min: "SubnetMin",
                max: "SubnetMax",
                width: 32,
                default_len: 24,
                max_prefix: 28,
                max_len: 30,
            },
            Family::V6 => FamilyNames {
                network: "IPv6Network",
                len: "IPv6SubnetLen",
                min: "IPv6SubnetMin",
                max: "IPv6SubnetMax",
                width: 128,
                default_len: 64,
                max_prefix: 124,
                max_len: 126,
            },
        }
    }
}

fn parse_addr(field: &str, s: &str, want_v4: bool) -> Result<IpAddr, ConfigError> {
    let a: IpAddr = s
        .parse()
        .map_err(|_| err(field, format!("{s:?} is not an IP address")))?;
    if a.is_ipv4() != want_v4 {
        return Err(err(
            field,
            format!("{s} is not an IPv{} address", if want_v4 { 4 } else { 6 }),
        ));
    }
    Ok(a)
}

fn pool(f: &Fields, fam: Family) -> Result<Pool, ConfigError> {
    let n = fam.names();
    let want_v4 = matches!(fam, Family::V4);
    let text = f.string(n.network)?.ok_or_else(|| {
        err(
            n.network,
            "missing; please define the network to hand out subnets from",
        )
    })?;
    let network: IpNetwork = text
        .parse()
        .map_err(|_| err(n.network, format!("{text:?} is not a CIDR")))?;
    if network.is_ipv4() != want_v4 {
        return Err(err(
            n.network,
            format!(
                "{text} is not an IPv{} network",
                if want_v4 { 4 } else { 6 }
            ),
        ));
    }
    if !subnet::is_canonical(&network) {
        return Err(err(
            n.network,
            format!(
                "{text} has host bits set (did you mean {}/{}?)",
                network.network(),
                network.prefix()
            ),
        ));
    }
    let prefix = network.prefix();
    let subnet_len = match f.uint(n.len, 255)? {
        Some(0) | None => {
            if prefix > n.max_prefix {
                return Err(err(
                    n.network,
                    format!(
                        "{text} is too small; the minimum useful network prefix is /{}",
                        n.max_prefix
                    ),
                ));
            }
            if prefix <= n.default_len - 2 {
                n.default_len
            } else {
                prefix + 2
            }
        }
        Some(len) => {
            let len = len as u8;
            if len > n.max_len {
                return Err(err(
                    n.len,
                    format!("/{len} is too long; it must be at most /{}", n.max_len),
                ));
            }
            if len < prefix + 2 {
                return Err(err(
                    n.len,
                    format!("/{len} is too short for {text}; the network must hold at least four subnets (use /{} or longer)", prefix + 2),
                ));
            }
            len
        }
    };
    let step = 1u128 << (n.width - subnet_len);
    let (first, last) = subnet::range(&network);
    let bound = |field: &str, default: u128| -> Result<IpAddr, ConfigError> {
        let addr = match f.string(field)? {
            None | Some("") => return Ok(subnet::from_u128(network.ip(), default)),
            Some(s) => parse_addr(field, s, want_v4)?,
        };
        if !network.contains(addr) {
            return Err(err(
                field,
                format!("{addr} is not in the range of the network {network}"),
            ));
        }
        if (subnet::to_u128(addr) - first) % step != 0 {
            return Err(err(
                field,
                format!("{addr} is not on a /{subnet_len} boundary"),
            ));
        }
        Ok(addr)
    };
    let subnet_min = bound(n.min, first + step)?;
    let subnet_max = bound(n.max, last + 1 - step)?;
    if subnet::to_u128(subnet_min) > subnet::to_u128(subnet_max) {
        return Err(err(
            n.min,
            format!("{subnet_min} is above {} {subnet_max}", n.max),
        ));
    }
    Ok(Pool {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> NetConf {
        NetConf::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn bad(s: &str) -> ConfigError {
        NetConf::parse(s).expect_err(s)
    }
    const VX: &str = r#""Backend":{"Type":"vxlan"}"#;

    #[test]
    fn seed_config_defaults() {
        let c = ok(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let p = c.v4.unwrap();
        assert_eq!(p.network.to_string(), "10.244.0.0/16");
        assert_eq!(p.subnet_len, 24);
        assert_eq!(p.subnet_min.to_string(), "10.244.1.0");
        assert_eq!(p.subnet_max.to_string(), "10.244.255.0");
        assert!(c.v6.is_none());
        assert_eq!(c.backend, BackendConf::Vxlan(VxlanConf::default()));
        assert!(!c.enable_nftables);
    }

    #[test]
    fn subnet_len_defaults_follow_prefix() {
        assert_eq!(
            ok(&format!(r#"{{"Network":"10.0.0.0/22",{VX}}}"#))
                .v4
                .unwrap()
                .subnet_len,
            24
        );
        assert_eq!(
            ok(&format!(r#"{{"Network":"10.0.0.0/23",{VX}}}"#))
                .v4
                .unwrap()
                .subnet_len,
            25
        );
        assert_eq!(
            ok(&format!(r#"{{"Network":"10.0.0.0/28",{VX}}}"#))
                .v4
                .unwrap()
                .subnet_len,
            30
        );
        let e = bad(&format!(r#"{{"Network":"10.0.0.0/29",{VX}}}"#));
        assert_eq!(e.field, "Network");
        assert!(e.reason.contains("too small"));
    }

    #[test]
    fn explicit_subnet_len_bounds() {
        assert_eq!(
            ok(&format!(
                r#"{{"Network":"10.0.0.0/8","SubnetLen":20,{VX}}}"#
            ))
            .v4
            .unwrap()
            .subnet_len,
            20
        );
        let e = bad(&format!(
            r#"{{"Network":"10.0.0.0/8","SubnetLen":31,{VX}}}"#
        ));
        assert_eq!(e.field, "SubnetLen");
        let e = bad(&format!(
            r#"{{"Network":"10.244.0.0/16","SubnetLen":16,{VX}}}"#
        ));
        assert_eq!(e.field, "SubnetLen");
        assert!(e.to_string().contains("/16"));
        let e = bad(&format!(
            r#"{{"Network":"10.244.0.0/16","SubnetLen":17,{VX}}}"#
        ));
        assert_eq!(e.field, "SubnetLen");
        assert_eq!(
            ok(&format!(
                r#"{{"Network":"10.244.0.0/16","SubnetLen":18,{VX}}}"#
            ))
            .v4
            .unwrap()
            .subnet_len,
            18
        );
    }

    #[test]
    fn subnet_min_max() {
        let c = ok(&format!(
            r#"{{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.20.0",{VX}}}"#
        ));
        let p = c.v4.unwrap();
        assert_eq!(p.range().count(), 11);
        for (json, field) in [
            (r#""SubnetMin":"10.245.0.0""#, "SubnetMin"),
            (r#""SubnetMax":"10.0.0.0""#, "SubnetMax"),
            (r#""SubnetMin":"10.244.1.7""#, "SubnetMin"),
            (
                r#""SubnetMin":"10.244.20.0","SubnetMax":"10.244.10.0""#,
                "SubnetMin",
            ),
            (r#""SubnetMin":"banana""#, "SubnetMin"),
            (r#""SubnetMin":"fd00::""#, "SubnetMin"),
            (r#""SubnetMin":5"#, "SubnetMin"),
        ] {
            let e = bad(&format!(r#"{{"Network":"10.244.0.0/16",{json},{VX}}}"#));
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn network_errors_name_the_field() {
        assert_eq!(bad(&format!(r#"{{{VX}}}"#)).field, "Network");
        assert_eq!(
            bad(&format!(r#"{{"Network":"10.244.0.0",{VX}}}"#)).field,
            "Network"
        );
        assert_eq!(
            bad(&format!(r#"{{"Network":"10.244.1.0/16",{VX}}}"#)).field,
            "Network"
        );
        assert_eq!(
            bad(&format!(r#"{{"Network":"fd00::/48",{VX}}}"#)).field,
            "Network"
        );
        assert_eq!(bad(&format!(r#"{{"Network":16,{VX}}}"#)).field, "Network");
        assert_eq!(bad("{not json").field, "net-conf.json");
        assert_eq!(bad("[]").field, "net-conf.json");
        assert_eq!(bad("").field, "net-conf.json");
        let e = bad(r#"{"Network":"10.244.0.0/16"}"#);
        assert_eq!(e.field, "Backend.Type");
        assert!(e.reason.contains("udp"));
        let e = bad(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"carrier-pigeon"}}"#);
        assert_eq!(e.field, "Backend.Type");
        assert!(e.to_string().contains("carrier-pigeon"));
        assert_eq!(
            bad(r#"{"Network":"10.244.0.0/16","Backend":"vxlan"}"#).field,
            "Backend"
        );
        assert_eq!(
            bad(r#"{"Network":"10.244.0.0/16","EnableIPv4":"yes","Backend":{"Type":"vxlan"}}"#)
                .field,
            "EnableIPv4"
        );
    }

    #[test]
    fn keys_are_case_insensitive_like_go() {
        let c = ok(r#"{"network":"10.1.0.0/16","backend":{"type":"host-gw"}}"#);
        assert_eq!(c.v4.unwrap().network.to_string(), "10.1.0.0/16");
        assert_eq!(c.backend, BackendConf::HostGw);
    }

    #[test]
    fn wireguard_fields_and_defaults() {
        let c = ok(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#);
        assert_eq!(c.backend, BackendConf::Wireguard(WireguardConf::default()));
        assert_eq!(c.backend.type_name(), "wireguard");
        let c = ok(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","ListenPort":5000,"ListenPortV6":5001,"PersistentKeepaliveInterval":25,"Mode":"auto","MTU":1400}}"#,
        );
        let BackendConf::Wireguard(w) = c.backend else {
            panic!()
        };
        let mut psk = [0u8; 32];
        for (i, b) in psk.iter_mut().enumerate() {
            *b = i as u8;
        }
        assert_eq!(
            w,
            WireguardConf {
                psk: Some(psk),
                listen_port: 5000,
                listen_port_v6: 5001,
                keepalive: 25,
                mode: WgMode::Auto,
                mtu: Some(1400),
            }
        );
        for (json, field) in [
            (r#""PSK":"c2hvcnQ=""#, "Backend.PSK"),
            (r#""PSK":7"#, "Backend.PSK"),
            (r#""Mode":"both""#, "Backend.Mode"),
            (r#""ListenPort":70000"#, "Backend.ListenPort"),
            (r#""MTU":100"#, "Backend.MTU"),
            (
                r#""PersistentKeepaliveInterval":-1"#,
                "Backend.PersistentKeepaliveInterval",
            ),
        ] {
            let e = bad(&format!(
                r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard",{json}}}}}"#
            ));
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn vxlan_fields() {
        let c = ok(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"GBP":true,"Learning":true,"DirectRouting":true,"MTU":1400,"MacPrefix":"0E:2A"}}"#,
        );
        let BackendConf::Vxlan(v) = c.backend else {
            panic!()
        };
        assert_eq!(
            (v.vni, v.port, v.gbp, v.learning, v.direct_routing, v.mtu),
            (4096, 4789, true, true, true, Some(1400))
        );
        assert_eq!(v.mac_prefix, Some(vec![0x0e, 0x2a]));
        for (json, field) in [
            (r#""VNI":16777216"#, "Backend.VNI"),
            (r#""VNI":-1"#, "Backend.VNI"),
            (r#""Port":70000"#, "Backend.Port"),
            (r#""GBP":"yes""#, "Backend.GBP"),
            (r#""DirectRouting":1"#, "Backend.DirectRouting"),
            (r#""MTU":10"#, "Backend.MTU"),
            (r#""MacPrefix":"01:00""#, "Backend.MacPrefix"),
            (r#""MacPrefix":"zz""#, "Backend.MacPrefix"),
        ] {
            let e = bad(&format!(
                r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"vxlan",{json}}}}}"#
            ));
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn ipv6_and_dual_stack() {
        let c = ok(
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        );
        let p6 = c.v6.unwrap();
        assert_eq!(p6.subnet_len, 64);
        assert_eq!(p6.subnet_min.to_string(), "fd00:10:244:1::");
        assert_eq!(p6.subnet_max.to_string(), "fd00:10:244:ff::");
        let c = ok(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/120","Backend":{"Type":"host-gw"}}"#,
        );
        assert!(c.v4.is_none());
        assert_eq!(c.v6.unwrap().subnet_len, 122);
        assert_eq!(
            bad(r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
                .field,
            "IPv6Network"
        );
        assert_eq!(bad(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/125","Backend":{"Type":"vxlan"}}"#).field, "IPv6Network");
        assert_eq!(bad(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetLen":127,"Backend":{"Type":"vxlan"}}"#).field, "IPv6SubnetLen");
        assert_eq!(bad(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd01::","Backend":{"Type":"vxlan"}}"#).field, "IPv6SubnetMin");
        assert_eq!(
            bad(r#"{"EnableIPv4":false,"EnableIPv6":false,"Backend":{"Type":"vxlan"}}"#).field,
            "EnableIPv4"
        );
        assert!(
            ok(r#"{"Network":"10.0.0.0/8","EnableNFTables":true,"Backend":{"Type":"host-gw"}}"#)
                .enable_nftables
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_is_refused_with_a_reason(s in ".{0,200}") {
            // Not a JSON object with a Network: always an error that says something.
            if let Err(e) = NetConf::parse(&s) {
                proptest::prop_assert!(!e.to_string().is_empty());
            } else {
                proptest::prop_assert!(s.contains("Network"));
            }
        }

        #[test]
        fn never_panics_on_structured_input(
            net in "[0-9./:a-f]{0,20}", len in proptest::option::of(0u64..300),
            min in "[0-9./:a-f]{0,20}", ty in "(vxlan|host-gw|udp|x)", vni in 0i64..20_000_000, v6 in proptest::bool::ANY,
        ) {
            let len = len.map(|l| format!(r#","SubnetLen":{l}"#)).unwrap_or_default();
            let s = format!(r#"{{"Network":"{net}"{len},"SubnetMin":"{min}","EnableIPv6":{v6},"IPv6Network":"{net}","Backend":{{"Type":"{ty}","VNI":{vni}}}}}"#);
            if let Ok(c) = NetConf::parse(&s) {
                let p = c.v4.unwrap();
                proptest::prop_assert!(p.range().count() >= 1);
                proptest::prop_assert!(p.network.contains(p.subnet_min) && p.network.contains(p.subnet_max));
            }
        }
    }

    fn backend_of(b: &str) -> Result<BackendConf, ConfigError> {
        NetConf::parse(&format!(r#"{{"Network":"10.244.0.0/16","Backend":{b}}}"#))
            .map(|c| c.backend)
    }

    #[test]
    fn declined_backends_say_why_and_what_instead() {
        for (t, instead) in [
            ("udp", "vxlan"),
            ("ipsec", "wireguard"),
            ("aws-vpc", "host-gw"),
            ("awsvpc", "host-gw"),
            ("gce", "host-gw"),
            ("ali-vpc", "host-gw"),
            ("alivpc", "host-gw"),
            ("tencent-vpc", "host-gw"),
            ("tencentvpc", "host-gw"),
        ] {
            let e = backend_of(&format!(r#"{{"Type":"{t}"}}"#)).unwrap_err();
            assert_eq!(e.field, "Backend.Type");
            assert!(e.reason.contains("declined"), "{t}: {e}");
            assert!(e.reason.contains(&format!("use \"{instead}\"")), "{t}: {e}");
        }
        // Every declined type has a reason that names a supported alternative.
        for (t, why) in DECLINED {
            assert!(why.contains("use \""), "{t}");
        }
    }

    #[test]
    fn type_is_matched_case_insensitively_like_upstream() {
        assert_eq!(
            backend_of(r#"{"Type":"VXLAN"}"#),
            Ok(BackendConf::Vxlan(VxlanConf::default()))
        );
        assert_eq!(backend_of(r#"{"Type":"Host-GW"}"#), Ok(BackendConf::HostGw));
        assert_eq!(backend_of(r#"{"Type":"Alloc"}"#), Ok(BackendConf::Alloc));
    }

    /// Every net-conf key upstream v0.28 reads (and v0.20.2's multi-network
    /// keys) is either honoured — its value shows in the parsed config — or
    /// refused with a message naming it.
    #[test]
    fn every_upstream_key_is_honoured_or_refused() {
        let c = ok(
            r#"{"EnableIPv4":true,"EnableIPv6":true,"EnableNFTables":true,
            "Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.1.0","SubnetMax":"10.100.9.0",
            "IPv6Network":"fd00:100::/56","IPv6SubnetLen":64,"IPv6SubnetMin":"fd00:100:0:2::","IPv6SubnetMax":"fd00:100:0:9::",
            "Backend":{"Type":"host-gw"}}"#,
        );
        let (p4, p6) = (c.v4.unwrap(), c.v6.unwrap());
        assert!(c.enable_nftables);
        assert_eq!(
            (
                p4.network.to_string(),
                p4.subnet_len,
                p4.subnet_min.to_string(),
                p4.subnet_max.to_string()
            ),
            (
                "10.100.0.0/16".into(),
                25,
                "10.100.1.0".into(),
                "10.100.9.0".into()
            )
        );
        assert_eq!(
            (
                p6.network.to_string(),
                p6.subnet_len,
                p6.subnet_min.to_string(),
                p6.subnet_max.to_string()
            ),
            (
                "fd00:100::/56".into(),
                64,
                "fd00:100:0:2::".into(),
                "fd00:100:0:9::".into()
            )
        );
        for k in ["Networks", "IPv6Networks"] {
            let e = bad(&format!(
                r#"{{"Network":"10.244.0.0/16","{k}":["10.244.0.0/16"],{VX}}}"#
            ));
            assert_eq!(e.field, "Networks", "{k}");
        }
        // Backend fields, per type.
        let vx = backend_of(
            r#"{"Type":"vxlan","VNI":7,"Port":4789,"MTU":1400,"GBP":true,"Learning":true,"DirectRouting":true}"#,
        );
        assert_eq!(
            vx,
            Ok(BackendConf::Vxlan(VxlanConf {
                vni: 7,
                port: 4789,
                gbp: true,
                learning: true,
                direct_routing: true,
                mtu: Some(1400),
                mac_prefix: None,
            }))
        );
        let BackendConf::Wireguard(wg) = backend_of(
            r#"{"Type":"wireguard","ListenPort":5000,"ListenPortV6":5001,"MTU":1400,"PSK":"","PersistentKeepaliveInterval":25,"Mode":"auto"}"#,
        )
        .unwrap() else {
            panic!("not wireguard")
        };
        assert_eq!(
            (
                wg.listen_port,
                wg.listen_port_v6,
                wg.mtu,
                wg.keepalive,
                wg.mode
            ),
            (5000, 5001, Some(1400), 25, WgMode::Auto)
        );
        assert_eq!(
            backend_of(r#"{"Type":"ipip","DirectRouting":true}"#),
            Ok(BackendConf::Ipip(IpipConf {
                direct_routing: true
            }))
        );
        let BackendConf::Extension(x) = backend_of(
            r#"{"Type":"extension","PreStartupCommand":"a","PostStartupCommand":"b","SubnetAddCommand":"c","SubnetRemoveCommand":"d","CommandTimeout":5}"#,
        )
        .unwrap() else {
            panic!("not extension")
        };
        assert_eq!(
            (
                x.pre_startup,
                x.post_startup,
                x.subnet_add,
                x.subnet_remove,
                x.timeout
            ),
            (
                Some("a".into()),
                Some("b".into()),
                Some("c".into()),
                Some("d".into()),
                std::time::Duration::from_secs(5)
            )
        );
        assert_eq!(backend_of(r#"{"Type":"alloc"}"#), Ok(BackendConf::Alloc));
        // The declined types' own fields never get as far as being ignored.
        for b in [
            r#"{"Type":"udp","Port":8285}"#,
            r#"{"Type":"ipsec","PSK":"x","UDPEncap":true,"ESPProposal":"aes128gcm16-sha256-prfsha256-ecp256"}"#,
            r#"{"Type":"tencent-vpc","AccessKeyID":"a","AccessKeySecret":"b"}"#,
        ] {
            assert!(
                backend_of(b).unwrap_err().reason.contains("declined"),
                "{b}"
            );
        }
    }

    #[test]
    fn extension_fields_are_checked() {
        let e = backend_of(r#"{"Type":"extension","SubnetAddCommand":7}"#).unwrap_err();
        assert_eq!(e.field, "Backend.SubnetAddCommand");
        let e = backend_of(r#"{"Type":"extension","CommandTimeout":-1}"#).unwrap_err();
        assert_eq!(e.field, "Backend.CommandTimeout");
        // Blank commands are no commands; the default timeout is 30 s.
        assert_eq!(
            backend_of(r#"{"Type":"extension","PreStartupCommand":"  "}"#),
            Ok(BackendConf::Extension(ExtensionConf::default()))
        );
        let e = backend_of(r#"{"Type":"ipip","DirectRouting":"yes"}"#).unwrap_err();
        assert_eq!(e.field, "Backend.DirectRouting");
    }

    #[test]
    fn ipip_is_ipv4_only() {
        let e = bad(
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:10::/56","Backend":{"Type":"ipip"}}"#,
        );
        assert!(e.reason.contains("IPv4 only"), "{e}");
        let e = bad(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"ipip"}}"#,
        );
        assert!(e.reason.contains("IPv4 only"), "{e}");
    }
}
