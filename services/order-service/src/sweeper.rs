//! The sweeper: expires unpaid orders past their deadline and makes sure every stock return
//! MySQL made reaches Redis. Every pod runs one; `SKIP LOCKED` keeps them off each other's rows,
//! and applying a return twice changes nothing.

use std::time::{Duration, Instant};

use flash_sale_common::redis::Redis;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::configuration::LifecycleSettings;
use crate::lifecycle;

/// How often the gauges of `lifecycle::sample_gauges` are refreshed.
const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// Most batches expired in one pass, so a huge backlog does not starve the returns.
const MAX_BATCHES_PER_PASS: usize = 20;
/// Most unapplied returns looked at per pass.
const RETURNS_PER_PASS: usize = 1000;

pub struct Sweeper {
    db: MySqlPool,
    redis: Redis,
    settings: LifecycleSettings,
}

impl Sweeper {
    pub fn new(db: MySqlPool, redis: Redis, settings: LifecycleSettings) -> Self {
        Self {
            db,
            redis,
            settings,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.settings.sweep_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampled: Option<Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.pass().await {
                tracing::warn!(%error, "sweeper pass failed; retrying next tick");
            }
            if sampled.is_none_or(|t| t.elapsed() >= SAMPLE_EVERY) {
                sampled = Some(Instant::now());
                if let Err(error) = lifecycle::sample_gauges(&self.db).await {
                    tracing::debug!(%error, "sampling the order gauges failed");
                }
            }
        }
    }

    /// One pass: expire what is due, then apply returns Redis has not had.
    pub async fn pass(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut expired = 0;
        for _ in 0..MAX_BATCHES_PER_PASS {
            let n = lifecycle::expire_due(&self.db, &self.redis, self.settings.sweep_batch).await?;
            expired += n;
            if n < self.settings.sweep_batch as usize {
                break;
            }
        }
        if expired > 0 {
            tracing::info!(
                expired,
                "expired unpaid orders; their stock is back on sale"
            );
        }
        lifecycle::apply_unapplied(&self.db, &self.redis, RETURNS_PER_PASS).await?;
        metrics::histogram!("flash_sale_sweep_duration_seconds").record(started.elapsed());
        Ok(())
    }
}
