//! Pods, Namespaces and NetworkPolicies as the API server hands them over
//! (JSON any user with create rights may shape), into the policy model.
#![no_main]
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use libfuzzer_sys::fuzz_target;

use flannel::policy::model::{namespace_labels, PodInfo, Policy};

fuzz_target!(|data: &[u8]| {
    if let Ok(np) = serde_json::from_slice::<NetworkPolicy>(data) {
        if let Ok(p) = Policy::from_api(&np) {
            if let Ok(pod) = serde_json::from_slice::<Pod>(data) {
                if let Some(info) = PodInfo::from_api(&pod) {
                    let _ = p.selects(&info);
                }
            }
        }
    }
    if let Ok(pod) = serde_json::from_slice::<Pod>(data) {
        let _ = PodInfo::from_api(&pod);
    }
    if let Ok(ns) = serde_json::from_slice::<Namespace>(data) {
        let _ = namespace_labels(&ns);
    }
});
