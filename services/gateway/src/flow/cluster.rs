//! The cluster-wide limit: a token bucket in Redis that every gateway replica draws from (the
//! seed's `RequestRateLimiter`, replenishRate 1000, burstCapacity 2000).
//!
//! A replica does not ask Redis for every request: it takes a [`Lease`] of tokens, usable for
//! the rule's `lease_ms`, sized to what it used of the previous one (doubling while leases run
//! out early) and never more than the whole cluster earns in `lease_ms`. Unused tokens go back
//! to the bucket with the next call. A refusal from Redis is remembered until a token could be
//! there (at most `lease_ms`). One refill per resource runs at a time; requests that find the
//! lease empty meanwhile wait for it instead of all calling Redis. `lease_ms = 0` is one call
//! per request.
//!
//! When Redis cannot be reached (not connected yet, an error, a timeout), each replica enforces
//! its share locally, `rate / replicas` and `burst / replicas`, where `replicas` is the number
//! of live replicas Redis last reported (heartbeats), or `cluster.replicas_hint` before that.
//! It never fails open silently: entering and leaving the fallback is logged, and
//! `gateway_cluster_fallback` (0/1) and `gateway_cluster_fallback_decisions_total{resource}`
//! say how long and how much was decided locally.

use backon::{ConstantBuilder, Retryable};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::Duration;

use flash_sale_common::configuration::RedisSettings;
use flash_sale_common::redis::{Redis, RedisFailure};
use redis::Script;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::bucket::TokenBucket;
use crate::configuration::ClusterSettings;
use crate::resource::RouteId;
use crate::rules::ClusterRule;

static TOKEN_BUCKET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/token_bucket.lua")));
static HEARTBEAT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/heartbeat.lua")));

/// The bucket's key; the hash tag keeps it in one slot on Redis Cluster.
pub fn bucket_key(resource: &str) -> String {
    format!("gw:{{rl:{resource}}}:bucket")
}

/// The replica set's key.
pub const REPLICAS_KEY: &str = "gw:{gateway}:replicas";

/// What the cluster limit decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterDecision {
    Pass,
    Block(Duration),
}

#[derive(Debug)]
struct LocalShare {
    rule: ClusterRule,
    replicas: usize,
    bucket: TokenBucket,
}

pub struct ClusterLimiter {
    settings: ClusterSettings,
    instance: String,
    redis: OnceLock<Handles>,
    replicas: AtomicUsize,
    /// While set and in the future, the local share decides without trying Redis.
    retry_at: Mutex<Option<Instant>>,
    in_fallback: AtomicBool,
    /// One per route, indexed by `RouteId as usize`.
    routes: [RouteState; RouteId::ALL.len()],
}

/// One Redis connection, seen with two sets of limits: the bucket's short ones, and the
/// connection's own for everyone else (the waiting room, the passes, the management routes),
/// whose callers would rather wait a second than answer 503.
struct Handles {
    shared: Redis,
    bucket: Redis,
}

impl Handles {
    fn new(shared: Redis, settings: &ClusterSettings) -> Self {
        let bucket = shared.with_timeouts(
            Duration::from_millis(settings.bucket_acquire_timeout_ms),
            Duration::from_millis(settings.bucket_response_timeout_ms),
        );
        Self { shared, bucket }
    }
}

/// One route's lease, the lock that lets one refill run at a time, and its local share for
/// when Redis cannot be reached.
#[derive(Debug, Default)]
struct RouteState {
    book: Mutex<Lease>,
    refill: tokio::sync::Mutex<()>,
    local: Mutex<Option<LocalShare>>,
}

/// What Redis answered to a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Tokens(u32),
    Refused(Duration),
}

impl std::fmt::Debug for ClusterLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLimiter")
            .field("instance", &self.instance)
            .field("connected", &self.redis.get().is_some())
            .field("replicas", &self.replicas())
            .field("in_fallback", &self.is_in_fallback())
            .finish_non_exhaustive()
    }
}

