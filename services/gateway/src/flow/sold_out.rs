//! The sold-out short circuit: what order-service said about an activity, remembered for a
//! short TTL so the gateway answers for it without a downstream call.
//!
//! The gateway learns from order-service's own answers: `409 SOLD_OUT` to an order for one item
//! (a larger order may be refused while single items remain) and `409 SALE_ENDED`. While the mark
//! holds, every order for the activity gets the same answer at once. When it lapses, exactly
//! one request goes through as a probe while the others still get the remembered answer: the
//! probe's answer renews the mark or lifts it. A restock or warm-up of the activity that passes
//! through this gateway lifts the mark at once; other replicas see the restock within the TTL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flash_sale_common::domain::ActivityId;
use flash_sale_common::error::ErrorCode;
use tokio::time::Instant;

/// A probe whose answer does not come within this long no longer blocks another probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Mark {
    code: ErrorCode,
    until: Instant,
    probe_until: Option<Instant>,
}

/// What the short circuit says about a request.
#[derive(Debug)]
pub enum SoldOutCheck {
    /// Nothing known: go on.
    Open,
    /// Answer with this code now.
    Known(ErrorCode),
    /// The mark lapsed and this request is its probe: report what order-service answers.
    Probe(SoldOutProbe),
}

#[derive(Debug, Default)]
pub struct SoldOut {
    marks: RwLock<HashMap<ActivityId, Mark>>,
}

impl SoldOut {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn check(self: &Arc<Self>, activity: ActivityId, now: Instant) -> SoldOutCheck {
        {
            let marks = self.marks.read().unwrap_or_else(|e| e.into_inner());
            match marks.get(&activity) {
                None => return SoldOutCheck::Open,
                Some(mark) if now < mark.until => return SoldOutCheck::Known(mark.code),
                Some(_) => {}
            }
        }
        let mut marks = self.marks.write().unwrap_or_else(|e| e.into_inner());
        let Some(mark) = marks.get_mut(&activity) else {
            return SoldOutCheck::Open;
        };
        if now < mark.until || mark.probe_until.is_some_and(|until| now < until) {
            return SoldOutCheck::Known(mark.code);
        }
        mark.probe_until = Some(now + PROBE_TIMEOUT);
        SoldOutCheck::Probe(SoldOutProbe {
            sold_out: Arc::clone(self),
            activity,
            reported: false,
        })
    }

    /// Order-service refused an order with `code` (SOLD_OUT for one item, or SALE_ENDED).
    pub fn mark(&self, activity: ActivityId, code: ErrorCode, ttl: Duration, now: Instant) {
        let mut marks = self.marks.write().unwrap_or_else(|e| e.into_inner());
        let earlier = marks.insert(
            activity,
            Mark {
                code,
                until: now + ttl,
                probe_until: None,
            },
        );
        if earlier.is_none() {
            tracing::info!(%activity, code = code.as_str(), "activity refused as a whole: the gateway answers for it");
        }
        metrics::gauge!("gateway_sold_out_activities").set(marks.len() as f64);
    }

    /// The activity may sell again (a probe was not refused, or it was restocked).
    pub fn clear(&self, activity: ActivityId) {
        let mut marks = self.marks.write().unwrap_or_else(|e| e.into_inner());
        if marks.remove(&activity).is_some() {
            tracing::info!(%activity, "activity open again: the sold-out short circuit is lifted");
        }
        metrics::gauge!("gateway_sold_out_activities").set(marks.len() as f64);
    }

    /// Every activity may sell again (a warm-up of all activities).
    pub fn clear_all(&self) {
        let mut marks = self.marks.write().unwrap_or_else(|e| e.into_inner());
        marks.clear();
        metrics::gauge!("gateway_sold_out_activities").set(0.0);
    }

    pub fn is_marked(&self, activity: ActivityId, now: Instant) -> bool {
        self.known(activity, now).is_some()
    }

    /// The remembered answer while the mark holds (no probe is handed out here).
    pub fn known(&self, activity: ActivityId, now: Instant) -> Option<ErrorCode> {
        let marks = self.marks.read().unwrap_or_else(|e| e.into_inner());
        marks
            .get(&activity)
            .filter(|m| now < m.until)
            .map(|m| m.code)
    }

    fn probe_abandoned(&self, activity: ActivityId) {
        let mut marks = self.marks.write().unwrap_or_else(|e| e.into_inner());
        if let Some(mark) = marks.get_mut(&activity) {
            mark.probe_until = None;
        }
    }
}

/// The one request that asks order-service again after a mark lapsed. Dropped without a
/// report (refused by a later rule, client gone), it lets the next request probe.
#[derive(Debug)]
pub struct SoldOutProbe {
    sold_out: Arc<SoldOut>,
    activity: ActivityId,
    reported: bool,
}

impl SoldOutProbe {
    /// Order-service answered without refusing the activity as a whole: it sells again.
    pub fn open(mut self) {
        self.reported = true;
        self.sold_out.clear(self.activity);
    }

    /// Order-service refused again.
    pub fn still(mut self, code: ErrorCode, ttl: Duration, now: Instant) {
        self.reported = true;
        self.sold_out.mark(self.activity, code, ttl, now);
    }
}

impl Drop for SoldOutProbe {
    fn drop(&mut self) {
        if !self.reported {
            self.sold_out.probe_abandoned(self.activity);
        }
    }
}
