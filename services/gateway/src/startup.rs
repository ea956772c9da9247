//! Building the application (check settings, load rules, bind) and running it until a drain
//! completes.

use std::time::Duration;

use anyhow::Context;
use flash_sale_common::management::Readiness;
use flash_sale_common::supervisor::Supervisor;
use flash_sale_common::telemetry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::configuration::Settings;
use crate::flow::system;
use crate::management;
use crate::resource::Downstream;
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
        crate::admission::register_metrics();
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

    /// Serves until `shutdown` is cancelled or a task ends, then drains: readiness off, the
    /// proxied requests finish, the background jobs (rule reload, Redis heartbeat, CPU sampler)
    /// stop, the management listener closes.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            management,
            state,
            readiness,
        } = self;
        let settings = state.settings.clone();
        let app = routes::router(state.clone());
        let mgmt = management::router(
            state.clone(),
            readiness.clone(),
            telemetry::metrics_handle(),
        );
        tracing::info!(
            order_service = %state.upstream.base_url(Downstream::OrderService),
            inventory_service = %state.upstream.base_url(Downstream::InventoryService),
            "gateway upstreams"
        );

        let mut supervisor = Supervisor::new("gateway", shutdown, readiness);
        let accept = supervisor.stop_step("stop accepting");
        let connections = settings.connections.clone();
        supervisor.spawn(accept, "http server", |stop| {
            crate::edge::serve(listener, app, connections, stop)
        });
        let jobs = supervisor.stop_step("stop jobs");
        let flow = state.flow.clone();
        let interval = Duration::from_millis(settings.rules.poll_interval_ms.max(10));
        supervisor.spawn(jobs, "rule reload", |stop| async move {
            flow.rules().run(interval, stop).await;
            Ok(())
        });
        let (flow, redis) = (state.flow.clone(), settings.redis.clone());
        supervisor.spawn(jobs, "cluster heartbeat", |stop| async move {
            flow.cluster().run(&redis, stop).await;
            Ok(())
        });
        let flow = state.flow.clone();
        let interval = Duration::from_millis(settings.proxy.cpu_sample_interval_ms.max(10));
        supervisor.spawn(jobs, "cpu sampler", |stop| async move {
            system::sample_cpu(flow.system(), interval, stop).await;
            Ok(())
        });
        let last = supervisor.stop_step("stop management");
        supervisor.spawn(last, "management", |stop| {
            flash_sale_common::management::serve(management, mgmt, stop)
        });
        supervisor.run().await
    }
}
