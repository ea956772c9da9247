//! Circuit breakers per downstream (Sentinel's degrade rules): closed while the statistics stay
//! below the threshold; open (fail fast) for `open_ms` once they reach it with at least
//! `min_requests` in the window; then half-open, letting exactly one probe through, whose
//! outcome closes the breaker or opens it again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::window::BucketWindow;
use crate::resource::Downstream;
use crate::rules::{BreakerRule, BreakerStrategy};

const BUCKETS: usize = 10;

/// The states, numbered as `gateway_circuit_state` exports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl CircuitState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// How a request through the breaker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// 5xx, timeout or unreachable.
    pub error: bool,
    /// Until the response head.
    pub rt: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    total: u64,
    errors: u64,
    slow: u64,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    window: BucketWindow<Counts>,
}

/// One breaker: one rule's state machine.
#[derive(Debug)]
pub struct CircuitBreaker {
    rule: BreakerRule,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(rule: &BreakerRule, now: Instant) -> Self {
        Self {
            rule: rule.clone(),
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                window: Self::window(rule, now),
            }),
        }
    }

    fn window(rule: &BreakerRule, now: Instant) -> BucketWindow<Counts> {
        BucketWindow::new(now, Duration::from_millis(rule.window_ms), BUCKETS)
    }

    pub fn rule(&self) -> &BreakerRule {
        &self.rule
    }

    pub fn state(&self) -> CircuitState {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.phase {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen => CircuitState::HalfOpen,
        }
    }

    /// Ok(true) for the half-open probe, Ok(false) for an ordinary pass, Err(retry after) when
    /// open or while another probe is out.
    pub fn try_pass(&self, now: Instant) -> Result<bool, Duration> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.phase {
            Phase::Closed => Ok(false),
            Phase::Open { until } if now >= until => {
                inner.phase = Phase::HalfOpen;
                Ok(true)
            }
            Phase::Open { until } => Err(until - now),
            Phase::HalfOpen => Err(Duration::from_millis(self.rule.open_ms.min(1000))),
        }
    }

    fn is_failure(&self, outcome: Outcome) -> bool {
        match self.rule.strategy {
            BreakerStrategy::SlowRatio => outcome.rt > Duration::from_millis(self.rule.max_rt_ms),
            BreakerStrategy::ErrorRatio | BreakerStrategy::ErrorCount => outcome.error,
        }
    }

    /// Records an answered request; returns the new state if it changed.
    pub fn on_complete(&self, probe: bool, outcome: Outcome, now: Instant) -> Option<CircuitState> {
        let failed = self.is_failure(outcome);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if probe {
            return Some(if failed {
                inner.phase = Phase::Open {
                    until: now + Duration::from_millis(self.rule.open_ms),
                };
                CircuitState::Open
            } else {
                inner.phase = Phase::Closed;
                inner.window = Self::window(&self.rule, now);
                CircuitState::Closed
            });
        }
        if !matches!(inner.phase, Phase::Closed) {
            // Admitted before the breaker opened; the breaker has already decided.
            return None;
        }
        let bucket = inner.window.current(now);
        bucket.total += 1;
        if outcome.error {
            bucket.errors += 1;
        }
        if outcome.rt > Duration::from_millis(self.rule.max_rt_ms) {
            bucket.slow += 1;
        }
        let sum = inner
            .window
            .valid(now)
            .fold(Counts::default(), |acc, (_, c)| Counts {
                total: acc.total + c.total,
                errors: acc.errors + c.errors,
                slow: acc.slow + c.slow,
            });
        if sum.total < self.rule.min_requests {
            return None;
        }
        let measure = match self.rule.strategy {
            BreakerStrategy::SlowRatio => sum.slow as f64 / sum.total as f64,
            BreakerStrategy::ErrorRatio => sum.errors as f64 / sum.total as f64,
            BreakerStrategy::ErrorCount => sum.errors as f64,
        };
        if measure >= self.rule.threshold {
            inner.phase = Phase::Open {
                until: now + Duration::from_millis(self.rule.open_ms),
            };
            Some(CircuitState::Open)
        } else {
            None
        }
    }

    /// The probe never got an answer (refused further on, or the client went away): the next
    /// request may probe at once.
    pub fn on_abandon(&self, probe: bool, now: Instant) {
        if probe {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(inner.phase, Phase::HalfOpen) {
                inner.phase = Phase::Open { until: now };
            }
        }
    }
}

