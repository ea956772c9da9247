//! Acknowledging reservations in groups: after the broker has an order, its reservation moves
//! from `R` to `A` in Redis, and the buyer hears yes only then. The acknowledgements of orders
//! published at about the same time go to Redis in one `transition` call per activity: one
//! task takes every acknowledgement waiting when it is free, sends them, answers each, and
//! takes the next lot. Under load, librdkafka completes a whole produce batch's deliveries at
//! once, so their acknowledgements wait together; with one order in flight, the lot is that one
//! order and nothing waits longer than before (group commit, no timer).
//!
//! Hand-written because no crate groups by key and answers each caller: a channel and a loop.
//! Measured by `cargo xtask bench` (docs/performance.md, "Where an accepted order's CPU goes").

use std::collections::BTreeMap;

use flash_sale_common::domain::{ActivityId, OrderNo};
use flash_sale_common::redis::{Redis, RedisFailure, ReservationState};
use tokio::sync::{mpsc, oneshot};

/// The most acknowledgements in one Redis call: a bound on the script's run time (Redis runs
/// nothing else meanwhile) and on its argument list.
const MAX_LOT: usize = 256;

/// One acknowledgement on its way: the reply is `transition`'s code for this order.
struct Waiting {
    order_no: OrderNo,
    reply: oneshot::Sender<Result<i64, RedisFailure>>,
}

/// The handle the buy path acknowledges through; cloning shares the task.
#[derive(Clone)]
pub struct Acker {
    queue: mpsc::UnboundedSender<Waiting>,
}

impl Acker {
    /// Starts the task, which ends when the last handle is dropped.
    pub fn start(redis: Redis) -> Self {
        let (queue, lots) = mpsc::unbounded_channel();
        tokio::spawn(run(redis, lots));
        Self { queue }
    }

    /// Moves the reservation of `order_no` (of the activity its number names) from `R` to `A`; `transition`'s code for it (1 moved,
    /// 0 no reservation, -1 other state, -2 released).
    pub async fn ack(&self, order_no: &OrderNo) -> Result<i64, RedisFailure> {
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            order_no: order_no.clone(),
            reply,
        };
        // Only a task that is gone drops its end: the runtime is stopping.
        let gone = || RedisFailure::Protocol("the acknowledging task has stopped".into());
        self.queue.send(waiting).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(redis: Redis, mut lots: mpsc::UnboundedReceiver<Waiting>) {
    let mut lot = Vec::with_capacity(MAX_LOT);
    while lots.recv_many(&mut lot, MAX_LOT).await > 0 {
        let mut by_activity: BTreeMap<ActivityId, Vec<Waiting>> = BTreeMap::new();
        for waiting in lot.drain(..) {
            by_activity
                .entry(waiting.order_no.activity())
                .or_default()
                .push(waiting);
        }
        // One call per activity: each activity's keys share one hash tag (one cluster slot).
        for (activity, group) in by_activity {
            let order_nos: Vec<&OrderNo> = group.iter().map(|w| &w.order_no).collect();
            let result = redis
                .transition(
                    activity,
                    &order_nos,
                    &[ReservationState::Reserved],
                    ReservationState::Acked,
                )
                .await;
            metrics::histogram!("flash_sale_ack_lot_size").record(group.len() as f64);
            match result {
                Ok(codes) if codes.len() == group.len() => {
                    for (waiting, code) in group.into_iter().zip(codes) {
                        let _ = waiting.reply.send(Ok(code));
                    }
                }
                Ok(codes) => {
                    let error = format!("{} codes for {} orders", codes.len(), group.len());
                    for waiting in group {
                        let _ = waiting
                            .reply
                            .send(Err(RedisFailure::Protocol(error.clone())));
                    }
                }
                Err(error) => {
                    for waiting in group {
                        let _ = waiting.reply.send(Err(copy(&error)));
                    }
                }
            }
        }
    }
}

/// A failure told to every order of a lot (`RedisError` is not `Clone`).
fn copy(error: &RedisFailure) -> RedisFailure {
    match error {
        RedisFailure::Busy => RedisFailure::Busy,
        RedisFailure::Timeout => RedisFailure::Timeout,
        other => RedisFailure::Protocol(other.to_string()),
    }
}
