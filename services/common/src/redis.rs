//! Redis: the per-activity key layout, the Lua scripts of the buy path, and a connection that
//! bounds how many calls are in flight.
//!
//! All of an activity's keys share the hash tag `{act:N}`, so every script touches a single slot
//! and runs unchanged on Redis Cluster. The scripts live in `lua/` beside this crate.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Script, ScriptInvocation, Value,
};
use tokio::sync::Semaphore;

use crate::configuration::RedisSettings;
use crate::db::{Book, StockReturn};
use crate::domain::{ActivityId, OrderNo, Quantity, UserId};

/// The keys of one activity.
#[derive(Debug, Clone)]
pub struct ActivityKeys {
    /// Hash: `start_ms`, `end_ms` (-1 = open ended), `total`, `epoch` (the `LASTSAVE` of the
    /// Redis process that built the counters: `fence`). Its presence means "warmed up".
    pub meta: String,
    /// String: available stock.
    pub stock: String,
    /// Set: users holding a reservation or an order.
    pub users: String,
    /// Hash: order number -> reservation record (`state|user|qty|reserved_ms`).
    pub resv: String,
    /// Sorted set: order numbers by reservation time, for the reconciler's deadline scan.
    pub resv_ts: String,
    /// Sorted set: tombstones of released reservations, so a late order message is skipped.
    pub released: String,
    /// Sorted set: orders (cancelled or expired) whose stock came back to `stock`, by when: a
    /// return is applied once per order number (`restore.lua`).
    pub returned: String,
}

impl ActivityKeys {
    /// The prefix every key of the activity starts with, hash tag included: other keys of the
    /// activity (the gateway's waiting room) start with it too, to share its slot.
    pub fn prefix(activity: ActivityId) -> String {
        format!("fs:{{act:{activity}}}")
    }

    pub fn new(activity: ActivityId) -> Self {
        let tag = Self::prefix(activity);
        Self {
            meta: format!("{tag}:meta"),
            stock: format!("{tag}:stock"),
            users: format!("{tag}:users"),
            resv: format!("{tag}:resv"),
            resv_ts: format!("{tag}:resv:ts"),
            released: format!("{tag}:released"),
            returned: format!("{tag}:returned"),
        }
    }
}

/// Where a reservation stands. Only `Reserved` may be released by the reconciler: once the broker
/// acknowledged the order (`Acked`) the buyer may have been told yes, and once the consumer
/// claimed it (`Claimed`) it is being written to MySQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    Reserved,
    Acked,
    Claimed,
}

impl ReservationState {
    pub const fn letter(self) -> &'static str {
        match self {
            Self::Reserved => "R",
            Self::Acked => "A",
            Self::Claimed => "C",
        }
    }
}

/// One reservation record, as stored in `fs:{act:N}:resv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub state: ReservationState,
    pub user: UserId,
    pub quantity: Quantity,
    pub reserved_ms: i64,
}

impl Reservation {
    pub fn parse(record: &str) -> Option<Self> {
        let mut parts = record.split('|');
        let state = match parts.next()? {
            "R" => ReservationState::Reserved,
            "A" => ReservationState::Acked,
            "C" => ReservationState::Claimed,
            _ => return None,
        };
        let user = UserId::new(parts.next()?.parse().ok()?)?;
        let quantity = Quantity::new(parts.next()?.parse().ok()?)?;
        let reserved_ms = parts.next()?.parse().ok()?;
        Some(Self {
            state,
            user,
            quantity,
            reserved_ms,
        })
    }
}

/// The Lua scripts; `Script` sends EVALSHA and falls back to EVAL after a Redis restart. The ones
/// that write many orders at once start with `bulk.lua`'s helpers.
pub struct Scripts {
    pub reserve: Script,
    pub release: Script,
    pub transition: Script,
    pub settle: Script,
    pub warmup: Script,
    pub adjust: Script,
    pub snapshot: Script,
    pub rebuild: Script,
    pub verified: Script,
    pub restore: Script,
}

