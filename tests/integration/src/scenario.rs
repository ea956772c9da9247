//! A flash sale driven through the public API, and the invariant check of docs/design.md.
//!
//! The same code runs in the integration tests, in `cargo xtask sale` (the README's main job) and
//! in the NixOS VM test (the `flash-sale-scenario` binary).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use flash_sale_common::api;
use flash_sale_common::domain::ActivityId;
use flash_sale_common::redis::ActivityKeys;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::MySqlPool;

/// The inventory admin API.
#[derive(Clone)]
pub struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Admin {
    pub fn new(http: reqwest::Client, base_url: &str, token: &str) -> Self {
        Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    /// Calls the admin API; a non-2xx answer is an error carrying the body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("calling {path}"))?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        ensure!(status.is_success(), "{path} answered {status}: {body}");
        Ok(body)
    }

    /// Creates an activity open now and for an hour, warmed up at once (free, 15 minutes to pay).
    pub async fn create_activity(&self, id: i64, stock: i64) -> anyhow::Result<Value> {
        self.create_activity_with(id, stock, json!({})).await
    }

    /// Like [`Self::create_activity`], with more fields of the create request (`priceCents`,
    /// `payTimeoutSecs`, ...).
    pub async fn create_activity_with(
        &self,
        id: i64,
        stock: i64,
        extra: Value,
    ) -> anyhow::Result<Value> {
        let now = chrono_now_rfc3339(0);
        let end = chrono_now_rfc3339(3600);
        let mut body = json!({"activityId": id.to_string(), "name": format!("sale {id}"), "stock": stock, "startTime": now, "endTime": end});
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        self.call(
            reqwest::Method::POST,
            api::inventory::ACTIVITIES,
            Some(body),
        )
        .await
    }

    pub async fn activity(&self, id: i64) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::GET,
            &api::inventory::activity(id, ""),
            None,
        )
        .await
    }

    pub async fn reconcile(&self) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, api::inventory::RECONCILE, None)
            .await
    }
}

fn chrono_now_rfc3339(offset_secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(offset_secs))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The shape of a sale.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaleConfig {
    pub activity: i64,
    pub stock: i64,
    pub requests: usize,
    pub concurrency: usize,
    /// Every n-th request comes from a user who already tried (0: never).
    pub repeat_every: usize,
    /// First user id; users are `first_user..`.
    pub first_user: i64,
    /// How long a buyer goes on retrying a request that got no answer, a 5xx or a 429, as people
    /// do (0: one try). The crash drills use it; a definitive answer ends the buyer's tries.
    #[serde(default)]
    pub retry_ms: u64,
}

/// Pause between a buyer's tries.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

impl Default for SaleConfig {
    fn default() -> Self {
        Self {
            activity: 1,
            stock: 2000,
            requests: 20_000,
            concurrency: 200,
            repeat_every: 3,
            first_user: 1_000_000,
            retry_ms: 0,
        }
    }
}

impl SaleConfig {
    /// The user of request `i`: fresh users, except every `repeat_every`-th request, which
    /// repeats the user of the request before it.
    pub fn user(&self, i: usize) -> i64 {
        let i = if self.repeat_every > 0 && i % self.repeat_every == self.repeat_every - 1 {
            i - 1
        } else {
            i
        };
        self.first_user + i as i64
    }
}

/// What the load did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub requests: usize,
    pub elapsed: Duration,
    /// (HTTP status, error code or "ACCEPTED") -> count.
    pub outcomes: BTreeMap<String, usize>,
    /// Accepted order numbers with their user.
    pub accepted: Vec<(String, i64)>,
    /// When each 2xx answer arrived, in the order of `accepted` (not in the JSON report).
    #[serde(skip)]
    pub accepted_at: Vec<Instant>,
    /// Transport failures (no HTTP answer), counted only for a buyer's last try.
    pub transport_errors: usize,
    /// Tries repeated after no answer, a 5xx or a 429 (`SaleConfig::retry_ms`).
    pub retries: usize,
    /// Latency percentiles in ms: p50, p90, p99, max.
    pub latency_ms: [f64; 4],
    /// Every answer, retried ones included, in no particular order (for the report's timeline;
    /// not in the JSON report).
    #[serde(skip)]
    pub answers: Vec<Answer>,
    /// When the load began (the origin of `Answer::at_ms`).
    #[serde(skip)]
    pub started: Option<Instant>,
}

