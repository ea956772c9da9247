use flash_sale_common::api;
use flash_sale_tests::apps::{SERVICE_READY, TestApps};
use flash_sale_tests::scenario::Stores;
use flash_sale_tests::stack::{BrokerStorage, Stack};
use serde_json::Value;

/// A private stack with both services on it.
pub(crate) async fn spawn_apps() -> TestApps {
    let stack = Stack::start(BrokerStorage::Sqlite)
        .await
        .expect("the private stack starts");
    TestApps::spawn(stack).await.expect("the services start")
}

pub(crate) async fn stores(apps: &TestApps) -> Stores {
    stack_stores(&apps.stack).await
}

pub(crate) async fn stack_stores(stack: &Stack) -> Stores {
    Stores::connect(&stack.database_url(), &stack.redis_url())
        .await
        .expect("the stores answer")
}

/// POSTs a create-order body (raw text, so malformed bodies can be sent) and returns status and
/// JSON body.
pub(crate) async fn create_order_raw(
    apps: &TestApps,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let res = apps
        .http
        .post(format!("{}{}", apps.order.base_url, api::order::CREATE))
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .expect("order-service answers");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn create_order(apps: &TestApps, user: i64, activity: i64) -> (u16, Value) {
    let body = serde_json::json!({"userId": user.to_string(), "activityId": activity.to_string(), "quantity": 1});
    create_order_raw(apps, "application/json", &body.to_string()).await
}

// ------------------------------------------------------------ services in their own processes

/// A service with its settings, to run in a [`ServiceProcess`].
pub(crate) enum ServiceSettings {
    Order(order_service::Settings),
    Inventory(inventory_service::Settings),
    Gateway(gateway::Settings),
}

/// A real service running in a child process, the package's `flash-sale-service` binary. In-process
/// services share the process-wide Prometheus recorder with each other and with every test
/// running alongside, so their `/metrics` cannot tell two instances apart; a child's `/metrics`
/// holds its own series only, as a pod's does. The child runs until its stdin closes, so it ends
/// with this test binary even if that dies without dropping it. Dropping it kills the child (by
/// its pid) and removes its log.
pub(crate) struct ServiceProcess {
    pub(crate) name: &'static str,
    pub(crate) base_url: String,
    pub(crate) management_url: String,
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ServiceProcess {
    /// Starts the service and waits (at most 60 s) until it listens.
    pub(crate) async fn spawn(settings: ServiceSettings) -> anyhow::Result<Self> {
        use anyhow::Context;
        let (name, settings) = match &settings {
            ServiceSettings::Order(s) => ("order-service", serde_json::to_string(s)?),
            ServiceSettings::Inventory(s) => ("inventory-service", serde_json::to_string(s)?),
            ServiceSettings::Gateway(s) => ("gateway", serde_json::to_string(s)?),
        };
        let dir = tempfile::Builder::new()
            .prefix("flash-sale-service-process-")
            .tempdir()?;
        let log = dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_flash-sale-service"))
            .args([name, &settings])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name} in a child process"))?;
        let mut process = Self {
            name,
            base_url: String::new(),
            management_url: String::new(),
            child,
            log,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let text = process.log_text();
            let ready = text
                .lines()
                .find_map(|line| line.strip_prefix(SERVICE_READY))
                .and_then(|rest| rest.trim().split_once(' '));
            if let Some((base_url, management_url)) = ready {
                process.base_url = base_url.to_owned();
                process.management_url = management_url.to_owned();
                return Ok(process);
            }
            if let Some(status) = process.child.try_wait()? {
                anyhow::bail!("{name} exited with {status} before it listened:\n{text}");
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("{name} did not listen within 60 s:\n{text}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// What the child printed so far (its logs, at `RUST_LOG`, default `warn`).
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The Prometheus text of the service's `/metrics`.
    pub(crate) async fn metrics(&self, http: &reqwest::Client) -> anyhow::Result<String> {
        let res = http
            .get(format!("{}/metrics", self.management_url))
            .send()
            .await?;
        anyhow::ensure!(
            res.status().is_success(),
            "{} /metrics: {}",
            self.name,
            res.status()
        );
        Ok(res.text().await?)
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `consumer` until activity `activity`'s orders are all in MySQL, then stops it.
pub(crate) async fn drain_with(
    consumer: order_service::consumer::OrderConsumer,
    stores: &Stores,
    activity: i64,
) {
    let token = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(consumer.run(token.clone()));
    stores
        .wait_for_drain(activity, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    token.cancel();
    run.await.unwrap();
}
