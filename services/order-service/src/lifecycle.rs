//! An order's life after `CREATED` (docs/orders.md): paid, cancelled or expired, and the stock
//! of a closed order back on sale.
//!
//! Every way out of `CREATED` is one conditional `UPDATE ... WHERE status = CREATED`: of a
//! payment, a cancellation and an expiry racing for one order, exactly one changes the row and
//! the others read what it became. A payment also needs the deadline not passed, by MySQL's
//! clock, so a payment and the sweeper agree on when an order expires.
//!
//! Cancel and expire give the stock back in the same transaction: `inventory.stock`, and a
//! `stock_returns` row keyed by the order number (a second return of one order cannot be
//! written). Redis gets it after the commit (`restore.lua`, which remembers every order it
//! returned); a process that dies in between leaves the row unapplied, and the sweeper applies it.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use flash_sale_common::api::order::PaymentCallback;
use flash_sale_common::db::{self, StockReturn, Tx, is_duplicate_key};
use flash_sale_common::domain::{ActivityId, OrderNo, OrderStatus, Quantity, UserId};
use flash_sale_common::redis::{Redis, RestoreOutcome};
use sqlx::{MySqlPool, QueryBuilder};

/// `orders.status` codes, from the one table in `OrderStatus`.
const fn code(status: OrderStatus) -> i8 {
    match status.code() {
        Some(code) => code,
        None => panic!("PENDING is not stored"),
    }
}
const CREATED: i8 = code(OrderStatus::Created);
const PAID: i8 = code(OrderStatus::Paid);
const CANCELLED: i8 = code(OrderStatus::Cancelled);
const EXPIRED: i8 = code(OrderStatus::Expired);

/// One row of `orders`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub order_no: OrderNo,
    pub user: UserId,
    pub quantity: Quantity,
    pub amount_cents: i64,
    pub status: OrderStatus,
    pub reserved_at: Option<DateTime<Utc>>,
    pub created_at: Option<DateTime<Utc>>,
    pub pay_deadline: Option<DateTime<Utc>>,
    pub paid_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub payment_ref: Option<String>,
}

type Row = (
    String,
    i64,
    i32,
    i64,
    i8,
    Option<NaiveDateTime>,
    Option<NaiveDateTime>,
    Option<NaiveDateTime>,
    Option<NaiveDateTime>,
    Option<NaiveDateTime>,
    Option<String>,
);

const COLUMNS: &str = "order_no, user_id, quantity, amount_cents, status, reserved_at, \
     create_time, pay_deadline, paid_at, closed_at, payment_ref";

fn from_row(r: Row) -> Option<Order> {
    let utc = |t: Option<NaiveDateTime>| t.map(|t| t.and_utc());
    Some(Order {
        order_no: OrderNo::parse(&r.0).ok()?,
        user: UserId::new(r.1)?,
        quantity: Quantity::new(u32::try_from(r.2).ok()?)?,
        amount_cents: r.3,
        status: OrderStatus::from_code(r.4)?,
        reserved_at: utc(r.5),
        created_at: utc(r.6),
        pay_deadline: utc(r.7),
        paid_at: utc(r.8),
        closed_at: utc(r.9),
        payment_ref: r.10,
    })
}

pub async fn find(db: &MySqlPool, order_no: &OrderNo) -> Result<Option<Order>, sqlx::Error> {
    let row: Option<Row> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM orders WHERE order_no = ?"))
            .bind(order_no.as_str())
            .fetch_optional(db)
            .await?;
    Ok(row.and_then(from_row))
}

/// A buyer's orders in MySQL, newest first.
pub async fn of_user(db: &MySqlPool, user: UserId, limit: u32) -> Result<Vec<Order>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM orders WHERE user_id = ? ORDER BY id DESC LIMIT ?"
    ))
    .bind(user.get())
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().filter_map(from_row).collect())
}

/// What a payment confirmation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayOutcome {
    /// This confirmation paid the order.
    Paid(Order),
    /// The same payment had paid it before: the same answer, nothing changed.
    AlreadyPaid(Order),
    /// Another payment had paid it: this one must be refunded.
    PaidByAnother,
    /// The order was cancelled or expired and its stock given back: refund.
    Closed(OrderStatus),
    /// The amount or quantity is not the order's, or the payment id is another order's.
    Mismatch(String),
    NotFound,
}

/// Confirms a payment for an order in MySQL.
pub async fn pay(
    db: &MySqlPool,
    redis: &Redis,
    callback: &PaymentCallback,
    order_no: &OrderNo,
) -> Result<PayOutcome, sqlx::Error> {
    retried(|| pay_once(db, redis, callback, order_no)).await
}