/// What one answer was, for the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AnswerKind {
    Accepted,
    SoldOut,
    /// 429: a flow rule metered it (the buyer may try again).
    Throttled,
    OtherClientError,
    ServerError,
    NoAnswer,
}

impl AnswerKind {
    pub const ALL: [Self; 6] = [
        Self::Accepted,
        Self::SoldOut,
        Self::Throttled,
        Self::OtherClientError,
        Self::ServerError,
        Self::NoAnswer,
    ];

    pub fn of_status(status: u16) -> Self {
        match status {
            200..=299 => Self::Accepted,
            409 => Self::SoldOut,
            429 => Self::Throttled,
            500.. => Self::ServerError,
            _ => Self::OtherClientError,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted (2xx)",
            Self::SoldOut => "sold out / ended (409)",
            Self::Throttled => "throttled (429)",
            Self::OtherClientError => "other 4xx",
            Self::ServerError => "5xx",
            Self::NoAnswer => "no answer",
        }
    }
}

/// One answer: when it came (ms after the load began), how long it took, what it was.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub at_ms: u32,
    pub latency_us: u32,
    pub kind: AnswerKind,
}

/// What a load has done so far, read while it runs (the live view) without a lock.
#[derive(Debug)]
pub struct LoadProgress {
    /// Buyers whose tries are over.
    pub buyers_done: AtomicUsize,
    /// HTTP answers, retried ones included.
    pub answers: AtomicUsize,
    pub accepted: AtomicUsize,
    /// Answers by latency: bucket `i` holds latencies in `[2^(i/4), 2^((i+1)/4))` µs.
    latency: [AtomicU64; LATENCY_BUCKETS],
}

const LATENCY_BUCKETS: usize = 128;

