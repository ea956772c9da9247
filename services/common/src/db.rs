//! MySQL (or MariaDB): the pool and the embedded migrations.

use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{Executor, MySql, Transaction};

use crate::configuration::DatabaseSettings;
use crate::domain::{ActivityId, OrderNo, Quantity, UserId};

/// The schema, embedded at build time from `migrations/` at the repository root.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A lazily connecting pool; every connection runs in UTC.
pub fn pool(settings: &DatabaseSettings) -> Result<MySqlPool, sqlx::Error> {
    let options: MySqlConnectOptions = settings.url.expose().parse()?;
    Ok(MySqlPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("SET time_zone = '+00:00'").await?;
                Ok(())
            })
        })
        .connect_lazy_with(options))
}

pub type Tx<'a> = Transaction<'a, MySql>;

/// Whether an error is a unique-key violation (MySQL error 1062).
pub fn is_duplicate_key(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("23000"))
}

/// What MySQL, the book of record, says Redis should hold for an activity: read in one
/// transaction (one InnoDB snapshot), so a return committed while it is read is either in the
/// stock and among `unapplied`, or in neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Book {
    /// Available stock.
    pub stock: i64,
    /// Users holding a live (`CREATED` or `PAID`) order.
    pub buyers: Vec<i64>,
    /// Orders whose stock MySQL took back and Redis has not been told of.
    pub unapplied: Vec<String>,
}

impl Book {
    /// The tail of `warmup.lua`'s and `rebuild.lua`'s arguments: the count of buyers, the
    /// buyers, the unapplied returns.
    pub fn push_args(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(self.buyers.len());
        for user in &self.buyers {
            inv.arg(*user);
        }
        for no in &self.unapplied {
            inv.arg(no.as_str());
        }
    }
}

/// Reads an activity's [`Book`] (`None`: no such activity).
pub async fn book(db: &MySqlPool, id: ActivityId) -> Result<Option<Book>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let stock: Option<(i64,)> = sqlx::query_as("SELECT stock FROM inventory WHERE activity_id = ?")
        .bind(id.get())
        .fetch_optional(&mut *tx)
        .await?;
    let Some((stock,)) = stock else {
        return Ok(None);
    };
    let buyers: Vec<(i64,)> =
        sqlx::query_as("SELECT user_id FROM orders WHERE activity_id = ? AND status IN (0, 1)")
            .bind(id.get())
            .fetch_all(&mut *tx)
            .await?;
    let unapplied: Vec<(String,)> = sqlx::query_as(
        "SELECT order_no FROM stock_returns WHERE activity_id = ? AND applied_at IS NULL",
    )
    .bind(id.get())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Book {
        stock,
        buyers: buyers.into_iter().map(|(u,)| u).collect(),
        unapplied: unapplied.into_iter().map(|(n,)| n).collect(),
    }))
}

/// A closed order's stock on its way back to Redis: a row of `stock_returns` not yet applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockReturn {
    pub order_no: OrderNo,
    pub user: UserId,
    pub quantity: Quantity,
}

impl StockReturn {
    /// From the `order_no, user_id, quantity` columns of a row; `None` if one is malformed.
    pub fn from_row(order_no: &str, user: i64, quantity: i32) -> Option<Self> {
        Some(Self {
            order_no: OrderNo::parse(order_no).ok()?,
            user: UserId::new(user)?,
            quantity: Quantity::new(u32::try_from(quantity).ok()?)?,
        })
    }
}

/// Returns MySQL has made and Redis may not have applied yet, oldest first, grouped by activity.
pub async fn unapplied_returns(
    db: &MySqlPool,
    limit: usize,
) -> Result<Vec<(ActivityId, Vec<StockReturn>)>, sqlx::Error> {
    let rows: Vec<(String, i64, i32)> = sqlx::query_as(
        "SELECT order_no, user_id, quantity FROM stock_returns WHERE applied_at IS NULL \
         ORDER BY created_at LIMIT ?",
    )
    .bind(limit as u64)
    .fetch_all(db)
    .await?;
    let mut by_activity: std::collections::BTreeMap<ActivityId, Vec<StockReturn>> =
        Default::default();
    for (no, user, quantity) in rows {
        let Some(r) = StockReturn::from_row(&no, user, quantity) else {
            tracing::error!(order_no = no, "malformed stock_returns row skipped");
            continue;
        };
        by_activity
            .entry(r.order_no.activity())
            .or_default()
            .push(r);
    }
    Ok(by_activity.into_iter().collect())
}

/// Records that Redis has these returns.
pub async fn mark_applied(db: &MySqlPool, returns: &[StockReturn]) -> Result<(), sqlx::Error> {
    if returns.is_empty() {
        return Ok(());
    }
    let mut q = sqlx::QueryBuilder::new(
        "UPDATE stock_returns SET applied_at = UTC_TIMESTAMP(3) WHERE applied_at IS NULL AND order_no IN (",
    );
    let mut sep = q.separated(", ");
    for r in returns {
        sep.push_bind(r.order_no.as_str());
    }
    q.push(")");
    q.build().execute(db).await?;
    Ok(())
}

/// Which of these order numbers are in MySQL.
pub async fn existing_orders(
    db: &MySqlPool,
    order_nos: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    if order_nos.is_empty() {
        return Ok(Vec::new());
    }
    let mut q = sqlx::QueryBuilder::new("SELECT order_no FROM orders WHERE order_no IN (");
    let mut sep = q.separated(", ");
    for no in order_nos {
        sep.push_bind(no);
    }
    q.push(")");
    let rows: Vec<(String,)> = q.build_query_as().fetch_all(db).await?;
    Ok(rows.into_iter().map(|(n,)| n).collect())
}

/// Activities the scheduled jobs look after: not ended more than a day ago.
pub async fn current(db: &MySqlPool) -> Result<Vec<ActivityId>, sqlx::Error> {
    let ids: Vec<(i64,)> = sqlx::query_as(
        "SELECT activity_id FROM inventory \
         WHERE end_time IS NULL OR end_time > UTC_TIMESTAMP(3) - INTERVAL 1 DAY",
    )
    .fetch_all(db)
    .await?;
    Ok(ids
        .into_iter()
        .filter_map(|(id,)| ActivityId::new(id))
        .collect())
}
