//! Building the application and running it with its scheduled jobs until a drain completes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flash_sale_common::db;
use flash_sale_common::management::{self, ManagementServer, Readiness};
use flash_sale_common::redis::Redis;
use flash_sale_common::telemetry;
use sqlx::MySqlPool;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::configuration::{InventorySettings, Settings};
use crate::reconciler::{self, DriftTracker};
use crate::{routes, warmup};

/// The state every handler and job shares; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: MySqlPool,
    pub redis: Redis,
    pub settings: Arc<InventorySettings>,
    /// The reconciler's memory, shared by the schedule and the on-demand endpoint.
    pub drift: Arc<Mutex<DriftTracker>>,
}

pub struct Application {
    listener: TcpListener,
    management: TcpListener,
    state: AppState,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        telemetry::metrics_handle();
        if settings.inventory.admin_token.is_empty() {
            tracing::warn!("inventory.admin_token is empty: the admin API refuses every call");
        }
        let redis = Redis::connect(&settings.redis)
            .await
            .context("connecting to Redis")?;
        let db = db::pool(&settings.database).context("configuring the MySQL pool")?;
        let state = AppState {
            db,
            redis,
            settings: Arc::new(settings.inventory.clone()),
            drift: Arc::default(),
        };
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
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn management_port(&self) -> u16 {
        self.management.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves and runs the scheduled warm-up and reconciler until `shutdown`; a job finishes its
    /// pass before the process exits.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let readiness = Readiness::default();
        let app = routes::router(self.state.clone());
        let mgmt = ManagementServer::spawn(
            self.management,
            management::router(readiness.clone(), telemetry::metrics_handle()),
        );
        let jobs = tokio::spawn(run_jobs(self.state.clone(), shutdown.clone()));
        readiness.set_ready(true);
        tracing::info!("inventory-service ready");
        let served = axum::serve(flash_sale_common::http::no_delay(self.listener), app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await;
        readiness.set_ready(false);
        shutdown.cancel();
        jobs.await.context("the scheduled jobs panicked")?;
        mgmt.stop().await?;
        tracing::info!("inventory-service stopped");
        served.context("the http server failed")
    }
}

/// The seed's schedule: warm-up every `warmup_interval_secs`, reconciliation every
/// `reconcile_interval_secs`. A pass in progress completes before shutdown returns.
async fn run_jobs(state: AppState, shutdown: CancellationToken) {
    let every = |secs: u64| {
        (secs > 0).then(|| {
            let mut i = tokio::time::interval(Duration::from_secs(secs));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        })
    };
    let mut warmup_tick = every(state.settings.warmup_interval_secs);
    let mut reconcile_tick = every(state.settings.reconcile_interval_secs);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick(&mut warmup_tick) => {
                if let Err(error) = warmup::warm_up_all(&state.db, &state.redis).await {
                    tracing::warn!(%error, "scheduled warm-up failed");
                }
            }
            _ = tick(&mut reconcile_tick) => {
                let mut tracker = state.drift.lock().await;
                if let Err(error) = reconciler::reconcile_all(&state.db, &state.redis, &state.settings, &mut tracker).await {
                    tracing::warn!(%error, "scheduled reconciliation failed");
                }
            }
        }
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