impl Default for LoadProgress {
    fn default() -> Self {
        Self {
            buyers_done: AtomicUsize::new(0),
            answers: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LoadProgress {
    fn bucket(latency: Duration) -> usize {
        let us = latency.as_micros().max(1) as f64;
        ((us.log2() * 4.0) as usize).min(LATENCY_BUCKETS - 1)
    }

    /// Counts one answer and its latency.
    pub fn record(&self, latency: Duration) {
        self.answers.fetch_add(1, Ordering::Relaxed);
        self.latency[Self::bucket(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile (0..=1) of the latencies so far, in ms, to within a bucket (19 %):
    /// the upper edge of the bucket it falls in. 0 before any answer.
    pub fn latency_quantile_ms(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (total as f64 * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return 2f64.powf((i + 1) as f64 / 4.0) / 1000.0;
            }
        }
        2f64.powf(LATENCY_BUCKETS as f64 / 4.0) / 1000.0
    }
}

impl LoadReport {
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn count_5xx(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|(k, _)| k.starts_with('5'))
            .map(|(_, n)| n)
            .sum()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "requests     {} in {:.2} s = {:.0} requests/s",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.throughput()
        )?;
        writeln!(
            f,
            "latency ms   p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
            self.latency_ms[0], self.latency_ms[1], self.latency_ms[2], self.latency_ms[3]
        )?;
        writeln!(f, "outcomes")?;
        for (outcome, n) in &self.outcomes {
            writeln!(f, "  {outcome:<32} {n:>8}")?;
        }
        if self.retries > 0 {
            writeln!(
                f,
                "  {:<32} {:>8}",
                "tries repeated by buyers", self.retries
            )?;
        }
        if self.transport_errors > 0 {
            writeln!(
                f,
                "  {:<32} {:>8}",
                "no answer (transport error)", self.transport_errors
            )?;
        }
        Ok(())
    }
}

/// Sends `config.requests` create-order requests to `buy_url` (order-service or gateway base URL)
/// from `config.concurrency` workers.
pub async fn drive_sale(http: &reqwest::Client, buy_url: &str, config: &SaleConfig) -> LoadReport {
    drive_sale_with(std::slice::from_ref(http), buy_url, config, &Arc::default()).await
}

/// [`drive_sale`] with the buyers spread over `clients` (worker `i` uses client `i % n`),
/// counting into `progress` as it goes.
pub async fn drive_sale_with(
    clients: &[reqwest::Client],
    buy_url: &str,
    config: &SaleConfig,
    progress: &Arc<LoadProgress>,
) -> LoadReport {
    let url = format!("{}{}", buy_url.trim_end_matches('/'), api::order::CREATE);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..config.concurrency.max(1) {
        let http = clients[w % clients.len()].clone();
        let (url, next, config) = (url.clone(), next.clone(), config.clone());
        let progress = progress.clone();
        workers.push(tokio::spawn(async move {
            let mut part = Part::default();
            let answered = |part: &mut Part, t: Instant, kind: AnswerKind| {
                let latency = t.elapsed();
                part.answers.push(Answer {
                    at_ms: (t + latency - started).as_millis() as u32,
                    latency_us: latency.as_micros().min(u32::MAX as u128) as u32,
                    kind,
                });
                latency
            };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= config.requests {
                    return part;
                }
                let user = config.user(i);
                let body = json!({"userId": user.to_string(), "activityId": config.activity.to_string(), "quantity": 1});
                let give_up = Instant::now() + Duration::from_millis(config.retry_ms);
                loop {
                    let t = Instant::now();
                    let answer = match http.post(&url).json(&body).send().await {
                        Ok(res) => {
                            let status = res.status().as_u16();
                            let blocked = res
                                .headers()
                                .get(gateway::error::BLOCKED_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            let body: Value = res.json().await.unwrap_or(Value::Null);
                            let latency = answered(&mut part, t, AnswerKind::of_status(status));
                            part.latencies.push(latency);
                            progress.record(latency);
                            Some((status, body, blocked))
                        }
                        Err(_) => {
                            answered(&mut part, t, AnswerKind::NoAnswer);
                            None
                        }
                    };
                    let retryable = answer
                        .as_ref()
                        .is_none_or(|(status, _, _)| *status >= 500 || *status == 429);
                    if retryable && Instant::now() < give_up {
                        part.retries += 1;
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    progress.buyers_done.fetch_add(1, Ordering::Relaxed);
                    let Some((status, body, blocked)) = answer else {
                        part.transport_errors += 1;
                        break;
                    };
                    let key = match (status, body.get("code").and_then(Value::as_str)) {
                        (202, _) => {
                            if let Some(no) = body.get("orderNo").and_then(Value::as_str) {
                                part.accepted.push((no.to_owned(), user));
                                part.accepted_at.push(Instant::now());
                                progress.accepted.fetch_add(1, Ordering::Relaxed);
                            }
                            "202 ACCEPTED".to_owned()
                        }
                        // A refusal the gateway decided by itself names its rule.
                        (s, Some(code)) => match &blocked {
                            Some(reason) => format!("{s} {code} (gateway: {reason})"),
                            None => format!("{s} {code}"),
                        },
                        (s, None) => format!("{s} (no error code)"),
                    };
                    *part.outcomes.entry(key).or_default() += 1;
                    break;
                }
            }
        }));
    }
    let mut report = LoadReport {
        requests: config.requests,
        started: Some(started),
        ..LoadReport::default()
    };
    let mut latencies = Vec::with_capacity(config.requests);
    for w in workers {
        let part = w.await.expect("a load worker does not panic");
        latencies.extend(part.latencies);
        report.accepted.extend(part.accepted);
        report.accepted_at.extend(part.accepted_at);
        report.answers.extend(part.answers);
        report.transport_errors += part.transport_errors;
        report.retries += part.retries;
        for (k, n) in part.outcomes {
            *report.outcomes.entry(k).or_default() += n;
        }
    }
    report.elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    report.latency_ms = [pct(0.50), pct(0.90), pct(0.99), pct(1.0)];
    report
}

#[derive(Default)]
struct Part {
    latencies: Vec<Duration>,
    outcomes: BTreeMap<String, usize>,
    accepted: Vec<(String, i64)>,
    accepted_at: Vec<Instant>,
    answers: Vec<Answer>,
    transport_errors: usize,
    retries: usize,
}

/// The Redis keys of an activity, as the services name them.
fn keys(activity: i64) -> anyhow::Result<ActivityKeys> {
    let id = ActivityId::new(activity).with_context(|| format!("{activity} is no activity id"))?;
    Ok(ActivityKeys::new(id))
}

/// Direct access to the stores, for the drain wait and the invariant check.
#[derive(Clone)]
pub struct Stores {
    pub db: MySqlPool,
    pub redis: StoreConnection,
}

/// A connection to the single Redis or to a Redis Cluster (a `redis_url` listing several
/// nodes, comma separated, as [`crate::stack::StackInfo::redis_url`] gives a cluster's): the
/// services' own connection type. Cloning shares the socket(s).
pub use flash_sale_common::redis::RedisConnection as StoreConnection;

/// Lua scripts Redis has run so far (`EVALSHA`, and `EVAL` for a script not cached yet), from
/// `INFO commandstats`: what a test counts to show that calls were saved. (On a cluster, the
/// node the command is routed to.)
pub async fn scripts_run(conn: &mut impl redis::aio::ConnectionLike) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

impl Stores {
    pub async fn connect(database_url: &str, redis_url: &str) -> anyhow::Result<Self> {
        let db = MySqlPool::connect(database_url)
            .await
            .context("connecting to MySQL")?;
        let redis = StoreConnection::open(redis_url)
            .await
            .context("connecting to Redis")?;
        Ok(Self { db, redis })
    }

    async fn redis_i64(&self, cmd: &mut redis::Cmd) -> anyhow::Result<i64> {
        let mut conn = self.redis.clone();
        let v: Option<i64> = cmd.query_async(&mut conn).await?;
        Ok(v.unwrap_or(0))
    }

    /// Redis' available stock of an activity.
    pub async fn redis_stock(&self, activity: i64) -> anyhow::Result<i64> {
        self.redis_i64(redis::cmd("GET").arg(keys(activity)?.stock))
            .await
    }

    /// Reservations Redis holds that are not yet settled into MySQL.
    pub async fn pending(&self, activity: i64) -> anyhow::Result<i64> {
        self.redis_i64(redis::cmd("HLEN").arg(keys(activity)?.resv))
            .await
    }

    /// The MySQL pool, for checks of their own.
    pub fn db(&self) -> &MySqlPool {
        &self.db
    }

    /// Orders of an activity in MySQL with this `orders.status` code.
    pub async fn order_count_in_status(&self, activity: i64, status: i8) -> anyhow::Result<i64> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM orders WHERE activity_id = ? AND status = ?")
                .bind(activity)
                .bind(status)
                .fetch_one(&self.db)
                .await?;
        Ok(n)
    }

    /// When each order of `activity` in MySQL was reserved (`reserved_at`: order-service's
    /// clock right after Redis reserved it), in ms since the epoch: what order-service took in,
    /// read from the book of record rather than sampled from a counter.
    pub async fn reserved_at_ms(&self, activity: i64) -> anyhow::Result<Vec<u64>> {
        let instants: Vec<i64> = sqlx::query_scalar(
            "SELECT CAST(UNIX_TIMESTAMP(reserved_at) * 1000 AS SIGNED) FROM orders \
             WHERE activity_id = ? AND reserved_at IS NOT NULL",
        )
        .bind(activity)
        .fetch_all(&self.db)
        .await?;
        Ok(instants.into_iter().map(|ms| ms.max(0) as u64).collect())
    }

    pub async fn order_count(&self, activity: i64) -> anyhow::Result<i64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders WHERE activity_id = ?")
            .bind(activity)
            .fetch_one(&self.db)
            .await?;
        Ok(n)
    }

    /// Whether Redis' counters of the activity were built by the running Redis process (after a
    /// Redis restart, order-service rebuilds them from MySQL before they sell again).
    pub async fn verified(&self, activity: i64) -> anyhow::Result<bool> {
        let mut conn = self.redis.clone();
        let code: i64 = flash_sale_common::redis::SCRIPTS
            .verified
            .key(keys(activity)?.meta)
            .invoke_async(&mut conn)
            .await?;
        Ok(code != 0)
    }

    /// Returns of closed orders MySQL made that Redis has not applied yet.
    pub async fn unapplied_returns(&self, activity: i64) -> anyhow::Result<i64> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM stock_returns WHERE activity_id = ? AND applied_at IS NULL",
        )
        .bind(activity)
        .fetch_one(&self.db)
        .await?;
        Ok(n)
    }

