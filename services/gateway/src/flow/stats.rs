//! Per-resource statistics and metrics, Sentinel's real-time view: passed, blocked by reason,
//! errors, in flight and latency for each route and each activity.
//!
//! - `gateway_flow_passed_total{resource}`
//! - `gateway_flow_blocked_total{resource,reason}`
//! - `gateway_flow_errors_total{resource}`
//! - `gateway_flow_in_flight{resource}`
//! - `gateway_flow_latency_seconds{resource}` (to the upstream's response head)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use flash_sale_common::domain::ActivityId;
use metrics::{Counter, Gauge, Histogram};

use super::BlockReason;
use crate::resource::RouteId;

/// An activity resource idle this long may make room for a new one.
const ACTIVITY_IDLE: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub struct ResourceStats {
    name: String,
    in_flight: AtomicU64,
    last_seen_secs: AtomicU64,
    passed: Counter,
    errors: Counter,
    in_flight_gauge: Gauge,
    latency: Histogram,
    blocked: [OnceLock<Counter>; BlockReason::ALL.len()],
}

impl ResourceStats {
    pub fn new(name: String) -> Self {
        let label = [("resource", name.clone())];
        Self {
            passed: metrics::counter!("gateway_flow_passed_total", &label),
            errors: metrics::counter!("gateway_flow_errors_total", &label),
            in_flight_gauge: metrics::gauge!("gateway_flow_in_flight", &label),
            latency: metrics::histogram!("gateway_flow_latency_seconds", &label),
            name,
            in_flight: AtomicU64::new(0),
            last_seen_secs: AtomicU64::new(0),
            blocked: Default::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn blocked(&self, reason: BlockReason) {
        self.blocked[reason as usize]
            .get_or_init(|| {
                metrics::counter!(
                    "gateway_flow_blocked_total",
                    "resource" => self.name.clone(),
                    "reason" => reason.as_str()
                )
            })
            .increment(1);
    }

    /// Counts the request in flight unless that would exceed `limit` (a concurrency rule).
    pub fn try_enter(self: &Arc<Self>, limit: Option<u64>) -> Option<InFlight> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if limit.is_some_and(|limit| before >= limit) {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.in_flight_gauge.increment(1.0);
        Some(InFlight {
            stats: Arc::clone(self),
        })
    }

    fn touch(&self, now_secs: u64) {
        self.last_seen_secs.store(now_secs, Ordering::Relaxed);
    }
}

/// A request counted in flight on one resource, until dropped.
#[derive(Debug)]
pub struct InFlight {
    stats: Arc<ResourceStats>,
}

impl InFlight {
    pub fn stats(&self) -> &ResourceStats {
        &self.stats
    }

    pub fn passed(&self) {
        self.stats.passed.increment(1);
    }

    pub fn finished(&self, latency: Duration, error: bool) {
        self.stats.latency.record(latency);
        if error {
            self.stats.errors.increment(1);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.stats.in_flight_gauge.decrement(1.0);
    }
}

/// The resources: the routes, and activities up to `max_activities`.
#[derive(Debug)]
pub struct Resources {
    flash_sale: Arc<ResourceStats>,
    inventory: Arc<ResourceStats>,
    activities: RwLock<HashMap<ActivityId, Arc<ResourceStats>>>,
    other: Arc<ResourceStats>,
    max_activities: usize,
    started: std::time::Instant,
}

impl Resources {
    pub fn new(max_activities: usize) -> Self {
        Self {
            flash_sale: Arc::new(ResourceStats::new(RouteId::FlashSale.as_str().into())),
            inventory: Arc::new(ResourceStats::new(RouteId::Inventory.as_str().into())),
            activities: RwLock::new(HashMap::new()),
            other: Arc::new(ResourceStats::new("activity:other".into())),
            max_activities,
            started: std::time::Instant::now(),
        }
    }

    pub fn route(&self, route: RouteId) -> &Arc<ResourceStats> {
        match route {
            RouteId::FlashSale => &self.flash_sale,
            RouteId::Inventory => &self.inventory,
        }
    }

    /// The activity's resource; `activity:other` once `max_activities` are tracked and none
    /// of them has been idle for an hour.
    pub fn activity(&self, activity: ActivityId) -> Arc<ResourceStats> {
        let now = self.started.elapsed().as_secs();
        {
            let map = self.activities.read().unwrap_or_else(|e| e.into_inner());
            if let Some(stats) = map.get(&activity) {
                stats.touch(now);
                return Arc::clone(stats);
            }
        }
        let mut map = self.activities.write().unwrap_or_else(|e| e.into_inner());
        if let Some(stats) = map.get(&activity) {
            return Arc::clone(stats);
        }
        if map.len() >= self.max_activities {
            let idle = ACTIVITY_IDLE.as_secs();
            map.retain(|_, s| {
                s.in_flight() > 0
                    || now.saturating_sub(s.last_seen_secs.load(Ordering::Relaxed)) < idle
            });
            if map.len() >= self.max_activities {
                return Arc::clone(&self.other);
            }
        }
        let stats = Arc::new(ResourceStats::new(format!("activity:{activity}")));
        stats.touch(now);
        map.insert(activity, Arc::clone(&stats));
        stats
    }
}
