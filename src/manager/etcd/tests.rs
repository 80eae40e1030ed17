//! The etcd manager: codec and fault rules, and against a real etcd on loopback.

use super::lease::{holder, Holder};
use super::*;
use crate::lease::{BackendData, Mac, VxlanData};
use ipnetwork::IpNetwork;

#[test]
fn renewal_time_follows_the_margin() {
    let h = Duration::from_secs(3600);
    assert_eq!(renew_interval(24 * h, h), 23 * h);
    // A margin not shorter than the TTL (a test TTL): half-life.
    assert_eq!(
        renew_interval(Duration::from_secs(8), h),
        Duration::from_secs(4)
    );
    assert_eq!(
        renew_interval(Duration::from_secs(2), h),
        Duration::from_secs(1)
    );
}

#[test]
fn our_key_is_ours_only_with_our_address() {
    let d = BackendData::Vxlan(VxlanData {
        vni: 1,
        vtep_mac: "2e:b8:0a:81:03:b7".parse::<Mac>().unwrap(),
    });
    let req = LeaseRequest {
        public_ip: Some("198.18.0.11".parse().unwrap()),
        public_ipv6: None,
        data: d,
        data_v6: None,
    };
    let mine = lease_value(&req, true);
    assert_eq!(holder("10.244.1.0-24", mine.as_bytes(), &req), Holder::Us);
    // Another MAC (our device re-created) is still us: same address.
    let other_mac = mine.replace("2e:b8", "2e:b9");
    assert_eq!(
        holder("10.244.1.0-24", other_mac.as_bytes(), &req),
        Holder::Us
    );
    let theirs = mine.replace("198.18.0.11", "198.18.0.99");
    assert_eq!(
        holder("10.244.1.0-24", theirs.as_bytes(), &req),
        Holder::Other("public IP 198.18.0.99".into())
    );
    assert!(matches!(
        holder("10.244.1.0-24", b"garbage", &req),
        Holder::Other(_)
    ));
}

#[test]
fn only_configuration_errors_are_fatal() {
    use tonic::{Code, Status};
    let s = |c, m: &str| etcd_client::Error::GRpcStatus(Status::new(c, m));
    assert!(fatal(&s(
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password"
    )));
    assert!(fatal(&s(
        Code::PermissionDenied,
        "etcdserver: permission denied"
    )));
    assert!(!fatal(&s(Code::Unavailable, "etcdserver: no leader")));
    assert!(!fatal(&s(
        Code::Unauthenticated,
        "etcdserver: invalid auth token"
    )));
    assert!(!fatal(&etcd_client::Error::WatchError(
        "watch stream closed".into()
    )));
}

#[test]
fn a_live_etcd_shedding_load_waits_longer_than_no_etcd() {
    use crate::retry::{Cause, Classify};
    use tonic::{Code, Status};
    let s = |c, m: &str| etcd_client::Error::GRpcStatus(Status::new(c, m));
    let slow = Cause::Overloaded { retry_after: None };
    assert_eq!(
        s(Code::ResourceExhausted, "etcdserver: too many requests").cause(),
        slow
    );
    assert_eq!(s(Code::Unavailable, "etcdserver: no leader").cause(), slow);
    // tonic's own Unavailable: no connection at all.
    assert_eq!(
        s(
            Code::Unavailable,
            "tcp connect error: Connection refused (os error 111)"
        )
        .cause(),
        Cause::Unreachable
    );
    assert_eq!(
        s(Code::Unauthenticated, "etcdserver: invalid auth token").cause(),
        Cause::Unreachable
    );
    // Through anyhow's context chain, as the lease loops see it.
    let e = anyhow::Error::new(s(Code::ResourceExhausted, "etcdserver: too many requests"))
        .context("renewing");
    assert_eq!(e.cause(), slow);
    assert_eq!(
        anyhow::anyhow!("something else").cause(),
        Cause::Unreachable
    );
}

#[test]
fn key_names_round_trip() {
    let v4: IpNetwork = "10.244.1.0/24".parse().unwrap();
    let v6: IpNetwork = "fd00:10:244:1::/64".parse().unwrap();
    assert_eq!(key_name(Some(v4), None), "10.244.1.0-24");
    assert_eq!(
        key_name(Some(v4), Some(v6)),
        "10.244.1.0-24&fd00:10:244:1::-64"
    );
    assert_eq!(parse_key_name("10.244.1.0-24"), Some((Some(v4), None)));
    assert_eq!(
        parse_key_name("10.244.1.0-24&fd00:10:244:1::-64"),
        Some((Some(v4), Some(v6)))
    );
    for bad in [
        "",
        "10.244.1.0",
        "10.244.1.0-99",
        "x-24",
        "10.244.1.0-24&10.244.2.0-24",
        "-",
    ] {
        assert_eq!(parse_key_name(bad), None, "{bad}");
    }
}

