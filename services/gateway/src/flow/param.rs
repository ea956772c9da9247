//! Hot-parameter limits (Sentinel's `ParamFlowRule`): a budget per value of one request parameter
//! (user, client IP, activity), so one hot key is held back without touching others.
//!
//! `governor` does the per-key limiting: a GCRA, equivalent to a token bucket of `count + burst`
//! refilled with `count` per `window_secs`, in a keyed limiter (a sharded `DashMap`), and a direct
//! limiter per override key. It reads time from tokio's clock (`TokioClock`), so that tests run
//! on a paused clock like the rest of the flow code.
//!
//! Still hand-written is the bound on the keys remembered, because governor's keyed limiter only
//! grows: it offers `retain_recent()` (forget the keys whose state is the same as a new key's) but
//! no trigger for it, no size limit and no way to clear the map. So every few requests the key
//! count is looked at (not on every request: the count walks the map's shards); a sweep runs
//! whenever it has grown by half since the last one, and if the keys left after a sweep are still
//! `max_keys` or more, every key is busy and the whole keyed limiter is replaced by a fresh one:
//! all keys are forgotten, which errs towards letting requests through, and counted in
//! `gateway_param_keys_evicted_total{param}`.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, TryLockError};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use crate::rules::ParamRule;

/// Keys remembered before the first sweep for idle ones.
const FIRST_SWEEP: usize = 1024;

/// The key count is looked at every this many requests at most (and every `max_keys / 16`, so
/// the bound is overshot by a sixteenth at most).
const CHECK_EVERY: usize = 256;

/// governor's time source: tokio's clock, as nanoseconds since the limiter was made, so that a
/// paused clock (`tokio::time::pause`, `advance`) holds governor too.
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    start: Instant,
}

impl TokioClock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.start.elapsed())
    }
}

type KeyedLimiter =
    RateLimiter<String, DashMapStateStore<String>, TokioClock, NoOpMiddleware<Nanos>>;
type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

pub struct ParamLimiter {
    rule: ParamRule,
    clock: TokioClock,
    /// The keys without an override; `None` if `count` is 0 (every such key is refused).
    keyed: Option<Keyed>,
    /// The override keys; `None` for an override of 0.
    overrides: HashMap<String, Option<DirectLimiter>>,
}

/// The keyed limiter and what bounds it. A key whose state is the same as a new key's says no
/// more than no state at all, so such keys are swept whenever the map has grown by half since
/// the last sweep. governor's `retain_recent` keeps keys one emission interval (`window / count`)
/// longer than needed, so half of what a sweep keeps is already idle: growing by half holds
/// about the keys seen within a window or two (with `count` 1), not every key ever seen (a sale
/// has a million buyers, each buying once).
struct Keyed {
    quota: Quota,
    /// Behind a lock only to be replaced when every key is busy; requests take it to read.
    limiter: RwLock<KeyedLimiter>,
    requests: AtomicUsize,
    check_every: usize,
    /// Size at which idle keys are next swept; locked by the request that looks.
    sweep_at: Mutex<usize>,
}

/// `count + burst` per `window_secs`, or `None` for a count of 0.
fn quota(count: u32, burst: u32, window_secs: u64) -> Option<Quota> {
    let count = NonZeroU32::new(count)?;
    let period = (Duration::from_secs(window_secs) / count.get()).max(Duration::from_nanos(1));
    let burst = count.saturating_add(burst);
    Quota::with_period(period).map(|quota| quota.allow_burst(burst))
}

impl ParamLimiter {
    pub fn new(rule: &ParamRule) -> Self {
        let clock = TokioClock::new();
        let keyed = quota(rule.count, rule.burst, rule.window_secs).map(|quota| Keyed {
            quota,
            limiter: RwLock::new(KeyedLimiter::dashmap_with_clock(quota, clock)),
            requests: AtomicUsize::new(0),
            check_every: (rule.max_keys / 16).clamp(1, CHECK_EVERY),
            sweep_at: Mutex::new(FIRST_SWEEP),
        });
        let overrides = rule
            .overrides
            .iter()
            .map(|(key, &count)| {
                let limiter = quota(count, rule.burst, rule.window_secs)
                    .map(|quota| DirectLimiter::direct_with_clock(quota, clock));
                (key.clone(), limiter)
            })
            .collect();
        Self {
            rule: rule.clone(),
            clock,
            keyed,
            overrides,
        }
    }

    pub fn rule(&self) -> &ParamRule {
        &self.rule
    }

    /// Takes one token for `key`, or says how long until the key has one again.
    pub fn try_acquire(&self, key: &str) -> Result<(), Duration> {
        let refused = Duration::from_secs(self.rule.window_secs);
        let checked = match self.overrides.get(key) {
            Some(Some(limiter)) => limiter.check(),
            Some(None) => return Err(refused),
            None => {
                let Some(keyed) = &self.keyed else {
                    return Err(refused);
                };
                if keyed.requests.fetch_add(1, Ordering::Relaxed) % keyed.check_every == 0 {
                    self.bound(keyed);
                }
                let limiter = keyed.limiter.read().unwrap_or_else(PoisonError::into_inner);
                // governor's `check_key` takes `&K`, so the key is copied.
                limiter.check_key(&key.to_owned())
            }
        };
        checked.map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Sweeps idle keys if there are enough of them, and forgets every key if even then there
    /// are `max_keys`.
    fn bound(&self, keyed: &Keyed) {
        let mut sweep_at = match keyed.sweep_at.try_lock() {
            Ok(sweep_at) => sweep_at,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            // Another request is at it.
            Err(TryLockError::WouldBlock) => return,
        };
        let limiter = keyed.limiter.read().unwrap_or_else(PoisonError::into_inner);
        if limiter.len() < (*sweep_at).min(self.rule.max_keys) {
            return;
        }
        limiter.retain_recent();
        let keys = limiter.len();
        drop(limiter);
        if keys >= self.rule.max_keys {
            // Every remembered key is busy: forget them all rather than grow without bound.
            // This errs towards letting requests through, and is counted.
            let fresh = KeyedLimiter::dashmap_with_clock(keyed.quota, self.clock);
            let old = std::mem::replace(
                &mut *keyed
                    .limiter
                    .write()
                    .unwrap_or_else(PoisonError::into_inner),
                fresh,
            );
            metrics::counter!("gateway_param_keys_evicted_total", "param" => self.rule.param.as_str())
                .increment(old.len() as u64);
            *sweep_at = FIRST_SWEEP;
        } else {
            *sweep_at = (keys + keys / 2).max(FIRST_SWEEP);
        }
    }

    /// Keys currently remembered, override keys aside (for tests).
    pub fn keys(&self) -> usize {
        self.keyed.as_ref().map_or(0, |keyed| {
            keyed
                .limiter
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
        })
    }
}

impl fmt::Debug for ParamLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParamLimiter")
            .field("rule", &self.rule)
            .field("keys", &self.keys())
            .finish_non_exhaustive()
    }
}
