//! Building the application (connect, bind) and running it until a drain completes.

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

use crate::acker::Acker;
use crate::configuration::Settings;
use crate::consumer::OrderConsumer;
use crate::fence::{RedisGuard, Unverified};
use crate::publisher::{self, Publisher};
use crate::reserver::Reserver;
use crate::routes;
use crate::sold_out::SoldOut;
use crate::state::AppState;
use crate::sweeper::Sweeper;

/// How long shutdown waits for the producer to deliver what it holds.
const PRODUCER_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Application {
    listener: TcpListener,
    management: TcpListener,
    state: AppState,
    consumer: Option<OrderConsumer>,
    guard: RedisGuard,
    sweeper: Option<Sweeper>,
    readiness: Readiness,
}

impl Application {
    /// Connects to Redis, MySQL and Kafka (creating the topic if needed) and binds both
    /// listeners. Port 0 picks free ports (tests).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Install the recorder before anything records.
        telemetry::metrics_handle();
        let redis = Redis::connect(&settings.redis)
            .await
            .context("connecting to Redis")?;
        let db = db::pool(&settings.database).context("configuring the MySQL pool")?;
        publisher::ensure_topic(
            &settings.kafka,
            settings.consumer.topic_partitions,
            settings.consumer.topic_replication,
        )
        .await
        .context("creating the order topic")?;
        let publisher = Publisher::new(&settings.kafka).context("creating the Kafka producer")?;
        let consumer = if settings.consumer.enabled {
            Some(
                OrderConsumer::new(
                    &settings.kafka,
                    settings.consumer.clone(),
                    db.clone(),
                    redis.clone(),
                )
                .context("creating the Kafka consumer")?,
            )
        } else {
            None
        };
        let unverified = Arc::new(Unverified::default());
        let guard = RedisGuard::new(
            &settings.kafka,
            unverified.clone(),
            redis.clone(),
            db.clone(),
        )
        .context("creating the Redis guard's Kafka client")?;
        let sweeper = settings
            .lifecycle
            .enabled
            .then(|| Sweeper::new(db.clone(), redis.clone(), settings.lifecycle.clone()));
        if settings.payment.callback_secret.expose().is_empty() {
            tracing::warn!("payment.callback_secret is empty: every payment callback is refused");
        }
        let state = AppState {
            reserver: Reserver::start(redis.clone()),
            acker: Acker::start(redis.clone()),
            redis,
            db,
            payment: Arc::new(settings.payment.clone()),
            unverified,
            publisher,
            sold_out: Arc::new(SoldOut::new(Duration::from_millis(
                settings.order.sold_out_ttl_ms,
            ))),
            settings: Arc::new(settings.order.clone()),
        };
        let listener = TcpListener::bind(settings.server.address()?)
            .await
            .context("binding the app listener")?;
        let management_listener = TcpListener::bind(settings.management.address()?)
            .await
            .context("binding the management listener")?;
        let readiness = Readiness::default();
        Ok(Self {
            listener,
            management: management_listener,
            state,
            consumer,
            guard,
            sweeper,
            readiness,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn management_port(&self) -> u16 {
        self.management.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` is cancelled or a task ends, then drains in order: readiness off,
    /// HTTP requests finish (each waits for its broker ack), the producer flushes, the consumer
    /// finishes and commits its batch and the Redis guard its pass, the management listener
    /// closes.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            management,
            state,
            consumer,
            guard,
            sweeper,
            readiness,
        } = self;
        let publisher = state.publisher.clone();
        let app = routes::router(state);
        let mgmt = management::router(readiness.clone(), telemetry::metrics_handle());

        let mut supervisor = Supervisor::new("order-service", shutdown, readiness);
        let accept = supervisor.stop_step("stop accepting");
        supervisor.spawn(accept, "http server", |stop| {
            flash_sale_common::http::serve(listener, app, stop)
        });
        supervisor.run_step("flush the producer", async move {
            tokio::task::spawn_blocking(move || publisher.flush(PRODUCER_FLUSH_TIMEOUT))
                .await?
                .map_err(Into::into)
        });
        let jobs = supervisor.stop_step("stop jobs");
        if let Some(consumer) = consumer {
            supervisor.spawn(jobs, "order consumer", |stop| async move {
                consumer.run(stop).await;
                Ok(())
            });
        }
        supervisor.spawn(jobs, "redis guard", |stop| async move {
            guard.run(stop).await;
            Ok(())
        });
        if let Some(sweeper) = sweeper {
            supervisor.spawn(jobs, "sweeper", |stop| async move {
                sweeper.run(stop).await;
                Ok(())
            });
        }
        let last = supervisor.stop_step("stop management");
        supervisor.spawn(last, "management", |stop| {
            management::serve(management, mgmt, stop)
        });
        supervisor.run().await
    }
}
