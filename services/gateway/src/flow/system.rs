//! System adaptive protection, BBR-style: the gateway measures what its downstream pipe can
//! hold (the highest completion rate times the lowest latency seen in the window, Little's law)
//! and, while it is saturated, sheds requests beyond that many in flight. A CPU ceiling
//! (Sentinel's `highestCpuUsage`) can shed on its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::window::BucketWindow;
use crate::rules::SystemRule;

/// After shedding, the BBR check stays on this long even if the CPU dipped below the gate, so
/// the gateway does not flap between shedding and flooding.
const COOL_DOWN: Duration = Duration::from_secs(1);

/// Why the system rule shed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemBlock {
    /// In flight above the BBR estimate.
    Adaptive,
    /// CPU above `max_cpu`.
    Cpu,
}

#[derive(Debug, Default, Clone, Copy)]
struct Completions {
    count: u64,
    rt_micros: u64,
}

#[derive(Debug)]
struct Stats {
    window_ms: u64,
    buckets: usize,
    completions: BucketWindow<Completions>,
    last_shed: Option<Instant>,
}

/// The gateway-wide in-flight count and completion statistics.
#[derive(Debug)]
pub struct SystemGuard {
    in_flight: AtomicU64,
    /// CPU busy share 0..1, as f64 bits, set by the sampler.
    cpu: AtomicU64,
    stats: Mutex<Stats>,
}

impl SystemGuard {
    pub fn new(rule: &SystemRule, now: Instant) -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            cpu: AtomicU64::new(0f64.to_bits()),
            stats: Mutex::new(Stats::new(rule, now)),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn cpu(&self) -> f64 {
        f64::from_bits(self.cpu.load(Ordering::Relaxed))
    }

    /// Sets the smoothed CPU share (the sampler; tests).
    pub fn set_cpu(&self, share: f64) {
        self.cpu
            .store(share.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
        metrics::gauge!("gateway_system_cpu_ratio").set(share);
    }

    /// The in-flight limit the BBR check would apply at `now` (the estimate, not the floor),
    /// or None while the window has no complete bucket with completions.
    pub fn estimated_capacity(&self, rule: &SystemRule, now: Instant) -> Option<f64> {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.reconfigure(rule, now);
        stats.capacity(now)
    }

    /// Admits a request or sheds it. The permit counts the request in flight until dropped.
    pub fn try_enter(
        self: &Arc<Self>,
        rule: &SystemRule,
        now: Instant,
    ) -> Result<SystemPermit, SystemBlock> {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let cpu = self.cpu();
        if let Some(max_cpu) = rule.max_cpu
            && cpu > max_cpu
            && in_flight >= rule.min_in_flight
        {
            return Err(SystemBlock::Cpu);
        }
        if rule.adaptive && in_flight >= rule.min_in_flight {
            let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.reconfigure(rule, now);
            let cooling = stats
                .last_shed
                .is_some_and(|at| now.saturating_duration_since(at) < COOL_DOWN);
            if (cpu >= rule.cpu_gate || cooling)
                && let Some(capacity) = stats.capacity(now)
                && in_flight as f64 >= capacity.max(rule.min_in_flight as f64)
            {
                stats.last_shed = Some(now);
                return Err(SystemBlock::Adaptive);
            }
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(SystemPermit {
            guard: Arc::clone(self),
            started: now,
        })
    }

    fn complete(&self, started: Instant, now: Instant) {
        let rt = now.saturating_duration_since(started);
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = stats.completions.current(now);
        bucket.count += 1;
        bucket.rt_micros += rt.as_micros() as u64;
    }
}

impl Stats {
    fn new(rule: &SystemRule, now: Instant) -> Self {
        Self {
            window_ms: rule.window_ms,
            buckets: rule.buckets,
            completions: BucketWindow::new(
                now,
                Duration::from_millis(rule.window_ms),
                rule.buckets,
            ),
            last_shed: None,
        }
    }

    /// A reloaded rule with another window starts the statistics over.
    fn reconfigure(&mut self, rule: &SystemRule, now: Instant) {
        if rule.window_ms != self.window_ms || rule.buckets != self.buckets {
            *self = Self::new(rule, now);
        }
    }

    /// max completions per second (per bucket, scaled) x min mean latency (over buckets).
    fn capacity(&self, now: Instant) -> Option<f64> {
        let mut max_count = 0u64;
        let mut min_rt = f64::INFINITY;
        for bucket in self.completions.complete(now) {
            if bucket.count == 0 {
                continue;
            }
            max_count = max_count.max(bucket.count);
            let mean = bucket.rt_micros as f64 / bucket.count as f64 / 1e6;
            min_rt = min_rt.min(mean);
        }
        (max_count > 0).then(|| max_count as f64 * self.completions.buckets_per_second() * min_rt)
    }
}

/// A request admitted by the system rule. Completing it feeds the statistics; dropping it
/// without completing (a refusal further on) only ends its in-flight count.
#[derive(Debug)]
pub struct SystemPermit {
    guard: Arc<SystemGuard>,
    started: Instant,
}

impl SystemPermit {
    /// The request got its answer at `now` (success or not: latency is what BBR measures).
    pub fn complete(self, now: Instant) {
        self.guard.complete(self.started, now);
    }
}

impl Drop for SystemPermit {
    fn drop(&mut self) {
        self.guard.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Samples the gateway's CPU saturation every `interval` until `stop`: the share of time the
/// tokio workers were busy, smoothed over the last few samples so a single busy moment does
/// not shed ("CPU stays too high"). Busy workers are what the gateway's own CPU limit looks
/// like from inside, also when the pod is starved by its neighbours.
pub async fn sample_cpu(
    guard: &SystemGuard,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let workers = metrics.num_workers().max(1);
    let busy = || -> Duration {
        (0..workers)
            .map(|w| metrics.worker_total_busy_duration(w))
            .sum()
    };
    let mut last_busy = busy();
    let mut last_at = std::time::Instant::now();
    let mut smoothed: Option<f64> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let (now, busy_now) = (std::time::Instant::now(), busy());
        let wall = now.duration_since(last_at).as_secs_f64() * workers as f64;
        if wall > 0.0 {
            let share = (busy_now.saturating_sub(last_busy).as_secs_f64() / wall).clamp(0.0, 1.0);
            let value = smoothed.map_or(share, |s| 0.5 * s + 0.5 * share);
            smoothed = Some(value);
            guard.set_cpu(value);
        }
        (last_busy, last_at) = (busy_now, now);
    }
}
