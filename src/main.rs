//! flanneld: parse flags, set up logging, wire the subnet manager and backend
//! into the agent, stop on SIGTERM/SIGINT leaving the dataplane in place.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use flannel::backend::Any;
use flannel::config::flags::{Flags, FlagsError};
use flannel::config::netconf::NetConf;
use flannel::daemon::Agent;
use flannel::manager::etcd::{EtcdManager, EtcdSettings};
use flannel::manager::kube::{KubeManager, KubeSettings};
use flannel::manager::SubnetManager;
use flannel::metrics::Metrics;
use flannel::supervisor::Supervisor;

fn init_logging(flags: &Flags) {
    let level = match flags.verbosity {
        0 => "info",
        1..=4 => "debug",
        _ => "trace",
    };
    // The Kubernetes client logs every failed request itself, unthrottled; the
    // agent logs the same failures (rate-limited, with context), so at the default
    // level those lines are left out. -v or RUST_LOG brings them back.
    let default = if flags.verbosity == 0 {
        format!("{level},kube_client=off,kube_runtime=off,boringtun=warn")
    } else {
        level.to_string()
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    // Multi-call: under the name mk-docker-opts(.sh) this binary is that tool.
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let argv0 = argv.first().cloned().unwrap_or_default();
    if std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("mk-docker-opts"))
    {
        let code = flannel::dockeropts::main(&argv0, &argv[1..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let flags = match Flags::from_env_and_args() {
        Ok(f) => f,
        Err(FlagsError::Help(h)) => {
            print!("{h}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("flanneld: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("v{} (flannel-rs)", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    init_logging(&flags);
    // Few allocator arenas: the agent is mostly one thread, and each arena keeps memory.
    // A fixed mmap threshold: glibc otherwise raises it to the largest buffer
    // freed so far (a list response, an nft script), after which such buffers
    // come from the heap and their pages stay with the process.
    // SAFETY: mallopt only tunes glibc's allocator, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
    // One thread: the agent waits on sockets; a single-threaded runtime is
    // smaller and cheaper at idle than a pool.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flanneld: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(flags)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("flanneld: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    if flags.network_policy && !flags.kube_subnet_mgr {
        anyhow::bail!("--network-policy needs --kube-subnet-mgr (policies, pods and namespaces come from the API server)");
    }
    if flags.policy_log_denied && !flags.network_policy {
        tracing::warn!("--policy-log-denied does nothing without --network-policy");
    }
    if flags.network_policy && !flags.ip_masq {
        tracing::warn!("--network-policy without --ip-masq: the CNI bridge plugin then masquerades pod traffic between nodes, so policies see node addresses, not pods'; use --ip-masq (as kube-flannel.yml does)");
    }
    if flags.use_multi_cluster_cidr {
        tracing::warn!("--use-multi-cluster-cidr is not supported (the API was removed from Kubernetes); ignoring it");
    }
    let prefix = flags
        .annotation_prefix()
        .map_err(|e| anyhow::anyhow!("--kube-annotation-prefix: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    // In kube mode the configuration is a file: validate it before touching the API or the network.
    let file_conf = if flags.kube_subnet_mgr {
        Some(NetConf::from_file(&flags.net_config_path)?)
    } else {
        None
    };
    if flags.healthz_port != 0 {
        let addr = std::net::SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        flannel::health::spawn(addr, metrics.clone())?;
    }
    let agent = async {
        if let Some(conf) = file_conf {
            let settings = KubeSettings {
                kubeconfig: flags.kubeconfig_file.clone(),
                api_url: flags.kube_api_url.clone(),
                prefix,
                net_config_path: flags.net_config_path.clone(),
                set_unavailable: flags.set_node_network_unavailable,
            };
            let manager = Arc::new(KubeManager::new(settings, metrics.clone()).await?);
            tracing::info!("kube subnet manager for node {}", manager.node_name());
            let mut sup = Supervisor::new(metrics.clone());
            if flags.network_policy {
                let (m, node, metrics) = (
                    manager.clone(),
                    manager.node_name().to_string(),
                    metrics.clone(),
                );
                let log = flags.policy_log_denied;
                sup.restartable("network-policy", move || {
                    flannel::policy::run(m.clients(), node.clone(), metrics.clone(), log)
                });
            }
            let depth = manager.queue_depth();
            run_agent(&flags, conf, manager, &metrics, depth, sup).await
        } else {
            let settings = EtcdSettings {
                endpoints: flags.etcd_endpoint_list(),
                prefix: flags.etcd_prefix.clone(),
                keyfile: flags.etcd_keyfile.clone(),
                certfile: flags.etcd_certfile.clone(),
                cafile: flags.etcd_cafile.clone(),
                username: flags.etcd_username.clone(),
                password: flags.etcd_password.clone(),
                subnet_file: flags.subnet_file.clone(),
                renew_margin: std::time::Duration::from_secs(
                    60 * flags.subnet_lease_renew_margin as u64,
                ),
                lease_ttl: lease_ttl()?,
            };
            let manager = Arc::new(EtcdManager::new(settings, metrics.clone()).await?);
            let conf = manager.network_config().await?;
            let sup = Supervisor::new(metrics.clone());
            run_agent(&flags, conf, manager, &metrics, 5000, sup).await
        }
    };
    tokio::select! {
        r = agent => r,
        s = shutdown_signal() => {
            tracing::info!("{}: exiting, leaving the dataplane in place", s?);
            Ok(())
        }
    }
}

/// Upstream's 24 h etcd lease TTL; `FLANNEL_RS_LEASE_TTL_SECONDS` shortens it
/// for tests of renewal through outages (not an upstream setting).
fn lease_ttl() -> anyhow::Result<std::time::Duration> {
    match std::env::var("FLANNEL_RS_LEASE_TTL_SECONDS") {
        Ok(v) => match v.parse::<u64>() {
            Ok(s) if s >= 2 => Ok(std::time::Duration::from_secs(s)),
            _ => anyhow::bail!(
                "FLANNEL_RS_LEASE_TTL_SECONDS={v:?}: want a number of seconds, at least 2"
            ),
        },
        Err(_) => Ok(flannel::manager::etcd::LEASE_TTL),
    }
}

/// `FLANNEL_WG_IMPL`: which WireGuard serves the wireguard backend — `auto`
/// (the kernel's, else the embedded userspace one), `kernel` or `userspace`.
fn wg_impl() -> anyhow::Result<flannel::config::netconf::WgImpl> {
    use flannel::config::netconf::WgImpl;
    match std::env::var("FLANNEL_WG_IMPL").as_deref() {
        Err(_) | Ok("") | Ok("auto") => Ok(WgImpl::Auto),
        Ok("kernel") => Ok(WgImpl::Kernel),
        Ok("userspace") => Ok(WgImpl::Userspace),
        Ok(v) => anyhow::bail!("FLANNEL_WG_IMPL={v:?}: want auto, kernel or userspace"),
    }
}

async fn run_agent<M: SubnetManager>(
    flags: &Flags,
    conf: NetConf,
    manager: Arc<M>,
    metrics: &Arc<Metrics>,
    queue_depth: usize,
    sup: Supervisor,
) -> anyhow::Result<()> {
    // One agent per backend type (the backend is a type parameter: no dynamic
    // dispatch on the reconcile path).
    macro_rules! agent {
        ($backend:expr) => {
            Agent {
                flags: flags.clone(),
                conf,
                manager,
                backend: $backend,
                metrics: metrics.clone(),
                queue_depth,
                sup,
            }
            .run()
            .await
        };
    }
    match Any::from_conf(&conf, wg_impl()?) {
        Any::Vxlan(b) => agent!(b),
        Any::Wireguard(b) => agent!(b),
        Any::HostGw(b) => agent!(b),
        Any::Ipip(b) => agent!(b),
        Any::Alloc(b) => agent!(b),
        Any::Extension(b) => agent!(b),
    }
}
