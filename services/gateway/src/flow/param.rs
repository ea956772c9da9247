//! Hot-parameter limits (Sentinel's `ParamFlowRule`): a token bucket per value of one request
//! parameter (user, client IP, activity), so one hot key is held back without touching others.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::bucket::TokenBucket;
use crate::rules::ParamRule;

/// Keys are spread over shards so concurrent requests for different keys rarely share a lock.
const SHARDS: usize = 16;

/// Keys a shard holds before its first sweep for idle ones.
const FIRST_SWEEP: usize = 1024;

#[derive(Debug)]
pub struct ParamLimiter {
    rule: ParamRule,
    hasher: RandomState,
    max_keys_per_shard: usize,
    shards: Vec<Mutex<Shard>>,
}

/// The buckets of some keys. A bucket that is full again says no more than no bucket at all, so
/// a shard forgets those whenever it has doubled since it last did: it holds about the keys seen
/// within one window, not every key ever seen (a sale has a million buyers, each buying once).
#[derive(Debug)]
struct Shard {
    buckets: HashMap<String, TokenBucket>,
    /// Size at which idle keys are next swept.
    sweep_at: usize,
}

impl ParamLimiter {
    pub fn new(rule: &ParamRule) -> Self {
        Self {
            rule: rule.clone(),
            hasher: RandomState::new(),
            max_keys_per_shard: rule.max_keys.div_ceil(SHARDS).max(1),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::new(),
                        sweep_at: FIRST_SWEEP,
                    })
                })
                .collect(),
        }
    }

    pub fn rule(&self) -> &ParamRule {
        &self.rule
    }

    /// Takes one token for `key`, or says how long until the key has one again.
    pub fn try_acquire(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let count = self
            .rule
            .overrides
            .get(key)
            .copied()
            .unwrap_or(self.rule.count);
        if count == 0 {
            return Err(Duration::from_secs(self.rule.window_secs));
        }
        let rate = f64::from(count) / self.rule.window_secs as f64;
        let capacity = f64::from(count) + f64::from(self.rule.burst);

        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = shard.buckets.get_mut(key) {
            return bucket.try_take(1.0, now);
        }
        if shard.buckets.len() >= shard.sweep_at.min(self.max_keys_per_shard) {
            shard.buckets.retain(|_, b| !b.is_full(now));
            if shard.buckets.len() >= self.max_keys_per_shard {
                // Every remembered key is busy: forget them all rather than grow without bound.
                // This errs towards letting requests through, and is counted.
                metrics::counter!("gateway_param_keys_evicted_total", "param" => self.rule.param.as_str())
                    .increment(shard.buckets.len() as u64);
                shard.buckets.clear();
            }
            shard.sweep_at = (2 * shard.buckets.len()).max(FIRST_SWEEP);
        }
        let mut bucket = TokenBucket::new(rate, capacity, now);
        let result = bucket.try_take(1.0, now);
        shard.buckets.insert(key.to_owned(), bucket);
        result
    }

    /// Keys currently remembered (for tests).
    pub fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).buckets.len())
            .sum()
    }
}