    /// Waits until every reservation is settled into MySQL (the queue has drained), every stock
    /// return is back in Redis, and Redis' counters are verified.
    pub async fn wait_for_drain(
        &self,
        activity: i64,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self.pending(activity).await? == 0
                && self.unapplied_returns(activity).await? == 0
                && self.verified(activity).await?
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the queue did not drain within {timeout:?}: {} reservations pending, {} orders in MySQL, {} stock returns not in Redis",
                    self.pending(activity).await?,
                    self.order_count(activity).await?,
                    self.unapplied_returns(activity).await?
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks the invariants of docs/design.md for one activity after the queue drained and the
    /// sweeper applied every return: `total_stock` is all the stock ever put on sale.
    pub async fn check_invariants(
        &self,
        activity: i64,
        total_stock: i64,
        accepted: &[(String, i64)],
    ) -> anyhow::Result<InvariantReport> {
        let rows: Vec<(String, i64, i32, i8)> = sqlx::query_as(
            "SELECT order_no, user_id, quantity, status FROM orders WHERE activity_id = ?",
        )
        .bind(activity)
        .fetch_all(&self.db)
        .await?;
        let live = |status: i8| status == 0 || status == 1;
        let ordered: i64 = rows
            .iter()
            .filter(|r| live(r.3))
            .map(|r| i64::from(r.2))
            .sum();
        let in_mysql: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let live_orders = rows.iter().filter(|r| live(r.3)).count();
        let live_users: HashSet<i64> = rows.iter().filter(|r| live(r.3)).map(|r| r.1).collect();
        let missing: Vec<String> = accepted
            .iter()
            .filter(|(no, _)| !in_mysql.contains(no.as_str()))
            .map(|(no, _)| no.clone())
            .collect();
        let accepted_set: HashSet<&str> = accepted.iter().map(|(no, _)| no.as_str()).collect();

        // Returns: one per closed order, none for a live one, every one applied to Redis.
        let returns: Vec<(String, i32, bool)> = sqlx::query_as(
            "SELECT order_no, quantity, applied_at IS NOT NULL FROM stock_returns WHERE activity_id = ?",
        )
        .bind(activity)
        .fetch_all(&self.db)
        .await?;
        let returned: HashSet<&str> = returns.iter().map(|r| r.0.as_str()).collect();
        let closed: HashSet<&str> = rows
            .iter()
            .filter(|r| !live(r.3))
            .map(|r| r.0.as_str())
            .collect();
        let paid_returned = rows
            .iter()
            .filter(|r| r.3 == 1 && returned.contains(r.0.as_str()))
            .count();
        let closed_not_returned = closed.iter().filter(|no| !returned.contains(**no)).count();
        let live_returned = rows
            .iter()
            .filter(|r| live(r.3) && returned.contains(r.0.as_str()))
            .count();
        let (mysql_stock,): (i64,) =
            sqlx::query_as("SELECT CAST(stock AS SIGNED) FROM inventory WHERE activity_id = ?")
                .bind(activity)
                .fetch_one(&self.db)
                .await?;
        let redis_stock = self.redis_stock(activity).await?;
        let count = |status: i8| rows.iter().filter(|r| r.3 == status).count();
        Ok(InvariantReport {
            initial_stock: total_stock,
            ordered,
            orders: rows.len(),
            live_orders,
            paid: count(1),
            cancelled: count(2),
            expired: count(3),
            accepted: accepted.len(),
            missing,
            unanswered_orders: in_mysql
                .iter()
                .filter(|no| !accepted_set.contains(**no))
                .count(),
            duplicate_users: live_orders - live_users.len(),
            redis_stock,
            mysql_stock,
            pending: self.pending(activity).await?,
            returns: returns.len(),
            unapplied_returns: returns.iter().filter(|r| !r.2).count(),
            returned_quantity: returns.iter().map(|r| i64::from(r.1)).sum(),
            paid_returned,
            live_returned,
            closed_not_returned,
        })
    }
}

/// The invariants of docs/design.md, measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InvariantReport {
    /// All the stock ever put on sale.
    pub initial_stock: i64,
    /// Sum of quantities of live (`CREATED` or `PAID`) orders in MySQL.
    pub ordered: i64,
    /// Orders in MySQL, in every state.
    pub orders: usize,
    pub live_orders: usize,
    pub paid: usize,
    pub cancelled: usize,
    pub expired: usize,
    /// 2xx answers.
    pub accepted: usize,
    /// Order numbers answered 2xx with no MySQL order.
    pub missing: Vec<String>,
    /// Orders in MySQL whose create request got no 2xx (e.g. a 503 "could not be confirmed").
    pub unanswered_orders: usize,
    /// Live orders beyond one per user.
    pub duplicate_users: usize,
    pub redis_stock: i64,
    pub mysql_stock: i64,
    pub pending: i64,
    /// Rows of `stock_returns` (one per order at most: its primary key).
    pub returns: usize,
    pub unapplied_returns: usize,
    pub returned_quantity: i64,
    /// Paid orders whose stock was given back (must be 0).
    pub paid_returned: usize,
    /// Live orders with a return (must be 0).
    pub live_returned: usize,
    /// Cancelled or expired orders without a return (must be 0).
    pub closed_not_returned: usize,
}

