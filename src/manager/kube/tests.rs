//! Reading Nodes: annotations and podCIDRs, good and hostile.

use super::*;

const P: &str = "flannel.alpha.coreos.com/";

fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (format!("{P}{k}"), v.to_string()))
        .collect()
}

fn good() -> BTreeMap<String, String> {
    ann(&[
        ("kube-subnet-manager", "true"),
        ("backend-type", "vxlan"),
        ("backend-data", r#"{"VNI":1,"VtepMAC":"82:cd:b6:82:3c:70"}"#),
        ("public-ip", "198.18.0.12"),
    ])
}

#[test]
fn reads_a_running_flanneld_node() {
    let l = lease_from_node(P, &good(), Some("10.244.2.0/24"), &[])
        .unwrap()
        .unwrap();
    assert_eq!(l.subnet.unwrap().to_string(), "10.244.2.0/24");
    assert_eq!(l.public_ip.unwrap().to_string(), "198.18.0.12");
    assert_eq!(
        l.backend.to_json(),
        r#"{"VNI":1,"VtepMAC":"82:cd:b6:82:3c:70"}"#
    );
}

#[test]
fn non_flannel_nodes_are_not_peers() {
    assert_eq!(
        lease_from_node(P, &BTreeMap::new(), Some("10.244.2.0/24"), &[]),
        Ok(None)
    );
    let mut a = good();
    a.insert(format!("{P}kube-subnet-manager"), "false".into());
    assert_eq!(lease_from_node(P, &a, Some("10.244.2.0/24"), &[]), Ok(None));
}

#[test]
fn broken_annotations_are_errors_not_panics() {
    assert!(lease_from_node(P, &good(), None, &[]).is_err());
    assert!(lease_from_node(P, &good(), Some("nope"), &[]).is_err());
    for (k, v) in [
        ("backend-data", "{"),
        ("backend-data", r#"{"VNI":1,"VtepMAC":"nope"}"#),
        ("public-ip", "999.1.1.1"),
        ("public-ip", "fd00::1"),
        ("backend-type", "udp"),
    ] {
        let mut a = good();
        a.insert(format!("{P}{k}"), v.into());
        assert!(
            lease_from_node(P, &a, Some("10.244.2.0/24"), &[]).is_err(),
            "{k}={v}"
        );
    }
}

#[test]
fn node_lite_reads_api_json() {
    let n: NodeLite = serde_json::from_str(
        r#"{"metadata":{"name":"node2","annotations":{"a":"b"},"managedFields":[{"manager":"kubectl","fieldsV1":{"f:spec":{}}}],"resourceVersion":"7"},"spec":{"podCIDR":"10.244.1.0/24","podCIDRs":["10.244.1.0/24"]},"status":{"images":[]}}"#,
    )
    .unwrap();
    assert_eq!(n.metadata.name.as_deref(), Some("node2"));
    assert_eq!(n.metadata.annotations.as_ref().unwrap()["a"], "b");
    let spec = n.spec.unwrap();
    assert_eq!(spec.pod_cidr.as_deref(), Some("10.244.1.0/24"));
    assert_eq!(spec.pod_cidrs.unwrap().len(), 1);
}

#[test]
fn dual_stack_pod_cidrs() {
    let (v4, v6) = pod_cidrs(
        Some("10.244.2.0/24"),
        &["10.244.2.0/24".into(), "fd00:10:244:2::/64".into()],
    )
    .unwrap();
    assert_eq!(v4.unwrap().to_string(), "10.244.2.0/24");
    assert_eq!(v6.unwrap().to_string(), "fd00:10:244:2::/64");
}

#[test]
fn dual_stack_and_ipv6_only_nodes() {
    let v6 = [
        (
            "backend-v6-data",
            r#"{"VNI":1,"VtepMAC":"66:cd:b6:82:3c:71"}"#,
        ),
        ("public-ipv6", "fd00:198:18::12"),
    ];
    let mut a = good();
    a.extend(ann(&v6));
    let cidrs = [
        "10.244.2.0/24".to_string(),
        "fd00:10:244:2::/64".to_string(),
    ];
    let l = lease_from_node(P, &a, Some("10.244.2.0/24"), &cidrs)
        .unwrap()
        .unwrap();
    assert_eq!(l.ipv6_subnet.unwrap().to_string(), "fd00:10:244:2::/64");
    assert_eq!(l.public_ipv6.unwrap().to_string(), "fd00:198:18::12");
    assert_eq!(
        l.backend_v6.unwrap().to_json(),
        r#"{"VNI":1,"VtepMAC":"66:cd:b6:82:3c:71"}"#
    );
    assert_eq!(
        l.backend.to_json(),
        r#"{"VNI":1,"VtepMAC":"82:cd:b6:82:3c:70"}"#
    );

    // IPv6 only: no IPv4 annotations at all, as upstream writes them.
    let mut only = ann(&[("kube-subnet-manager", "true"), ("backend-type", "vxlan")]);
    only.extend(ann(&v6));
    let l = lease_from_node(P, &only, Some("fd00:10:244:2::/64"), &cidrs[1..])
        .unwrap()
        .unwrap();
    assert_eq!((l.subnet, l.public_ip), (None, None));
    assert_eq!(Some(l.backend), l.backend_v6);

    // Broken IPv6 annotations are errors, not panics.
    for (k, v) in [
        ("public-ipv6", "198.18.0.12"),
        ("public-ipv6", "fd00::zz"),
        ("backend-v6-data", "[]"),
    ] {
        let mut b = only.clone();
        b.insert(format!("{P}{k}"), v.into());
        assert!(
            lease_from_node(P, &b, Some("fd00:10:244:2::/64"), &cidrs[1..]).is_err(),
            "{k}={v}"
        );
    }
}

proptest::proptest! {
    #[test]
    fn accepted_leases_carry_the_nodes_cidr_and_address(data in ".{0,80}", ip in ".{0,20}", cidr in "[0-9./:a-f]{0,20}", ty in "(vxlan|host-gw|.{0,5})") {
        let a = ann(&[("kube-subnet-manager", "true"), ("backend-type", &ty), ("backend-data", &data), ("public-ip", &ip)]);
        // Accepted only with the Node's own podCIDR and the annotated address.
        if let Ok(Some(l)) = lease_from_node(P, &a, Some(&cidr), std::slice::from_ref(&cidr)) {
            let n: IpNetwork = cidr.parse().unwrap();
            proptest::prop_assert_eq!(l.subnet.map(|s| (s.ip(), s.prefix())), Some((n.network(), n.prefix())));
            proptest::prop_assert_eq!(l.public_ip.map(|p| p.to_string()), Some(ip.clone()));
            proptest::prop_assert!(ty == "vxlan" || ty == "host-gw");
        }
    }
}

#[test]
fn node_public_ip_annotations_are_read_and_bad_ones_warned_about() {
    let p = P;
    let a = ann(&[
        ("node-public-ip", "203.0.113.7"),
        ("node-public-ipv6", "2001:db8::7"),
    ]);
    let ((v4, v6), w) = super::assigned_public_ips(Some(&a), p);
    assert_eq!(v4, Some("203.0.113.7".parse().unwrap()));
    assert_eq!(v6, Some("2001:db8::7".parse().unwrap()));
    assert!(w.is_empty());
    // Swapped families and garbage: ignored, one warning each, naming the key.
    let a = ann(&[
        ("node-public-ip", "2001:db8::7"),
        ("node-public-ipv6", "x; rm -rf /"),
    ]);
    let ((v4, v6), w) = super::assigned_public_ips(Some(&a), p);
    assert_eq!((v4, v6), (None, None));
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("node-public-ip:") && w[0].contains("IPv4"),
        "{w:?}"
    );
    assert!(
        w[1].contains("node-public-ipv6") && w[1].contains("IPv6"),
        "{w:?}"
    );
    // Absent or empty: nothing, silently; another prefix is not ours.
    let a = ann(&[("node-public-ip", "")]);
    assert_eq!(
        super::assigned_public_ips(Some(&a), p),
        ((None, None), vec![])
    );
    assert_eq!(super::assigned_public_ips(None, p), ((None, None), vec![]));
    let a = ann(&[("node-public-ip", "203.0.113.7")]);
    assert_eq!(
        super::assigned_public_ips(Some(&a), "example.com/"),
        ((None, None), vec![])
    );
}

#[test]
fn event_queue_depth_as_upstream() {
    use super::queue_depth;
    assert_eq!(queue_depth(None).unwrap(), 5000);
    assert_eq!(queue_depth(Some("")).unwrap(), 5000);
    assert_eq!(queue_depth(Some("64")).unwrap(), 64);
    assert_eq!(queue_depth(Some("0")).unwrap(), 5000);
    assert_eq!(queue_depth(Some("-3")).unwrap(), 5000);
    let e = queue_depth(Some("lots")).unwrap_err().to_string();
    assert!(
        e.starts_with("env EVENT_QUEUE_DEPTH=lots format error"),
        "{e}"
    );
}
