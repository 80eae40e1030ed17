//! Command-line flags, compatible with upstream flanneld's Go `flag` package.
//!
//! Go accepts `-flag` as well as `--flag`, and booleans only as `--flag` or
//! `--flag=value`. Every flag can also come from `FLANNELD_<NAME>`; the command
//! line wins. clap does the parsing; this module adapts the Go conventions to it.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

/// Parses a boolean the way Go's `strconv.ParseBool` does.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean {s:?} (use true or false)")),
    }
}

fn parse_renew_margin(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("invalid number {s:?}"))?;
    if (1..=1439).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range 1..1439 minutes"))
    }
}

fn parse_can_reach(s: &str) -> Result<String, String> {
    if s.is_empty() || s.parse::<IpAddr>().is_ok() {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not an IP address"))
    }
}

/// Every flag upstream flanneld accepts, with upstream's names and defaults.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(
    name = "flanneld",
    about = "flannel-rs: a Flannel-compatible node agent",
    disable_version_flag = true,
    args_override_self = true,
    allow_hyphen_values = true
)]
pub struct Flags {
    /// a comma-delimited list of etcd endpoints
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,
    /// etcd prefix
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// SSL key file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", default_value = "")]
    pub etcd_keyfile: String,
    /// SSL certification file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", default_value = "")]
    pub etcd_certfile: String,
    /// SSL Certificate Authority file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", default_value = "")]
    pub etcd_cafile: String,
    /// username for BasicAuth to etcd
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", default_value = "")]
    pub etcd_username: String,
    /// password for BasicAuth to etcd
    #[arg(
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub etcd_password: String,
    /// interface to use (IP or name) for inter-host communication; repeat to try each in order
    #[arg(long, env = "FLANNELD_IFACE", action = ArgAction::Append)]
    pub iface: Vec<String>,
    /// regex matched against interface names and IPs; repeatable, checked after --iface
    #[arg(long, env = "FLANNELD_IFACE_REGEX", action = ArgAction::Append)]
    pub iface_regex: Vec<String>,
    /// use the interface that `ip route get <IP>` would use
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH", default_value = "", value_parser = parse_can_reach)]
    pub iface_can_reach: String,
    /// filename where env variables (subnet, MTU, ...) will be written to
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// IP accessible by other nodes for inter-host communication
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<std::net::Ipv4Addr>,
    /// IPv6 accessible by other nodes for inter-host communication
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// subnet lease renewal margin, in minutes, ranging from 1 to 1439
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value = "60", value_parser = parse_renew_margin)]
    pub subnet_lease_renew_margin: u32,
    /// setup IP masquerade rule for traffic destined outside of overlay network
    #[arg(long, env = "FLANNELD_IP_MASQ", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub ip_masq: bool,
    /// masquerade without random-fully source ports (upstream v0.27.4+)
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub ip_masq_fully_random_disable: bool,
    /// keep a blackhole route for this node's own pod subnet(s), e.g. without the bridge plugin (upstream v0.27.1+)
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub ip_blackhole_route: bool,
    /// iptables backend for the rules: auto (the one the host's rules already use, as kube-proxy's iptables-wrapper), legacy or nft (flannel-rs)
    #[arg(long, env = "FLANNELD_IPTABLES_MODE", default_value = "auto",
          value_parser = ["auto", "legacy", "nft"])]
    pub iptables_mode: String,
    /// enforce Kubernetes NetworkPolicy for this node's pods with nftables (kube mode; flannel-rs)
    #[arg(long, env = "FLANNELD_NETWORK_POLICY", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub network_policy: bool,
    /// log denied connection attempts: source and destination pod, protocol, port; at most 10 a second per pod, through nflog group 2045 (flannel-rs; needs --network-policy to act)
    #[arg(long, env = "FLANNELD_POLICY_LOG_DENIED", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub policy_log_denied: bool,
    /// contact the Kubernetes API for subnet assignment instead of etcd
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL; not needed in a pod
    #[arg(long, env = "FLANNELD_KUBE_API_URL", default_value = "")]
    pub kube_api_url: String,
    /// Kubernetes annotation prefix; a single "/" may appear, otherwise one is appended
    #[arg(
        long,
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,
    /// kubeconfig file location; not needed in a pod
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", default_value = "")]
    pub kubeconfig_file: String,
    /// print version and exit
    #[arg(long, env = "FLANNELD_VERSION", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub version: bool,
    /// the IP address for healthz server to listen
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// the port for healthz server to listen (0 to disable)
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value = "0")]
    pub healthz_port: u16,
    /// resync period for iptables rules, in seconds
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value = "5", value_parser = clap::value_parser!(u64).range(1..))]
    pub iptables_resync: u64,
    /// add default accept rules to FORWARD chain in iptables
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", default_value = "true", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub iptables_forward_rules: bool,
    /// path to the network configuration file (kube mode)
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,
    /// set NodeNetworkUnavailable after ready
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", default_value = "true", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub set_node_network_unavailable: bool,
    /// use MultiClusterCIDR when allocating node CIDR (alpha upstream; not supported, accepted for compatibility)
    #[arg(long, env = "FLANNELD_USE_MULTI_CLUSTER_CIDR", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub use_multi_cluster_cidr: bool,
    /// log level verbosity (klog style: 0 info, 1-4 debug, 5+ trace)
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value = "0")]
    pub verbosity: u8,
    /// comma-separated pattern=N settings for file-filtered logging (klog; mapped onto module filters)
    #[arg(long, env = "FLANNELD_VMODULE", default_value = "")]
    pub vmodule: String,
    /// when logging hits line file:N, emit a stack trace (klog; accepted and ignored)
    #[arg(
        long = "log_backtrace_at",
        env = "FLANNELD_LOG_BACKTRACE_AT",
        default_value = ""
    )]
    pub log_backtrace_at: String,
}

