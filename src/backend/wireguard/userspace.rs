//! Userspace WireGuard for kernels without the module: boringtun's device
//! (a TUN of the same name, its own worker threads) in this process, driven
//! over a private socket pair with the cross-platform configuration protocol
//! (no control socket in /var/run/wireguard, so several agents in several
//! network namespaces of one host never meet).

use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use boringtun::device::{DeviceConfig, DeviceHandle};

use super::device::DeviceState;
use super::key::Key;
use super::uapi;
use crate::dataplane::model::{Changes, WgPeer};

/// Longest a configuration request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Peers per set request.
const BATCH: usize = 256;

/// The control channel of a running userspace device.
#[derive(Clone)]
pub struct Uapi {
    name: String,
    stream: Arc<Mutex<UnixStream>>,
}

/// A running userspace device: it lives as long as this value (and the process).
pub struct UserDevice {
    handle: Option<DeviceHandle>,
    pub uapi: Uapi,
}

/// Starts a userspace device `name` in this network namespace.
pub fn start(name: &str) -> anyhow::Result<UserDevice> {
    let (ours, theirs) = UnixStream::pair().context("creating the control socket pair")?;
    ours.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    ours.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let config = DeviceConfig {
        n_threads: 2,
        use_connected_socket: true,
        use_multi_queue: true,
        uapi_fd: theirs.into_raw_fd(),
    };
    let handle = DeviceHandle::new(name, config)
        .map_err(|e| anyhow::anyhow!("starting userspace WireGuard {name}: {e:?}"))?;
    Ok(UserDevice {
        handle: Some(handle),
        uapi: Uapi {
            name: name.to_string(),
            stream: Arc::new(Mutex::new(ours)),
        },
    })
}

impl UserDevice {
    /// Stops the device (its TUN goes away) and waits for its threads.
    pub async fn stop(mut self) {
        self.uapi.close();
        if let Some(mut h) = self.handle.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::task::spawn_blocking(move || h.wait()),
            )
            .await;
        }
    }
}

impl Uapi {
    /// Closing our end makes the device exit.
    fn close(&self) {
        if let Ok(s) = self.stream.lock() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    async fn request(&self, text: String) -> anyhow::Result<String> {
        let stream = self.stream.clone();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
            let mut s = stream
                .lock()
                .map_err(|_| anyhow::anyhow!("control socket lock poisoned"))?;
            s.write_all(text.as_bytes())
                .with_context(|| format!("writing to userspace WireGuard {name}"))?;
            let mut reply = Vec::new();
            let mut buf = [0u8; 16384];
            // A reply ends with "errno=N\n\n".
            loop {
                let n = s
                    .read(&mut buf)
                    .with_context(|| format!("reading from userspace WireGuard {name}"))?;
                if n == 0 {
                    anyhow::bail!("userspace WireGuard {name} closed its control socket");
                }
                reply.extend_from_slice(&buf[..n]);
                if reply.ends_with(b"\n\n") && find(&reply, b"errno=") {
                    break;
                }
            }
            Ok(String::from_utf8_lossy(&reply).into_owned())
        })
        .await
        .context("control request task")?
    }

    async fn set(&self, text: String) -> anyhow::Result<()> {
        let reply = self.request(text).await?;
        match uapi::errno(&reply) {
            Some(0) => Ok(()),
            e => anyhow::bail!("userspace WireGuard {} refused: errno={e:?}", self.name),
        }
    }

    pub async fn get(&self) -> anyhow::Result<DeviceState> {
        let reply = self.request("get=1\n\n".into()).await?;
        uapi::parse_get(&reply).map_err(|e| anyhow::anyhow!("{}: {e}", self.name))
    }

    pub async fn set_device(&self, private: &Key, port: u16) -> anyhow::Result<()> {
        self.set(uapi::set_device(private, port)).await
    }

    pub async fn set_peers(&self, c: &Changes<Key, WgPeer>) -> Vec<String> {
        let mut failed = Vec::new();
        let dels: Vec<_> = c.del.clone();
        let sets: Vec<_> = c.set.clone();
        let mut chunks: Vec<Changes<Key, WgPeer>> = dels
            .chunks(BATCH)
            .map(|d| Changes {
                set: vec![],
                del: d.to_vec(),
            })
            .collect();
        chunks.extend(sets.chunks(BATCH).map(|s| Changes {
            set: s.to_vec(),
            del: vec![],
        }));
        for ch in chunks {
            if let Err(e) = self.set(uapi::set_peers(&ch)).await {
                failed.push(format!(
                    "{} peer changes on {}: {e:#}",
                    ch.set.len() + ch.del.len(),
                    self.name
                ));
            }
        }
        failed
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
