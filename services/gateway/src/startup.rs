//! Building the application (check settings, load rules, bind) and running it until a drain
//! completes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use flash_sale_common::management::{ManagementServer, Readiness};
use flash_sale_common::telemetry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::configuration::Settings;
use crate::flow::system;
use crate::management;
use crate::routes;
use crate::state::AppState;

pub struct Application {
    listener: TcpListener,
    management: TcpListener,
    state: AppState,
    readiness: Readiness,
}

impl Application {
    /// Checks the settings and the rule file and binds both listeners (port 0 picks free
    /// ports, for tests). Redis is not needed to start: the cluster limit connects in the
    /// background and uses its local share meanwhile.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Install the recorder before anything records.
        telemetry::metrics_handle();
        let state = AppState::build(&settings)?;
        let listener = TcpListener::bind(settings.server.address()?)
            .await
            .context("binding the app listener")?;
        let management = TcpListener::bind(settings.management.address()?)
            .await
            .context("binding the management listener")?;
        Ok(Self {
            listener,
            management,
            state,
            readiness: Readiness::default(),
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn management_port(&self) -> u16 {
        self.management.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The shared state, for tests that look at the flow state directly.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` is cancelled, then drains: readiness off, the proxied requests
    /// finish, the background jobs (rule reload, Redis heartbeat, CPU sampler) stop, the
    /// management listener closes. A task that ends early cancels the others and is named in
    /// the error.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            management,
            state,
            readiness,
        } = self;
        let settings = state.settings.clone();
        let app = routes::router(state.clone());
        let mgmt_router = management::router(
            state.clone(),
            readiness.clone(),
            telemetry::metrics_handle(),
        );
        let background = CancellationToken::new();

        let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let result = axum::serve(
                flash_sale_common::http::no_delay(listener),
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
            ("http server", result.map_err(Into::into))
        });

        let mut jobs = JoinSet::new();
        {
            let (flow, stop) = (state.flow.clone(), background.clone());
            let interval = Duration::from_millis(settings.rules.poll_interval_ms.max(10));
            jobs.spawn(async move { flow.rules().run(interval, stop).await });
        }
        {
            let (flow, stop, redis) = (
                state.flow.clone(),
                background.clone(),
                settings.redis.clone(),
            );
            jobs.spawn(async move { flow.cluster().run(&redis, stop).await });
        }
        {
            let (flow, stop) = (state.flow.clone(), background.clone());
            let interval = Duration::from_millis(settings.proxy.cpu_sample_interval_ms.max(10));
            jobs.spawn(async move { system::sample_cpu(flow.system(), interval, stop).await });
        }
        let mgmt = ManagementServer::spawn(management, mgmt_router);
        readiness.set_ready(true);
        tracing::info!(
            order_service = %state.upstream.base_url(crate::resource::Downstream::OrderService),
            inventory_service = %state.upstream.base_url(crate::resource::Downstream::InventoryService),
            "gateway ready"
        );

        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            let (name, result) = joined.context("a task panicked")?;
            if !shutdown.is_cancelled() {
                tracing::error!(task = name, ?result, "task ended before shutdown; stopping");
                failure.get_or_insert(anyhow::anyhow!("{name} ended unexpectedly: {result:?}"));
                shutdown.cancel();
            }
            readiness.set_ready(false);
        }
        background.cancel();
        while jobs.join_next().await.is_some() {}
        mgmt.stop().await?;
        tracing::info!("gateway stopped");
        failure.map_or(Ok(()), Err)
    }
}
