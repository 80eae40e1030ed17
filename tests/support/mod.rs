//! Test support: drives `scripts/lab.sh` (namespaces, etcd, kube-apiserver,
//! CNI pods) from Rust. A `Lab` is torn down when dropped, also when a test
//! panics. Labs are serialised: they are heavy and timing-sensitive on 2 cores.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

pub fn top() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Lab tests are `#[ignore]`d with the reason "needs root", so a run that cannot
/// do them reports them as ignored; `scripts/test.sh` includes them when root.
/// Run without root anyway (`--include-ignored`), they fail here, never pass.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (network namespaces): run the README's test command as root"
    );
}

pub struct Lab {
    pub name: String,
    pub dir: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

fn run(args: &[&str], timeout_s: u32) -> Output {
    run_env(args, timeout_s, &[])
}

fn run_env(args: &[&str], timeout_s: u32, env: &[(&str, &str)]) -> Output {
    let script = top().join("scripts/lab.sh");
    Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(timeout_s.to_string())
        .arg("bash")
        .arg(script)
        .args(args)
        .env("FLANNELD", env!("CARGO_BIN_EXE_flanneld"))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running scripts/lab.sh")
}

impl Lab {
    /// Brings up a lab named `name` (1-8 of [a-z0-9]) with `args` for `lab.sh up`.
    pub fn up(name: &str, args: &[&str]) -> Lab {
        Lab::up_env(name, &[], args)
    }

