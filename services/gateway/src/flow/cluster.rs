//! The cluster-wide limit: a token bucket in Redis that every gateway replica draws from (the
//! seed's `RequestRateLimiter`, replenishRate 1000, burstCapacity 2000), one Lua call per request.
//!
//! When Redis cannot be reached (not connected yet, an error, a timeout), each replica enforces
//! its share locally, `rate / replicas` and `burst / replicas`, where `replicas` is the number
//! of live replicas Redis last reported (heartbeats), or `cluster.replicas_hint` before that.
//! It never fails open silently: entering and leaving the fallback is logged, and
//! `gateway_cluster_fallback` (0/1) and `gateway_cluster_fallback_decisions_total{resource}`
//! say how long and how much was decided locally.

use std::collections::HashMap;
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
    redis: OnceLock<Redis>,
    replicas: AtomicUsize,
    /// While set and in the future, the local share decides without trying Redis.
    retry_at: Mutex<Option<Instant>>,
    in_fallback: AtomicBool,
    local: Mutex<HashMap<String, LocalShare>>,
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
            local: Mutex::new(HashMap::new()),
        };
        metrics::gauge!("gateway_cluster_replicas").set(this.replicas() as f64);
        this
    }

    /// Uses an already connected Redis (tests).
    pub fn with_redis(settings: &ClusterSettings, redis: Redis) -> Self {
        let this = Self::new(settings);
        let _ = this.redis.set(redis);
        this
    }

    /// Live replicas, as Redis last counted them.
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Whether a Redis connection has been made (it reconnects by itself after that).
    pub fn is_connected(&self) -> bool {
        self.redis.get().is_some()
    }

    pub fn is_in_fallback(&self) -> bool {
        self.in_fallback.load(Ordering::Relaxed)
    }

    /// Takes the rule's tokens for one request.
    pub async fn acquire(&self, resource: &str, rule: &ClusterRule) -> ClusterDecision {
        match self.redis.get() {
            Some(redis) if !self.waiting_to_retry() => {
                match self.call(redis, resource, rule).await {
                    Ok(decision) => {
                        self.leave_fallback();
                        return decision;
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
        metrics::counter!("gateway_cluster_fallback_decisions_total", "resource" => resource.to_owned())
            .increment(1);
        self.decide_locally(resource, rule, Instant::now())
    }

    async fn call(
        &self,
        redis: &Redis,
        resource: &str,
        rule: &ClusterRule,
    ) -> Result<ClusterDecision, RedisFailure> {
        let mut invocation = TOKEN_BUCKET.prepare_invoke();
        invocation
            .key(bucket_key(resource))
            .arg(rule.replenish_rate)
            .arg(rule.burst_capacity)
            .arg(rule.requested_tokens);
        let (allowed, _left, wait_ms): (i64, i64, i64) =
            redis.run("gateway_token_bucket", &invocation).await?;
        Ok(if allowed == 1 {
            ClusterDecision::Pass
        } else {
            ClusterDecision::Block(Duration::from_millis(wait_ms.max(0) as u64))
        })
    }

    fn waiting_to_retry(&self) -> bool {
        let retry_at = self.retry_at.lock().unwrap_or_else(|e| e.into_inner());
        retry_at.is_some_and(|at| Instant::now() < at)
    }

    fn enter_fallback(&self, cause: &str) {
        *self.retry_at.lock().unwrap_or_else(|e| e.into_inner()) =
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
            *self.retry_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::info!("cluster rate limit: Redis reachable again, the shared bucket decides");
            metrics::gauge!("gateway_cluster_fallback").set(0.0);
        }
    }

    /// The local share of the bucket: `rate / replicas`, `burst / replicas`.
    pub fn decide_locally(
        &self,
        resource: &str,
        rule: &ClusterRule,
        now: Instant,
    ) -> ClusterDecision {
        let replicas = self.replicas();
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let share = local
            .entry(resource.to_owned())
            .or_insert_with(|| LocalShare {
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
        let retry = Duration::from_millis(self.settings.retry_ms.max(100));
        if self.redis.get().is_none() {
            let mut warned = false;
            loop {
                let attempt = tokio::select! {
                    () = stop.cancelled() => return,
                    attempt = Redis::connect(redis) => attempt,
                };
                match attempt {
                    Ok(connection) => {
                        let _ = self.redis.set(connection);
                        tracing::info!("cluster rate limit: connected to Redis");
                        break;
                    }
                    Err(error) => {
                        if !warned {
                            tracing::warn!(%error, "cluster rate limit: cannot connect to Redis yet; the local share decides");
                            warned = true;
                        }
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(retry) => {}
                        }
                    }
                }
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
        let Some(redis) = self.redis.get() else {
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