async fn pay_once(
    db: &MySqlPool,
    redis: &Redis,
    callback: &PaymentCallback,
    order_no: &OrderNo,
) -> Result<PayOutcome, sqlx::Error> {
    let Some(order) = find(db, order_no).await? else {
        return Ok(PayOutcome::NotFound);
    };
    if order.amount_cents != callback.amount_cents || order.quantity.get() != callback.quantity {
        return Ok(PayOutcome::Mismatch(format!(
            "order {order_no} is {} item(s) for {} cents; the payment says {} for {}",
            order.quantity.get(),
            order.amount_cents,
            callback.quantity,
            callback.amount_cents
        )));
    }
    let updated = sqlx::query(
        "UPDATE orders SET status = ?, paid_at = UTC_TIMESTAMP(3), payment_ref = ? \
         WHERE order_no = ? AND status = ? \
         AND (pay_deadline IS NULL OR pay_deadline > UTC_TIMESTAMP(3))",
    )
    .bind(PAID)
    .bind(&callback.payment_id)
    .bind(order_no.as_str())
    .bind(CREATED)
    .execute(db)
    .await;
    match updated {
        Ok(done) if done.rows_affected() == 1 => {
            transitioned(OrderStatus::Paid, 1);
            let order = find(db, order_no).await?.unwrap_or(order);
            return Ok(PayOutcome::Paid(order));
        }
        Ok(_) => {}
        Err(e) if is_duplicate_key(&e) => {
            return Ok(PayOutcome::Mismatch(format!(
                "payment {} already paid another order",
                callback.payment_id
            )));
        }
        Err(e) => return Err(e),
    }
    // The row did not change: read what it is now. A CREATED order here is past its deadline
    // that the sweeper has not reached yet; it expires now, and the payment is refused.
    for _ in 0..2 {
        let Some(now) = find(db, order_no).await? else {
            return Ok(PayOutcome::NotFound);
        };
        match now.status {
            OrderStatus::Paid if now.payment_ref.as_deref() == Some(&callback.payment_id) => {
                return Ok(PayOutcome::AlreadyPaid(now));
            }
            OrderStatus::Paid => return Ok(PayOutcome::PaidByAnother),
            OrderStatus::Cancelled | OrderStatus::Expired => {
                return Ok(PayOutcome::Closed(now.status));
            }
            OrderStatus::Created | OrderStatus::Pending => {
                expire_one(db, redis, order_no).await?;
            }
        }
    }
    Err(sqlx::Error::Protocol(format!(
        "order {order_no} kept changing while a payment was confirmed"
    )))
}

/// What a buyer's cancellation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancelled now; its stock is going back on sale.
    Cancelled(Order),
    /// Cancelled before: the same answer.
    AlreadyCancelled(Order),
    Paid,
    Expired,
    NotFound,
}

/// Cancels a buyer's own `CREATED` order (someone else's is `NotFound`).
pub async fn cancel(
    db: &MySqlPool,
    redis: &Redis,
    user: UserId,
    order_no: &OrderNo,
) -> Result<CancelOutcome, sqlx::Error> {
    retried(|| cancel_once(db, redis, user, order_no)).await
}

async fn cancel_once(
    db: &MySqlPool,
    redis: &Redis,
    user: UserId,
    order_no: &OrderNo,
) -> Result<CancelOutcome, sqlx::Error> {
    let Some(order) = find(db, order_no).await? else {
        return Ok(CancelOutcome::NotFound);
    };
    if order.user != user {
        return Ok(CancelOutcome::NotFound);
    }
    let mut conn = db.acquire().await?;
    let mut tx = read_committed(&mut conn).await?;
    let done = sqlx::query(
        "UPDATE orders SET status = ?, closed_at = UTC_TIMESTAMP(3) \
         WHERE order_no = ? AND user_id = ? AND status = ?",
    )
    .bind(CANCELLED)
    .bind(order_no.as_str())
    .bind(user.get())
    .bind(CREATED)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 1 {
        let returns = [StockReturn {
            order_no: order_no.clone(),
            user,
            quantity: order.quantity,
        }];
        give_back(&mut tx, &returns, CANCELLED).await?;
        tx.commit().await?;
        // Back to the pool before what follows asks it for another connection.
        drop(conn);
        transitioned(OrderStatus::Cancelled, 1);
        apply_returns(db, redis, order_no.activity(), &returns).await;
        let order = find(db, order_no).await?.unwrap_or(order);
        return Ok(CancelOutcome::Cancelled(order));
    }
    tx.rollback().await?;
    drop(conn);
    let Some(now) = find(db, order_no).await? else {
        return Ok(CancelOutcome::NotFound);
    };
    Ok(match now.status {
        OrderStatus::Cancelled => CancelOutcome::AlreadyCancelled(now),
        OrderStatus::Paid => CancelOutcome::Paid,
        _ => CancelOutcome::Expired,
    })
}

