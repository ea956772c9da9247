//! The services running in-process against a [`Stack`], on free ports, each stopped by its own
//! token. Test files use [`TestApps::spawn`] and read like the API they exercise.

use std::time::Duration;

use flash_sale_common::configuration::{ListenerSettings, LogFormat, Secret};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::stack::Stack;

/// The admin token the test inventory-service accepts.
pub const ADMIN_TOKEN: &str = "test-admin-token";

pub fn local(port: u16) -> ListenerSettings {
    ListenerSettings {
        host: "127.0.0.1".into(),
        port,
    }
}

/// order-service settings pointing at `stack`, on free ports.
pub fn order_settings(stack: &Stack) -> order_service::Settings {
    let mut s = order_service::Settings {
        server: local(0),
        management: local(0),
        ..Default::default()
    };
    s.redis.url = Secret::new(stack.redis_url());
    s.redis.cluster = stack.info().redis_cluster;
    s.database.url = Secret::new(stack.database_url());
    s.kafka.brokers = stack.brokers();
    s.kafka.message_timeout_ms = 3000;
    s.consumer.batch_linger_ms = 10;
    s.consumer.retry_backoff_ms = 100;
    s.lifecycle.sweep_interval_ms = 200;
    s.payment.callback_secret = Secret::new(PAYMENT_SECRET);
    s.telemetry.log_format = LogFormat::Pretty;
    s
}

/// The key the payment simulator and the test order-service share.
pub const PAYMENT_SECRET: &str = "test-payment-callback-secret";

/// inventory-service settings pointing at `stack`, on free ports, with the schedules off (tests
/// drive the jobs through the API).
pub fn inventory_settings(stack: &Stack) -> inventory_service::Settings {
    let mut s = inventory_service::Settings {
        server: local(0),
        management: local(0),
        ..Default::default()
    };
    s.redis.url = Secret::new(stack.redis_url());
    s.redis.cluster = stack.info().redis_cluster;
    s.database.url = Secret::new(stack.database_url());
    s.inventory.admin_token = Secret::new(ADMIN_TOKEN);
    s.inventory.warmup_interval_secs = 0;
    s.inventory.reconcile_interval_secs = 0;
    s.telemetry.log_format = LogFormat::Pretty;
    s
}

/// The key the test gateway signs queue tickets and purchase passes with.
pub const ADMISSION_SECRET: &str = "test-admission-secret-of-at-least-32-bytes";

/// The HS256 key the test gateway verifies tokens with.
pub const JWT_SECRET: &str = "test-secret-of-at-least-32-bytes-length";

/// gateway settings in front of order and inventory services at these base URLs (in-process
/// or child processes), on free ports, using `stack`'s Redis for the cluster-wide bucket.
pub fn gateway_settings(stack: &Stack, order_url: &str, inventory_url: &str) -> gateway::Settings {
    let mut s = gateway::Settings {
        server: local(0),
        management: local(0),
        ..Default::default()
    };
    s.upstreams.order_service = order_url.to_owned();
    s.upstreams.inventory_service = inventory_url.to_owned();
    s.redis.url = Secret::new(stack.redis_url());
    s.redis.cluster = stack.info().redis_cluster;
    s.auth.hs256_secret = Secret::new(JWT_SECRET);
    s.admission.secret = Secret::new(ADMISSION_SECRET);
    s.telemetry.log_format = LogFormat::Pretty;
    s
}

pub async fn spawn_gateway(settings: gateway::Settings) -> anyhow::Result<RunningApp> {
    Ok(spawn_gateway_with_state(settings).await?.0)
}

/// A running gateway and its state, for tests that look inside it (the cluster bucket's
/// connection, replica count and fallback).
pub async fn spawn_gateway_with_state(
    settings: gateway::Settings,
) -> anyhow::Result<(RunningApp, gateway::state::AppState)> {
    let app = gateway::Application::build(settings).await?;
    let state = app.state().clone();
    let running = RunningApp::run(app.port(), app.management_port(), |t| {
        app.run_until_stopped(t)
    });
    Ok((running, state))
}

/// What the `flash-sale-service` binary prints, then ` <base url> <management url>`, on a line
/// of its own once its service listens; the `api` tests' `ServiceProcess` waits for it.
pub const SERVICE_READY: &str = "flash-sale-service-listening";

/// One running service.
pub struct RunningApp {
    pub base_url: String,
    pub management_url: String,
    token: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RunningApp {
    /// Runs a built application until its token is cancelled.
    fn run<F>(port: u16, management_port: u16, run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let token = CancellationToken::new();
        let handle = tokio::spawn(run(token.clone()));
        Self {
            base_url: format!("http://127.0.0.1:{port}"),
            management_url: format!("http://127.0.0.1:{management_port}"),
            token,
            handle: Some(handle),
        }
    }

    /// The Prometheus text of the service's `/metrics`.
    pub async fn metrics(&self, http: &reqwest::Client) -> anyhow::Result<String> {
        Ok(http
            .get(format!("{}/metrics", self.management_url))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Drains and stops the service (as on SIGTERM), returning how it ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.token.cancel();
        match self.handle.take() {
            Some(handle) => tokio::time::timeout(Duration::from_secs(30), handle).await??,
            None => Ok(()),
        }
    }

    /// Stops the service without waiting for anything: the closest to a crash in-process.
    pub fn abort(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

pub async fn spawn_order_service(settings: order_service::Settings) -> anyhow::Result<RunningApp> {
    let app = order_service::Application::build(settings).await?;
    Ok(RunningApp::run(app.port(), app.management_port(), |t| {
        app.run_until_stopped(t)
    }))
}

pub async fn spawn_inventory_service(
    settings: inventory_service::Settings,
) -> anyhow::Result<RunningApp> {
    let app = inventory_service::Application::build(settings).await?;
    Ok(RunningApp::run(app.port(), app.management_port(), |t| {
        app.run_until_stopped(t)
    }))
}

/// A stack with both services running on it.
pub struct TestApps {
    pub order: RunningApp,
    pub inventory: RunningApp,
    pub http: reqwest::Client,
    /// Declared last: dropped after the apps.
    pub stack: Stack,
}

/// Routes the services' logs into the test harness' captured output (shown for failing tests);
/// `RUST_LOG` picks the level, `warn` by default.
pub fn init_test_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

impl TestApps {
    pub async fn spawn(stack: Stack) -> anyhow::Result<Self> {
        init_test_tracing();
        let order = spawn_order_service(order_settings(&stack)).await?;
        let inventory = spawn_inventory_service(inventory_settings(&stack)).await?;
        Ok(Self {
            order,
            inventory,
            http: http_client(),
            stack,
        })
    }

    pub fn admin(&self) -> crate::scenario::Admin {
        crate::scenario::Admin::new(self.http.clone(), &self.inventory.base_url, ADMIN_TOKEN)
    }
}

/// `n` clients like [`http_client`], each bound to its own loopback address (127.0.1.1 and on),
/// so that a load of many buyers does not all come from one address: the gateway caps the
/// connections of one address (`connections.max_connections_per_ip`), as it should a real one.
pub fn buyer_clients(n: u8) -> anyhow::Result<Vec<reqwest::Client>> {
    (1..=n.max(1))
        .map(|i| {
            Ok(reqwest::Client::builder()
                .no_proxy()
                .local_address(std::net::IpAddr::from([127, 0, 1, i]))
                .pool_max_idle_per_host(1024)
                .timeout(Duration::from_secs(30))
                .build()?)
        })
        .collect()
}

/// A client with enough idle connections for load, and no proxy.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a plain HTTP client builds")
}