pub static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    reserve: Script::new(concat!(
        include_str!("../lua/bulk.lua"),
        include_str!("../lua/reserve.lua")
    )),
    release: Script::new(include_str!("../lua/release.lua")),
    transition: Script::new(concat!(
        include_str!("../lua/bulk.lua"),
        include_str!("../lua/transition.lua")
    )),
    settle: Script::new(concat!(
        include_str!("../lua/bulk.lua"),
        include_str!("../lua/settle.lua")
    )),
    warmup: Script::new(include_str!("../lua/warmup.lua")),
    adjust: Script::new(include_str!("../lua/adjust.lua")),
    snapshot: Script::new(include_str!("../lua/snapshot.lua")),
    rebuild: Script::new(include_str!("../lua/rebuild.lua")),
    verified: Script::new(include_str!("../lua/verified.lua")),
    restore: Script::new(include_str!("../lua/restore.lua")),
});

/// What the reserve script decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved {
        stock_left: i64,
    },
    SoldOut {
        stock_left: i64,
    },
    AlreadyPurchased,
    NotStarted {
        starts_ms: i64,
    },
    Ended,
    UnknownActivity,
    /// The counters were not built by this Redis process (it restarted, or a replica took over)
    /// and may miss its last writes: nothing sells until they are rebuilt from MySQL.
    Unverified,
}

impl ReserveOutcome {
    fn from_reply((code, value): (i64, i64)) -> Result<Self, RedisFailure> {
        Ok(match code {
            1 => Self::Reserved { stock_left: value },
            0 => Self::SoldOut { stock_left: value },
            -1 => Self::AlreadyPurchased,
            -2 => Self::NotStarted { starts_ms: value },
            -3 => Self::Ended,
            -4 => Self::UnknownActivity,
            -5 => Self::Unverified,
            other => return Err(RedisFailure::Protocol(format!("reserve returned {other}"))),
        })
    }
}

/// What `restore` did with a batch of returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// `applied` came back now; `already` had come back before (a retry).
    Done { applied: usize, already: usize },
    /// The activity is not in Redis: a warm-up loads MySQL's stock, which has the returns.
    NotWarmed,
    /// The counters wait for a rebuild from MySQL, which will count the returns.
    Unverified,
}

/// An activity's Redis counters, read atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub warmed: bool,
    pub stock: i64,
    pub total: i64,
    /// Reservations not yet settled into MySQL, and their quantity.
    pub pending: i64,
    pub pending_quantity: i64,
    /// Redis' clock, in ms since the epoch.
    pub now_ms: i64,
}