impl InvariantReport {
    pub fn no_oversell(&self) -> bool {
        self.ordered <= self.initial_stock
    }

    pub fn no_lost_order(&self) -> bool {
        self.missing.is_empty()
    }

    pub fn no_duplicate(&self) -> bool {
        self.duplicate_users == 0
    }

    /// Redis available + live ordered = total, and MySQL's stock agrees; every return applied.
    pub fn conservation(&self) -> bool {
        self.pending == 0
            && self.unapplied_returns == 0
            && self.redis_stock + self.ordered == self.initial_stock
            && self.mysql_stock + self.ordered == self.initial_stock
    }

    /// Every closed order returned its stock exactly once, and no live or paid one did.
    pub fn returns_exactly_once(&self) -> bool {
        self.paid_returned == 0 && self.live_returned == 0 && self.closed_not_returned == 0
    }

    pub fn all_hold(&self) -> bool {
        self.no_oversell()
            && self.no_lost_order()
            && self.no_duplicate()
            && self.conservation()
            && self.returns_exactly_once()
    }

    /// An error naming every broken invariant.
    pub fn ensure(&self) -> anyhow::Result<()> {
        ensure!(self.all_hold(), "invariants broken:\n{self}");
        Ok(())
    }
}

impl InvariantReport {
    /// Each invariant: its name, whether it holds, what was counted.
    pub fn rows(&self) -> Vec<(&'static str, bool, String)> {
        vec![
            (
                "1 no oversell",
                self.no_oversell(),
                format!(
                    "live ordered {} <= stock ever on sale {}",
                    self.ordered, self.initial_stock
                ),
            ),
            (
                "2 no lost order",
                self.no_lost_order(),
                format!(
                    "{} accepted, {} missing from MySQL ({} orders in MySQL, {} of them never answered 2xx)",
                    self.accepted,
                    self.missing.len(),
                    self.orders,
                    self.unanswered_orders
                ),
            ),
            (
                "3 no duplicate",
                self.no_duplicate(),
                format!(
                    "{} users with more than one live order",
                    self.duplicate_users
                ),
            ),
            (
                "4 conservation",
                self.conservation(),
                format!(
                    "Redis stock {} + live ordered {} = {}, MySQL stock {} + live ordered = {} (on sale {}), {} reservations pending, {} returns not in Redis",
                    self.redis_stock,
                    self.ordered,
                    self.redis_stock + self.ordered,
                    self.mysql_stock,
                    self.mysql_stock + self.ordered,
                    self.initial_stock,
                    self.pending,
                    self.unapplied_returns
                ),
            ),
            (
                "6 returns once",
                self.returns_exactly_once(),
                format!(
                    "{} paid, {} cancelled, {} expired; {} returns ({} items); {} paid and {} live orders returned, {} closed orders not returned",
                    self.paid,
                    self.cancelled,
                    self.expired,
                    self.returns,
                    self.returned_quantity,
                    self.paid_returned,
                    self.live_returned,
                    self.closed_not_returned
                ),
            ),
        ]
    }
}

