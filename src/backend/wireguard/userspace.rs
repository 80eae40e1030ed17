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
    /// The same socket, for shutting it down while a request holds the lock.
    closer: Arc<UnixStream>,
}

/// A running userspace device: it lives as long as this value (and the process).
pub struct UserDevice {
    handle: Option<DeviceHandle>,
    pub uapi: Uapi,
    /// Serves `wg` on `<dir>/<name>.sock`, as every userspace WireGuard does.
    socket: Option<(std::path::PathBuf, crate::reconcile::drift::AbortOnDrop<()>)>,
}

/// Where the control socket goes: `FLANNEL_WG_SOCKET_DIR`, else the one `wg`
/// looks in.
pub fn socket_dir() -> std::path::PathBuf {
    std::env::var_os("FLANNEL_WG_SOCKET_DIR")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/run/wireguard".into())
}

/// Serves the configuration protocol on a Unix socket for `wg show`,
/// forwarding `get` to the device. `set` is refused (EPERM): the agent owns
/// the device, and boringtun aborts on some valid requests (changing a peer in
/// place), which must not take the node's dataplane down.
fn serve_socket(
    uapi: &Uapi,
) -> anyhow::Result<(std::path::PathBuf, crate::reconcile::drift::AbortOnDrop<()>)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = socket_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.sock", uapi.name));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    let uapi = uapi.clone();
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let uapi = uapi.clone();
            tokio::spawn(async move {
                let (r, mut w) = conn.into_split();
                let mut r = tokio::io::BufReader::new(r);
                let mut req = String::new();
                // One request: lines up to a blank one (bounded in size and time).
                let read = async {
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.ok()? == 0 || req.len() > 1 << 20 {
                            return None;
                        }
                        req.push_str(&line);
                        if line == "\n" {
                            return Some(());
                        }
                    }
                };
                if tokio::time::timeout(REQUEST_TIMEOUT, read)
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                {
                    return;
                }
                let reply = if req.starts_with("get=1\n") {
                    uapi.request("get=1\n\n".into()).await.ok()
                } else {
                    Some(format!("errno={}\n\n", -libc::EPERM))
                };
                if let Some(reply) = reply {
                    let _ = w.write_all(reply.as_bytes()).await;
                }
            });
        }
    });
    Ok((path, crate::reconcile::drift::AbortOnDrop(task)))
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
    // The device's threads inherit the signal mask of the thread that starts
    // them: with every signal blocked there, the agent's signals (SIGCHLD of
    // every iptables run, SIGTERM) never interrupt their polls.
    let owned = name.to_string();
    let handle = std::thread::spawn(move || {
        let all = nix::sys::signal::SigSet::all();
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&all),
            None,
        );
        DeviceHandle::new(&owned, config)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("starting userspace WireGuard {name}: the thread panicked"))?
    .map_err(|e| anyhow::anyhow!("starting userspace WireGuard {name}: {e:?}"))?;
    let closer = Arc::new(ours.try_clone().context("duplicating the control socket")?);
    let uapi = Uapi {
        name: name.to_string(),
        stream: Arc::new(Mutex::new(ours)),
        closer,
    };
    let socket = match serve_socket(&uapi) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("no control socket for `wg` on {name}: {e:#}");
            None
        }
    };
    Ok(UserDevice {
        handle: Some(handle),
        uapi,
        socket,
    })
}

impl UserDevice {
    /// Stops the device: dropping boringtun's handle tells its threads to
    /// exit (they close their TUN queues as they go); nothing waits for them.
    pub async fn stop(mut self) {
        if let Some((path, _task)) = self.socket.take() {
            let _ = std::fs::remove_file(path);
        }
        self.uapi.close();
        drop(self.handle.take());
    }
}

/// Reads and drops whatever is already waiting on the control socket.
fn drain(s: &std::os::unix::net::UnixStream, buf: &mut [u8]) {
    if s.set_nonblocking(true).is_err() {
        return;
    }
    let mut r = s;
    loop {
        match r.read(buf) {
            Ok(n) if n > 0 => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => break,
        }
    }
    let _ = s.set_nonblocking(false);
}

impl Uapi {
    /// Closing our end makes the device exit.
    fn close(&self) {
        // Also ends a request blocked on a device that stopped answering.
        let _ = self.closer.shutdown(std::net::Shutdown::Both);
    }

    async fn request(&self, text: String) -> anyhow::Result<String> {
        let stream = self.stream.clone();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
            let mut s = stream
                .lock()
                .map_err(|_| anyhow::anyhow!("control socket lock poisoned"))?;
            let mut buf = [0u8; 16384];
            // The rest of a reply an earlier request gave up on (timed out)
            // must not be taken for this one's.
            drain(&s, &mut buf);
            s.write_all(text.as_bytes())
                .with_context(|| format!("writing to userspace WireGuard {name}"))?;
            let mut reply = Vec::new();
            // A reply ends with "errno=N\n\n". A signal (SIGCHLD of a firewall
            // tool, say) interrupting the read must not end the request early:
            // the rest of this reply would then be read as the next one's.
            loop {
                let n = match s.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => r.with_context(|| format!("reading from userspace WireGuard {name}"))?,
                };
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
        // Bounded requests: the diff in slices of BATCH peers, each slice's
        // removals before its additions.
        let mut dels = c.del.chunks(BATCH);
        let mut sets = c.set.chunks(BATCH);
        loop {
            let ch = Changes {
                del: dels.next().map(<[_]>::to_vec).unwrap_or_default(),
                set: sets.next().map(<[_]>::to_vec).unwrap_or_default(),
            };
            if ch.is_empty() {
                break;
            }
            for req in uapi::set_peers(&ch) {
                if let Err(e) = self.set(req).await {
                    failed.push(format!(
                        "{} peer changes on {}: {e:#}",
                        ch.set.len() + ch.del.len(),
                        self.name
                    ));
                }
            }
        }
        failed
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
