//! What a Node object says, as any API client may have written it: the lite
//! decoding of Nodes and the peer lease read from annotations and podCIDRs
//! (pure; hostile input is an error, never a panic).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::lease::{BackendData, Lease};
use crate::manager::PeerRead;

/// Annotation names (after the prefix).
pub mod names {
    pub const SUBNET_MANAGER: &str = "kube-subnet-manager";
    pub const BACKEND_TYPE: &str = "backend-type";
    pub const BACKEND_DATA: &str = "backend-data";
    pub const BACKEND_V6_DATA: &str = "backend-v6-data";
    pub const PUBLIC_IP: &str = "public-ip";
    pub const PUBLIC_IPV6: &str = "public-ipv6";
    pub const PUBLIC_IP_OVERWRITE: &str = "public-ip-overwrite";
    pub const PUBLIC_IPV6_OVERWRITE: &str = "public-ipv6-overwrite";
    /// Set by an admin (upstream v0.25.2+): used as `--public-ip` at start.
    pub const NODE_PUBLIC_IP: &str = "node-public-ip";
    pub const NODE_PUBLIC_IPV6: &str = "node-public-ipv6";
}

/// Only the parts of a Node a flanneld reads; the rest of the object (status,
/// images, conditions) is skipped while decoding.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct NodeLite {
    #[serde(deserialize_with = "meta_lite")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<NodeSpecLite>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct NodeSpecLite {
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
}

impl kube::Resource for NodeLite {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        "Node".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "nodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Decodes only the metadata fields flanneld reads; `managedFields`, labels and
/// the rest are skipped by the parser instead of being built and dropped.
fn meta_lite<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct MetaLite {
        name: Option<String>,
        resource_version: Option<String>,
        creation_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
        annotations: Option<BTreeMap<String, String>>,
    }
    let m = MetaLite::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        resource_version: m.resource_version,
        creation_timestamp: m.creation_timestamp,
        annotations: m.annotations,
        ..Default::default()
    })
}

/// The `node-public-ip(v6)` annotations of a node (`prefix` ends in `/`), and
/// a warning per malformed one.
pub fn assigned_public_ips(
    annotations: Option<&BTreeMap<String, String>>,
    prefix: &str,
) -> ((Option<Ipv4Addr>, Option<Ipv6Addr>), Vec<String>) {
    let mut warnings = Vec::new();
    let mut read = |name: &str, v6: bool| -> Option<IpAddr> {
        let key = format!("{prefix}{name}");
        let v = annotations?.get(&key)?.trim();
        if v.is_empty() {
            return None;
        }
        match v.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == v6 => Some(ip),
            _ => {
                let fam = if v6 { "IPv6" } else { "IPv4" };
                warnings.push(format!(
                    "ignoring annotation {key}: {v:?} is not an {fam} address"
                ));
                None
            }
        }
    };
    let v4 = match read(names::NODE_PUBLIC_IP, false) {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    };
    let v6 = match read(names::NODE_PUBLIC_IPV6, true) {
        Some(IpAddr::V6(a)) => Some(a),
        _ => None,
    };
    ((v4, v6), warnings)
}

/// The pod CIDRs of a node, per family.
pub fn pod_cidrs(
    pod_cidr: Option<&str>,
    pod_cidrs: &[String],
) -> Result<(Option<IpNetwork>, Option<IpNetwork>), String> {
    let mut v4 = None;
    let mut v6 = None;
    for s in pod_cidr
        .into_iter()
        .chain(pod_cidrs.iter().map(String::as_str))
    {
        let n: IpNetwork = s
            .parse()
            .map_err(|_| format!("podCIDR {s:?} is not a CIDR"))?;
        let slot = if n.is_ipv4() { &mut v4 } else { &mut v6 };
        if slot.is_none() {
            *slot = Some(n);
        }
    }
    Ok((v4, v6))
}

/// Reads a peer's lease from its annotations and podCIDRs (pure; hostile input safe).
pub fn lease_from_node(
    prefix: &str,
    annotations: &BTreeMap<String, String>,
    pod_cidr: Option<&str>,
    pod_cidrs_list: &[String],
) -> PeerRead {
    let get = |n: &str| annotations.get(&format!("{prefix}{n}")).map(String::as_str);
    if get(names::SUBNET_MANAGER) != Some("true") {
        return Ok(None);
    }
    let ty = get(names::BACKEND_TYPE).ok_or("no backend-type annotation")?;
    let (v4, v6) = pod_cidrs(pod_cidr, pod_cidrs_list)?;
    if v4.is_none() && v6.is_none() {
        return Err("no podCIDR".into());
    }
    let mut lease = Lease {
        subnet: None,
        ipv6_subnet: None,
        public_ip: None,
        public_ipv6: None,
        backend: BackendData::HostGw,
        backend_v6: None,
    };
    if let Some(n) =
        v4.filter(|_| get(names::BACKEND_DATA).is_some() || get(names::PUBLIC_IP).is_some())
    {
        let data = get(names::BACKEND_DATA).ok_or("no backend-data annotation")?;
        lease.backend = BackendData::parse(ty, data)?;
        let ip = get(names::PUBLIC_IP).ok_or("no public-ip annotation")?;
        lease.public_ip = Some(
            ip.parse::<Ipv4Addr>()
                .map_err(|_| format!("public-ip {ip:?} is not an IPv4 address"))?,
        );
        lease.subnet = Some(n);
    }
    if let Some(n) =
        v6.filter(|_| get(names::BACKEND_V6_DATA).is_some() || get(names::PUBLIC_IPV6).is_some())
    {
        let data = get(names::BACKEND_V6_DATA).ok_or("no backend-v6-data annotation")?;
        let d = BackendData::parse(ty, data)?;
        let ip = get(names::PUBLIC_IPV6).ok_or("no public-ipv6 annotation")?;
        lease.public_ipv6 = Some(
            ip.parse::<Ipv6Addr>()
                .map_err(|_| format!("public-ipv6 {ip:?} is not an IPv6 address"))?,
        );
        lease.ipv6_subnet = Some(n);
        if lease.subnet.is_none() {
            lease.backend = d.clone();
        }
        lease.backend_v6 = Some(d);
    }
    if lease.subnet.is_none() && lease.ipv6_subnet.is_none() {
        return Err("no backend-data / public-ip annotations for its podCIDR".into());
    }
    Ok(Some(lease))
}
