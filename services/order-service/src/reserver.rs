//! Reserving in lots (`lots`): the reservations asked for while one reserve call runs go to
//! Redis together, one `reserve` call per activity, each buyer getting the outcome of their
//! own order. The script takes the lot in the order it came and is atomic, so the lot sells no
//! more than the stock, and a buyer twice in one lot is refused the second time, as with one
//! call each.

use flash_sale_common::domain::{ActivityId, OrderNo, Quantity, UserId};
use flash_sale_common::redis::{Redis, RedisFailure, ReserveOutcome};

use crate::lots::{LotCall, Lots};

/// The handle the buy path reserves through; cloning shares the task.
#[derive(Clone)]
pub struct Reserver(Lots<Reserves>);

impl Reserver {
    /// Starts the task, which ends when the last handle is dropped.
    pub fn start(redis: Redis) -> Self {
        Self(Lots::start(Reserves(redis)))
    }

    /// Reserves `quantity` for `user` under `order_no` (of `activity`), with the other
    /// reservations waiting.
    pub async fn reserve(
        &self,
        activity: ActivityId,
        user: UserId,
        quantity: Quantity,
        order_no: &OrderNo,
    ) -> Result<ReserveOutcome, RedisFailure> {
        self.0
            .send(activity, (user, quantity, order_no.clone()))
            .await
    }
}

struct Reserves(Redis);

impl LotCall for Reserves {
    type Item = (UserId, Quantity, OrderNo);
    type Reply = ReserveOutcome;
    const METRIC: &'static str = "flash_sale_reserve_lot_size";

    async fn call(
        &self,
        activity: ActivityId,
        lot: &[Self::Item],
    ) -> Result<Vec<ReserveOutcome>, RedisFailure> {
        self.0.reserve_lot(activity, lot).await
    }
}
