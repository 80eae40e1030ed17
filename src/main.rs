//! flanneld: parse flags, set up logging, wire the subnet manager and backend
//! into the agent, stop on SIGTERM/SIGINT leaving the dataplane in place.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use flannel::backend::Any;
use flannel::config::flags::{Flags, FlagsError};
use flannel::config::netconf::NetConf;
use flannel::daemon::Agent;
use flannel::manager::kube::{KubeManager, KubeSettings};
use flannel::metrics::Metrics;

fn init_logging(flags: &Flags) {
    let level = match flags.verbosity {
        0 => "info",
        1..=4 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
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
    if flags.use_multi_cluster_cidr {
        tracing::warn!("--use-multi-cluster-cidr is not supported (the API was removed from Kubernetes); ignoring it");
    }
    let prefix = flags
        .annotation_prefix()
        .map_err(|e| anyhow::anyhow!("--kube-annotation-prefix: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    if !flags.kube_subnet_mgr {
        anyhow::bail!("the etcd subnet manager is not available in this build yet; run with --kube-subnet-mgr");
    }
    // Validate the configuration before touching the API or the network.
    let conf = NetConf::from_file(&flags.net_config_path)?;
    if flags.healthz_port != 0 {
        let addr = std::net::SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        let m = metrics.clone();
        let listener = flannel::health::serve(addr, m);
        tokio::spawn(async move {
            if let Err(e) = listener.await {
                tracing::error!("{e:#}");
            }
        });
    }
    let settings = KubeSettings {
        kubeconfig: flags.kubeconfig_file.clone(),
        api_url: flags.kube_api_url.clone(),
        prefix,
        net_config_path: flags.net_config_path.clone(),
        set_unavailable: flags.set_node_network_unavailable,
    };
    let agent = async {
        let manager = Arc::new(KubeManager::new(settings, metrics.clone()).await?);
        tracing::info!("kube subnet manager for node {}", manager.node_name());
        let queue_depth = manager.queue_depth();
        match Any::from_conf(&conf) {
            Any::Vxlan(b) => {
                Agent {
                    flags: flags.clone(),
                    conf: conf.clone(),
                    manager,
                    backend: b,
                    metrics: metrics.clone(),
                    queue_depth,
                }
                .run()
                .await
            }
            Any::HostGw(b) => {
                Agent {
                    flags: flags.clone(),
                    conf: conf.clone(),
                    manager,
                    backend: b,
                    metrics: metrics.clone(),
                    queue_depth,
                }
                .run()
                .await
            }
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
