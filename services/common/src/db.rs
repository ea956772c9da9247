//! MySQL (or MariaDB): the pool and the embedded migrations.

use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{Executor, MySql, Transaction};

use crate::configuration::DatabaseSettings;
use crate::domain::ActivityId;

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

/// The users holding an order in an activity (to rebuild its Redis buyers' set from MySQL).
pub async fn buyers(db: &MySqlPool, id: ActivityId) -> Result<Vec<i64>, sqlx::Error> {
    let rows: Vec<(i64,)> = sqlx::query_as("SELECT user_id FROM orders WHERE activity_id = ?")
        .bind(id.get())
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(|(u,)| u).collect())
}

/// An activity's available stock in MySQL, the book of record (`None`: no such activity).
pub async fn stock(db: &MySqlPool, id: ActivityId) -> Result<Option<i64>, sqlx::Error> {
    let row: Option<(i64,)> = sqlx::query_as("SELECT stock FROM inventory WHERE activity_id = ?")
        .bind(id.get())
        .fetch_optional(db)
        .await?;
    Ok(row.map(|(s,)| s))
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