/// Why the flags could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FlagsError {
    /// `--help` was asked for (the text is the rendered help).
    #[error("{0}")]
    Help(String),
    #[error("invalid value {value:?} in environment variable {var}: {reason}")]
    Env {
        var: String,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Cli(String),
}

impl Flags {
    /// Parses the process arguments and environment.
    pub fn from_env_and_args() -> Result<Self, FlagsError> {
        Self::parse_from_iter(std::env::args_os(), |k| std::env::var(k).ok())
    }

    /// Parses `args` (including argv[0]); `env` looks up environment variables.
    ///
    /// clap reads `FLANNELD_*` itself (through the process environment); the
    /// `env` lookup is only used to say which variable held a bad value.
    pub fn parse_from_iter<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, FlagsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let args = go_style_args(args.into_iter().map(Into::into).collect());
        let cmd = Self::command();
        let matches = match cmd.clone().try_get_matches_from(&args) {
            Ok(m) => m,
            Err(e) => return Err(explain(e, &cmd, &args, &env)),
        };
        Self::from_arg_matches(&matches).map_err(|e| FlagsError::Cli(e.to_string()))
    }

    /// The annotation prefix normalised as upstream does (see compat §4).
    pub fn annotation_prefix(&self) -> Result<String, String> {
        normalize_annotation_prefix(&self.kube_annotation_prefix)
    }

    /// The etcd endpoints as a list.
    pub fn etcd_endpoint_list(&self) -> Vec<String> {
        self.etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }
}

/// Upstream: a prefix without `/` gets `/` appended; with one `/` not at the end,
/// `-` is appended; the result must look like `fqdn/[name-]`.
pub fn normalize_annotation_prefix(p: &str) -> Result<String, String> {
    let slashes = p.matches('/').count();
    let prefix = match slashes {
        0 => format!("{p}/"),
        1 if p.ends_with('/') => p.to_string(),
        1 => format!("{p}-"),
        _ => {
            return Err(format!(
                "annotation prefix {p:?} may contain at most one '/'"
            ))
        }
    };
    let (domain, name) = prefix.split_once('/').unwrap_or((&prefix, ""));
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.is_empty() || domain.len() > 253 || !domain.split('.').all(label_ok) {
        return Err(format!(
            "annotation prefix {p:?} does not start with a DNS name"
        ));
    }
    let name_ok = name.is_empty()
        || (name.len() < 63
            && name.ends_with('-')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && name.starts_with(|c: char| c.is_ascii_alphanumeric()));
    if !name_ok {
        return Err(format!("annotation prefix {p:?} has an invalid name part"));
    }
    Ok(prefix)
}

