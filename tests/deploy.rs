//! Deployment artefacts: the DaemonSet manifest under the lab's API server, the
//! systemd unit, the container image, and docs that agree with --help.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use support::*;

fn help_flags() -> BTreeSet<String> {
    let o = Command::new(env!("CARGO_BIN_EXE_flanneld"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout).into_owned();
    help.split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(',')
                .split(['[', '=', '<'])
                .next()
                .unwrap()
                .to_string()
        })
        .filter(|w| w != "--help")
        .collect()
}

#[test]
fn configuration_docs_agree_with_help() {
    let doc = std::fs::read_to_string(top().join("docs/configuration.md")).unwrap();
    let documented: BTreeSet<String> = doc
        .lines()
        .filter(|l| l.starts_with("| `-"))
        .flat_map(|l| {
            l.split('`')
                .filter(|p| p.starts_with("--"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    let help = help_flags();
    assert!(help.len() >= 30, "{help:?}");
    assert_eq!(
        documented, help,
        "docs/configuration.md and --help disagree"
    );
    let readme = std::fs::read_to_string(top().join("README.md")).unwrap();
    for f in &help {
        assert!(readme.contains(f.as_str()), "README misses {f}");
    }
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(top().join("deploy/flanneld.service")).unwrap();
    assert!(unit.contains("Restart=always") && unit.contains("CAP_NET_ADMIN"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flanneld.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/flanneld", env!("CARGO_BIN_EXE_flanneld")),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !err.contains("flanneld.service"),
        "systemd-analyze verify: {err}"
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn manifest_creates_every_object_with_upstreams_rbac() {
    require_root();
    // `lab.sh up` applies deploy/kube-flannel.yml with kubectl.
    let lab = Lab::up("deploy", &["--nodes", "1"]);
    for obj in [
        vec!["get", "namespace", "kube-flannel"],
        vec!["get", "-n", "kube-flannel", "serviceaccount", "flannel"],
        vec!["get", "clusterrole", "flannel"],
        vec!["get", "clusterrolebinding", "flannel"],
        vec!["get", "-n", "kube-flannel", "configmap", "kube-flannel-cfg"],
        vec!["get", "-n", "kube-flannel", "daemonset", "kube-flannel-ds"],
    ] {
        lab.kubectl(&obj);
    }
    let rules = lab.kubectl(&["get", "clusterrole", "flannel", "-o", "jsonpath={.rules}"]);
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let got: BTreeSet<String> = rules
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            let res: Vec<String> = r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            let verbs: Vec<String> = r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            res.iter()
                .flat_map(|x| verbs.iter().map(move |v| format!("{x}:{v}")))
                .collect::<Vec<_>>()
        })
        .collect();
    let want: BTreeSet<String> = [
        "pods:get",
        "nodes:get",
        "nodes:list",
        "nodes:watch",
        "nodes/status:patch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, want);
    let args = lab.kubectl(&[
        "get",
        "-n",
        "kube-flannel",
        "ds",
        "kube-flannel-ds",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    assert_eq!(args, r#"["--ip-masq","--kube-subnet-mgr"]"#);
    let net_conf = lab.kubectl(&[
        "get",
        "-n",
        "kube-flannel",
        "cm",
        "kube-flannel-cfg",
        "-o",
        "jsonpath={.data.net-conf\\.json}",
    ]);
    assert!(
        flannel::config::netconf::NetConf::parse(&net_conf).is_ok(),
        "{net_conf}"
    );
    // The agent in the lab runs with exactly this RBAC (the flannel ServiceAccount's token).
    lab.start_flannel(1, &[]);
    support::wait_until(
        std::time::Duration::from_secs(30),
        "the agent to publish its lease",
        || {
            lab.kubectl(&[
                "get",
                "node",
                "node1",
                "-o",
                "jsonpath={.metadata.annotations}",
            ])
            .contains("kube-subnet-manager")
        },
    );
}

/// Runs `cmd` in a buildah working container, whatever its exit status.
fn run_in(ctr: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("buildah")
        .args([
            "--storage-driver",
            "vfs",
            "run",
            "--isolation",
            "chroot",
            ctr,
        ])
        .args(cmd)
        .output()
        .unwrap()
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it as root"]
fn image_builds_with_buildah_and_runs() {
    require_root();
    let tag = "localhost/flannel-rs:test";
    let o = Command::new("bash")
        .arg(top().join("scripts/build-image.sh"))
        .arg(tag)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "build-image: {}{}",
        out,
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{}", out.trim());
    let buildah = |args: &[&str]| {
        let o = Command::new("buildah")
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "buildah {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let ctr = buildah(&["from", tag]);
    let version = buildah(&[
        "run",
        "--isolation",
        "chroot",
        &ctr,
        "/opt/bin/flanneld",
        "--version",
    ]);
    let ipt = buildah(&[
        "run",
        "--isolation",
        "chroot",
        &ctr,
        "/usr/sbin/iptables",
        "--version",
    ]);
    let legacy = buildah(&[
        "run",
        "--isolation",
        "chroot",
        &ctr,
        "/usr/sbin/iptables-legacy",
        "--version",
    ]);
    let root = buildah(&["run", "--isolation", "chroot", &ctr, "ls", "/"]);
    // mk-docker-opts.sh is flanneld under that name: an unknown option prints its usage.
    let mk = run_in(&ctr, &["/opt/bin/mk-docker-opts.sh", "-x"]);
    let cp = run_in(&ctr, &["cp", "--help"]);
    buildah(&["rm", &ctr]);
    assert!(
        version.starts_with("v0.") && version.contains("flannel-rs"),
        "{version}"
    );
    assert!(ipt.contains("nf_tables"), "{ipt}");
    assert!(legacy.contains("(legacy)"), "{legacy}");
    assert!(
        !mk.status.success() && String::from_utf8_lossy(&mk.stderr).contains("-k COMBINED-KEY"),
        "{mk:?}"
    );
    // Only the assembled root went in: no sources, no target/.
    let top_level: Vec<&str> = root.split_whitespace().collect();
    for absent in ["src", "target", "Cargo.toml"] {
        assert!(
            !top_level.contains(&absent),
            "{absent} in the image: {top_level:?}"
        );
    }
    assert!(String::from_utf8_lossy(&cp.stderr).contains("cp") || cp.status.success());
}

/// Building from a context without scripts/build-image.sh's assembly (the
/// conventional `buildah bud .`) fails at once, naming the file it lacks, instead
/// of producing an image of the source tree.
#[test]
#[ignore = "needs root (buildah); scripts/test.sh runs it as root"]
fn image_builds_only_from_the_assembled_root() {
    require_root();
    let ctx = tempfile::tempdir().unwrap();
    for f in ["Containerfile", ".containerignore"] {
        std::fs::copy(top().join(f), ctx.path().join(f)).unwrap();
    }
    std::fs::create_dir(ctx.path().join("src")).unwrap();
    std::fs::write(ctx.path().join("src/main.rs"), "fn main() {}").unwrap();
    let o = Command::new("buildah")
        .args([
            "--storage-driver",
            "vfs",
            "bud",
            "--isolation",
            "chroot",
            "-f",
            "Containerfile",
            ".",
        ])
        .current_dir(ctx.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "built from a bare context");
    assert!(err.contains("built-by-scripts-build-image.sh"), "{err}");
    // The conventional path and name operators try first point at the same file.
    assert_eq!(
        std::fs::read_link(top().join("deploy/Dockerfile")).unwrap(),
        std::path::PathBuf::from("../Containerfile")
    );
    assert_eq!(
        std::fs::read_to_string(top().join(".dockerignore")).unwrap(),
        std::fs::read_to_string(top().join(".containerignore")).unwrap()
    );
}

/// The docker.service drop-in: its mk-docker-opts.sh step writes the file it
/// names as EnvironmentFile, defining the variable its ExecStart passes to dockerd.
#[test]
fn docker_drop_in_feeds_dockerd_the_flannel_subnet() {
    let unit = std::fs::read_to_string(top().join("deploy/docker.service.d/flannel.conf")).unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(String::from)
            .collect()
    };
    let pre = value("ExecStartPre");
    let mk = pre
        .iter()
        .find(|l| l.contains("mk-docker-opts.sh"))
        .expect("an mk-docker-opts.sh step");
    let words: Vec<&str> = mk.split_whitespace().collect();
    let arg = |flag: &str| words[words.iter().position(|w| *w == flag).unwrap() + 1];
    let (key, out) = (arg("-k"), arg("-d"));
    assert_eq!(value("EnvironmentFile"), vec![format!("-{out}")]);
    assert!(value("ExecStart")
        .iter()
        .any(|l| l.contains(&format!("${key}"))));
    // Run that step with flanneld as mk-docker-opts.sh, on a subnet.env fixture.
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("mk-docker-opts.sh");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_flanneld"), &tool).unwrap();
    let written = dir.path().join("docker");
    let st = Command::new(&tool)
        .env_clear()
        .args(&words[1..])
        .args(["-d", written.to_str().unwrap(), "-f"])
        .arg(top().join("tests/fixtures/mk-docker-opts/v4.env"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        format!("DOCKER_OPT_BIP=\"--bip=10.244.1.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n{key}=\" --bip=10.244.1.1/24 --ip-masq=false --mtu=1450 \"\n")
    );
}
