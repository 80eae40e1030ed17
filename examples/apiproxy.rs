//! The instrument of `scripts/bench-apiserver.sh`: a TCP proxy in front of
//! the lab API server's plain-HTTP port, so a benchmark can break the agent's
//! connections and play an overloaded API server.
//!
//!   apiproxy <listen addr> <upstream addr> <retry-after seconds>
//!
//! - SIGUSR1: drop every open connection with a reset (a watch breaks
//!   mid-stream, as when a load balancer or an API server process dies).
//! - SIGUSR2: toggle "overloaded": open connections are dropped and every
//!   request is answered `429 Too Many Requests` with `Retry-After` and the
//!   Status body kube-apiserver sends, then the connection is closed.
//!
//! Prints one line per event on stdout, `<unix ms> <event> [detail]`:
//! `drop <n>`, `overloaded on|off`, `429 <request line>`, and every second
//! in which bytes flowed, `bytes <total from the API server to clients>`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

struct Shared {
    overloaded: AtomicBool,
    down_bytes: AtomicU64,
    retry_after: u64,
    upstream: String,
    /// Bumped to drop every open connection.
    generation: watch::Sender<u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 4,
        "usage: apiproxy <listen addr> <upstream addr> <retry-after seconds>"
    );
    let listener = TcpListener::bind(&a[1]).await?;
    let sh = Arc::new(Shared {
        overloaded: AtomicBool::new(false),
        down_bytes: AtomicU64::new(0),
        retry_after: a[3].parse()?,
        upstream: a[2].clone(),
        generation: watch::Sender::new(0),
    });
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_bytes = 0;
    loop {
        tokio::select! {
            c = listener.accept() => {
                let (sock, _) = c?;
                tokio::spawn(serve(sock, sh.clone()));
            }
            _ = usr1.recv() => drop_all(&sh),
            _ = usr2.recv() => {
                let on = !sh.overloaded.fetch_xor(true, Ordering::SeqCst);
                println!("{} overloaded {}", now_ms(), if on { "on" } else { "off" });
                if on {
                    drop_all(&sh);
                }
            }
            _ = tick.tick() => {
                let b = sh.down_bytes.load(Ordering::Relaxed);
                if b != last_bytes {
                    println!("{} bytes {b}", now_ms());
                    last_bytes = b;
                }
            }
        }
    }
}

fn drop_all(sh: &Shared) {
    let n = sh.generation.receiver_count();
    sh.generation.send_modify(|g| *g += 1);
    println!("{} drop {n}", now_ms());
}

async fn serve(mut client: TcpStream, sh: Arc<Shared>) {
    let mut gen = sh.generation.subscribe();
    if sh.overloaded.load(Ordering::SeqCst) {
        reject(&mut client, &sh).await;
        return;
    }
    let Ok(upstream) = TcpStream::connect(&sh.upstream).await else {
        return; // the API server is down: the client sees the connection close
    };
    let mut upstream = upstream;
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = ur.read(&mut buf).await {
            if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            sh.down_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let dropped = tokio::select! {
        _ = async { tokio::join!(up, down) } => false,
        _ = gen.changed() => true,
    };
    if dropped {
        // Closed with a reset, not a clean end of stream. A zero linger never
        // blocks on drop (the deprecation's concern): the kernel sends RST at once.
        #[allow(deprecated)]
        let _ = client.set_linger(Some(Duration::ZERO));
    }
}

/// Reads one request head (bounded) and answers it as an overloaded API server.
async fn reject(client: &mut TcpStream, sh: &Shared) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    });
    if read.await.is_err() || head.is_empty() {
        return;
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("");
    println!("{} 429 {line}", now_ms());
    let body = format!(
        r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"Too many requests, please try again later.","reason":"TooManyRequests","details":{{"retryAfterSeconds":{}}},"code":429}}"#,
        sh.retry_after
    );
    let resp = format!(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        sh.retry_after,
        body.len()
    );
    let _ = client.write_all(resp.as_bytes()).await;
    let _ = client.shutdown().await;
}