/// The breakers of one downstream; a request passes if every one lets it.
#[derive(Debug)]
pub struct DownstreamBreakers {
    downstream: Downstream,
    breakers: Vec<CircuitBreaker>,
}

impl DownstreamBreakers {
    pub fn new(downstream: Downstream, rules: &[&BreakerRule], now: Instant) -> Self {
        let this = Self {
            downstream,
            breakers: rules.iter().map(|r| CircuitBreaker::new(r, now)).collect(),
        };
        this.publish();
        this
    }

    pub fn downstream(&self) -> Downstream {
        self.downstream
    }

    pub fn rules(&self) -> impl Iterator<Item = &BreakerRule> {
        self.breakers.iter().map(CircuitBreaker::rule)
    }

    /// The worst state: open, else half-open, else closed.
    pub fn state(&self) -> CircuitState {
        let states: Vec<CircuitState> = self.breakers.iter().map(CircuitBreaker::state).collect();
        if states.contains(&CircuitState::Open) {
            CircuitState::Open
        } else if states.contains(&CircuitState::HalfOpen) {
            CircuitState::HalfOpen
        } else {
            CircuitState::Closed
        }
    }

    /// Sets `gateway_circuit_state{downstream}`.
    pub fn publish(&self) {
        metrics::gauge!("gateway_circuit_state", "downstream" => self.downstream.as_str())
            .set(self.state() as i32 as f64);
    }

    /// Lets a request through every breaker, or says how long until it could be tried again.
    pub fn try_pass(self: &Arc<Self>, now: Instant) -> Result<BreakerPermit, Duration> {
        let mut probes = Vec::with_capacity(self.breakers.len());
        for breaker in &self.breakers {
            match breaker.try_pass(now) {
                Ok(probe) => probes.push(probe),
                Err(retry) => {
                    for (b, probe) in self.breakers.iter().zip(&probes) {
                        b.on_abandon(*probe, now);
                    }
                    if probes.iter().any(|p| *p) {
                        self.publish();
                    }
                    return Err(retry);
                }
            }
        }
        if probes.iter().any(|p| *p) {
            tracing::info!(downstream = %self.downstream, "circuit half-open: one probe request goes through");
            self.publish();
        }
        Ok(BreakerPermit {
            breakers: Arc::clone(self),
            probes,
            done: false,
        })
    }

    fn transitioned(&self, breaker: &CircuitBreaker, state: CircuitState) {
        let rule = breaker.rule();
        match state {
            CircuitState::Open => tracing::warn!(
                downstream = %self.downstream,
                strategy = rule.strategy.as_str(),
                threshold = rule.threshold,
                open_ms = rule.open_ms,
                "circuit opened: requests fail fast"
            ),
            _ => {
                tracing::info!(downstream = %self.downstream, state = state.as_str(), "circuit state changed")
            }
        }
        self.publish();
    }
}

/// A request admitted by a downstream's breakers; report its outcome with [`Self::complete`].
#[derive(Debug)]
pub struct BreakerPermit {
    breakers: Arc<DownstreamBreakers>,
    probes: Vec<bool>,
    done: bool,
}

impl BreakerPermit {
    pub fn complete(mut self, outcome: Outcome, now: Instant) {
        self.done = true;
        for (breaker, probe) in self.breakers.breakers.iter().zip(&self.probes) {
            if let Some(state) = breaker.on_complete(*probe, outcome, now) {
                self.breakers.transitioned(breaker, state);
            }
        }
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.done {
            let now = Instant::now();
            for (breaker, probe) in self.breakers.breakers.iter().zip(&self.probes) {
                breaker.on_abandon(*probe, now);
            }
            if self.probes.iter().any(|p| *p) {
                self.breakers.publish();
            }
        }
    }
}
