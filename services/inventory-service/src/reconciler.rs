//! The reconciler: releases reservations that never became orders, and measures, exports and
//! repairs the drift between Redis and MySQL stock.
//!
//! Per activity, one pass:
//! 1. reservations older than `reservation_deadline_secs`: those already in MySQL are settled;
//!    those still `R` (the broker never acknowledged them, so nobody was told yes) are released;
//!    `A`/`C` ones wait for the consumer and are counted as stuck;
//! 2. tombstones and return markers older than `tombstone_ttl_secs` are dropped;
//! 3. drift = MySQL stock - (Redis stock + quantity of pending reservations + quantity of
//!    returns MySQL made that Redis has not applied yet). Zero when the two agree. The same non-zero drift seen `drift_repair_after` passes in a row is repaired by
//!    moving Redis' stock by the drift (MySQL is the book of record).

use std::collections::{HashMap, HashSet};

use flash_sale_common::domain::{ActivityId, OrderNo};
use flash_sale_common::redis::{ActivityKeys, Redis, RedisFailure, Reservation, ReservationState};
use serde::Serialize;
use sqlx::MySqlPool;

use crate::activities;
use crate::configuration::InventorySettings;

/// Most expired reservations handled per activity and pass.
const SCAN_LIMIT: usize = 1000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivityReport {
    pub activity_id: String,
    pub warmed: bool,
    pub released: usize,
    pub settled: usize,
    pub stuck: usize,
    pub redis_stock: i64,
    pub mysql_stock: i64,
    pub pending_quantity: i64,
    /// Stock MySQL took back from closed orders that Redis has not applied yet.
    pub returning_quantity: i64,
    pub drift: i64,
    pub repaired: bool,
    /// Age in milliseconds of the oldest order the broker acknowledged (so the buyer may have been
    /// told yes) that is not yet in MySQL; 0 when there is none. A growing value is a stranded
    /// order: exported as `flash_sale_oldest_unwritten_order_age_seconds`, alerted on.
    pub oldest_unwritten_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Redis(#[from] RedisFailure),
}

/// Remembers the drift of earlier passes, to repair only a drift that holds still.
#[derive(Debug, Default)]
pub struct DriftTracker {
    seen: HashMap<ActivityId, (i64, u32)>,
}

impl DriftTracker {
    /// Records a drift; true when it has now been the same non-zero value `needed` times.
    fn observe(&mut self, id: ActivityId, drift: i64, needed: u32) -> bool {
        let entry = self.seen.entry(id).or_insert((drift, 0));
        if entry.0 == drift {
            entry.1 += 1;
        } else {
            *entry = (drift, 1);
        }
        drift != 0 && entry.1 >= needed
    }

    fn forget(&mut self, id: ActivityId) {
        self.seen.remove(&id);
    }
}

/// One pass over every current activity.
pub async fn reconcile_all(
    db: &MySqlPool,
    redis: &Redis,
    settings: &InventorySettings,
    tracker: &mut DriftTracker,
) -> Result<Vec<ActivityReport>, ReconcileError> {
    let mut reports = Vec::new();
    for id in activities::current(db).await? {
        reports.push(reconcile(db, redis, settings, tracker, id).await?);
    }
    Ok(reports)
}

pub async fn reconcile(
    db: &MySqlPool,
    redis: &Redis,
    settings: &InventorySettings,
    tracker: &mut DriftTracker,
    id: ActivityId,
) -> Result<ActivityReport, ReconcileError> {
    let keys = ActivityKeys::new(id);
    let mut report = ActivityReport {
        activity_id: id.to_string(),
        ..ActivityReport::default()
    };
    let snapshot = redis.snapshot(id).await?;
    if !snapshot.warmed {
        tracker.forget(id);
        return Ok(report);
    }
    report.warmed = true;

    // 1. expired reservations
    let cutoff = snapshot.now_ms - (settings.reservation_deadline_secs as i64) * 1000;
    let expired: Vec<String> = redis
        .query(
            redis::cmd("ZRANGEBYSCORE")
                .arg(&keys.resv_ts)
                .arg("-inf")
                .arg(cutoff)
                .arg("LIMIT")
                .arg(0)
                .arg(SCAN_LIMIT),
        )
        .await?;
    if !expired.is_empty() {
        let records: Vec<Option<String>> = redis
            .query(redis::cmd("HMGET").arg(&keys.resv).arg(&expired))
            .await?;
        let in_mysql: HashSet<String> = activities::existing_orders(db, &expired)
            .await?
            .into_iter()
            .collect();
        let mut settle = Vec::new();
        for (no, record) in expired.iter().zip(records) {
            let Ok(order_no) = OrderNo::parse(no) else {
                continue;
            };
            if in_mysql.contains(no) {
                settle.push(order_no);
                continue;
            }
            match record.as_deref().and_then(Reservation::parse) {
                Some(r) if r.state == ReservationState::Reserved => {
                    if redis
                        .release(&order_no, &[ReservationState::Reserved])
                        .await?
                        == 1
                    {
                        report.released += 1;
                    }
                }
                Some(_) => report.stuck += 1,
                // The record is gone but the index entry stayed: drop the index entry.
                None => settle.push(order_no),
            }
        }
        if !settle.is_empty() {
            let refs: Vec<&OrderNo> = settle.iter().collect();
            redis.settle(id, &refs).await?;
            report.settled = settle.len();
        }
        if report.released > 0 {
            metrics::counter!("flash_sale_reservations_released_total", "activity" => id.to_string())
                .increment(report.released as u64);
            tracing::info!(activity = %id, released = report.released, "released expired reservations");
        }
        if report.stuck > 0 {
            tracing::warn!(activity = %id, stuck = report.stuck, "acknowledged reservations still waiting for the consumer");
        }
    }

    // 2. old tombstones
    let tombstone_cutoff = snapshot.now_ms - (settings.tombstone_ttl_secs as i64) * 1000;
    for markers in [&keys.released, &keys.returned] {
        let _: i64 = redis
            .query(
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(markers)
                    .arg("-inf")
                    .arg(tombstone_cutoff),
            )
            .await?;
    }

    // 3. drift, measured after step 1 changed things
    let snapshot = redis.snapshot(id).await?;
    let Some(activity) = activities::find(db, id).await? else {
        return Ok(report);
    };
    report.redis_stock = snapshot.stock;
    report.mysql_stock = activity.stock;
    report.pending_quantity = snapshot.pending_quantity;
    report.returning_quantity = returning_quantity(db, redis, id).await?;
    report.drift =
        activity.stock - snapshot.stock - snapshot.pending_quantity - report.returning_quantity;
    let activity_label = id.to_string();
    metrics::gauge!("flash_sale_stock_available", "activity" => activity_label.clone())
        .set(snapshot.stock as f64);
    metrics::gauge!("flash_sale_stock_mysql", "activity" => activity_label.clone())
        .set(activity.stock as f64);
    metrics::gauge!("flash_sale_stock_drift", "activity" => activity_label.clone())
        .set(report.drift as f64);
    metrics::gauge!("flash_sale_reservations_pending", "activity" => activity_label.clone())
        .set(snapshot.pending as f64);
    report.oldest_unwritten_ms = oldest_unwritten_ms(redis, &keys, snapshot.now_ms).await?;
    metrics::gauge!("flash_sale_oldest_unwritten_order_age_seconds", "activity" => activity_label.clone())
        .set(report.oldest_unwritten_ms as f64 / 1000.0);

    if tracker.observe(id, report.drift, settings.drift_repair_after) {
        redis.adjust(id, report.drift, 0).await?;
        metrics::counter!("flash_sale_drift_repairs_total", "activity" => activity_label)
            .increment(1);
        tracing::warn!(activity = %id, drift = report.drift, "repaired Redis stock to match MySQL");
        tracker.forget(id);
        report.repaired = true;
    }
    Ok(report)
}

/// The quantity of returns on their way to Redis: in `stock_returns` without `applied_at`, and not
/// yet among Redis' `returned` markers (a return Redis applied but MySQL has not recorded as
/// applied is already in Redis' stock).
async fn returning_quantity(
    db: &MySqlPool,
    redis: &Redis,
    id: ActivityId,
) -> Result<i64, ReconcileError> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT order_no, quantity FROM stock_returns WHERE activity_id = ? AND applied_at IS NULL",
    )
    .bind(id.get())
    .fetch_all(db)
    .await?;
    let nos: Vec<&str> = rows.iter().map(|(no, _)| no.as_str()).collect();
    let applied = redis.returned(id, &nos).await?;
    Ok(rows
        .iter()
        .zip(applied)
        .filter(|(_, applied)| !applied)
        .map(|((_, q), _)| i64::from(*q))
        .sum())
}

