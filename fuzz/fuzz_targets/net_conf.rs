//! net-conf.json (the kube ConfigMap, or etcd's `<prefix>/config`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = flannel::config::netconf::NetConf::parse(text);
    }
});
