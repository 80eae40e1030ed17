//! The flanneld binary's command line: upstream's flags, env vars, fail-fast config errors.

use std::process::Command;

fn flanneld() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flanneld"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FLANNELD_") || k == "NODE_NAME" {
            c.env_remove(k);
        }
    }
    c
}

fn out(c: &mut Command) -> (bool, String) {
    let o = c.output().expect("running flanneld");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn version_and_help() {
    let (ok, s) = out(flanneld().arg("--version"));
    assert!(ok && s.starts_with("v0."), "{s}");
    let (ok, s) = out(flanneld().arg("-version"));
    assert!(ok && s.starts_with("v0."), "{s}");
    let (ok, help) = out(flanneld().arg("--help"));
    assert!(ok);
    for f in [
        "--etcd-endpoints",
        "--iface-regex",
        "--kube-subnet-mgr",
        "--healthz-port",
        "--iptables-forward-rules",
        "FLANNELD_IP_MASQ",
    ] {
        assert!(help.contains(f), "help lacks {f}");
    }
}

#[test]
fn bad_env_value_names_the_variable() {
    let (ok, s) = out(flanneld()
        .env("FLANNELD_HEALTHZ_PORT", "abc")
        .arg("--version"));
    assert!(!ok);
    assert!(
        s.contains("FLANNELD_HEALTHZ_PORT") && s.contains("abc"),
        "{s}"
    );
    // The command line wins over the environment, so its value is used and the bad env is moot.
    let (ok, s) = out(flanneld()
        .env("FLANNELD_HEALTHZ_PORT", "abc")
        .args(["--healthz-port=1", "--version"]));
    assert!(ok, "{s}");
    let (ok, s) = out(flanneld().env("FLANNELD_IP_MASQ", "maybe").arg("--version"));
    assert!(!ok && s.contains("FLANNELD_IP_MASQ"), "{s}");
}

#[test]
fn bad_net_conf_fails_fast_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("run/subnet.env");
    for (conf, field) in [
        ("{nope", "net-conf.json"),
        (r#"{"Backend":{"Type":"vxlan"}}"#, "Network"),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"warp"}}"#,
            "Backend.Type",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":16,"Backend":{"Type":"vxlan"}}"#,
            "SubnetLen",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.9.0.0","Backend":{"Type":"vxlan"}}"#,
            "SubnetMin",
        ),
    ] {
        let path = dir.path().join("net-conf.json");
        std::fs::write(&path, conf).unwrap();
        let started = std::time::Instant::now();
        // The API URL points nowhere: a config error must be reported before any connection attempt.
        let (ok, s) = out(flanneld()
            .args(["--kube-subnet-mgr", "--kube-api-url=https://192.0.2.1:6443"])
            .arg(format!("--net-config-path={}", path.display()))
            .arg(format!("--subnet-file={}", env_file.display())));
        assert!(!ok, "{conf}: {s}");
        assert!(
            s.contains(field),
            "{conf}: message does not name {field}: {s}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "not fast: {:?}",
            started.elapsed()
        );
        assert!(!env_file.exists());
    }
}

#[test]
fn env_sets_flags_and_cli_wins() {
    let dir = tempfile::tempdir().unwrap();
    let env_path = dir.path().join("from-env.json");
    let cli_path = dir.path().join("from-cli.json");
    let (ok, s) = out(flanneld()
        .env("FLANNELD_KUBE_SUBNET_MGR", "true")
        .env("FLANNELD_NET_CONFIG_PATH", &env_path));
    assert!(!ok && s.contains("from-env.json"), "{s}");
    let (ok, s) = out(flanneld()
        .env("FLANNELD_KUBE_SUBNET_MGR", "true")
        .env("FLANNELD_NET_CONFIG_PATH", &env_path)
        .arg(format!("-net-config-path={}", cli_path.display())));
    assert!(
        !ok && s.contains("from-cli.json") && !s.contains("from-env.json"),
        "{s}"
    );
}
