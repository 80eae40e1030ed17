use super::*;
use crate::config::netconf::NetConf;
use crate::lease::PeerSet;

const PK: &str = "jH3QnRkn8hh2LhXlyq6mRdNq1P7pzYONSQ3mNQdFRhU=";

fn key(i: u8) -> Key {
    let mut k = [i; 32];
    k[0] = 1;
    Key(k)
}

fn ext() -> ExternalInterface {
    ExternalInterface {
        index: 2,
        name: "eth0".into(),
        mtu: 1500,
        iface_addr: Some("198.18.0.11".parse().unwrap()),
        iface_addr6: Some("2001:db8::11".parse().unwrap()),
        public_ip: Some("198.18.0.11".parse().unwrap()),
        public_ipv6: Some("2001:db8::11".parse().unwrap()),
        networks: vec!["198.18.0.0/24".parse().unwrap()],
    }
}

fn conf(extra: &str, v6: bool) -> NetConf {
    let fam = if v6 {
        r#""EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","#
    } else {
        ""
    };
    NetConf::parse(&format!(
        r#"{{"Network":"10.244.0.0/16",{fam}"Backend":{{"Type":"wireguard"{extra}}}}}"#
    ))
    .unwrap()
}

fn backend(c: &NetConf) -> Wireguard {
    let BackendConf::Wireguard(w) = &c.backend else {
        panic!("not wireguard")
    };
    Wireguard::new(w.clone(), c, WgImpl::Auto)
}

use crate::config::netconf::BackendConf;

fn wg(i: u8, port: Option<u16>) -> BackendData {
    BackendData::Wireguard(WireguardData {
        public_key: key(i),
        port,
    })
}

fn lease(i: u8, port: Option<u16>, v6: bool) -> Lease {
    Lease {
        subnet: Some(format!("10.244.{i}.0/24").parse().unwrap()),
        ipv6_subnet: v6.then(|| format!("fd00:10:244:{i}::/64").parse().unwrap()),
        public_ip: Some(format!("198.18.0.{i}").parse().unwrap()),
        public_ipv6: v6.then(|| format!("2001:db8::{i}").parse().unwrap()),
        backend: wg(i, port),
        backend_v6: v6.then(|| wg(i, port.map(|p| p + 1))),
    }
}

fn peer_of(b: &Wireguard, l: &Lease, v6: bool) -> Option<(Key, WgPeer)> {
    b.entries(&ext(), l, v6).unwrap().and_then(|e| e.wg)
}