    /// [`Lab::up`] with extra environment for `lab.sh up` (e.g. LAB_AUDIT=1).
    pub fn up_env(name: &str, env: &[(&str, &str)], args: &[&str]) -> Lab {
        let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // A leftover from a killed earlier run must not break this one.
        run(&["down", name], 60);
        let lab = Lab {
            name: name.to_string(),
            dir: PathBuf::from("/tmp/flannel-lab").join(name),
            _serial: guard,
        };
        let mut a = vec!["up", name];
        a.extend_from_slice(args);
        let o = run_env(&a, 180, env);
        assert!(
            o.status.success(),
            "lab up failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        lab
    }

    /// Runs a lab.sh command; panics with its output on failure.
    pub fn sh(&self, cmd: &str, args: &[&str]) -> String {
        let o = self.try_sh(cmd, args);
        assert!(
            o.status.success(),
            "lab.sh {cmd} {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn try_sh(&self, cmd: &str, args: &[&str]) -> Output {
        let mut a = vec![cmd, self.name.as_str()];
        a.extend_from_slice(args);
        run(&a, 120)
    }

    pub fn start_flannel(&self, node: u32, extra: &[&str]) {
        let n = node.to_string();
        let mut a = vec![n.as_str()];
        a.extend_from_slice(extra);
        self.sh("flannel-start", &a);
    }

    /// Like [`Lab::start_flannel`], with extra environment for the agent.
    pub fn start_flannel_env(&self, node: u32, env: &[(&str, &str)], extra: &[&str]) {
        let mut a = vec!["flannel-start", self.name.as_str()];
        let n = node.to_string();
        a.push(&n);
        a.extend_from_slice(extra);
        let o = Command::new("timeout")
            .args(["-k", "5", "60", "bash"])
            .arg(top().join("scripts/lab.sh"))
            .args(&a)
            .env("FLANNELD", env!("CARGO_BIN_EXE_flanneld"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("running scripts/lab.sh");
        assert!(
            o.status.success(),
            "flannel-start: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// An HTTP GET from the control-plane namespace (e.g. a node's /readyz).
    pub fn http_get(&self, url: &str) -> String {
        let o = self.try_sh("exec", &["cp", "curl", "-s", "-m", "5", url]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn stop_flannel(&self, node: u32, signal: &str) {
        self.sh("flannel-stop", &[&node.to_string(), signal]);
    }

    pub fn flannel_log(&self, node: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("n{node}/flanneld.log"))).unwrap_or_default()
    }

    pub fn subnet_env(&self, node: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("n{node}/subnet.env"))).unwrap_or_default()
    }

    pub fn add_pod(&self, node: u32, pod: &str) -> String {
        self.sh("pod-add", &[&node.to_string(), pod])
            .trim()
            .to_string()
    }

    /// A pod's address in one family (4 or 6), as its CNI result gave it.
    pub fn pod_ip(&self, node: u32, pod: &str, family: u8) -> String {
        self.sh("pod-ip", &[&node.to_string(), pod, &family.to_string()])
            .trim()
            .to_string()
    }

    /// Waits (bounded) until one ping gets through — the first IPv6 packets wait
    /// for neighbour discovery — then requires `count` pings without loss.
    pub fn reaches(&self, from_pod: &str, ip: &str, count: u32) -> bool {
        let end = Instant::now() + Duration::from_secs(20);
        while !self.ping(from_pod, ip, 1, "0.2") {
            if Instant::now() > end {
                return false;
            }
        }
        self.ping(from_pod, ip, count, "0.2")
    }

    /// `count` pings at `interval` seconds; true if all answered.
    pub fn ping(&self, from_pod: &str, ip: &str, count: u32, interval: &str) -> bool {
        self.try_sh("ping", &[from_pod, ip, &count.to_string(), interval])
            .status
            .success()
    }

    /// Starts a long ping in the background (for loss counting).
    pub fn ping_bg(&self, from_pod: &str, ip: &str, count: u32, interval: &str) -> Child {
        let script = top().join("scripts/lab.sh");
        Command::new("timeout")
            .args(["-k", "5", "300", "bash"])
            .arg(script)
            .args([
                "ping",
                &self.name,
                from_pod,
                ip,
                &count.to_string(),
                interval,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ping")
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.sh("kubectl", args)
    }

    /// Runs a command in one of the lab's namespaces (`cp`, `n1`, ...).
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> String {
        let mut a = vec![ns];
        a.extend_from_slice(cmd);
        self.sh("exec", &a)
    }

    pub fn dump(&self, node: u32) -> String {
        self.sh("dump", &[&node.to_string()])
    }

    /// Lines of `ip route` / `ip neigh` / `bridge fdb` on flannel.1 in node `n`;
    /// empty while the device does not exist (yet).
    pub fn routes(&self, node: u32) -> Vec<String> {
        self.on_device(node, &["ip", "route", "show", "dev", "flannel.1"])
    }
    pub fn neighs(&self, node: u32) -> Vec<String> {
        self.on_device(node, &["ip", "neigh", "show", "dev", "flannel.1"])
    }
    pub fn fdb(&self, node: u32) -> Vec<String> {
        self.on_device(node, &["bridge", "fdb", "show", "dev", "flannel.1"])
    }
    pub fn on_device(&self, node: u32, cmd: &[&str]) -> Vec<String> {
        let ns = format!("n{node}");
        let mut a = vec![ns.as_str()];
        a.extend_from_slice(cmd);
        let o = self.try_sh("exec", &a);
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("Cannot find device") || err.contains("does not exist"),
                "{cmd:?} in {ns}: {err}"
            );
            return Vec::new();
        }
        lines(&String::from_utf8_lossy(&o.stdout))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in 1..=6 {
                let log = self.flannel_log(n);
                if !log.is_empty() {
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    eprintln!(
                        "--- flanneld log node{n} (last lines, newest first):\n{}",
                        tail.join("\n")
                    );
                }
            }
        }
        let o = run(&["down", &self.name], 60);
        if !o.status.success() {
            eprintln!(
                "lab down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

pub fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Parses ping's summary: (transmitted, received).
pub fn ping_counts(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().ok());
    Some((nums.next()??, nums.next()??))
}

impl Lab {
    /// Creates a Node object as a (possibly hostile) flanneld would have left it.
    pub fn fake_node(&self, name: &str, pod_cidr: &str, annotations: &[(&str, &str)]) {
        let ann: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| {
                (
                    format!("flannel.alpha.coreos.com/{k}"),
                    serde_json::Value::String(v.to_string()),
                )
            })
            .collect();
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "annotations": ann },
            "spec": { "podCIDR": pod_cidr, "podCIDRs": [pod_cidr] },
        });
        let path = self.dir.join(format!("{name}.json"));
        std::fs::write(&path, node.to_string()).unwrap();
        self.kubectl(&["create", "-f", path.to_str().unwrap()]);
    }
}

impl Lab {
    /// Receives one UDP datagram on `port` inside the lab namespace `ns` (e.g. `cp`,
    /// `n2-p2`) while `send` runs, and returns the sender's address as seen there.
    pub fn udp_source(&self, ns: &str, port: u16, send: impl FnOnce()) -> Option<std::net::IpAddr> {
        let path = format!("/run/netns/fl{}-{ns}", self.name);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || -> Option<std::net::IpAddr> {
            // Only this thread enters the namespace; the socket stays bound there.
            let f = std::fs::File::open(&path).ok()?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let sock = std::net::UdpSocket::bind(("0.0.0.0", port)).ok()?;
            sock.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            ready_tx.send(()).ok()?;
            let mut buf = [0u8; 64];
            sock.recv_from(&mut buf).ok().map(|(_, a)| a.ip())
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).ok()?;
        send();
        t.join().ok().flatten()
    }

    /// Sends one UDP datagram from the lab namespace `ns` to `ip:port`.
    pub fn udp_send(&self, ns: &str, ip: &str, port: u16) {
        self.exec(
            ns,
            &["bash", "-c", &format!("echo hello > /dev/udp/{ip}/{port}")],
        );
    }
}

impl Lab {
    /// Runs `script` (bash) in a lab namespace in the background, bounded to 300 s.
    pub fn exec_bg(&self, ns: &str, script: &str) -> Child {
        Command::new("timeout")
            .args(["-k", "5", "300", "bash"])
            .arg(top().join("scripts/lab.sh"))
            .args(["exec", &self.name, ns, "bash", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning lab.sh exec")
    }

    /// Accepts TCP connections on `port` inside the lab namespace `ns` while
    /// `during` runs, and returns each connection's source address as seen there.
    pub fn tcp_sources(&self, ns: &str, port: u16, during: impl FnOnce()) -> Vec<std::net::IpAddr> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let path = format!("/run/netns/fl{}-{ns}", self.name);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let t = std::thread::spawn(move || -> Vec<std::net::IpAddr> {
            let mut seen = Vec::new();
            let Ok(f) = std::fs::File::open(&path) else {
                return seen;
            };
            if nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return seen;
            }
            let Ok(l) = std::net::TcpListener::bind(("0.0.0.0", port)) else {
                return seen;
            };
            let _ = l.set_nonblocking(true);
            let _ = ready_tx.send(());
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            while !flag.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                match l.accept() {
                    Ok((_, a)) => seen.push(a.ip()),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            // Connections queued when told to stop still count.
            while let Ok((_, a)) = l.accept() {
                seen.push(a.ip());
            }
            seen
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("TCP listener in the namespace");
        during();
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap_or_default()
    }
}

/// The sum of every sample of `name` (any labels) in a /metrics text; None if absent.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.split_once("} ").map(|(_, v)| v)
        } else {
            rest.strip_prefix(' ')
        };
        if let Some(v) = value.and_then(|v| v.trim().parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}
