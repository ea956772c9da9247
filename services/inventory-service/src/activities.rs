//! Activities and their stock in MySQL.

use chrono::{DateTime, NaiveDateTime, Utc};
use flash_sale_common::db::is_duplicate_key;
use flash_sale_common::domain::ActivityId;
use sqlx::MySqlPool;

pub use flash_sale_common::db::{book, current, existing_orders};

/// One row of `inventory`, with what `orders` says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub id: ActivityId,
    pub name: Option<String>,
    /// Stock not yet ordered in MySQL.
    pub stock: i64,
    /// All stock ever put on sale; `None` for a row inserted by hand until the warm-up fills it.
    pub total_stock: Option<i64>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    /// Price of one item, in the currency's smallest unit.
    pub price_cents: i64,
    /// How long a buyer has to pay once the order is in MySQL.
    pub pay_timeout_secs: i64,
    /// Sum of quantities of live (`CREATED` or `PAID`) orders in `orders`.
    pub ordered: i64,
}

/// A new activity, already validated.
#[derive(Debug, Clone)]
pub struct NewActivity {
    pub id: ActivityId,
    pub name: Option<String>,
    pub stock: i64,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub price_cents: i64,
    pub pay_timeout_secs: i64,
}

type Row = (
    i64,
    Option<String>,
    i32,
    Option<i32>,
    Option<NaiveDateTime>,
    Option<NaiveDateTime>,
    i64,
    i32,
    i64,
);

/// Live orders hold stock; cancelled and expired ones gave theirs back.
const LIVE_ORDERED: &str = "COALESCE((SELECT SUM(o.quantity) FROM orders o \
     WHERE o.activity_id = i.activity_id AND o.status IN (0, 1)), 0)";

fn select() -> String {
    format!(
        "SELECT i.activity_id, i.name, i.stock, i.total_stock, i.start_time, i.end_time, \
         i.price_cents, i.pay_timeout_secs, CAST({LIVE_ORDERED} AS SIGNED) FROM inventory i"
    )
}

fn from_row(r: Row) -> Option<Activity> {
    Some(Activity {
        id: ActivityId::new(r.0)?,
        name: r.1,
        stock: i64::from(r.2),
        total_stock: r.3.map(i64::from),
        start_time: r.4.map(|t| t.and_utc()),
        end_time: r.5.map(|t| t.and_utc()),
        price_cents: r.6,
        pay_timeout_secs: i64::from(r.7),
        ordered: r.8,
    })
}

pub async fn find(db: &MySqlPool, id: ActivityId) -> Result<Option<Activity>, sqlx::Error> {
    let row: Option<Row> = sqlx::query_as(&format!("{} WHERE i.activity_id = ?", select()))
        .bind(id.get())
        .fetch_optional(db)
        .await?;
    Ok(row.and_then(from_row))
}

/// Every activity, newest id first.
pub async fn list(db: &MySqlPool) -> Result<Vec<Activity>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!("{} ORDER BY i.activity_id DESC", select()))
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().filter_map(from_row).collect())
}

/// Inserts a new activity. `Ok(false)` if the id is taken.
pub async fn create(db: &MySqlPool, new: &NewActivity) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "INSERT INTO inventory \
         (activity_id, name, stock, total_stock, start_time, end_time, price_cents, pay_timeout_secs) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(new.id.get())
    .bind(new.name.as_deref())
    .bind(new.stock)
    .bind(new.stock)
    .bind(new.start_time.map(|t| t.naive_utc()))
    .bind(new.end_time.map(|t| t.naive_utc()))
    .bind(new.price_cents)
    .bind(new.pay_timeout_secs)
    .execute(db)
    .await;
    match result {
        Ok(_) => Ok(true),
        Err(e) if is_duplicate_key(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Adds stock in MySQL. `Ok(false)` if there is no such activity.
pub async fn restock(db: &MySqlPool, id: ActivityId, quantity: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE inventory SET stock = stock + ?, total_stock = total_stock + ?, version = version + 1 \
         WHERE activity_id = ? AND total_stock IS NOT NULL",
    )
    .bind(quantity)
    .bind(quantity)
    .bind(id.get())
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Fills `total_stock` of a row inserted by hand (the seed's `INSERT INTO inventory (activity_id,
/// stock)`): everything ever on sale is what is left plus what live orders hold.
pub async fn fill_total(db: &MySqlPool, id: ActivityId) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE inventory i SET i.total_stock = i.stock + {LIVE_ORDERED} \
         WHERE i.activity_id = ? AND i.total_stock IS NULL"
    ))
    .bind(id.get())
    .execute(db)
    .await?;
    Ok(())
}
