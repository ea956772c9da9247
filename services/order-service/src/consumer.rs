//! The order consumer: Kafka -> MySQL, exactly once in effect.
//!
//! One batch goes through four steps, and offsets are committed only after all of them:
//! 1. **claim** in Redis (`R|A -> C`): a reservation the reconciler released has a tombstone, and
//!    its late message is skipped; a claimed one can no longer be released;
//! 2. **write** in one MySQL transaction: skip order numbers already there (redelivery), refuse a
//!    second live order of a user, decrement `inventory.stock` guarded by `stock >= qty`, insert
//!    `CREATED` with the amount and the payment deadline (now, by MySQL's clock, + the activity's
//!    `pay_timeout_secs`: a buyer cannot pay before the order is here, so a queue that lags
//!    does not eat into their time);
//! 3. **settle** in Redis: forget the reservations now in MySQL;
//! 4. **commit** the offsets.
//!
//! A crash anywhere redelivers the batch, and every step is idempotent: a re-claimed order is
//! claimed again, an inserted one is found by its order number, a settled one has no reservation.
//! A failing step is retried after `consumer.retry_backoff_ms`; offsets never move past an order
//! that is not in MySQL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use flash_sale_common::configuration::KafkaSettings;
use flash_sale_common::domain::{ActivityId, OrderEvent, OrderNo, decode_lot};
use flash_sale_common::redis::{Redis, ReservationState};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::{MySqlPool, QueryBuilder};
use tokio_util::sync::CancellationToken;

use crate::configuration::ConsumerSettings;

/// What became of the orders of one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    /// Inserted into MySQL now.
    pub created: usize,
    /// Already in MySQL (a redelivered message).
    pub duplicate: usize,
    /// Skipped: the reservation had been released, the buyer was never told yes.
    pub released: usize,
    /// Refused by MySQL's guards (no stock, or a second order of the user): logged as errors.
    pub rejected: usize,
    /// Records that hold no order event at all.
    pub malformed: usize,
}

/// A batch read from Kafka: the decoded events and the offsets to commit once they are stored.
#[derive(Default)]
pub struct Batch {
    pub events: Vec<OrderEvent>,
    offsets: BTreeMap<(String, i32), i64>,
    malformed: usize,
}

