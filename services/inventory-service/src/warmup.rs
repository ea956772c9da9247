//! The warm-up: MySQL -> Redis. It loads an activity that Redis does not hold and, for one it
//! holds, only refreshes the sale window: counters of a sale in progress are never overwritten.

use flash_sale_common::db::Book;
use flash_sale_common::domain::ActivityId;
use flash_sale_common::redis::{ActivityKeys, Redis, RedisFailure, SCRIPTS};
use sqlx::MySqlPool;

use crate::activities;

/// What the warm-up did with one activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmupOutcome {
    /// Loaded into Redis: it is now on sale (within its window).
    Loaded,
    /// Already in Redis: its counters were left alone, its window refreshed.
    Kept,
}

impl WarmupOutcome {
    /// The name used in the API and in `flash_sale_warmup_total{result}`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Kept => "kept",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    #[error("no activity {0}")]
    NotFound(ActivityId),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Redis(#[from] RedisFailure),
}

pub async fn warm_up(
    db: &MySqlPool,
    redis: &Redis,
    id: ActivityId,
) -> Result<WarmupOutcome, WarmupError> {
    activities::fill_total(db, id).await?;
    let activity = activities::find(db, id)
        .await?
        .ok_or(WarmupError::NotFound(id))?;
    let keys = ActivityKeys::new(id);
    let start_ms = activity.start_time.map_or(0, |t| t.timestamp_millis());
    let end_ms = activity.end_time.map_or(-1, |t| t.timestamp_millis());
    let total = activity
        .total_stock
        .unwrap_or(activity.stock + activity.ordered);

    // The book (stock, buyers, returns in flight, in one snapshot) is only needed to load an
    // activity Redis does not hold; skip it when Redis has it (the script keeps its counters).
    let present: bool = redis.query(redis::cmd("EXISTS").arg(&keys.meta)).await?;
    let book = if present {
        Book {
            stock: activity.stock,
            ..Book::default()
        }
    } else {
        activities::book(db, id)
            .await?
            .ok_or(WarmupError::NotFound(id))?
    };
    let mut inv = SCRIPTS.warmup.prepare_invoke();
    inv.key(&keys.meta)
        .key(&keys.stock)
        .key(&keys.users)
        .key(&keys.returned)
        .arg(start_ms)
        .arg(end_ms)
        .arg(book.stock)
        .arg(total);
    book.push_args(&mut inv);
    let loaded: i64 = redis.run("warmup", &inv).await?;
    let outcome = if loaded == 1 {
        WarmupOutcome::Loaded
    } else {
        WarmupOutcome::Kept
    };
    metrics::counter!("flash_sale_warmup_total", "result" => outcome.as_str()).increment(1);
    tracing::info!(activity = %id, ?outcome, stock = activity.stock, "warm-up");
    Ok(outcome)
}

/// Warms up every current activity; one failing activity does not stop the others.
pub async fn warm_up_all(
    db: &MySqlPool,
    redis: &Redis,
) -> Result<Vec<(ActivityId, Result<WarmupOutcome, WarmupError>)>, sqlx::Error> {
    let mut results = Vec::new();
    for id in activities::current(db).await? {
        let result = warm_up(db, redis, id).await;
        if let Err(error) = &result {
            tracing::warn!(activity = %id, %error, "warm-up failed");
        }
        results.push((id, result));
    }
    Ok(results)
}
