//! The fence after a Redis that may have lost writes: nothing sells from counters this Redis
//! process did not build, until they are rebuilt from MySQL.
//!
//! Redis with `appendfsync everysec` loses up to its last second of writes on a power cut, a lost
//! node, or a failover to an asynchronously replicated replica: reservations, decrements and
//! buyers of orders that were already published and answered 202. Selling on from those
//! counters would sell the same stock twice, and MySQL's guard would then refuse orders that
//! buyers were told yes to. So the warm-up stamps each activity's counters with the epoch of the
//! Redis process that built them (its `LASTSAVE`, which is its start time while `save ""`), and
//! the reserve script answers "unverified" when the epoch differs.
//!
//! On that answer the buy path answers 503 (buyers retry) and hands the activity to
//! [`RedisGuard`], which rebuilds it once nothing published before can still be on its way:
//! 1. `kafka.message_timeout_ms` after the first unverified answer, so every publish started
//!    against the old Redis has been acknowledged or failed;
//! 2. the order consumer group has no lag on any partition of the topic, so every acknowledged
//!    order is in MySQL (the consumer writes orders whose reservation Redis lost: it only skips
//!    tombstoned ones);
//! 3. reservations already in MySQL are settled; then `rebuild.lua` sets stock = MySQL's stock
//!    minus what the still-pending reservations hold, adds MySQL's buyers, and stamps the epoch.
//!
//! Any order-service pod may do it; the script is a no-op once the epoch matches, so two pods
//! rebuilding at once agree. A plain restart that lost nothing pays the same short pause.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flash_sale_common::configuration::KafkaSettings;
use flash_sale_common::db;
use flash_sale_common::domain::{ActivityId, OrderNo};
use flash_sale_common::redis::Redis;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

/// How often the guard looks at the activities waiting for a rebuild.
const TICK: Duration = Duration::from_millis(500);

/// How often the guard asks Redis whether any current activity is unverified, for the
/// activities nobody is buying (a sold-out sale must come back right too: invariant 4).
const SURVEY_EVERY: Duration = Duration::from_secs(5);

/// Broker calls of the lag check.
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);

/// Activities whose counters Redis answered "unverified" for, and since when.
#[derive(Debug, Default)]
pub struct Unverified {
    since: Mutex<HashMap<ActivityId, Instant>>,
}

impl Unverified {
    /// Notes an unverified answer (the first one starts the wait).
    pub fn mark(&self, activity: ActivityId) {
        let mut since = self.since.lock().expect("unverified lock");
        since.entry(activity).or_insert_with(Instant::now);
    }

    /// Activities unverified for at least `wait`.
    fn due(&self, wait: Duration) -> Vec<ActivityId> {
        let since = self.since.lock().expect("unverified lock");
        since
            .iter()
            .filter(|(_, t)| t.elapsed() >= wait)
            .map(|(a, _)| *a)
            .collect()
    }

    fn forget(&self, activity: ActivityId) {
        self.since
            .lock()
            .expect("unverified lock")
            .remove(&activity);
    }
}

/// Rebuilds unverified activities (see the module doc).
pub struct RedisGuard {
    unverified: Arc<Unverified>,
    redis: Redis,
    db: MySqlPool,
    /// A consumer that never subscribes: it only reads the group's committed offsets.
    offsets: Arc<BaseConsumer>,
    topic: String,
    wait: Duration,
}

impl RedisGuard {
    pub fn new(
        kafka: &KafkaSettings,
        unverified: Arc<Unverified>,
        redis: Redis,
        db: MySqlPool,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let offsets: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Self {
            unverified,
            redis,
            db,
            offsets: Arc::new(offsets),
            topic: kafka.topic.clone(),
            wait: Duration::from_millis(kafka.message_timeout_ms),
        })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        let mut surveyed = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if surveyed.elapsed() >= SURVEY_EVERY {
                surveyed = Instant::now();
                if let Err(error) = self.survey().await {
                    tracing::debug!(%error, "surveying activities for unverified counters failed");
                }
            }
            for activity in self.unverified.due(self.wait) {
                match self.step(activity).await {
                    Ok(true) => self.unverified.forget(activity),
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(%activity, %error, "rebuilding unverified counters failed; retrying")
                    }
                }
            }
        }
    }

    /// Marks every current activity whose counters this Redis process did not build.
    async fn survey(&self) -> anyhow::Result<()> {
        for activity in db::current(&self.db).await? {
            if !self.redis.is_verified(activity).await? {
                self.unverified.mark(activity);
            }
        }
        Ok(())
    }

    /// One attempt: true once the activity's counters are verified (rebuilt now, by another
    /// pod, or gone), false while orders may still be on their way to MySQL.
    pub async fn step(&self, activity: ActivityId) -> anyhow::Result<bool> {
        let lag = self.group_lag().await?;
        if lag > 0 {
            tracing::info!(%activity, lag, "unverified counters wait for the consumer to drain");
            return Ok(false);
        }
        let pending = self.redis.pending_order_nos(activity).await?;
        let in_mysql: Vec<OrderNo> = db::existing_orders(&self.db, &pending)
            .await?
            .iter()
            .filter_map(|no| OrderNo::parse(no).ok())
            .collect();
        if !in_mysql.is_empty() {
            let refs: Vec<&OrderNo> = in_mysql.iter().collect();
            self.redis.settle(activity, &refs).await?;
        }
        let Some(book) = db::book(&self.db, activity).await? else {
            return Ok(true);
        };
        if let Some((true, stock)) = self.redis.rebuild(activity, &book).await? {
            metrics::counter!("flash_sale_redis_rebuilds_total", "activity" => activity.to_string())
                .increment(1);
            tracing::warn!(%activity, stock, buyers = book.buyers.len(), returns = book.unapplied.len(), "rebuilt unverified Redis counters from MySQL");
        }
        Ok(true)
    }

    /// Messages of the order topic not yet committed by the consumer group, over every
    /// partition (a partition never committed counts from its low watermark).
    async fn group_lag(&self) -> anyhow::Result<i64> {
        let (consumer, topic) = (self.offsets.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
            let metadata = consumer.fetch_metadata(Some(&topic), BROKER_TIMEOUT)?;
            let mut partitions = TopicPartitionList::new();
            for t in metadata.topics() {
                for p in t.partitions() {
                    partitions.add_partition(&topic, p.id());
                }
            }
            let committed = consumer.committed_offsets(partitions, BROKER_TIMEOUT)?;
            let mut lag = 0;
            for el in committed.elements() {
                let (low, high) =
                    consumer.fetch_watermarks(&topic, el.partition(), BROKER_TIMEOUT)?;
                let position = match el.offset() {
                    Offset::Offset(o) => o,
                    _ => low,
                };
                lag += (high - position).max(0);
            }
            Ok(lag)
        })
        .await?
    }
}