/// Expires one order past its deadline (the payment path's own expiry), if it still is.
async fn expire_one(db: &MySqlPool, redis: &Redis, order_no: &OrderNo) -> Result<(), sqlx::Error> {
    let mut conn = db.acquire().await?;
    let mut tx = read_committed(&mut conn).await?;
    let row: Option<(i64, i32)> = sqlx::query_as(
        "SELECT user_id, quantity FROM orders WHERE order_no = ? AND status = ? \
         AND pay_deadline <= UTC_TIMESTAMP(3) FOR UPDATE",
    )
    .bind(order_no.as_str())
    .bind(CREATED)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(returns) = row.and_then(|(user, quantity)| {
        Some(vec![StockReturn::from_row(
            order_no.as_str(),
            user,
            quantity,
        )?])
    }) else {
        return tx.rollback().await;
    };
    close(&mut tx, &returns, EXPIRED).await?;
    tx.commit().await?;
    drop(conn);
    transitioned(OrderStatus::Expired, 1);
    apply_returns(db, redis, order_no.activity(), &returns).await;
    Ok(())
}

/// Expires up to `batch` unpaid orders past their deadline, oldest deadline first, and gives
/// their stock back. Rows another sweeper holds are skipped (`SKIP LOCKED`), so sweepers in
/// several pods share the work. Returns how many expired.
pub async fn expire_due(db: &MySqlPool, redis: &Redis, batch: u32) -> Result<usize, sqlx::Error> {
    retried(|| expire_due_once(db, redis, batch)).await
}

async fn expire_due_once(db: &MySqlPool, redis: &Redis, batch: u32) -> Result<usize, sqlx::Error> {
    let mut conn = db.acquire().await?;
    let mut tx = read_committed(&mut conn).await?;
    let rows: Vec<(String, i64, i32)> = sqlx::query_as(
        "SELECT order_no, user_id, quantity FROM orders \
         WHERE status = ? AND pay_deadline <= UTC_TIMESTAMP(3) \
         ORDER BY pay_deadline LIMIT ? FOR UPDATE SKIP LOCKED",
    )
    .bind(CREATED)
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    let returns: Vec<StockReturn> = rows
        .into_iter()
        .filter_map(|(no, user, quantity)| StockReturn::from_row(&no, user, quantity))
        .collect();
    if returns.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    close(&mut tx, &returns, EXPIRED).await?;
    tx.commit().await?;
    drop(conn);
    transitioned(OrderStatus::Expired, returns.len());
    for (activity, returns) in by_activity(returns.iter().cloned()) {
        apply_returns(db, redis, activity, &returns).await;
    }
    Ok(returns.len())
}

/// Begins a transaction at READ COMMITTED. The lifecycle's transactions lock the rows they
/// change and no gaps: at REPEATABLE READ, the sweepers' range scans and the status changes they
/// make in the same index took gap locks that deadlocked two sweepers (seen in the race test).
async fn read_committed(
    conn: &mut sqlx::pool::PoolConnection<sqlx::MySql>,
) -> Result<Tx<'_>, sqlx::Error> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut **conn)
        .await?;
    sqlx::Connection::begin(&mut **conn).await
}

/// Runs `attempt` again (up to 4 times in all, after 10, 20, 30 ms) when InnoDB picked it as a
/// deadlock's victim or its lock wait timed out: it was rolled back whole, so running it again is
/// safe, and the conditional updates make a second run decide from what the first left.
async fn retried<T, F, Fut>(mut attempt: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(sqlx::Error::Database(e))
                if tries < 4
                    && matches!(e.code().as_deref(), Some("40001") | Some("HY000"))
                    && e.message().to_ascii_lowercase().contains("lock") =>
            {
                tracing::debug!(error = %e.message(), tries, "lock conflict in MySQL; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(10 * tries)).await;
                tries += 1;
            }
            result => return result,
        }
    }
}

/// Moves locked `CREATED` rows to `status` and gives their stock back, in `tx`.
async fn close(tx: &mut Tx<'_>, returns: &[StockReturn], status: i8) -> Result<(), sqlx::Error> {
    let mut q = QueryBuilder::new("UPDATE orders SET status = ");
    q.push_bind(status)
        .push(", closed_at = UTC_TIMESTAMP(3) WHERE status = ")
        .push_bind(CREATED)
        .push(" AND order_no IN (");
    let mut sep = q.separated(", ");
    for r in returns {
        sep.push_bind(r.order_no.as_str());
    }
    q.push(")");
    let done = q.build().execute(&mut **tx).await?;
    if done.rows_affected() != returns.len() as u64 {
        // The rows are locked by this transaction: they cannot have moved.
        return Err(sqlx::Error::Protocol(format!(
            "closed {} of {} locked orders",
            done.rows_affected(),
            returns.len()
        )));
    }
    give_back(tx, returns, status).await
}

