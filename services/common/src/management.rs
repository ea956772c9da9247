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

/// Serves the management listener until `stop`, then closes it once its in-flight requests are
/// answered. It is the drain's last step, so probes and scrapes answer during the whole drain.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await?;
    Ok(())
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