/// The age of the oldest acknowledged or claimed reservation (an order someone may have been told
/// yes to, not yet in MySQL), looked for among the [`SCAN_LIMIT`] oldest reservations: step 1
/// released the unacknowledged ones past the deadline, so the oldest entries are the ones that
/// matter.
async fn oldest_unwritten_ms(
    redis: &Redis,
    keys: &ActivityKeys,
    now_ms: i64,
) -> Result<i64, ReconcileError> {
    let oldest: Vec<String> = redis
        .query(
            redis::cmd("ZRANGE")
                .arg(&keys.resv_ts)
                .arg(0)
                .arg(SCAN_LIMIT - 1),
        )
        .await?;
    if oldest.is_empty() {
        return Ok(0);
    }
    let records: Vec<Option<String>> = redis
        .query(redis::cmd("HMGET").arg(&keys.resv).arg(&oldest))
        .await?;
    let reserved_ms = records
        .iter()
        .filter_map(|r| r.as_deref().and_then(Reservation::parse))
        .filter(|r| r.state != ReservationState::Reserved)
        .map(|r| r.reserved_ms)
        .min();
    Ok(reserved_ms.map_or(0, |ms| (now_ms - ms).max(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_drift_that_holds_still_is_repaired() {
        let id = ActivityId::new(1).unwrap();
        let mut t = DriftTracker::default();
        assert!(!t.observe(id, 5, 3));
        assert!(!t.observe(id, 5, 3));
        assert!(!t.observe(id, 4, 3), "a moving drift restarts the count");
        assert!(!t.observe(id, 4, 3));
        assert!(t.observe(id, 4, 3));
        for _ in 0..5 {
            assert!(!t.observe(id, 0, 3), "no drift, no repair");
        }
    }
}