/// The stock of closed orders back into `inventory.stock`, and one `stock_returns` row per order
/// (its primary key refuses a second return of the same order).
async fn give_back(
    tx: &mut Tx<'_>,
    returns: &[StockReturn],
    reason: i8,
) -> Result<(), sqlx::Error> {
    let mut per_activity: BTreeMap<ActivityId, i64> = BTreeMap::new();
    for r in returns {
        *per_activity.entry(r.order_no.activity()).or_default() += i64::from(r.quantity.get());
    }
    for (activity, quantity) in per_activity {
        sqlx::query(
            "UPDATE inventory SET stock = stock + ?, version = version + 1 WHERE activity_id = ?",
        )
        .bind(quantity)
        .bind(activity.get())
        .execute(&mut **tx)
        .await?;
    }
    let mut insert = QueryBuilder::new(
        "INSERT INTO stock_returns (order_no, activity_id, user_id, quantity, reason) ",
    );
    insert.push_values(returns, |mut row, r| {
        row.push_bind(r.order_no.as_str())
            .push_bind(r.order_no.activity().get())
            .push_bind(r.user.get())
            .push_bind(r.quantity.get())
            .push_bind(reason);
    });
    insert.build().execute(&mut **tx).await?;
    Ok(())
}

fn by_activity(
    returns: impl Iterator<Item = StockReturn>,
) -> BTreeMap<ActivityId, Vec<StockReturn>> {
    let mut map: BTreeMap<ActivityId, Vec<StockReturn>> = BTreeMap::new();
    for r in returns {
        map.entry(r.order_no.activity()).or_default().push(r);
    }
    map
}

/// Gives returns MySQL has made back to Redis and records them as applied. A failure is logged
/// and left to the sweeper, which retries every unapplied row.
pub async fn apply_returns(
    db: &MySqlPool,
    redis: &Redis,
    activity: ActivityId,
    returns: &[StockReturn],
) {
    if let Err(error) = try_apply_returns(db, redis, activity, returns).await {
        tracing::warn!(%activity, %error, returns = returns.len(), "stock return not applied to Redis yet; the sweeper retries");
    }
}

async fn try_apply_returns(
    db: &MySqlPool,
    redis: &Redis,
    activity: ActivityId,
    returns: &[StockReturn],
) -> anyhow::Result<()> {
    if returns.is_empty() {
        return Ok(());
    }
    let result = match redis.restore(activity, returns).await? {
        RestoreOutcome::Done { applied, already } => {
            counted("applied", applied);
            counted("already_applied", already);
            true
        }
        RestoreOutcome::NotWarmed => {
            counted("not_warmed", returns.len());
            true
        }
        RestoreOutcome::Unverified => false,
    };
    if result {
        db::mark_applied(db, returns).await?;
    }
    Ok(())
}

/// Applies every return MySQL made that Redis has not been told of (after a crash between the
/// commit and Redis, or while Redis was away). Returns how many rows it looked at.
pub async fn apply_unapplied(db: &MySqlPool, redis: &Redis, limit: usize) -> anyhow::Result<usize> {
    let mut seen = 0;
    for (activity, returns) in db::unapplied_returns(db, limit).await? {
        seen += returns.len();
        try_apply_returns(db, redis, activity, &returns).await?;
    }
    Ok(seen)
}

fn counted(result: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!("flash_sale_stock_returns_total", "result" => result).increment(n as u64);
    }
}

fn transitioned(to: OrderStatus, n: usize) {
    let to = match to {
        OrderStatus::Paid => "paid",
        OrderStatus::Cancelled => "cancelled",
        _ => "expired",
    };
    metrics::counter!("flash_sale_order_transitions_total", "to" => to).increment(n as u64);
}

/// Orders in MySQL by state, unpaid orders past their deadline, returns not yet in Redis: the
/// gauges the sweeper samples.
pub async fn sample_gauges(db: &MySqlPool) -> Result<(), sqlx::Error> {
    let by_state: Vec<(i8, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM orders GROUP BY status")
            .fetch_all(db)
            .await?;
    for status in OrderStatus::STORED {
        let n = by_state
            .iter()
            .find(|(code, _)| Some(*code) == status.code())
            .map_or(0, |(_, n)| *n);
        let label = status.as_str().to_ascii_lowercase();
        metrics::gauge!("flash_sale_orders_in_state", "state" => label).set(n as f64);
    }
    let (overdue,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM orders WHERE status = ? AND pay_deadline <= UTC_TIMESTAMP(3)",
    )
    .bind(CREATED)
    .fetch_one(db)
    .await?;
    metrics::gauge!("flash_sale_overdue_unpaid_orders").set(overdue as f64);
    let (unapplied,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM stock_returns WHERE applied_at IS NULL")
            .fetch_one(db)
            .await?;
    metrics::gauge!("flash_sale_stock_returns_unapplied").set(unapplied as f64);
    Ok(())
}