impl fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, ok, detail) in self.rows() {
            let mark = if ok { "ok  " } else { "FAIL" };
            writeln!(f, "[{mark}] {name:<17} {detail}")?;
        }
        Ok(())
    }
}

/// What the buyers did with their orders after the sale, and what came of it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AfterSaleReport {
    /// Orders paid through the payment simulator (200).
    pub paid: usize,
    /// Payments refused (e.g. the order expired first): the provider refunds them.
    pub payments_refused: usize,
    /// Orders the buyer cancelled (200).
    pub cancelled: usize,
    /// Cancellations refused (the order was paid or expired first).
    pub cancels_refused: usize,
    /// Orders nobody paid nor cancelled: they expire at their deadline.
    pub left_to_expire: usize,
    pub elapsed: Duration,
}

impl fmt::Display for AfterSaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  paid through the payment simulator   {:>8}   (refused: {})",
            self.paid, self.payments_refused
        )?;
        writeln!(
            f,
            "  cancelled by their buyer             {:>8}   (refused: {})",
            self.cancelled, self.cancels_refused
        )?;
        write!(
            f,
            "  left unpaid, to expire               {:>8}   ({:.1} s for the payments and cancels)",
            self.left_to_expire,
            self.elapsed.as_secs_f64()
        )
    }
}

