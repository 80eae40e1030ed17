//! /run/flannel/subnet.env: what the flannel CNI plugin reads.
//!
//! Written as upstream does: a temporary `.<name>` in the same directory, then
//! renamed over the target, so a reader never sees half a file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use ipnetwork::IpNetwork;

use crate::subnet;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubnetEnv {
    pub network: Option<IpNetwork>,
    /// The lease (network address form); written as gateway/prefix.
    pub subnet: Option<IpNetwork>,
    pub ipv6_network: Option<IpNetwork>,
    pub ipv6_subnet: Option<IpNetwork>,
    pub mtu: Option<u32>,
    pub ipmasq: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

impl SubnetEnv {
    /// The file's text, keys in upstream's order.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let gw = |n: &IpNetwork| format!("{}/{}", subnet::gateway(n), n.prefix());
        if let Some(n) = &self.network {
            let _ = writeln!(s, "FLANNEL_NETWORK={n}");
        }
        if let Some(n) = &self.subnet {
            let _ = writeln!(s, "FLANNEL_SUBNET={}", gw(n));
        }
        if let Some(n) = &self.ipv6_network {
            let _ = writeln!(s, "FLANNEL_IPV6_NETWORK={n}");
        }
        if let Some(n) = &self.ipv6_subnet {
            let _ = writeln!(s, "FLANNEL_IPV6_SUBNET={}", gw(n));
        }
        if let Some(m) = self.mtu {
            let _ = writeln!(s, "FLANNEL_MTU={m}");
        }
        if let Some(b) = self.ipmasq {
            let _ = writeln!(s, "FLANNEL_IPMASQ={b}");
        }
        s
    }

    /// Parses the file's text. Unknown keys and malformed values are ignored
    /// (the file is a hint for re-acquiring the old lease, never authoritative).
    pub fn parse(text: &str) -> SubnetEnv {
        let mut env = SubnetEnv::default();
        let as_net = |v: &str| {
            v.parse::<IpNetwork>()
                .ok()
                .map(|n| subnet::net(n.ip(), n.prefix()))
        };
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "FLANNEL_NETWORK" => env.network = as_net(v).filter(|n| n.is_ipv4()),
                // A subnet is written as its first address: a /32 (/128) has none to spare.
                "FLANNEL_SUBNET" => {
                    env.subnet = as_net(v).filter(|n| n.is_ipv4() && n.prefix() < 32)
                }
                "FLANNEL_IPV6_NETWORK" => env.ipv6_network = as_net(v).filter(|n| n.is_ipv6()),
                "FLANNEL_IPV6_SUBNET" => {
                    env.ipv6_subnet = as_net(v).filter(|n| n.is_ipv6() && n.prefix() < 128)
                }
                "FLANNEL_MTU" => env.mtu = v.parse().ok(),
                "FLANNEL_IPMASQ" => env.ipmasq = v.parse().ok(),
                _ => {}
            }
        }
        env
    }

    /// Reads `path`; a missing file is `Ok(None)`.
    pub fn read(path: &Path) -> Result<Option<SubnetEnv>, SubnetEnvError> {
        match std::fs::read_to_string(path) {
            Ok(t) => Ok(Some(Self::parse(&t))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SubnetEnvError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Writes atomically; creates the directory (0755) when missing.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        let werr = |source| SubnetEnvError::Write {
            path: path.display().to_string(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| werr(std::io::Error::other("not a file name")))?;
        use std::os::unix::fs::PermissionsExt;
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(werr)?;
            // The CNI plugin (maybe another user) reads it: 0755 whatever the umask.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(werr)?;
        }
        let tmp = dir.join(format!(".{}", name.to_string_lossy()));
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(werr)?;
        f.write_all(self.render().as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(werr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> SubnetEnv {
        SubnetEnv {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.1.0/24".parse().unwrap()),
            ipv6_network: Some("fd00:10:244::/56".parse().unwrap()),
            ipv6_subnet: Some("fd00:10:244:1::/64".parse().unwrap()),
            mtu: Some(1450),
            ipmasq: Some(true),
        }
    }

    #[test]
    fn renders_upstream_format() {
        assert_eq!(
            full().render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\n\
             FLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let v4 = SubnetEnv {
            ipv6_network: None,
            ipv6_subnet: None,
            ipmasq: Some(false),
            ..full()
        };
        assert_eq!(v4.render(), "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n");
    }

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        // A restrictive umask (as under some service managers) must not make
        // the directory or the file unreadable for the CNI plugin.
        let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let written = full().write(&path);
        nix::sys::stat::umask(old_umask);
        written.unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(full()));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(path.parent().unwrap()), 0o755);
        assert_eq!(mode(&path), 0o644);
        // Replace: an open reader of the old file keeps the old inode; the path shows the new text.
        let old = std::fs::File::open(&path).unwrap();
        let next = SubnetEnv {
            mtu: Some(1500),
            ..full()
        };
        next.write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap().unwrap().mtu, Some(1500));
        let old_text = std::io::read_to_string(old).unwrap();
        assert!(old_text.contains("FLANNEL_MTU=1450"));
        assert!(!path.parent().unwrap().join(".subnet.env").exists());
    }

    #[test]
    fn missing_file_is_none_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SubnetEnv::read(&dir.path().join("nope")).unwrap(), None);
        let e = SubnetEnv::parse(
            "garbage\nFLANNEL_SUBNET=not-a-net\nFLANNEL_MTU=x\nFLANNEL_NETWORK=fd00::/8\n=\n",
        );
        assert_eq!(e, SubnetEnv::default());
        let e = SubnetEnv::parse("FLANNEL_SUBNET=10.244.7.1/24\n");
        assert_eq!(e.subnet, Some("10.244.7.0/24".parse().unwrap()));
    }

    proptest::proptest! {
        #[test]
        /// Whatever is read back renders to text that reads back the same (so a
        /// rewritten file never loses or changes a field the agent understood).
        fn parse_render_round_trip(s in "((FLANNEL_(NETWORK|SUBNET|IPV6_NETWORK|IPV6_SUBNET|MTU|IPMASQ|[A-Z]{0,4})=([0-9./:a-f]{0,24}|true|false|[0-9]{1,5})|[ -~]{0,20})\n){0,8}") {
            let e = SubnetEnv::parse(&s);
            proptest::prop_assert_eq!(SubnetEnv::parse(&e.render()), e.clone());
            for n in [e.network, e.subnet].into_iter().flatten() {
                proptest::prop_assert!(n.is_ipv4());
            }
            for n in [e.ipv6_network, e.ipv6_subnet].into_iter().flatten() {
                proptest::prop_assert!(n.is_ipv6());
            }
        }
    }
}
