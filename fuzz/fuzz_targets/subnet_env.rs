//! subnet.env as a previous run (or anyone with access to /run/flannel) left it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let env = flannel::subnet_env::SubnetEnv::parse(&text);
    // What it reads renders and reads back the same.
    let again = flannel::subnet_env::SubnetEnv::parse(&env.render());
    assert_eq!(env, again);
});