impl Batch {
    /// Adds one record's orders, and its offset to commit.
    fn push(&mut self, m: &impl Message) {
        let key = (m.topic().to_owned(), m.partition());
        let offset = self.offsets.entry(key).or_insert(m.offset());
        *offset = (*offset).max(m.offset());
        match m.payload().map(decode_lot) {
            Some(Ok(events)) => self.events.extend(events),
            _ => {
                tracing::error!(
                    partition = m.partition(),
                    offset = m.offset(),
                    "malformed order message skipped"
                );
                self.malformed += 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.events.len() + self.malformed
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct OrderConsumer {
    consumer: Arc<StreamConsumer>,
    db: MySqlPool,
    redis: Redis,
    settings: ConsumerSettings,
}

impl OrderConsumer {
    pub fn new(
        kafka: &KafkaSettings,
        settings: ConsumerSettings,
        db: MySqlPool,
        redis: Redis,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .create()?;
        consumer.subscribe(&[&kafka.topic])?;
        Ok(Self {
            consumer: Arc::new(consumer),
            db,
            redis,
            settings,
        })
    }

    /// Consumes until `shutdown`; the batch in hand is finished and committed first.
    pub async fn run(self, shutdown: CancellationToken) {
        // The lag reporter holds the consumer too: it must end with this future, however that
        // ends (dropped mid-batch included), or the consumer it keeps alive stays a member of
        // the group and keeps its partitions from the next one.
        let lag_stop = shutdown.child_token();
        let _lag_stops_with_run = lag_stop.clone().drop_guard();
        tokio::spawn(report_lag(self.consumer.clone(), lag_stop));
        while let Some(batch) = self.next_batch(&shutdown).await {
            if batch.is_empty() {
                continue;
            }
            self.store_until_done(&batch, &shutdown).await;
            if let Err(error) = self.commit(&batch) {
                // The orders are stored; a lost commit only means a redelivery, which is harmless.
                tracing::warn!(%error, "offset commit failed; the batch will be redelivered");
            }
        }
        tracing::info!("order consumer stopped");
    }

    /// Reads records until the batch holds `batch_size` orders, waiting `batch_linger_ms` after
    /// the first one. A record holds a lot of orders (`encode_lot`), so a batch can pass
    /// `batch_size` by the last record's lot. `None` once shutdown is requested.
    pub async fn next_batch(&self, shutdown: &CancellationToken) -> Option<Batch> {
        let first = tokio::select! {
            () = shutdown.cancelled() => return None,
            m = self.consumer.recv() => m,
        };
        let mut batch = Batch::default();
        match first {
            Ok(m) => batch.push(&m),
            Err(error) => {
                tracing::warn!(%error, "consumer error");
                tokio::time::sleep(Duration::from_millis(self.settings.retry_backoff_ms)).await;
                return Some(batch);
            }
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.batch_linger_ms);
        while batch.len() < self.settings.batch_size {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(&m),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "consumer error");
                    break;
                }
                Err(_) => break,
            }
        }
        Some(batch)
    }

    /// Stores a batch, retrying until it succeeds. Gives up only at shutdown, leaving the
    /// offsets uncommitted so the next owner of the partition stores it.
    async fn store_until_done(&self, batch: &Batch, shutdown: &CancellationToken) {
        // Doubling from `retry_backoff_ms` up to 20 times that, with jitter so that the pods of
        // a MySQL outage do not come back in step; no limit on tries: the offsets stay put and
        // nothing newer is read until this batch is stored.
        let first = Duration::from_millis(self.settings.retry_backoff_ms.max(1));
        let backoff = ExponentialBuilder::default()
            .with_min_delay(first)
            .with_max_delay(first * 20)
            .with_jitter()
            .without_max_times();
        let stored = (|| self.store(batch))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .notify(|error, pause| {
                tracing::error!(%error, orders = batch.events.len(), retry_in_ms = pause.as_millis() as u64, "storing a batch failed; retrying");
            });
        tokio::select! {
            () = shutdown.cancelled() => {}
            _ = stored => {}
        }
    }

    /// Claim, write and settle one batch (steps 1-3). Does not commit offsets.
    pub async fn store(&self, batch: &Batch) -> anyhow::Result<BatchReport> {
        let started = Instant::now();
        let mut report = BatchReport {
            malformed: batch.malformed,
            ..BatchReport::default()
        };

        // 1. claim
        let mut by_activity: HashMap<ActivityId, Vec<&OrderEvent>> = HashMap::new();
        let mut seen = HashSet::new();
        for event in &batch.events {
            if seen.insert(&event.order_no) {
                by_activity
                    .entry(event.activity_id)
                    .or_default()
                    .push(event);
            } else {
                report.duplicate += 1;
            }
        }
        let mut claimed = Vec::new();
        for (activity, events) in &by_activity {
            let nos: Vec<&OrderNo> = events.iter().map(|e| &e.order_no).collect();
            let from = [
                ReservationState::Reserved,
                ReservationState::Acked,
                ReservationState::Claimed,
            ];
            let codes = self
                .redis
                .transition(*activity, &nos, &from, ReservationState::Claimed)
                .await?;
            for (event, code) in events.iter().zip(codes) {
                if code == -2 {
                    report.released += 1;
                } else {
                    claimed.push(*event);
                }
            }
        }

        // 2. write
        let written = write_orders(&self.db, &claimed).await?;
        report.created = written.created.len();
        report.duplicate += written.duplicate.len();
        report.rejected = written.rejected_no_stock.len() + written.rejected_user.len();

        // 3. settle: forget reservations now in MySQL (or refused for lack of MySQL stock: the
        // drift metric shows that). A second order of a user gives its stock back instead.
        let mut settle: HashMap<ActivityId, Vec<&OrderNo>> = HashMap::new();
        for no in written
            .created
            .iter()
            .chain(&written.duplicate)
            .chain(&written.rejected_no_stock)
        {
            settle.entry(no.activity()).or_default().push(no);
        }
        for (activity, nos) in &settle {
            self.redis.settle(*activity, nos).await?;
        }
        for no in &written.rejected_user {
            self.redis.release(no, &[ReservationState::Claimed]).await?;
        }

        for (result, n) in [
            ("created", report.created),
            ("duplicate", report.duplicate),
            ("released", report.released),
            ("rejected", report.rejected),
            ("malformed", report.malformed),
        ] {
            if n > 0 {
                metrics::counter!("flash_sale_consumer_orders_total", "result" => result)
                    .increment(n as u64);
            }
        }
        metrics::histogram!("flash_sale_consumer_batch_duration_seconds").record(started.elapsed());
        Ok(report)
    }

    /// Commits the batch's offsets (step 4), synchronously.
    pub fn commit(&self, batch: &Batch) -> Result<(), rdkafka::error::KafkaError> {
        if batch.offsets.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in &batch.offsets {
            list.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))?;
        }
        self.consumer.commit(&list, CommitMode::Sync)
    }
}