/// Rewrites Go's single-dash long flags (`-ip-masq`, `-iface=eth0`) to the
/// double-dash form clap understands. Only names of known flags are rewritten,
/// so a value that happens to start with `-` is left alone.
fn go_style_args(mut args: Vec<OsString>) -> Vec<OsString> {
    let cmd = Flags::command();
    // Long names, and whether the flag needs a separate value (Go: every non-boolean flag).
    let longs: Vec<(String, bool)> = cmd
        .get_arguments()
        .filter_map(|a| {
            let takes = a.get_num_args().map(|n| n.min_values() > 0).unwrap_or(true)
                && a.get_action().takes_values();
            a.get_long().map(|l| (l.to_string(), takes))
        })
        .collect();
    let mut value_next = false;
    for a in args.iter_mut().skip(1) {
        let Some(s) = a.to_str().map(String::from) else {
            continue;
        };
        if std::mem::take(&mut value_next) {
            continue;
        }
        if s == "--" {
            break;
        }
        let Some(rest) = s.strip_prefix('-') else {
            continue;
        };
        let rest = rest.strip_prefix('-').unwrap_or(rest);
        let (name, has_value) = match rest.split_once('=') {
            Some((n, _)) => (n, true),
            None => (rest, false),
        };
        if name == "v" {
            // `-v=2` too: clap's short form does not take `=`.
            value_next = !has_value;
            if has_value {
                *a = OsString::from(format!("--{rest}"));
            }
            continue;
        }
        if let Some((_, takes)) = longs.iter().find(|(l, _)| l == name) {
            value_next = *takes && !has_value;
            if !s.starts_with("--") {
                *a = OsString::from(format!("-{s}"));
            }
        }
    }
    args
}

/// Turns a clap error into ours; a bad value that came from the environment
/// names the variable, as the operator has to fix it there.
fn explain(
    e: clap::Error,
    cmd: &clap::Command,
    args: &[OsString],
    env: &dyn Fn(&str) -> Option<String>,
) -> FlagsError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return FlagsError::Help(e.render().to_string());
    }
    if matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) {
            let long: String = arg
                .trim_start_matches('-')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            let on_cli = args.iter().skip(1).filter_map(|a| a.to_str()).any(|a| {
                let name = a.trim_start_matches('-').split('=').next().unwrap_or("");
                a.starts_with('-') && name == long
            });
            if !on_cli {
                if let Some(var) = cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long.as_str()))
                    .and_then(|a| a.get_env())
                    .and_then(|v| v.to_str())
                {
                    if let Some(value) = env(var) {
                        let reason = match e.get(ContextKind::InvalidValue) {
                            Some(ContextValue::String(_)) | None => e
                                .source_reason()
                                .unwrap_or_else(|| format!("not a valid value for --{long}")),
                            Some(other) => other.to_string(),
                        };
                        return FlagsError::Env {
                            var: var.to_string(),
                            value,
                            reason,
                        };
                    }
                }
            }
        }
    }
    FlagsError::Cli(e.render().to_string())
}

trait SourceReason {
    fn source_reason(&self) -> Option<String>;
}