impl ClusterLimiter {
    pub fn new(settings: &ClusterSettings) -> Self {
        let this = Self {
            settings: settings.clone(),
            instance: uuid::Uuid::now_v7().simple().to_string(),
            redis: OnceLock::new(),
            replicas: AtomicUsize::new(settings.replicas_hint.max(1)),
            retry_at: Mutex::new(None),
            in_fallback: AtomicBool::new(false),
            routes: Default::default(),
        };
        metrics::gauge!("gateway_cluster_replicas").set(this.replicas() as f64);
        this
    }

    /// Uses an already connected Redis (tests).
    pub fn with_redis(settings: &ClusterSettings, redis: Redis) -> Self {
        let this = Self::new(settings);
        let _ = this.redis.set(Handles::new(redis, settings));
        this
    }

    /// Live replicas, as Redis last counted them.
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// The Redis connection, once made, with the connection's own limits (the waiting room
    /// and the passes share it).
    pub fn redis(&self) -> Option<&Redis> {
        self.redis.get().map(|h| &h.shared)
    }

    /// Whether a Redis connection has been made (it reconnects by itself after that).
    pub fn is_connected(&self) -> bool {
        self.redis.get().is_some()
    }

    pub fn is_in_fallback(&self) -> bool {
        self.in_fallback.load(Ordering::Relaxed)
    }

    /// Takes the rule's tokens for one request: from this replica's lease when it holds them,
    /// otherwise from the shared bucket in Redis, or from the local share without Redis.
    pub async fn acquire(&self, route: RouteId, rule: &ClusterRule) -> ClusterDecision {
        let resource = route.as_str();
        let needed = rule.requested_tokens;
        let lease = &self.routes[route as usize];
        if let Some(decision) = lock(&lease.book).take(needed, Instant::now()) {
            return decision;
        }
        // One refill at a time: the others wait for it, then take from what it brought.
        let _refilling = match rule.lease_ms {
            0 => None,
            _ => Some(lease.refill.lock().await),
        };
        if let Some(decision) = lock(&lease.book).take(needed, Instant::now()) {
            return decision;
        }
        match self.redis.get().map(|h| &h.bucket) {
            Some(redis) if !self.waiting_to_retry() => {
                let (wanted, returned) = lock(&lease.book).start_refill(rule, Instant::now());
                match self.call(redis, resource, rule, wanted, returned).await {
                    Ok(grant) => {
                        self.leave_fallback();
                        let outcome = match grant {
                            Grant::Tokens(_) => "granted",
                            Grant::Refused(_) => "refused",
                        };
                        metrics::counter!("gateway_cluster_leases_total", "resource" => resource, "outcome" => outcome)
                            .increment(1);
                        return lock(&lease.book).record(grant, rule, Instant::now());
                    }
                    // This process has `redis.max_in_flight` calls out already: Redis is fine,
                    // this one request is decided locally.
                    Err(RedisFailure::Busy) => {}
                    Err(error) => self.enter_fallback(&error.to_string()),
                }
            }
            Some(_) => {}
            None => self.enter_fallback("Redis is not connected"),
        }
        metrics::counter!("gateway_cluster_fallback_decisions_total", "resource" => resource)
            .increment(1);
        self.decide_locally(route, rule, Instant::now())
    }

    /// The tokens this replica holds for `route` now (unexpired lease), for `/flow`.
    pub fn leased(&self, route: RouteId) -> u32 {
        lock(&self.routes[route as usize].book).available(Instant::now())
    }

