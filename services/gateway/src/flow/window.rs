//! A sliding window of equal time buckets (Sentinel's `LeapArray`): the statistics every rule
//! reads. Time is tokio's, so tests drive it with a paused clock.

use std::time::Duration;

use tokio::time::Instant;

/// `buckets` buckets of `window / buckets` each, starting at `epoch`. A bucket is reused once
/// the window has moved past it.
#[derive(Debug)]
pub struct BucketWindow<T> {
    epoch: Instant,
    bucket_nanos: u128,
    /// `(bucket index since epoch, value)`; a slot whose index is stale is empty.
    slots: Vec<(u64, T)>,
}

impl<T: Default> BucketWindow<T> {
    pub fn new(epoch: Instant, window: Duration, buckets: usize) -> Self {
        let buckets = buckets.max(1);
        let bucket_nanos = (window.as_nanos() / buckets as u128).max(1);
        Self {
            epoch,
            bucket_nanos,
            slots: (0..buckets).map(|_| (u64::MAX, T::default())).collect(),
        }
    }

    /// The bucket index `now` falls in.
    pub fn index(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / self.bucket_nanos) as u64
    }

    /// Buckets per second (for turning a per-bucket count into a rate).
    pub fn buckets_per_second(&self) -> f64 {
        1e9 / self.bucket_nanos as f64
    }

    /// The current bucket, emptied first if it held an older one.
    pub fn current(&mut self, now: Instant) -> &mut T {
        let index = self.index(now);
        let n = self.slots.len() as u64;
        let slot = &mut self.slots[(index % n) as usize];
        if slot.0 != index {
            *slot = (index, T::default());
        }
        &mut slot.1
    }

    /// The buckets inside the window ending at `now`, current one included (in slot order).
    pub fn valid(&self, now: Instant) -> impl Iterator<Item = (u64, &T)> {
        let index = self.index(now);
        let n = self.slots.len() as u64;
        let oldest = index.saturating_sub(n - 1);
        self.slots
            .iter()
            .filter(move |(i, _)| *i != u64::MAX && *i >= oldest && *i <= index)
            .map(|(i, v)| (*i, v))
    }

    /// The buckets inside the window that are complete (the current one excluded).
    pub fn complete(&self, now: Instant) -> impl Iterator<Item = &T> {
        let index = self.index(now);
        self.valid(now)
            .filter(move |(i, _)| *i < index)
            .map(|(_, v)| v)
    }
}

/// A sliding count of events over a window (the pass count of a QPS rule).
#[derive(Debug)]
pub struct SlidingCounter {
    window: BucketWindow<u64>,
}

impl SlidingCounter {
    pub fn new(epoch: Instant, window: Duration, buckets: usize) -> Self {
        Self {
            window: BucketWindow::new(epoch, window, buckets),
        }
    }

    pub fn sum(&self, now: Instant) -> u64 {
        self.window.valid(now).map(|(_, n)| *n).sum()
    }

    pub fn add(&mut self, now: Instant, n: u64) {
        *self.window.current(now) += n;
    }
}
