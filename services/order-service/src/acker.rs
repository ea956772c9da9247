//! Acknowledging reservations in lots (`lots`): after the broker has an order, its reservation
//! moves from `R` to `A` in Redis, and the buyer hears yes only then. Under load, the publisher
//! completes a whole lot's deliveries at once, so their acknowledgements wait together and go
//! in one `transition` call per activity.

use flash_sale_common::domain::{ActivityId, OrderNo};
use flash_sale_common::redis::{Redis, RedisFailure, ReservationState};

use crate::lots::{LotCall, Lots};

/// The handle the buy path acknowledges through; cloning shares the task.
#[derive(Clone)]
pub struct Acker(Lots<Acks>);

impl Acker {
    /// Starts the task, which ends when the last handle is dropped.
    pub fn start(redis: Redis) -> Self {
        Self(Lots::start(Acks(redis)))
    }

    /// Moves the reservation of `order_no` (of the activity its number names) from `R` to `A`;
    /// `transition`'s code for it (1 moved, 0 no reservation, -1 other state, -2 released).
    pub async fn ack(&self, order_no: &OrderNo) -> Result<i64, RedisFailure> {
        self.0.send(order_no.activity(), order_no.clone()).await
    }
}

struct Acks(Redis);

impl LotCall for Acks {
    type Item = OrderNo;
    type Reply = i64;
    const METRIC: &'static str = "flash_sale_ack_lot_size";

    async fn call(&self, activity: ActivityId, lot: &[OrderNo]) -> Result<Vec<i64>, RedisFailure> {
        let order_nos: Vec<&OrderNo> = lot.iter().collect();
        self.0
            .transition(
                activity,
                &order_nos,
                &[ReservationState::Reserved],
                ReservationState::Acked,
            )
            .await
    }
}
