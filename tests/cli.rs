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

/// The fixtures directory, a temporary directory, and in it flanneld linked as mk-docker-opts.sh.
fn mk_docker_opts() -> (std::path::PathBuf, tempfile::TempDir, std::path::PathBuf) {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mk-docker-opts");
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("mk-docker-opts.sh");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_flanneld"), &tool).unwrap();
    (fixtures, dir, tool)
}

/// flanneld run under the name mk-docker-opts.sh writes what upstream's script
/// writes, for every recorded case (tests/fixtures/mk-docker-opts/README.md).
#[test]
fn mk_docker_opts_matches_upstreams_output() {
    let (fixtures, dir, tool) = mk_docker_opts();
    let recorded = std::fs::read_to_string(fixtures.join("upstream.txt")).unwrap();
    let mut cases = 0;
    let mut ours = String::new();
    for line in recorded.lines().filter(|l| l.starts_with("== ")) {
        let field = |name: &str| -> String {
            let start = line.find(&format!("{name}=[")).unwrap() + name.len() + 2;
            line[start..start + line[start..].find(']').unwrap()].to_string()
        };
        let (env, file, args) = (field("env"), field("file"), field("args"));
        let out = dir.path().join("out.txt");
        let _ = std::fs::remove_file(&out);
        let mut c = Command::new(&tool);
        c.env_clear().current_dir(&fixtures);
        if let Some((k, v)) = env.split_once('=') {
            c.env(k, v);
        }
        c.args(["-f", &file, "-d", out.to_str().unwrap()]);
        c.args(args.split_whitespace());
        let status = c.output().unwrap().status;
        ours.push_str(&format!(
            "== env=[{env}] file=[{file}] args=[{args}] rc={}\n",
            status.code().unwrap()
        ));
        ours.push_str(&std::fs::read_to_string(&out).unwrap_or_default());
        cases += 1;
    }
    assert!(cases >= 30, "only {cases} recorded cases");
    assert_eq!(ours, recorded);
}

/// `-m` does what upstream's usage says (upstream's own getopts rejects it).
#[test]
fn mk_docker_opts_minus_m_drops_ip_masq() {
    let (fixtures, dir, tool) = mk_docker_opts();
    let out = dir.path().join("docker");
    let st = Command::new(&tool)
        .env_clear()
        .args([
            "-m",
            "-k",
            "DOCKER_NETWORK_OPTIONS",
            "-d",
            out.to_str().unwrap(),
            "-f",
        ])
        .arg(fixtures.join("v4.env"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=10.244.1.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_NETWORK_OPTIONS=\" --bip=10.244.1.1/24 --mtu=1450 \"\n"
    );
}

/// Every flag upstream v0.20.2 and v0.28 accept (docs/configuration.md), as a
/// DaemonSet or unit would pass them, parses; and so does each one's FLANNELD_* form.
#[test]
fn every_upstream_flag_parses() {
    let flags: &[(&str, &str)] = &[
        ("etcd-endpoints", "http://127.0.0.1:2379"),
        ("etcd-prefix", "/coreos.com/network"),
        ("etcd-keyfile", "/etc/k.pem"),
        ("etcd-certfile", "/etc/c.pem"),
        ("etcd-cafile", "/etc/ca.pem"),
        ("etcd-username", "flannel"),
        ("etcd-password", "pw"),
        ("iface", "eth0"),
        ("iface-regex", "^en"),
        ("iface-can-reach", "10.0.0.1"),
        ("subnet-file", "/run/flannel/subnet.env"),
        ("public-ip", "10.0.0.2"),
        ("public-ipv6", "fd00::2"),
        ("subnet-lease-renew-margin", "60"),
        ("ip-masq", "true"),
        ("ip-masq-fully-random-disable", "true"),
        ("kube-subnet-mgr", "true"),
        ("kube-api-url", "https://10.0.0.1:6443"),
        ("kube-annotation-prefix", "flannel.alpha.coreos.com"),
        ("kubeconfig-file", "/etc/kubeconfig"),
        ("healthz-ip", "127.0.0.1"),
        ("healthz-port", "8081"),
        ("iptables-resync", "5"),
        ("iptables-forward-rules", "true"),
        ("ip-blackhole-route", "true"),
        ("net-config-path", "/etc/kube-flannel/net-conf.json"),
        ("set-node-network-unavailable", "false"),
        ("v", "2"),
        ("vmodule", "kube=3"),
        ("log_backtrace_at", ":0"),
    ];
    let mut all = Vec::new();
    for (name, value) in flags {
        all.push(format!("--{name}={value}"));
        // Go style: one dash; booleans bare.
        let single = if *value == "true" {
            format!("-{name}")
        } else {
            format!("-{name}={value}")
        };
        let (ok, s) = out(flanneld().args([single.as_str(), "--version"]));
        assert!(ok, "{single}: {s}");
        let var = format!("FLANNELD_{}", name.to_uppercase().replace('-', "_"));
        let (ok, s) = out(flanneld().env(&var, value).arg("--version"));
        assert!(ok, "{var}={value}: {s}");
    }
    all.push("--version".into());
    let (ok, s) = out(flanneld().args(&all));
    assert!(ok && s.starts_with("v0."), "{s}");
}
