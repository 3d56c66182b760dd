//! The operator's own HTTP endpoint: `/metrics` for Prometheus and the `/healthz` and `/readyz`
//! probes for the kubelet.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::Error;
use crate::metrics::Metrics;

/// What the endpoints read.
#[derive(Clone, Debug)]
pub struct ServerState {
    /// Metrics served on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// `/readyz` answers 200 while this is true (set once caches are synced).
    pub ready: Arc<AtomicBool>,
}

/// The router with `/metrics`, `/healthz` and `/readyz`.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds `addr` and serves [`router`] until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).await?;
    serve_listener(listener, state, shutdown).await
}

/// Serves [`router`] on an already bound listener until `shutdown` completes; lets callers bind
/// port 0 and learn the port first.
pub async fn serve_listener(
    listener: TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    tracing::info!(addr = ?listener.local_addr().ok(), "serving metrics and probes");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn metrics(State(state): State<ServerState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

/// Liveness: answering at all is the signal.
async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<ServerState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start() -> (String, ServerState, tokio::sync::oneshot::Sender<()>) {
        let state = ServerState {
            metrics: Arc::new(Metrics::new().unwrap()),
            ready: Arc::new(AtomicBool::new(false)),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        tokio::spawn(async move {
            serve_listener(listener, served, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        (base, state, stop)
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        let (base, state, stop) = start().await;
        let http = reqwest::Client::new();

        let r = http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");

        let r = http.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        state.ready.store(true, Ordering::Relaxed);
        let r = http.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);

        state.metrics.leader.set(1);
        let r = http.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain; version=0.0.4");
        assert!(r.text().await.unwrap().contains("atomic_leader 1"));

        let r = http.get(format!("{base}/nope")).send().await.unwrap();
        assert_eq!(r.status(), 404);
        stop.send(()).unwrap();
    }

    #[tokio::test]
    async fn serve_binds_and_stops_on_shutdown() {
        let state = ServerState {
            metrics: Arc::new(Metrics::new().unwrap()),
            ready: Arc::new(AtomicBool::new(true)),
        };
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // A shutdown future that is already complete: serve must return cleanly.
        serve(addr, state, async {}).await.unwrap();
    }
}