impl SourceReason for clap::Error {
    fn source_reason(&self) -> Option<String> {
        std::error::Error::source(self).map(|s| s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Flags, FlagsError> {
        let mut v = vec!["flanneld"];
        v.extend_from_slice(args);
        Flags::parse_from_iter(v, |_| None)
    }

    #[test]
    fn defaults_match_upstream() {
        let f = parse(&[]).unwrap();
        assert_eq!(
            f.etcd_endpoints,
            "http://127.0.0.1:4001,http://127.0.0.1:2379"
        );
        assert_eq!(f.etcd_endpoint_list().len(), 2);
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert!(!f.ip_masq && !f.kube_subnet_mgr && !f.version);
        assert_eq!(f.kube_annotation_prefix, "flannel.alpha.coreos.com");
        assert_eq!(f.healthz_ip.to_string(), "0.0.0.0");
        assert_eq!(f.healthz_port, 0);
        assert_eq!(f.iptables_resync, 5);
        assert!(f.iptables_forward_rules);
        assert_eq!(
            f.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert!(f.set_node_network_unavailable);
        assert_eq!(f.verbosity, 0);
        assert!(f.iface.is_empty() && f.iface_regex.is_empty());
        assert_eq!(f.public_ip, None);
    }

    #[test]
    fn go_style_single_and_double_dash() {
        for args in [
            vec!["-ip-masq", "-kube-subnet-mgr", "-iface", "eth0"],
            vec!["--ip-masq", "--kube-subnet-mgr", "--iface=eth0"],
            vec!["--ip-masq=true", "-kube-subnet-mgr=true", "-iface=eth0"],
        ] {
            let f = parse(&args).unwrap();
            assert!(f.ip_masq, "{args:?}");
            assert!(f.kube_subnet_mgr, "{args:?}");
            assert_eq!(f.iface, vec!["eth0"], "{args:?}");
        }
    }

    #[test]
    fn bool_false_and_go_spellings() {
        let f = parse(&[
            "--iptables-forward-rules=false",
            "-set-node-network-unavailable=F",
            "--ip-masq=1",
        ])
        .unwrap();
        assert!(!f.iptables_forward_rules);
        assert!(!f.set_node_network_unavailable);
        assert!(f.ip_masq);
        assert!(parse(&["--ip-masq=yes"]).is_err());
    }

    #[test]
    fn repeatable_iface_keeps_order() {
        let f = parse(&[
            "--iface",
            "eth1",
            "-iface=10.0.0.1",
            "--iface-regex",
            "^en",
            "-iface-regex=^eth",
        ])
        .unwrap();
        assert_eq!(f.iface, vec!["eth1", "10.0.0.1"]);
        assert_eq!(f.iface_regex, vec!["^en", "^eth"]);
    }

    #[test]
    fn verbosity_forms() {
        assert_eq!(parse(&["-v", "3"]).unwrap().verbosity, 3);
        assert_eq!(parse(&["-v=4"]).unwrap().verbosity, 4);
        assert_eq!(parse(&["--v=2"]).unwrap().verbosity, 2);
        assert_eq!(parse(&["-v5"]).unwrap().verbosity, 5);
    }

    #[test]
    fn dash_value_is_not_rewritten() {
        let f = parse(&["--etcd-password", "-ip-masq"]).unwrap();
        assert_eq!(f.etcd_password, "-ip-masq");
        assert!(!f.ip_masq);
    }

    #[test]
    fn numbers_and_ips_are_checked() {
        assert_eq!(parse(&["--healthz-port=8471"]).unwrap().healthz_port, 8471);
        assert!(parse(&["--healthz-port=abc"]).is_err());
        assert!(parse(&["--subnet-lease-renew-margin=0"]).is_err());
        assert!(parse(&["--subnet-lease-renew-margin=1440"]).is_err());
        assert_eq!(
            parse(&["--subnet-lease-renew-margin=1439"])
                .unwrap()
                .subnet_lease_renew_margin,
            1439
        );
        assert!(parse(&["--public-ip=300.1.1.1"]).is_err());
        assert_eq!(
            parse(&["--public-ip=198.18.0.11"]).unwrap().public_ip,
            Some("198.18.0.11".parse().unwrap())
        );
        assert!(parse(&["--iface-can-reach=nope"]).is_err());
        assert!(parse(&["--unknown-flag"]).is_err());
    }

    #[test]
    fn help_lists_every_upstream_flag() {
        let help = Flags::command().render_long_help().to_string();
        for flag in [
            "--etcd-endpoints",
            "--etcd-prefix",
            "--etcd-keyfile",
            "--etcd-certfile",
            "--etcd-cafile",
            "--etcd-username",
            "--etcd-password",
            "--iface",
            "--iface-regex",
            "--iface-can-reach",
            "--subnet-file",
            "--public-ip",
            "--public-ipv6",
            "--subnet-lease-renew-margin",
            "--ip-masq",
            "--kube-subnet-mgr",
            "--kube-api-url",
            "--kube-annotation-prefix",
            "--kubeconfig-file",
            "--version",
            "--healthz-ip",
            "--healthz-port",
            "--iptables-resync",
            "--iptables-forward-rules",
            "--net-config-path",
            "--set-node-network-unavailable",
            "--ip-blackhole-route",
            "--ip-masq-fully-random-disable",
            "--iptables-mode",
            "--network-policy",
            "--policy-log-denied",
            "-v",
        ] {
            assert!(help.contains(flag), "help misses {flag}");
        }
    }

    #[test]
    fn annotation_prefix_rules() {
        assert_eq!(
            normalize_annotation_prefix("flannel.alpha.coreos.com").unwrap(),
            "flannel.alpha.coreos.com/"
        );
        assert_eq!(
            normalize_annotation_prefix("example.com/").unwrap(),
            "example.com/"
        );
        assert_eq!(
            normalize_annotation_prefix("example.com/net").unwrap(),
            "example.com/net-"
        );
        assert!(normalize_annotation_prefix("a/b/c").is_err());
        assert!(normalize_annotation_prefix("Bad_Domain").is_err());
        assert!(normalize_annotation_prefix("").is_err());
    }
}
