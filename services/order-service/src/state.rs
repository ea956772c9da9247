//! The state every handler shares; cheap to clone.

use std::sync::Arc;

use flash_sale_common::redis::Redis;
use sqlx::MySqlPool;

use crate::acker::Acker;
use crate::configuration::{OrderSettings, PaymentSettings};
use crate::fence::Unverified;
use crate::publisher::Publisher;
use crate::reserver::Reserver;
use crate::sold_out::SoldOut;

#[derive(Clone)]
pub struct AppState {
    pub redis: Redis,
    /// Reserves in groups (`reserver`).
    pub reserver: Reserver,
    /// Acknowledges reservations after their publish, in groups (`acker`).
    pub acker: Acker,
    pub db: MySqlPool,
    pub publisher: Publisher,
    pub sold_out: Arc<SoldOut>,
    /// Activities whose Redis counters must be rebuilt before they sell again (`fence`).
    pub unverified: Arc<Unverified>,
    pub settings: Arc<OrderSettings>,
    pub payment: Arc<PaymentSettings>,
}
