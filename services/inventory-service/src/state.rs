//! The state every handler and job shares.

use std::sync::Arc;

use flash_sale_common::redis::Redis;
use sqlx::MySqlPool;
use tokio::sync::Mutex;

use crate::configuration::InventorySettings;
use crate::reconciler::DriftTracker;

/// The state every handler and job shares; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: MySqlPool,
    pub redis: Redis,
    pub settings: Arc<InventorySettings>,
    /// The reconciler's memory, shared by the schedule and the on-demand endpoint.
    pub drift: Arc<Mutex<DriftTracker>>,
}