/// What the MySQL step did with each claimed order.
#[derive(Debug, Default)]
struct Written {
    created: Vec<OrderNo>,
    duplicate: Vec<OrderNo>,
    rejected_no_stock: Vec<OrderNo>,
    rejected_user: Vec<OrderNo>,
}

/// One transaction: classify against what MySQL already holds, decrement stock per activity
/// (guarded), insert. A concurrent writer (a rebalance overlap) makes it fail on a unique key,
/// and the retry then finds those rows and classifies them as duplicates.
async fn write_orders(db: &MySqlPool, events: &[&OrderEvent]) -> anyhow::Result<Written> {
    let mut written = Written::default();
    if events.is_empty() {
        return Ok(written);
    }
    let mut tx = db.begin().await?;

    let mut q = QueryBuilder::new(
        "SELECT order_no, activity_id, live_user_id FROM orders WHERE order_no IN (",
    );
    let mut sep = q.separated(", ");
    for e in events {
        sep.push_bind(e.order_no.as_str());
    }
    // A user's earlier order that was cancelled or expired does not count: live_user_id is NULL.
    q.push(") OR (activity_id, live_user_id) IN (");
    let mut sep = q.separated(", ");
    for e in events {
        sep.push("(")
            .push_bind_unseparated(e.activity_id.get())
            .push_unseparated(", ")
            .push_bind_unseparated(e.user_id.get())
            .push_unseparated(")");
    }
    q.push(")");
    let existing: Vec<(String, i64, Option<i64>)> = q.build_query_as().fetch_all(&mut *tx).await?;
    let existing_nos: HashSet<&str> = existing.iter().map(|(no, _, _)| no.as_str()).collect();
    let existing_users: HashSet<(i64, i64)> = existing
        .iter()
        .filter_map(|(_, a, u)| u.map(|u| (*a, u)))
        .collect();

    let mut fresh: BTreeMap<ActivityId, Vec<&OrderEvent>> = BTreeMap::new();
    for e in events {
        if existing_nos.contains(e.order_no.as_str()) {
            written.duplicate.push(e.order_no.clone());
        } else if existing_users.contains(&(e.activity_id.get(), e.user_id.get())) {
            tracing::error!(order_no = %e.order_no, user = %e.user_id, "second order of a user refused by MySQL");
            written.rejected_user.push(e.order_no.clone());
        } else {
            fresh.entry(e.activity_id).or_default().push(e);
        }
    }

    for (activity, orders) in fresh {
        let Some(terms) = terms(&mut tx, activity).await? else {
            for e in orders {
                tracing::error!(order_no = %e.order_no, %activity, "order for an activity MySQL does not have");
                written.rejected_no_stock.push(e.order_no.clone());
            }
            continue;
        };
        let total: i64 = orders.iter().map(|e| i64::from(e.quantity.get())).sum();
        let taken = take_stock(&mut tx, activity, total).await?;
        let accepted: Vec<&OrderEvent> = if taken {
            orders
        } else {
            // Not enough MySQL stock for the whole group: Redis and MySQL disagree. Take it order
            // by order so that every order that fits is still created.
            let mut fits = Vec::new();
            for e in orders {
                if take_stock(&mut tx, activity, i64::from(e.quantity.get())).await? {
                    fits.push(e);
                } else {
                    tracing::error!(order_no = %e.order_no, %activity, "no MySQL stock left for an accepted order");
                    written.rejected_no_stock.push(e.order_no.clone());
                }
            }
            fits
        };
        if accepted.is_empty() {
            continue;
        }
        let mut insert = QueryBuilder::new(
            "INSERT INTO orders (order_no, user_id, activity_id, quantity, amount_cents, status, \
             reserved_at, pay_deadline) ",
        );
        insert.push_values(&accepted, |mut row, e| {
            let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).map(|t| t.naive_utc());
            row.push_bind(e.order_no.as_str())
                .push_bind(e.user_id.get())
                .push_bind(e.activity_id.get())
                .push_bind(e.quantity.get())
                .push_bind(terms.price_cents * i64::from(e.quantity.get()))
                .push_bind(0_i8)
                .push_bind(at(e.reserved_at_ms))
                .push("UTC_TIMESTAMP(3) + INTERVAL ")
                .push_unseparated(terms.pay_timeout_secs)
                .push_unseparated(" SECOND");
        });
        insert.build().execute(&mut *tx).await?;
        written
            .created
            .extend(accepted.iter().map(|e| e.order_no.clone()));
    }
    tx.commit().await?;
    Ok(written)
}

