//! Tracing, the Prometheus recorder, and the process and tokio runtime gauges.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::configuration::{LogFormat, TelemetrySettings};

/// Installs the global tracing subscriber. `RUST_LOG` wins over `telemetry.log_level`.
/// Calling it twice (tests) keeps the first subscriber.
pub fn init_tracing(settings: &TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.log_level.as_str()));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match settings.log_format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .try_init(),
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer()).try_init(),
    };
}

/// Latency buckets, in seconds: fine below 10 ms where the buy path lives, coarse above.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets of the waiting room's wait, in seconds.
const WAIT_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// Buckets of order-service's acknowledgement lots, in orders per Redis call.
const LOT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The process-wide Prometheus recorder; installed once, shared by every app in the process.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), LATENCY_BUCKETS)
                .expect("buckets are not empty")
                // A wait in a waiting room lasts seconds to an hour, not milliseconds (exact
                // names win over suffixes in the exporter).
                .set_buckets_for_metric(
                    Matcher::Full("gateway_waiting_room_wait_seconds".into()),
                    WAIT_BUCKETS,
                )
                .expect("buckets are not empty")
                .set_buckets_for_metric(
                    Matcher::Full("flash_sale_ack_lot_size".into()),
                    LOT_BUCKETS,
                )
                .expect("buckets are not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once");
            metrics_process::Collector::default().describe();
            handle
        })
        .clone()
}

/// Whether [`metrics_handle`] has installed the recorder: before, every metric goes nowhere, and
/// a handle taken then would stay a no-op.
pub fn recorder_installed() -> bool {
    HANDLE.get().is_some()
}

/// Renders `/metrics`, refreshing the process and runtime gauges first.
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    metrics_process::Collector::default().collect();
    record_runtime_metrics();
    handle.render()
}

/// Tokio runtime saturation: workers, live tasks, the global queue, and the share of time the
/// workers were busy since the previous scrape (`tokio_busy_ratio`, 0 to 1).
fn record_runtime_metrics() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let m = runtime.metrics();
    let workers = m.num_workers();
    metrics::gauge!("tokio_workers").set(workers as f64);
    metrics::gauge!("tokio_alive_tasks").set(m.num_alive_tasks() as f64);
    metrics::gauge!("tokio_global_queue_depth").set(m.global_queue_depth() as f64);

    let busy: Duration = (0..workers).map(|w| m.worker_total_busy_duration(w)).sum();
    static LAST: Mutex<Option<(Instant, Duration)>> = Mutex::new(None);
    let now = Instant::now();
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, busy_then)) = *last {
        let wall = now.duration_since(at).as_secs_f64() * workers.max(1) as f64;
        if wall > 0.0 {
            let ratio = busy.saturating_sub(busy_then).as_secs_f64() / wall;
            metrics::gauge!("tokio_busy_ratio").set(ratio.clamp(0.0, 1.0));
        }
    }
    *last = Some((now, busy));
}