/// After the sale, each buyer of `accepted` acts on their order, by its position: of every ten,
/// seven pay (`pay`, the provider's signed callback), one cancels, two let it expire.
/// `order_url` is order-service's (or the gateway's) base URL.
pub async fn after_the_sale(
    http: &reqwest::Client,
    order_url: &str,
    pay: &crate::payments::PaymentSimulator,
    price_cents: i64,
    accepted: &[(String, i64)],
) -> anyhow::Result<AfterSaleReport> {
    use futures::StreamExt;
    let started = Instant::now();
    let base = order_url.trim_end_matches('/').to_owned();
    let acts = accepted.iter().enumerate().map(|(i, (no, user))| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            // Through the gateway both share the buy path's flow rules: a provider retries a
            // callback turned away with a 429 or a 5xx, and so does a buyer's cancel.
            let give_up = Instant::now() + Duration::from_secs(30);
            loop {
                let (done, retry) = match i % 10 {
                    0..=6 => {
                        let answer = pay.pay(no, price_cents, 1, &format!("sale-{no}")).await?;
                        match answer {
                            crate::payments::Confirmation::Paid(_) => ("paid", false),
                            crate::payments::Confirmation::Refused(status, _)
                                if status == 429 || status >= 500 =>
                            {
                                ("payment refused", true)
                            }
                            _ => ("payment refused", false),
                        }
                    }
                    7 => {
                        // The header for order-service, the body for a gateway in development
                        // mode (which drops a client's x-user-id).
                        let res = http
                            .post(format!("{base}{}", api::order::cancel(no)))
                            .header(api::USER_HEADER, user.to_string())
                            .json(&json!({"userId": user.to_string()}))
                            .send()
                            .await?;
                        let status = res.status().as_u16();
                        if res.status().is_success() {
                            ("cancelled", false)
                        } else {
                            ("cancel refused", status == 429 || status >= 500)
                        }
                    }
                    _ => ("left", false),
                };
                if retry && Instant::now() < give_up {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
                return Ok::<_, anyhow::Error>(done);
            }
        }
    });
    let mut results = futures::stream::iter(acts).buffer_unordered(64);
    let mut report = AfterSaleReport::default();
    while let Some(done) = results.next().await {
        match done? {
            "paid" => report.paid += 1,
            "payment refused" => report.payments_refused += 1,
            "cancelled" => report.cancelled += 1,
            "cancel refused" => report.cancels_refused += 1,
            _ => report.left_to_expire += 1,
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

impl Stores {
    /// Waits until no order of the activity awaits payment any more (each was paid, cancelled
    /// or expired by the sweeper), then until every return is back in Redis.
    pub async fn wait_for_expiry(
        &self,
        activity: i64,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let waiting = self.order_count_in_status(activity, 0).await?;
            if waiting == 0 {
                break;
            }
            if started.elapsed() > timeout {
                bail!(
                    "{waiting} orders still await payment after {timeout:?}: is the sweeper running?"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(10));
        self.wait_for_drain(activity, left).await?;
        Ok(started.elapsed())
    }
}
