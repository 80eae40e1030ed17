//! An etcd subnet key and its value, as any etcd client may write them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let name = String::from_utf8_lossy(&data[..split]);
    let value = data.get(split + 1..).unwrap_or(&[]);
    let _ = flannel::manager::etcd::parse_key_name(&name);
    if let Ok(Some(l)) = flannel::manager::etcd::parse_lease(&name, value) {
        // An accepted key is the canonical key of its lease.
        assert_eq!(flannel::manager::etcd::key_name(l.subnet, l.ipv6_subnet), name);
    }
});
