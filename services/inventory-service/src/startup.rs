//! Building the application and running it with its scheduled jobs until a drain completes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flash_sale_common::db;
use flash_sale_common::management::{self, Readiness};
use flash_sale_common::redis::Redis;
use flash_sale_common::supervisor::Supervisor;
use flash_sale_common::telemetry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::configuration::Settings;
use crate::reconciler;
use crate::state::AppState;
use crate::{routes, warmup};

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

    /// Serves and runs the scheduled warm-up and reconciler until `shutdown` or until a task
    /// ends, then drains: readiness off, requests finish, a job finishes its pass, the
    /// management listener closes.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let readiness = Readiness::default();
        let app = routes::router(self.state.clone());
        let mgmt = management::router(readiness.clone(), telemetry::metrics_handle());
        let (listener, management, state) = (self.listener, self.management, self.state);

        let mut supervisor = Supervisor::new("inventory-service", shutdown, readiness);
        let accept = supervisor.stop_step("stop accepting");
        supervisor.spawn(accept, "http server", |stop| {
            flash_sale_common::http::serve(listener, app, stop)
        });
        let jobs = supervisor.stop_step("stop jobs");
        supervisor.spawn(jobs, "scheduled jobs", |stop| async move {
            run_jobs(state, stop).await;
            Ok(())
        });
        let last = supervisor.stop_step("stop management");
        supervisor.spawn(last, "management", |stop| {
            management::serve(management, mgmt, stop)
        });
        supervisor.run().await
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
