//! This pod's memory of sold-out activities: once Redis says an activity has no stock left, the
//! pod answers SOLD_OUT without a Redis call until the entry expires (`order.sold_out_ttl_ms`).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use flash_sale_common::domain::ActivityId;

pub struct SoldOut {
    ttl: Duration,
    until: RwLock<HashMap<ActivityId, Instant>>,
}

impl SoldOut {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            until: RwLock::new(HashMap::new()),
        }
    }

    pub fn is_sold_out(&self, activity: ActivityId) -> bool {
        let map = self.until.read().unwrap_or_else(|e| e.into_inner());
        map.get(&activity)
            .is_some_and(|until| Instant::now() < *until)
    }

    pub fn mark(&self, activity: ActivityId) {
        let mut map = self.until.write().unwrap_or_else(|e| e.into_inner());
        map.insert(activity, Instant::now() + self.ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_expire() {
        let a = ActivityId::new(1).unwrap();
        let cache = SoldOut::new(Duration::from_millis(30));
        assert!(!cache.is_sold_out(a));
        cache.mark(a);
        assert!(cache.is_sold_out(a));
        assert!(!cache.is_sold_out(ActivityId::new(2).unwrap()));
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            !cache.is_sold_out(a),
            "the mark expires so restocked stock sells again"
        );
    }
}
