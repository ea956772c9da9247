//! The management listener: `/health/live`, `/health/ready`, `/metrics`.
//!
//! Probes check only the pod itself: a Redis or MySQL outage must not take every pod out of
//! its Service at once (the buy path answers 503 for what it cannot do instead).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Whether the pod should receive traffic: set once start-up is done, cleared when draining.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct ManagementState {
    readiness: Readiness,
    metrics: PrometheusHandle,
}

/// The management listener, served on its own task until [`ManagementServer::stop`]: it
/// outlives the app listener so probes and scrapes answer during the whole drain.
pub struct ManagementServer {
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl ManagementServer {
    pub fn spawn(listener: TcpListener, router: Router) -> Self {
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        });
        Self { stop, task }
    }

    /// Closes the listener once its in-flight requests are answered.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        Ok(self.task.await??)
    }
}

pub fn router(readiness: Readiness, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render))
        .with_state(ManagementState { readiness, metrics })
}

async fn ready(State(state): State<ManagementState>) -> (StatusCode, &'static str) {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn render(State(state): State<ManagementState>) -> String {
    crate::telemetry::render_metrics(&state.metrics)
}
