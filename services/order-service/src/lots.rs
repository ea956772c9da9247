//! Redis calls in lots: a call that waits while another runs goes with the others waiting in
//! the next one. One task takes every request waiting when it is free, groups them by activity
//! (each activity's keys share one hash tag, one cluster slot), sends one script call per
//! activity, answers each request with its own result, and takes the next lot. With one
//! request in flight the lot is that one and nothing waits longer than a call of its own
//! (group commit, no timer). The buy path's reservations (`reserver`) and acknowledgements
//! (`acker`) go this way.
//!
//! Hand-written because no crate groups by key and answers each caller: a channel and a loop.
//! Measured by `cargo xtask bench` (docs/performance.md, "Where an accepted order's CPU goes").

use std::collections::BTreeMap;
use std::future::Future;

use flash_sale_common::domain::ActivityId;
use flash_sale_common::redis::RedisFailure;
use tokio::sync::{mpsc, oneshot};

/// The most requests in one Redis call: a bound on the script's run time (Redis runs nothing
/// else meanwhile) and on its argument list.
const MAX_LOT: usize = 256;

/// One kind of call made in lots.
pub trait LotCall: Send + Sync + 'static {
    type Item: Send + 'static;
    type Reply: Send + 'static;
    /// The histogram of lot sizes.
    const METRIC: &'static str;

    /// One call for the lot of one activity; one reply per item, in order.
    fn call(
        &self,
        activity: ActivityId,
        lot: &[Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Reply>, RedisFailure>> + Send;
}

/// One request on its way.
struct Waiting<C: LotCall> {
    activity: ActivityId,
    item: C::Item,
    reply: oneshot::Sender<Result<C::Reply, RedisFailure>>,
}

/// The handle requests go through; cloning shares the task.
pub struct Lots<C: LotCall> {
    queue: mpsc::UnboundedSender<Waiting<C>>,
}

impl<C: LotCall> Clone for Lots<C> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<C: LotCall> Lots<C> {
    /// Starts the task, which ends when the last handle is dropped.
    pub fn start(call: C) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run(call, waiting));
        Self { queue }
    }

    /// Sends `item` with the next lot of `activity` and waits for its own reply.
    pub async fn send(
        &self,
        activity: ActivityId,
        item: C::Item,
    ) -> Result<C::Reply, RedisFailure> {
        let (reply, answer) = oneshot::channel();
        // Only a task that is gone drops its end: the runtime is stopping.
        let gone = || RedisFailure::Protocol(format!("the task of {} has stopped", C::METRIC));
        self.queue
            .send(Waiting {
                activity,
                item,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run<C: LotCall>(call: C, mut waiting: mpsc::UnboundedReceiver<Waiting<C>>) {
    let mut lot = Vec::with_capacity(MAX_LOT);
    while waiting.recv_many(&mut lot, MAX_LOT).await > 0 {
        let mut by_activity: BTreeMap<ActivityId, (Vec<C::Item>, Vec<_>)> = BTreeMap::new();
        for request in lot.drain(..) {
            let (items, replies) = by_activity.entry(request.activity).or_default();
            items.push(request.item);
            replies.push(request.reply);
        }
        for (activity, (items, replies)) in by_activity {
            metrics::histogram!(C::METRIC).record(items.len() as f64);
            match call.call(activity, &items).await {
                Ok(answers) if answers.len() == replies.len() => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Ok(answers) => {
                    let error = format!("{} answers for {} requests", answers.len(), items.len());
                    for reply in replies {
                        let _ = reply.send(Err(RedisFailure::Protocol(error.clone())));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(copy(&error)));
                    }
                }
            }
        }
    }
}

/// A failure told to every request of a lot (`RedisError` is not `Clone`).
fn copy(error: &RedisFailure) -> RedisFailure {
    match error {
        RedisFailure::Busy => RedisFailure::Busy,
        RedisFailure::Timeout => RedisFailure::Timeout,
        other => RedisFailure::Protocol(other.to_string()),
    }
}
