//! /healthz (upstream's liveness answer), /readyz and /metrics on
//! --healthz-ip:--healthz-port, served by axum on hyper.
//!
//! The server runs on a thread and runtime of its own, so scrapes never wait
//! behind (or delay) the reconciler. It holds at most [`MAX_CONNECTIONS`]
//! connections (further ones wait in the listen backlog), gives a client
//! [`HEADER_TIMEOUT`] to send its request head and [`CONNECTION_TIMEOUT`] in all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

pub const MAX_CONNECTIONS: usize = 16;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The routes: upstream answers /healthz to any method, 404 as Go's mux does.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", any(|| async { "flanneld is running" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found\n") })
        .with_state(metrics)
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.readiness() {
        Ok(()) => (StatusCode::OK, "flanneld is ready".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("flanneld is not ready yet: {why}"),
        ),
    }
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else text 0.0.4.
async fn scrape(State(m): State<Arc<Metrics>>, headers: HeaderMap) -> impl IntoResponse {
    m.refresh().await;
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.render_openmetrics(),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            m.render(),
        )
    }
}

/// Binds now (so a taken port is reported at start) and serves on a thread of its own.
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("healthz: cannot listen on {addr}: {e}"))?;
    std_listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("healthz".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!("healthz: cannot start its runtime: {e}"),
            };
            rt.block_on(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(l) => serve(l, metrics).await,
                    Err(e) => tracing::error!("healthz: {e}"),
                }
            })
        })?;
    tracing::info!("serving /healthz, /readyz and /metrics on {addr}");
    Ok(())
}

/// Accepts while fewer than [`MAX_CONNECTIONS`] are open; each connection is
/// HTTP/1.1 with a header read timeout and an overall bound.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let app = router(metrics);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!("healthz accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(sock), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server() -> (SocketAddr, Arc<Metrics>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        tokio::spawn(serve(l, m.clone()));
        (addr, m)
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_like_upstream() {
        let (addr, m) = server().await;
        let h = get(addr, "/healthz").await;
        assert!(
            h.starts_with("HTTP/1.1 200") && h.ends_with("flanneld is running"),
            "{h}"
        );
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("lease or dataplane pending"),
            "{r}"
        );
        m.set_ready();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let x = get(addr, "/metrics").await;
        assert!(
            x.contains("text/plain; version=0.0.4") && x.contains("\nflannel_ready 1\n"),
            "{x}"
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }

    #[tokio::test]
    async fn silent_clients_neither_block_others_nor_stay() {
        let (addr, _) = server().await;
        // Hold every slot with connections that never send a request head.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The next request waits for a slot: the header timeout frees them.
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(15), get(addr, "/healthz"))
            .await
            .expect("served once the silent connections timed out");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let waited = started.elapsed();
        assert!(
            waited >= HEADER_TIMEOUT - Duration::from_millis(500),
            "{waited:?}"
        );
        // The silent ones were closed by the server.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(1), idle[0].read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(_)) | Ok(Err(_))),
            "silent connection still open"
        );
    }
}