#[test]
fn values_have_upstreams_form() {
    let d = BackendData::Vxlan(VxlanData {
        vni: 1,
        vtep_mac: "2e:b8:0a:81:03:b7".parse::<Mac>().unwrap(),
    });
    let req = |data: BackendData, data_v6: Option<BackendData>| LeaseRequest {
        public_ip: Some("198.18.0.11".parse().unwrap()),
        public_ipv6: data_v6.as_ref().map(|_| "fd00:198:18::11".parse().unwrap()),
        data,
        data_v6,
    };
    assert_eq!(
        lease_value(&req(d.clone(), None), true),
        r#"{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"2e:b8:0a:81:03:b7"}}"#
    );
    assert_eq!(
        lease_value(&req(BackendData::HostGw, None), true),
        r#"{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"host-gw"}"#
    );
    let v = lease_value(&req(d.clone(), None), true);
    let l = parse_lease("10.244.1.0-24", v.as_bytes()).unwrap().unwrap();
    assert_eq!(l.public_ip, Some("198.18.0.11".parse().unwrap()));
    assert_eq!(l.backend, d);

    // Dual stack: both data fields; the key names both subnets.
    let d6 = BackendData::Vxlan(VxlanData {
        vni: 1,
        vtep_mac: "66:00:00:00:00:02".parse::<Mac>().unwrap(),
    });
    let v = lease_value(&req(d.clone(), Some(d6.clone())), true);
    assert_eq!(
        v,
        r#"{"PublicIP":"198.18.0.11","PublicIPv6":"fd00:198:18::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"2e:b8:0a:81:03:b7"},"BackendV6Data":{"VNI":1,"VtepMAC":"66:00:00:00:00:02"}}"#
    );
    let l = parse_lease("10.244.1.0-24&fd00:10:244:1::-64", v.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(
        (l.backend, l.backend_v6, l.ipv6_subnet),
        (
            d.clone(),
            Some(d6.clone()),
            Some("fd00:10:244:1::/64".parse().unwrap())
        )
    );

    // IPv6 only: upstream writes no BackendData and a zero PublicIP.
    let v = lease_value(&req(d6.clone(), Some(d6.clone())), false);
    assert_eq!(
        v,
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::11","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"66:00:00:00:00:02"}}"#
    );
    let l = parse_lease("fd00:10:244:1::-64", v.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(
        (l.subnet, l.backend, l.backend_v6),
        (None, d6.clone(), Some(d6))
    );
}

#[test]
fn hostile_values_are_errors() {
    for (k, v) in [
        ("10.244.1.0-24", "{"),
        (
            "10.244.1.0-24",
            r#"{"PublicIP":"x","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"2e:b8:0a:81:03:b7"}}"#,
        ),
        (
            "10.244.1.0-24",
            r#"{"PublicIP":"198.18.0.1","BackendType":"vxlan","BackendData":"nope"}"#,
        ),
        ("10.244.1.0-24", r#"{"PublicIP":"198.18.0.1"}"#),
        (
            "garbage",
            r#"{"PublicIP":"198.18.0.1","BackendType":"host-gw"}"#,
        ),
    ] {
        assert!(parse_lease(k, v.as_bytes()).is_err(), "{k} {v}");
    }
}

proptest::proptest! {
    #[test]
    fn parse_never_panics(k in "[0-9a-f.:&-]{0,30}", v in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        // Accepted only for a key that names a subnet, and then the key
        // written for that lease is the key it was read from.
        if let Ok(Some(l)) = parse_lease(&k, &v) {
            proptest::prop_assert_eq!(key_name(l.subnet, l.ipv6_subnet), k.clone());
        }
    }
}

#[tokio::test]
async fn a_cut_tls_handshake_is_transient() {
    // What a client sees while etcd restarts behind a TLS port: the
    // connection is accepted and closed mid-handshake.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        for _ in 0..50 {
            if let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        }
    });
    let opts = ConnectOptions::new()
        .with_tls(TlsOptions::new())
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2));
    let r = async {
        let mut c = Client::connect([format!("https://127.0.0.1:{port}")], Some(opts)).await?;
        c.status().await?;
        Ok::<_, etcd_client::Error>(())
    };
    let e = tokio::time::timeout(Duration::from_secs(10), r)
        .await
        .expect("bounded")
        .unwrap_err();
    server.abort();
    assert!(!fatal(&e), "a cut handshake was taken as fatal: {e:?}");
    // The same cut as a transport error (how a connect that fails before any
    // gRPC status reports it): transient, though its text says "handshake".
    assert!(!fatal_transport(
        r#"TransportError(tonic::transport::Error(Transport, ConnectError(Custom { kind: UnexpectedEof, error: "tls handshake eof" })))"#
    ));
    assert!(fatal_transport("invalid peer certificate: UnknownIssuer"));
    assert!(fatal_transport("received fatal alert: BadCertificate"));
}