/// Why a Redis call did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RedisFailure {
    #[error("too many Redis calls in flight")]
    Busy,
    #[error("Redis did not answer in time")]
    Timeout,
    #[error("unexpected script reply: {0}")]
    Protocol(String),
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// A multiplexed connection, to one Redis or to a Redis Cluster. Cloning shares the socket(s).
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConnection {
    /// Connects to `url`: one Redis (a managed connection, which reconnects after the server
    /// comes back), or, when it lists several nodes (comma separated), the cluster they form.
    /// For tools and tests; the services connect through [`Redis::connect`], with their settings.
    pub async fn open(url: &str) -> Result<Self, RedisError> {
        if url.contains(',') {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            let client = redis::cluster::ClusterClient::new(nodes)?;
            Ok(Self::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(url)?;
            Ok(Self::Single(ConnectionManager::new(client).await?))
        }
    }
}

/// The process' Redis handle: one multiplexed connection shared by every task, with an explicit
/// bound on calls in flight (`redis.max_in_flight`) and a timeout on each call.
///
/// Why not a pool: on the 2-core reference machine one multiplexed connection carried about
/// 71k Lua calls/s, a 64-connection pool about 28k/s (see docs/performance.md).
#[derive(Clone)]
pub struct Redis {
    conn: RedisConnection,
    permits: Arc<Semaphore>,
    acquire_timeout: Duration,
    response_timeout: Duration,
}

impl Redis {
    pub async fn connect(settings: &RedisSettings) -> Result<Self, RedisError> {
        let response_timeout = Duration::from_millis(settings.response_timeout_ms);
        let conn = if settings.cluster {
            let nodes: Vec<&str> = settings.url.expose().split(',').map(str::trim).collect();
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .response_timeout(response_timeout)
                .build()?;
            RedisConnection::Cluster(client.get_async_connection().await?)
        } else {
            let client = redis::Client::open(settings.url.expose())?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(response_timeout))
                .set_connection_timeout(Some(Duration::from_secs(2)));
            RedisConnection::Single(ConnectionManager::new_with_config(client, config).await?)
        };
        Ok(Self {
            conn,
            permits: Arc::new(Semaphore::new(settings.max_in_flight)),
            acquire_timeout: Duration::from_millis(settings.acquire_timeout_ms),
            response_timeout,
        })
    }

    /// The same connection and bound on calls in flight, with other limits for the calls made
    /// through the copy. A copy can only wait less than the connection itself allows
    /// (`redis.response_timeout_ms`, at connect): its timeout is the smaller of the two.
    pub fn with_timeouts(&self, acquire: Duration, response: Duration) -> Self {
        Self {
            acquire_timeout: acquire,
            response_timeout: response.min(self.response_timeout),
            ..self.clone()
        }
    }

    /// Runs a script, timing it under `flash_sale_redis_script_duration_seconds{script}`.
    pub async fn run<T: FromRedisValue>(
        &self,
        name: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisFailure> {
        let _permit = self.permit().await?;
        let started = Instant::now();
        let mut conn = self.conn.clone();
        let result =
            tokio::time::timeout(self.response_timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| RedisFailure::Timeout)?;
        metrics::histogram!("flash_sale_redis_script_duration_seconds", "script" => name)
            .record(started.elapsed());
        Ok(result?)
    }

    /// Sends one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisFailure> {
        let _permit = self.permit().await?;
        let mut conn = self.conn.clone();
        let result = tokio::time::timeout(self.response_timeout, cmd.query_async(&mut conn))
            .await
            .map_err(|_| RedisFailure::Timeout)?;
        Ok(result?)
    }

    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, RedisFailure> {
        match tokio::time::timeout(self.acquire_timeout, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(RedisFailure::Busy),
        }
    }

    /// Reserve `quantity` for `user`: window, dedupe, stock and reservation in one atomic call.
    pub async fn reserve(
        &self,
        activity: ActivityId,
        user: UserId,
        quantity: Quantity,
        order_no: &OrderNo,
    ) -> Result<ReserveOutcome, RedisFailure> {
        let mut outcomes = self
            .reserve_lot(activity, &[(user, quantity, order_no.clone())])
            .await?;
        outcomes
            .pop()
            .ok_or_else(|| RedisFailure::Protocol("reserve returned no answer".into()))
    }

    /// Reserves for a lot of buyers of one activity in one atomic call, in the order given
    /// (a buyer twice in the lot gets `AlreadyPurchased` the second time); one outcome per
    /// order.
    pub async fn reserve_lot(
        &self,
        activity: ActivityId,
        lot: &[(UserId, Quantity, OrderNo)],
    ) -> Result<Vec<ReserveOutcome>, RedisFailure> {
        let k = ActivityKeys::new(activity);
        let mut inv = SCRIPTS.reserve.prepare_invoke();
        inv.key(&k.meta)
            .key(&k.stock)
            .key(&k.users)
            .key(&k.resv)
            .key(&k.resv_ts);
        for (user, quantity, order_no) in lot {
            inv.arg(user.get())
                .arg(quantity.get())
                .arg(order_no.as_str());
        }
        let reply: Vec<i64> = self.run("reserve", &inv).await?;
        if reply.len() != 2 * lot.len() {
            return Err(RedisFailure::Protocol(format!(
                "reserve returned {} values for {} orders",
                reply.len(),
                lot.len()
            )));
        }
        reply
            .chunks_exact(2)
            .map(|pair| ReserveOutcome::from_reply((pair[0], pair[1])))
            .collect()
    }

    /// Gives a reservation back if it is in one of `states`. Returns 1 released, 0 none, -1 other state.
    pub async fn release(
        &self,
        order_no: &OrderNo,
        states: &[ReservationState],
    ) -> Result<i64, RedisFailure> {
        let k = ActivityKeys::new(order_no.activity());
        let allowed: String = states.iter().map(|s| s.letter()).collect();
        let mut inv = SCRIPTS.release.prepare_invoke();
        inv.key(&k.stock)
            .key(&k.users)
            .key(&k.resv)
            .key(&k.resv_ts)
            .key(&k.released)
            .arg(order_no.as_str())
            .arg(allowed);
        self.run("release", &inv).await
    }

    /// Moves reservations of one activity from one of `from` to `to`; one code per order number
    /// (1 moved, 0 no reservation, -1 other state, -2 released).
    pub async fn transition(
        &self,
        activity: ActivityId,
        order_nos: &[&OrderNo],
        from: &[ReservationState],
        to: ReservationState,
    ) -> Result<Vec<i64>, RedisFailure> {
        let k = ActivityKeys::new(activity);
        let allowed: String = from.iter().map(|s| s.letter()).collect();
        let mut inv = SCRIPTS.transition.prepare_invoke();
        inv.key(&k.resv)
            .key(&k.released)
            .arg(allowed)
            .arg(to.letter());
        for no in order_nos {
            inv.arg(no.as_str());
        }
        self.run("transition", &inv).await
    }

    /// Forgets reservations of one activity whose orders are in MySQL.
    pub async fn settle(
        &self,
        activity: ActivityId,
        order_nos: &[&OrderNo],
    ) -> Result<i64, RedisFailure> {
        let k = ActivityKeys::new(activity);
        let mut inv = SCRIPTS.settle.prepare_invoke();
        inv.key(&k.resv).key(&k.resv_ts);
        for no in order_nos {
            inv.arg(no.as_str());
        }
        self.run("settle", &inv).await
    }

    /// The reservation record of an order, if Redis still holds one.
    pub async fn reservation(
        &self,
        order_no: &OrderNo,
    ) -> Result<Option<Reservation>, RedisFailure> {
        let k = ActivityKeys::new(order_no.activity());
        let record: Option<String> = self
            .query(redis::cmd("HGET").arg(&k.resv).arg(order_no.as_str()))
            .await?;
        Ok(record.as_deref().and_then(Reservation::parse))
    }

    /// An atomic view of an activity's Redis counters.
    /// Order numbers of the reservations not yet settled into MySQL.
    pub async fn pending_order_nos(
        &self,
        activity: ActivityId,
    ) -> Result<Vec<String>, RedisFailure> {
        let k = ActivityKeys::new(activity);
        self.query(redis::cmd("HKEYS").arg(&k.resv)).await
    }

    /// Whether the activity's counters carry this Redis process's epoch (`verified.lua`): true
    /// also for an activity that is not warmed up (there is nothing to rebuild).
    pub async fn is_verified(&self, activity: ActivityId) -> Result<bool, RedisFailure> {
        let k = ActivityKeys::new(activity);
        let mut inv = SCRIPTS.verified.prepare_invoke();
        inv.key(&k.meta);
        let code: i64 = self.run("verified", &inv).await?;
        Ok(code != 0)
    }

    /// Rebuilds unverified counters from MySQL's `stock` and `buyers` (`rebuild.lua`): stock =
    /// MySQL's minus what pending reservations hold, buyers added, this process's epoch stamped.
    /// `Some((true, stock))` rebuilt, `Some((false, stock))` already verified, `None` not warmed
    /// up.
    pub async fn rebuild(
        &self,
        activity: ActivityId,
        book: &Book,
    ) -> Result<Option<(bool, i64)>, RedisFailure> {
        let k = ActivityKeys::new(activity);
        let mut inv = SCRIPTS.rebuild.prepare_invoke();
        inv.key(&k.meta)
            .key(&k.stock)
            .key(&k.users)
            .key(&k.resv)
            .key(&k.returned)
            .arg(book.stock);
        book.push_args(&mut inv);
        let (code, stock): (i64, i64) = self.run("rebuild", &inv).await?;
        Ok(match code {
            1 => Some((true, stock)),
            0 => Some((false, stock)),
            _ => None,
        })
    }

    pub async fn snapshot(&self, activity: ActivityId) -> Result<Snapshot, RedisFailure> {
        let k = ActivityKeys::new(activity);
        let mut inv = SCRIPTS.snapshot.prepare_invoke();
        inv.key(&k.meta).key(&k.stock).key(&k.resv);
        let v: Vec<i64> = self.run("snapshot", &inv).await?;
        match v.as_slice() {
            &[warmed, stock, total, pending, pending_quantity, now_ms] => Ok(Snapshot {
                warmed: warmed == 1,
                stock,
                total,
                pending,
                pending_quantity,
                now_ms,
            }),
            _ => Err(RedisFailure::Protocol(format!("snapshot returned {v:?}"))),
        }
    }

    /// Adds `delta` to the available stock (never below zero) and `total_delta` to the total.
    /// Returns the new stock, or `None` if the activity is not warmed up.
    pub async fn adjust(
        &self,
        activity: ActivityId,
        delta: i64,
        total_delta: i64,
    ) -> Result<Option<i64>, RedisFailure> {
        let k = ActivityKeys::new(activity);
        let mut inv = SCRIPTS.adjust.prepare_invoke();
        inv.key(&k.meta).key(&k.stock).arg(delta).arg(total_delta);
        let stock: i64 = self.run("adjust", &inv).await?;
        Ok((stock >= 0).then_some(stock))
    }

    /// `PING`, for readiness and start-up checks.
    /// Puts the stock of closed orders of one activity back on sale (`restore.lua`); applying a
    /// return twice changes nothing.
    pub async fn restore(
        &self,
        activity: ActivityId,
        returns: &[StockReturn],
    ) -> Result<RestoreOutcome, RedisFailure> {
        let k = ActivityKeys::new(activity);
        let mut inv = SCRIPTS.restore.prepare_invoke();
        inv.key(&k.meta)
            .key(&k.stock)
            .key(&k.users)
            .key(&k.returned);
        for r in returns {
            inv.arg(r.order_no.as_str())
                .arg(r.user.get())
                .arg(r.quantity.get());
        }
        let codes: Vec<i64> = self.run("restore", &inv).await?;
        Ok(match codes.as_slice() {
            [-4] => RestoreOutcome::NotWarmed,
            [-5] => RestoreOutcome::Unverified,
            codes if codes.len() == returns.len() && codes.iter().all(|c| *c == 0 || *c == 1) => {
                let applied = codes.iter().filter(|c| **c == 1).count();
                RestoreOutcome::Done {
                    applied,
                    already: codes.len() - applied,
                }
            }
            other => {
                return Err(RedisFailure::Protocol(format!(
                    "restore returned {other:?}"
                )));
            }
        })
    }

    /// Which of these orders' returns Redis has applied (`returned` holds them).
    pub async fn returned(
        &self,
        activity: ActivityId,
        order_nos: &[&str],
    ) -> Result<Vec<bool>, RedisFailure> {
        if order_nos.is_empty() {
            return Ok(Vec::new());
        }
        let k = ActivityKeys::new(activity);
        let scores: Vec<Option<f64>> = self
            .query(redis::cmd("ZMSCORE").arg(&k.returned).arg(order_nos))
            .await?;
        Ok(scores.iter().map(Option::is_some).collect())
    }

    pub async fn ping(&self) -> Result<(), RedisFailure> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_an_activity_shares_one_hash_tag() {
        let k = ActivityKeys::new(ActivityId::new(42).unwrap());
        for key in [
            &k.meta,
            &k.stock,
            &k.users,
            &k.resv,
            &k.resv_ts,
            &k.released,
            &k.returned,
        ] {
            assert!(key.contains("{act:42}"), "{key}");
            assert_eq!(key.matches('{').count(), 1, "{key}");
        }
    }

    #[test]
    fn reservation_records_parse() {
        let r = Reservation::parse("A|7|2|1700000000000").unwrap();
        assert_eq!(r.state, ReservationState::Acked);
        assert_eq!(r.user.get(), 7);
        assert_eq!(r.quantity.get(), 2);
        assert_eq!(r.reserved_ms, 1_700_000_000_000);
        assert!(Reservation::parse("X|7|2|1").is_none());
        assert!(Reservation::parse("R|7|0|1").is_none());
    }
}