    async fn call(
        &self,
        redis: &Redis,
        resource: &str,
        rule: &ClusterRule,
        wanted: u32,
        returned: u32,
    ) -> Result<Grant, RedisFailure> {
        let mut invocation = TOKEN_BUCKET.prepare_invoke();
        invocation
            .key(bucket_key(resource))
            .arg(rule.replenish_rate)
            .arg(rule.burst_capacity)
            .arg(rule.requested_tokens)
            .arg(wanted)
            .arg(returned);
        let (granted, _left, wait_ms): (i64, i64, i64) =
            redis.run("gateway_token_bucket", &invocation).await?;
        Ok(match u32::try_from(granted) {
            Ok(granted) if granted >= rule.requested_tokens => Grant::Tokens(granted),
            _ => Grant::Refused(Duration::from_millis(wait_ms.max(1) as u64)),
        })
    }

    fn waiting_to_retry(&self) -> bool {
        lock(&self.retry_at).is_some_and(|at| Instant::now() < at)
    }

    fn enter_fallback(&self, cause: &str) {
        *lock(&self.retry_at) =
            Some(Instant::now() + Duration::from_millis(self.settings.retry_ms));
        if !self.in_fallback.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                cause,
                replicas = self.replicas(),
                "cluster rate limit: Redis unreachable, each replica now enforces its local share"
            );
            metrics::gauge!("gateway_cluster_fallback").set(1.0);
        }
    }

    fn leave_fallback(&self) {
        if self.in_fallback.swap(false, Ordering::Relaxed) {
            *lock(&self.retry_at) = None;
            tracing::info!("cluster rate limit: Redis reachable again, the shared bucket decides");
            metrics::gauge!("gateway_cluster_fallback").set(0.0);
        }
    }

    /// The local share of the bucket: `rate / replicas`, `burst / replicas`.
    fn decide_locally(&self, route: RouteId, rule: &ClusterRule, now: Instant) -> ClusterDecision {
        let replicas = self.replicas();
        let mut local = lock(&self.routes[route as usize].local);
        let share = local.get_or_insert_with(|| LocalShare {
            rule: rule.clone(),
            replicas: 0,
            bucket: TokenBucket::new(0.0, 0.0, now),
        });
        if share.rule != *rule || share.replicas != replicas {
            let n = replicas as f64;
            let rate = f64::from(rule.replenish_rate) / n;
            let capacity =
                (f64::from(rule.burst_capacity) / n).max(f64::from(rule.requested_tokens));
            share.rule = rule.clone();
            share.replicas = replicas;
            share.bucket = TokenBucket::new(rate, capacity, now);
        }
        match share.bucket.try_take(f64::from(rule.requested_tokens), now) {
            Ok(()) => ClusterDecision::Pass,
            Err(wait) => ClusterDecision::Block(wait),
        }
    }

    /// Connects to Redis (retrying until it can), then beats every `cluster.heartbeat_ms`, until
    /// `stop`. Until the first connection, the local share decides.
    pub async fn run(&self, redis: &RedisSettings, stop: CancellationToken) {
        if self.redis.get().is_none() {
            // Every `retry_ms` until Redis answers (the local share decides meanwhile); the
            // first failure is logged, the rest would only repeat it.
            let retry = Duration::from_millis(self.settings.retry_ms.max(100));
            let warned = std::sync::atomic::AtomicBool::new(false);
            let connect = (|| Redis::connect(redis))
                .retry(ConstantBuilder::default().with_delay(retry).without_max_times())
                .sleep(tokio::time::sleep)
                .notify(|error, _| {
                    if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(%error, "cluster rate limit: cannot connect to Redis yet; the local share decides");
                    }
                });
            let connection = tokio::select! {
                () = stop.cancelled() => return,
                connection = connect => connection,
            };
            if let Ok(connection) = connection {
                let _ = self.redis.set(Handles::new(connection, &self.settings));
                tracing::info!("cluster rate limit: connected to Redis");
            }
        }
        let interval = Duration::from_millis(self.settings.heartbeat_ms.max(10));
        loop {
            self.beat().await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One heartbeat: registers this replica and reads how many are alive.
    pub async fn beat(&self) {
        let Some(redis) = self.redis.get().map(|h| &h.bucket) else {
            return;
        };
        let mut invocation = HEARTBEAT.prepare_invoke();
        invocation
            .key(REPLICAS_KEY)
            .arg(&self.instance)
            .arg(self.settings.heartbeat_ms.max(10) * 3);
        match redis.run::<i64>("gateway_heartbeat", &invocation).await {
            Ok(n) if n > 0 => {
                self.replicas.store(n as usize, Ordering::Relaxed);
                metrics::gauge!("gateway_cluster_replicas").set(n as f64);
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "cluster heartbeat failed"),
        }
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (plain counters).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tokens one replica took from the shared bucket and has not spent yet, and how much to ask
/// for next time. Pure bookkeeping on tokio's clock, so it is tested on a paused one.
#[derive(Debug, Default)]
pub struct Lease {
    /// Unspent tokens of the current lease.
    tokens: u32,
    /// When they stop being usable.
    expires: Option<Instant>,
    /// The current lease's size (0: none yet, or refused: ask for one request's worth).
    granted: u32,
    /// Redis refused: refuse here without asking until then.
    refused_until: Option<Instant>,
}

impl Lease {
    /// Spends `needed` tokens of an unexpired lease (`Pass`), repeats a remembered refusal
    /// (`Block`), or says a refill is needed (`None`).
    pub fn take(&mut self, needed: u32, now: Instant) -> Option<ClusterDecision> {
        if let Some(until) = self.refused_until {
            if now < until {
                return Some(ClusterDecision::Block(until - now));
            }
            self.refused_until = None;
        }
        if self.available(now) >= needed {
            self.tokens -= needed;
            return Some(ClusterDecision::Pass);
        }
        None
    }

    /// Unspent tokens usable at `now`.
    pub fn available(&self, now: Instant) -> u32 {
        match self.expires {
            Some(expires) if now < expires => self.tokens,
            _ => 0,
        }
    }

    /// Starts a refill: returns how many tokens to ask for and the unspent ones to give back
    /// (they leave this lease whatever Redis answers, so a lost answer never spends them
    /// twice). The next lease asks for what this one used if it lasted its whole length, twice
    /// its size if it ran out early, between one request's worth and `replenish_rate x
    /// lease_ms`.
    pub fn start_refill(&mut self, rule: &ClusterRule, now: Instant) -> (u32, u32) {
        let needed = rule.requested_tokens;
        let returned = std::mem::take(&mut self.tokens);
        let ran_out_early = self.expires.is_some_and(|expires| now < expires);
        let want = if self.granted == 0 {
            needed
        } else if ran_out_early {
            self.granted.saturating_mul(2)
        } else {
            self.granted - returned.min(self.granted)
        };
        self.expires = None;
        (want.clamp(needed, max_lease(rule)), returned)
    }

    /// Records Redis' answer and decides the request that asked.
    pub fn record(&mut self, grant: Grant, rule: &ClusterRule, now: Instant) -> ClusterDecision {
        let length = Duration::from_millis(rule.lease_ms);
        match grant {
            Grant::Tokens(granted) => {
                self.granted = granted;
                self.tokens = granted.saturating_sub(rule.requested_tokens);
                self.expires = Some(now + length);
                ClusterDecision::Pass
            }
            Grant::Refused(wait) => {
                self.granted = 0;
                if !length.is_zero() {
                    self.refused_until = Some(now + wait.min(length));
                }
                ClusterDecision::Block(wait)
            }
        }
    }
}

/// The most one replica may hold: what the whole cluster earns in one lease (at least one
/// request's worth).
fn max_lease(rule: &ClusterRule) -> u32 {
    let earned = u64::from(rule.replenish_rate) * rule.lease_ms / 1000;
    u32::try_from(earned)
        .unwrap_or(u32::MAX)
        .max(rule.requested_tokens)
}
