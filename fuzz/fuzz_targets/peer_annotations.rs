//! A peer Node's annotations and podCIDRs, as any API client may write them.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

const P: &str = "flannel.alpha.coreos.com/";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Fields separated by NUL: backend-type, backend-data, public-ip,
    // backend-v6-data, public-ipv6, podCIDR, more podCIDRs.
    let f: Vec<&str> = text.split('\0').collect();
    let get = |i: usize| f.get(i).copied();
    let mut a = BTreeMap::new();
    a.insert(format!("{P}kube-subnet-manager"), "true".to_string());
    for (i, k) in ["backend-type", "backend-data", "public-ip", "backend-v6-data", "public-ipv6"]
        .iter()
        .enumerate()
    {
        if let Some(v) = get(i) {
            a.insert(format!("{P}{k}"), v.to_string());
        }
    }
    let cidrs: Vec<String> = f.iter().skip(6).map(|s| s.to_string()).collect();
    if let Ok(Some(l)) = flannel::manager::kube::lease_from_node(P, &a, get(5), &cidrs) {
        // What is accepted renders back to upstream's JSON.
        let _ = l.backend.to_json();
    }
});
