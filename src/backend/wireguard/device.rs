//! One WireGuard device's control channel, kernel or userspace, behind one
//! interface: read what it holds, set its key and port, apply a peer diff.

use std::collections::BTreeMap;

use super::key::Key;
use super::{kernel, userspace};
use crate::dataplane::model::{Changes, WgPeer};

/// A peer's counters, for logs and metrics (`wg show`'s last columns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Seconds since the epoch; 0 = never.
    pub last_handshake_secs: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What a device holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub private_key: Option<Key>,
    /// The device's public key (boringtun reports only this, not the private one).
    pub public_key: Option<Key>,
    pub listen_port: u16,
    pub peers: BTreeMap<Key, WgPeer>,
    pub stats: BTreeMap<Key, PeerStats>,
}

impl DeviceState {
    /// Whether the device holds the private key `k` (by its public key when
    /// the device does not tell its private one).
    pub fn holds_key(&self, k: &Key) -> bool {
        match (self.private_key, self.public_key) {
            (Some(p), _) => p == *k,
            (None, Some(public)) => public == k.public(),
            (None, None) => false,
        }
    }
}

/// Which implementation serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Kernel,
    Userspace,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Kernel => "kernel",
            Flavor::Userspace => "userspace",
        }
    }
}

/// A device's control channel (cheap to clone: the drift check reads through
/// a clone while the reconciler writes through the original).
#[derive(Clone)]
pub enum Control {
    Kernel(kernel::Genl),
    Userspace(userspace::Uapi),
}

impl Control {
    pub fn flavor(&self) -> Flavor {
        match self {
            Control::Kernel(_) => Flavor::Kernel,
            Control::Userspace(_) => Flavor::Userspace,
        }
    }

    pub async fn get(&self) -> anyhow::Result<DeviceState> {
        match self {
            Control::Kernel(k) => k.get().await,
            Control::Userspace(u) => u.get().await,
        }
    }

    pub async fn set_device(&self, private: &Key, port: u16) -> anyhow::Result<()> {
        match self {
            Control::Kernel(k) => k.set_device(private, port).await,
            Control::Userspace(u) => u.set_device(private, port).await,
        }
    }

    /// Applies a peer diff; returns one message per failed request (the rest
    /// are applied: one refused peer does not hold back the others).
    pub async fn set_peers(&self, c: &Changes<Key, WgPeer>) -> Vec<String> {
        if c.is_empty() {
            return vec![];
        }
        match self {
            Control::Kernel(k) => k.set_peers(c).await,
            Control::Userspace(u) => u.set_peers(c).await,
        }
    }
}
