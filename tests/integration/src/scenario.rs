//! A flash sale driven through the public API, and the invariant check of docs/design.md.
//!
//! The same code runs in the integration tests, in `cargo xtask sale` (the README's main job) and
//! in the NixOS VM test (the `flash-sale-scenario` binary).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

    /// Creates an activity open now and for an hour, warmed up at once.
    pub async fn create_activity(&self, id: i64, stock: i64) -> anyhow::Result<Value> {
        let now = chrono_now_rfc3339(0);
        let end = chrono_now_rfc3339(3600);
        self.call(
            reqwest::Method::POST,
            api::inventory::ACTIVITIES,
            Some(json!({"activityId": id.to_string(), "name": format!("sale {id}"), "stock": stock, "startTime": now, "endTime": end})),
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
    let url = format!("{}{}", buy_url.trim_end_matches('/'), api::order::CREATE);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..config.concurrency.max(1) {
        let (http, url, next, config) = (http.clone(), url.clone(), next.clone(), config.clone());
        workers.push(tokio::spawn(async move {
            let mut part = Part::default();
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
                            let body: Value = res.json().await.unwrap_or(Value::Null);
                            part.latencies.push(t.elapsed());
                            Some((status, body))
                        }
                        Err(_) => None,
                    };
                    let retryable = answer
                        .as_ref()
                        .is_none_or(|(status, _)| *status >= 500 || *status == 429);
                    if retryable && Instant::now() < give_up {
                        part.retries += 1;
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    let Some((status, body)) = answer else {
                        part.transport_errors += 1;
                        break;
                    };
                    let key = match (status, body.get("code").and_then(Value::as_str)) {
                        (202, _) => {
                            if let Some(no) = body.get("orderNo").and_then(Value::as_str) {
                                part.accepted.push((no.to_owned(), user));
                                part.accepted_at.push(Instant::now());
                            }
                            "202 ACCEPTED".to_owned()
                        }
                        (s, Some(code)) => format!("{s} {code}"),
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
        ..LoadReport::default()
    };
    let mut latencies = Vec::with_capacity(config.requests);
    for w in workers {
        let part = w.await.expect("a load worker does not panic");
        latencies.extend(part.latencies);
        report.accepted.extend(part.accepted);
        report.accepted_at.extend(part.accepted_at);
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
    transport_errors: usize,
    retries: usize,
}

/// The Redis keys of an activity, as the services name them.
fn keys(activity: i64) -> anyhow::Result<ActivityKeys> {
    let id = ActivityId::new(activity).with_context(|| format!("{activity} is no activity id"))?;
    Ok(ActivityKeys::new(id))
}

/// Direct access to the stores, for the drain wait and the invariant check.
pub struct Stores {
    pub db: MySqlPool,
    pub redis: redis::aio::MultiplexedConnection,
}

/// Lua scripts Redis has run so far (`EVALSHA`, and `EVAL` for a script not cached yet), from
/// `INFO commandstats`: what a test counts to show that calls were saved.
pub async fn scripts_run(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
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
        let redis = redis::Client::open(redis_url)?
            .get_multiplexed_async_connection()
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

    /// Waits until every reservation is settled into MySQL (the queue has drained) and Redis'
    /// counters are verified.
    pub async fn wait_for_drain(
        &self,
        activity: i64,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self.pending(activity).await? == 0 && self.verified(activity).await? {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the queue did not drain within {timeout:?}: {} reservations pending, {} orders in MySQL",
                    self.pending(activity).await?,
                    self.order_count(activity).await?
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks invariants 1 to 4 of docs/design.md for one activity after the queue drained.
    pub async fn check_invariants(
        &self,
        activity: i64,
        initial_stock: i64,
        accepted: &[(String, i64)],
    ) -> anyhow::Result<InvariantReport> {
        let rows: Vec<(String, i64, i32)> =
            sqlx::query_as("SELECT order_no, user_id, quantity FROM orders WHERE activity_id = ?")
                .bind(activity)
                .fetch_all(&self.db)
                .await?;
        let ordered: i64 = rows.iter().map(|(_, _, q)| i64::from(*q)).sum();
        let in_mysql: HashSet<&str> = rows.iter().map(|(no, _, _)| no.as_str()).collect();
        let users: HashSet<i64> = rows.iter().map(|(_, u, _)| *u).collect();
        let missing: Vec<String> = accepted
            .iter()
            .filter(|(no, _)| !in_mysql.contains(no.as_str()))
            .map(|(no, _)| no.clone())
            .collect();
        let accepted_set: HashSet<&str> = accepted.iter().map(|(no, _)| no.as_str()).collect();
        let redis_stock = self.redis_stock(activity).await?;
        Ok(InvariantReport {
            initial_stock,
            ordered,
            orders: rows.len(),
            accepted: accepted.len(),
            missing,
            unanswered_orders: in_mysql
                .iter()
                .filter(|no| !accepted_set.contains(**no))
                .count(),
            duplicate_users: rows.len() - users.len(),
            redis_stock,
            pending: self.pending(activity).await?,
        })
    }
}

/// The invariants of docs/design.md, measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvariantReport {
    pub initial_stock: i64,
    /// Sum of ordered quantities in MySQL.
    pub ordered: i64,
    pub orders: usize,
    /// 2xx answers.
    pub accepted: usize,
    /// Order numbers answered 2xx with no MySQL order.
    pub missing: Vec<String>,
    /// Orders in MySQL whose create request got no 2xx (e.g. a 503 "could not be confirmed").
    pub unanswered_orders: usize,
    pub duplicate_users: usize,
    pub redis_stock: i64,
    pub pending: i64,
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

    pub fn conservation(&self) -> bool {
        self.pending == 0 && self.redis_stock + self.ordered == self.initial_stock
    }

    pub fn all_hold(&self) -> bool {
        self.no_oversell() && self.no_lost_order() && self.no_duplicate() && self.conservation()
    }

    /// An error naming every broken invariant.
    pub fn ensure(&self) -> anyhow::Result<()> {
        ensure!(self.all_hold(), "invariants broken:\n{self}");
        Ok(())
    }
}

impl fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
        writeln!(
            f,
            "[{}] 1 no oversell     ordered {} <= initial stock {}",
            mark(self.no_oversell()),
            self.ordered,
            self.initial_stock
        )?;
        writeln!(
            f,
            "[{}] 2 no lost order   {} accepted, {} missing from MySQL ({} orders in MySQL, {} of them never answered 2xx)",
            mark(self.no_lost_order()),
            self.accepted,
            self.missing.len(),
            self.orders,
            self.unanswered_orders
        )?;
        writeln!(
            f,
            "[{}] 3 no duplicate    {} users with more than one order",
            mark(self.no_duplicate()),
            self.duplicate_users
        )?;
        writeln!(
            f,
            "[{}] 4 conservation    Redis stock {} + ordered {} = {} (initial {}), {} reservations pending",
            mark(self.conservation()),
            self.redis_stock,
            self.ordered,
            self.redis_stock + self.ordered,
            self.initial_stock,
            self.pending
        )
    }
}
