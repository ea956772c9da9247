//! QPS limits with Sentinel's three control behaviours: reject at once, warm up from a cold
//! rate, or queue (leaky bucket) up to a maximum wait.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::window::SlidingCounter;
use crate::rules::{ControlBehavior, FlowRule};

/// The pass count is kept over one second in ten buckets: at most `count` requests pass in
/// any second that starts on a bucket boundary.
const WINDOW: Duration = Duration::from_secs(1);
const BUCKETS: usize = 10;

/// What a QPS limiter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpsDecision {
    Pass,
    /// Pass after waiting this long (queueing); the slot is already taken.
    PassAfter(Duration),
    /// Refused; a retry makes sense after this long.
    Block(Duration),
}

#[derive(Debug)]
pub struct QpsLimiter {
    count: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    Reject {
        passed: SlidingCounter,
    },
    WarmUp {
        passed: SlidingCounter,
        warm: WarmUp,
    },
    Queue {
        /// `1 / count` seconds between two requests.
        interval: Duration,
        max_wait: Duration,
        /// When the next request may pass.
        next_free: Instant,
    },
}

impl QpsLimiter {
    /// A limiter for `rule`, its clock starting at `now`.
    pub fn new(rule: &FlowRule, now: Instant) -> Self {
        let count = rule.count;
        let state = match rule.control {
            ControlBehavior::Reject => State::Reject {
                passed: SlidingCounter::new(now, WINDOW, BUCKETS),
            },
            ControlBehavior::WarmUp => State::WarmUp {
                passed: SlidingCounter::new(now, WINDOW, BUCKETS),
                warm: WarmUp::new(count, rule.cold_factor, rule.warm_up_period_secs, now),
            },
            ControlBehavior::Queue => State::Queue {
                interval: Duration::from_secs_f64(1.0 / count),
                max_wait: Duration::from_millis(rule.max_queue_ms),
                next_free: now,
            },
        };
        Self {
            count,
            state: Mutex::new(state),
        }
    }

    /// Decides for one request arriving at `now`.
    pub fn try_acquire(&self, now: Instant) -> QpsDecision {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            State::Reject { passed } => {
                if (passed.sum(now) + 1) as f64 <= self.count {
                    passed.add(now, 1);
                    QpsDecision::Pass
                } else {
                    QpsDecision::Block(Duration::from_secs(1))
                }
            }
            State::WarmUp { passed, warm } => {
                warm.sync(now);
                let allowed = warm.allowed_qps();
                if (passed.sum(now) + 1) as f64 <= allowed {
                    passed.add(now, 1);
                    warm.record_pass(now);
                    QpsDecision::Pass
                } else {
                    QpsDecision::Block(Duration::from_secs(1))
                }
            }
            State::Queue {
                interval,
                max_wait,
                next_free,
            } => {
                let slot = (*next_free).max(now);
                let wait = slot - now;
                if wait > *max_wait {
                    return QpsDecision::Block(wait);
                }
                *next_free = slot + *interval;
                if wait.is_zero() {
                    QpsDecision::Pass
                } else {
                    QpsDecision::PassAfter(wait)
                }
            }
        }
    }

    /// The rate currently allowed (the warm-up's ramp; `count` otherwise), for tests and logs.
    pub fn allowed_qps(&self, now: Instant) -> f64 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            State::WarmUp { warm, .. } => {
                warm.sync(now);
                warm.allowed_qps()
            }
            _ => self.count,
        }
    }
}

/// The warm-up ramp (Guava's `SmoothWarmingUp`, as Sentinel's `WarmUpController` uses it).
///
/// A store of tokens stands for how cold the resource is: it fills while traffic stays below
/// the cold rate and drains by what passes. Above `warning` tokens the allowed rate falls along
/// a line from `count` (at `warning`) to `count / cold_factor` (at `max`); below it the rule
/// allows `count`. Starting full, a resource under full pressure needs `warm_up_period` to reach
/// `count`.
#[derive(Debug)]
struct WarmUp {
    count: f64,
    cold_factor: f64,
    warning: f64,
    max: f64,
    slope: f64,
    stored: f64,
    epoch: Instant,
    /// Whole seconds since `epoch` up to which the store is settled.
    filled_second: u64,
    /// The second being counted and its passes.
    second: u64,
    second_passes: u64,
    /// Passes of the second before `second`, if it was the one just finished.
    last_second_passes: u64,
}

impl WarmUp {
    fn new(count: f64, cold_factor: f64, period_secs: u64, now: Instant) -> Self {
        let period = period_secs as f64;
        let warning = period * count / (cold_factor - 1.0);
        let max = warning + 2.0 * period * count / (1.0 + cold_factor);
        let slope = (cold_factor - 1.0) / count / (max - warning);
        Self {
            count,
            cold_factor,
            warning,
            max,
            slope,
            stored: max,
            epoch: now,
            filled_second: 0,
            second: 0,
            second_passes: 0,
            last_second_passes: 0,
        }
    }

    fn second_of(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    fn roll(&mut self, now: Instant) {
        let second = self.second_of(now);
        if second != self.second {
            self.last_second_passes = if second == self.second + 1 {
                self.second_passes
            } else {
                0
            };
            self.second = second;
            self.second_passes = 0;
        }
    }

    fn record_pass(&mut self, now: Instant) {
        self.roll(now);
        self.second_passes += 1;
    }

    /// Once per second: refill the store for the time that passed (if the resource is below
    /// its warning level or was used below the cold rate), then take what passed last second.
    fn sync(&mut self, now: Instant) {
        let second = self.second_of(now);
        if second <= self.filled_second {
            return;
        }
        // Passes of the second that just ended; older seconds had none worth subtracting here,
        // their passes were subtracted when they ended or the resource sat idle.
        let previous_passes = if second == self.second + 1 {
            self.second_passes
        } else if second == self.second {
            self.last_second_passes
        } else {
            0
        };
        let elapsed = (second - self.filled_second) as f64;
        let mut stored = self.stored;
        if stored < self.warning || (previous_passes as f64) < self.count / self.cold_factor {
            stored += elapsed * self.count;
        }
        stored = stored.min(self.max);
        self.stored = (stored - previous_passes as f64).max(0.0);
        self.filled_second = second;
        self.roll(now);
    }

    fn allowed_qps(&self) -> f64 {
        if self.stored >= self.warning {
            let above = self.stored - self.warning;
            1.0 / (above * self.slope + 1.0 / self.count)
        } else {
            self.count
        }
    }
}