/// A real etcd on loopback (Debian's etcd-server), ended when dropped.
struct Etcd {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn etcd(extra: &[&str]) -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (cp, pp) = (free(), free());
    let url = format!("http://127.0.0.1:{cp}");
    let peer = format!("http://127.0.0.1:{pp}");
    let child = std::process::Command::new("etcd")
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("default={peer}")])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("etcd (Debian's etcd-server, installed by scripts/install-deps.sh)");
    let e = Etcd {
        child,
        url,
        _dir: dir,
    };
    for _ in 0..100 {
        if let Ok(mut c) = Client::connect([e.url.clone()], None).await {
            if c.status().await.is_ok() {
                return e;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd did not start");
}

fn settings(url: &str) -> EtcdSettings {
    EtcdSettings {
        endpoints: vec![url.to_string()],
        prefix: "/coreos.com/network".into(),
        keyfile: String::new(),
        certfile: String::new(),
        cafile: String::new(),
        username: String::new(),
        password: String::new(),
        subnet_file: std::path::PathBuf::from("/nonexistent/subnet.env"),
        renew_margin: Duration::from_secs(60),
        lease_ttl: Duration::from_secs(3600),
    }
}

fn request(ip: &str) -> LeaseRequest {
    LeaseRequest {
        public_ip: Some(ip.parse().unwrap()),
        public_ipv6: None,
        data: BackendData::Vxlan(VxlanData {
            vni: 1,
            vtep_mac: "52:82:d5:a1:90:4d".parse().unwrap(),
        }),
        data_v6: None,
    }
}

#[tokio::test]
#[ignore = "needs etcd (scripts/install-deps.sh installs it); scripts/test.sh runs it as root"]
async fn a_failed_create_leaves_no_etcd_lease_behind() {
    let e = etcd(&["--max-request-bytes", "2048"]).await;
    let m = EtcdManager::new(settings(&e.url), Arc::new(Metrics::default()))
        .await
        .unwrap();
    // The transaction fails (too large for this etcd) after the grant.
    let r = m.create("10.244.1.0-24", &"x".repeat(4096)).await;
    assert!(r.is_err(), "{r:?}");
    let mut c = Client::connect([e.url.clone()], None).await.unwrap();
    let leases = c.leases().await.unwrap();
    assert!(leases.leases().is_empty(), "leaked: {:?}", leases.leases());
}

#[tokio::test]
#[ignore = "needs etcd (scripts/install-deps.sh installs it); scripts/test.sh runs it as root"]
async fn publishing_after_our_etcd_lease_expired_takes_a_new_one() {
    let e = etcd(&[]).await;
    let m = Arc::new(
        EtcdManager::new(settings(&e.url), Arc::new(Metrics::default()))
            .await
            .unwrap(),
    );
    let mut c = Client::connect([e.url.clone()], None).await.unwrap();
    c.put(
        "/coreos.com/network/config",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        None,
    )
    .await
    .unwrap();
    let conf = m.network_config().await.unwrap();
    let own = m.acquire(&conf, &request("198.18.0.11")).await.unwrap();
    let held = m.own().unwrap();
    // Gone behind the agent's back (expired while etcd was unreachable).
    c.lease_revoke(held.lease_id).await.unwrap();
    let (tx, rx) = watch::channel(request("198.18.0.11"));
    let keeper = {
        let (m, conf, own) = (m.clone(), conf.clone(), own.clone());
        tokio::spawn(async move { m.keep_alive(&conf, &own, rx).await })
    };
    tx.send_replace(request("198.18.0.31"));
    let mut published = None;
    for _ in 0..100 {
        let r = c.get(held.key.clone(), None).await.unwrap();
        if let Some(kv) = r.kvs().first() {
            if kv.value_str().unwrap().contains("198.18.0.31") && kv.lease() != 0 {
                published = Some(kv.lease());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    keeper.abort();
    let lease = published.expect("the new address was never published");
    assert_ne!(lease, held.lease_id);
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "published on a dead lease");
}

#[test]
fn a_later_key_naming_an_overlapping_subnet_yields() {
    use super::lease::yields_to;
    let ours = "10.244.43.0-24&fd00:10:244:c::-64";
    let other = "10.244.43.0-24&fd00:10:244:5::-64".to_string();
    // The other node created its key first: ours yields.
    assert_eq!(
        yields_to(ours, 20, &[(other.clone(), 19), (ours.into(), 20)]),
        Some(other.clone())
    );
    // Ours was first: the other one yields, we keep ours.
    assert_eq!(yields_to(ours, 20, &[(other.clone(), 21)]), None);
    assert_eq!(
        yields_to(&other, 21, &[(ours.into(), 20)]),
        Some(ours.to_string())
    );
    // Same IPv6, other IPv4: also an overlap. Disjoint subnets are not.
    let v6 = "10.244.44.0-24&fd00:10:244:c::-64".to_string();
    assert_eq!(yields_to(ours, 20, &[(v6.clone(), 3)]), Some(v6));
    let apart = "10.244.45.0-24&fd00:10:244:d::-64".to_string();
    assert_eq!(yields_to(ours, 20, &[(apart, 3)]), None);
    // IPv4 only keys, and a name that is no subnet.
    assert_eq!(
        yields_to(
            "10.244.43.0-24",
            9,
            &[("10.244.43.0-24&fd00::-64".into(), 8)]
        ),
        Some("10.244.43.0-24&fd00::-64".into())
    );
    assert_eq!(yields_to("config", 9, &[(other, 1)]), None);
}