#[test]
fn backend_data_is_upstreams_json_byte_for_byte() {
    let d = BackendData::Wireguard(WireguardData {
        public_key: PK.parse().unwrap(),
        port: Some(51820),
    });
    assert_eq!(
        d.to_json(),
        format!(r#"{{"PublicKey":"{PK}","Port":51820}}"#)
    );
    assert_eq!(BackendData::parse("wireguard", &d.to_json()).unwrap(), d);
    // Before v0.26.6 upstream wrote no Port.
    let old = BackendData::parse("wireguard", &format!(r#"{{"PublicKey":"{PK}"}}"#)).unwrap();
    assert_eq!(
        old,
        BackendData::Wireguard(WireguardData {
            public_key: PK.parse().unwrap(),
            port: None
        })
    );
    for bad in [
        "{",
        "null",
        r#"{"PublicKey":"short"}"#,
        r#"{"PublicKey":5}"#,
        r#"{"PublicKey":"jH3QnRkn8hh2LhXlyq6mRdNq1P7pzYONSQ3mNQdFRhU=","Port":70000}"#,
        r#"{"VNI":1,"VtepMAC":"82:cd:b6:82:3c:70"}"#,
    ] {
        assert!(BackendData::parse("wireguard", bad).is_err(), "{bad}");
    }
}

#[test]
fn etcd_value_is_upstreams() {
    use crate::manager::etcd::codec::{lease_value, parse_lease};
    use crate::manager::LeaseRequest;
    let d = BackendData::Wireguard(WireguardData {
        public_key: PK.parse().unwrap(),
        port: Some(51820),
    });
    let d6 = BackendData::Wireguard(WireguardData {
        public_key: PK.parse().unwrap(),
        port: Some(51821),
    });
    let req = LeaseRequest {
        public_ip: Some("198.18.0.11".parse().unwrap()),
        public_ipv6: Some("2001:db8::11".parse().unwrap()),
        data: d.clone(),
        data_v6: Some(d6.clone()),
    };
    let v = lease_value(&req, true);
    assert_eq!(
        v,
        format!(
            r#"{{"PublicIP":"198.18.0.11","PublicIPv6":"2001:db8::11","BackendType":"wireguard","BackendData":{{"PublicKey":"{PK}","Port":51820}},"BackendV6Data":{{"PublicKey":"{PK}","Port":51821}}}}"#
        )
    );
    let l = parse_lease("10.244.1.0-24&fd00:10:244:1::-64", v.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!((l.backend, l.backend_v6), (d, Some(d6)));
}

#[test]
fn separate_mode_gives_each_family_its_own_peer_and_port() {
    let c = conf("", true);
    let b = backend(&c);
    let l = lease(2, Some(6000), true);
    let (k4, p4) = peer_of(&b, &l, false).unwrap();
    let (k6, p6) = peer_of(&b, &l, true).unwrap();
    assert_eq!((k4, k6), (key(2), key(2)));
    assert_eq!(p4.endpoint, "198.18.0.2:6000".parse().unwrap());
    assert_eq!(p4.allowed, [Some("10.244.2.0/24".parse().unwrap()), None]);
    assert_eq!(p6.endpoint, "[2001:db8::2]:6001".parse().unwrap());
    assert_eq!(
        p6.allowed,
        [Some("fd00:10:244:2::/64".parse().unwrap()), None]
    );
    assert_eq!((p4.psk, p4.keepalive), (None, 0));
    // The devices: flannel-wg and flannel-wg-v6 on their own ports.
    let names: Vec<_> = b.devs.iter().map(|d| (d.name, d.port)).collect();
    assert_eq!(names, vec![(DEVICE, 51820), (DEVICE_V6, 51821)]);
}

#[test]
fn a_peer_without_port_is_reached_on_our_own_listen_port() {
    let c = conf(r#","ListenPort":7000,"ListenPortV6":7001"#, true);
    let b = backend(&c);
    let l = lease(3, None, true);
    assert_eq!(
        peer_of(&b, &l, false).unwrap().1.endpoint,
        "198.18.0.3:7000".parse().unwrap()
    );
    assert_eq!(
        peer_of(&b, &l, true).unwrap().1.endpoint,
        "[2001:db8::3]:7001".parse().unwrap()
    );
}

#[test]
fn psk_and_keepalive_go_to_every_peer() {
    let psk = Key([7; 32]);
    let c = conf(
        &format!(r#","PSK":"{psk}","PersistentKeepaliveInterval":25"#),
        false,
    );
    let b = backend(&c);
    let (_, p) = peer_of(&b, &lease(2, Some(51820), false), false).unwrap();
    assert_eq!((p.psk, p.keepalive), (Some(psk), 25));
}

#[test]
fn single_device_modes_hold_one_peer_with_both_subnets() {
    for (mode, v6_endpoint) in [("ipv4", false), ("ipv6", true), ("auto", false)] {
        let c = conf(&format!(r#","Mode":"{mode}""#), true);
        let b = backend(&c);
        assert_eq!(b.devs.len(), 1, "{mode}");
        let l = lease(2, Some(51820), true);
        let (k, p) = peer_of(&b, &l, false).unwrap();
        assert_eq!(k, key(2));
        assert_eq!(
            p.allowed,
            [
                Some("10.244.2.0/24".parse().unwrap()),
                Some("fd00:10:244:2::/64".parse().unwrap())
            ],
            "{mode}"
        );
        assert_eq!(p.endpoint.is_ipv6(), v6_endpoint, "{mode}");
        // The IPv6 plane holds nothing of its own: the one device is the IPv4 plane's.
        assert_eq!(peer_of(&b, &l, true), None, "{mode}");
        assert_eq!(
            b.devices(&ext(), true).overlay,
            b.devices(&ext(), false).overlay
        );
    }
}

#[test]
fn auto_mode_prefers_ipv4_unless_it_is_private_and_both_ipv6_are_public() {
    let e = ext();
    let v4pub: Option<Ipv4Addr> = Some("198.51.100.2".parse().unwrap());
    let v4priv: Option<Ipv4Addr> = Some("10.0.0.2".parse().unwrap());
    let v6pub: Option<Ipv6Addr> = Some("2001:db8::2".parse().unwrap());
    let v6ula: Option<Ipv6Addr> = Some("fd00::2".parse().unwrap());
    assert!(!select_v6(v4pub, v6pub, &e));
    assert!(select_v6(v4priv, v6pub, &e));
    assert!(!select_v6(v4priv, v6ula, &e));
    assert!(!select_v6(v4priv, None, &e));
    let mut ula = e.clone();
    ula.public_ipv6 = Some("fd00::11".parse().unwrap());
    assert!(!select_v6(v4priv, v6pub, &ula));
}

#[test]
fn ipv6_only_cluster_uses_the_v6_device_in_separate_mode() {
    let c = NetConf::parse(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard"}}"#,
    )
    .unwrap();
    let b = backend(&c);
    assert_eq!(b.devs.len(), 1);
    assert_eq!(b.devs[0].name, DEVICE_V6);
    let mut l = lease(2, Some(51821), true);
    l.subnet = None;
    l.public_ip = None;
    let (_, p) = peer_of(&b, &l, true).unwrap();
    assert_eq!(p.endpoint, "[2001:db8::2]:51822".parse().unwrap());
    assert_eq!(peer_of(&b, &l, false), None);
}

#[test]
fn a_peer_of_another_backend_is_refused_and_others_served() {
    let c = conf("", false);
    let b = backend(&c);
    let mut l = lease(2, None, false);
    l.backend = BackendData::HostGw;
    assert!(b.entries(&ext(), &l, false).is_err());
    assert!(peer_of(&b, &lease(3, None, false), false).is_some());
}

#[test]
fn a_duplicate_or_own_public_key_is_refused() {
    let c = conf("", false);
    let own = lease(1, Some(51820), false);
    let mut set = PeerSet::default();
    set.upsert("n2", lease(2, Some(51820), false), &c, &own);
    // n3 claims n2's key: it would steal n2's traffic.
    let mut thief = lease(3, Some(51820), false);
    thief.backend = wg(2, Some(51820));
    set.upsert("n3", thief, &c, &own);
    // n4 claims ours.
    let mut mirror = lease(4, Some(51820), false);
    mirror.backend = wg(1, Some(51820));
    set.upsert("n4", mirror, &c, &own);
    let names: Vec<_> = set.accepted().keys().cloned().collect();
    assert_eq!(names, vec!["n2".to_string()]);
}

/// One changed peer costs one WireGuard peer operation, whatever the cluster
/// size: the tracker's scoped diff over the backend's entries.
#[test]
fn one_changed_peer_costs_one_peer_operation() {
    use crate::dataplane::model::{PeerChange, Tracker};
    let c = conf("", false);
    let b = backend(&c);
    let mut t = Tracker::default();
    let mut want = crate::dataplane::model::State::default();
    for i in 2..250 {
        b.entries(&ext(), &lease(i, None, false), false)
            .unwrap()
            .unwrap()
            .add_to(&mut want);
    }
    t.reset(want);
    let old = b.entries(&ext(), &lease(7, None, false), false).unwrap();
    let mut moved = lease(7, None, false);
    moved.public_ip = Some("198.18.1.7".parse().unwrap());
    let new = b.entries(&ext(), &moved, false).unwrap();
    let d = t.scoped(&[PeerChange { old, new }]);
    assert_eq!((d.wg.set.len(), d.wg.del.len(), d.ops()), (1, 0, 1));
    // A key change: the old peer removed, the new one added.
    let mut rekeyed = lease(7, None, false);
    rekeyed.backend = wg(99, None);
    let d = t.scoped(&[PeerChange {
        old,
        new: b.entries(&ext(), &rekeyed, false).unwrap(),
    }]);
    assert_eq!((d.wg.set.len(), d.wg.del.len()), (1, 1));
    assert_eq!(d.wg.del[0].0, key(7));
    // Removal.
    let d = t.scoped(&[PeerChange { old, new: None }]);
    assert_eq!((d.wg.set.len(), d.wg.del.len(), d.ops()), (0, 1, 1));
}