/// What an activity's orders cost and how long their buyers have to pay.
struct Terms {
    price_cents: i64,
    pay_timeout_secs: i64,
}

async fn terms(
    tx: &mut flash_sale_common::db::Tx<'_>,
    activity: ActivityId,
) -> Result<Option<Terms>, sqlx::Error> {
    let row: Option<(i64, i32)> =
        sqlx::query_as("SELECT price_cents, pay_timeout_secs FROM inventory WHERE activity_id = ?")
            .bind(activity.get())
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.map(|(price_cents, secs)| Terms {
        price_cents,
        pay_timeout_secs: i64::from(secs),
    }))
}

async fn take_stock(
    tx: &mut flash_sale_common::db::Tx<'_>,
    activity: ActivityId,
    quantity: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE inventory SET stock = stock - ?, version = version + 1 \
         WHERE activity_id = ? AND stock >= ?",
    )
    .bind(quantity)
    .bind(activity.get())
    .bind(quantity)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Exports `flash_sale_consumer_lag`: messages behind the high watermark on this consumer's
/// partitions, every 5 s.
async fn report_lag(consumer: Arc<StreamConsumer>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = consumer.clone();
        let lag = tokio::task::spawn_blocking(move || -> Option<i64> {
            let positions = c.position().ok()?;
            let mut lag = 0;
            for el in positions.elements() {
                let (_, high) = c
                    .fetch_watermarks(el.topic(), el.partition(), Duration::from_secs(1))
                    .ok()?;
                if let Offset::Offset(pos) = el.offset() {
                    lag += (high - pos).max(0);
                } else {
                    lag += high.max(0);
                }
            }
            Some(lag)
        })
        .await;
        if let Ok(Some(lag)) = lag {
            metrics::gauge!("flash_sale_consumer_lag").set(lag as f64);
        }
    }
}
