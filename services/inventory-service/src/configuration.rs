//! inventory-service settings.

use flash_sale_common::configuration::{
    DatabaseSettings, ListenerSettings, RedisSettings, Secret, TelemetrySettings,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The admin API's listener (seed: 8084).
    pub server: ListenerSettings,
    /// `/health/*` and `/metrics` (seed: 8085).
    pub management: ListenerSettings,
    pub redis: RedisSettings,
    pub database: DatabaseSettings,
    pub inventory: InventorySettings,
    pub telemetry: TelemetrySettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ListenerSettings::new(8084),
            management: ListenerSettings::new(8085),
            redis: RedisSettings::default(),
            database: DatabaseSettings::default(),
            inventory: InventorySettings::default(),
            telemetry: TelemetrySettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InventorySettings {
    /// Bearer token of the admin API. Empty: the admin API refuses every call.
    pub admin_token: Secret,
    /// Scheduled warm-up of every current activity (the seed: every 5 minutes); 0 turns it off.
    pub warmup_interval_secs: u64,
    /// Scheduled reconciliation (the seed: every minute); 0 turns it off.
    pub reconcile_interval_secs: u64,
    /// A reservation with no order after this long, never acknowledged by the broker, is
    /// released. Must exceed the producer's `message_timeout_ms` by a wide margin.
    pub reservation_deadline_secs: u64,
    /// Redis-vs-MySQL drift is repaired once the same drift was seen this many passes in a row
    /// (a moving drift is an in-flight batch, not a fault).
    pub drift_repair_after: u32,
    /// How long tombstones of released reservations are kept (longer than the topic's retention).
    pub tombstone_ttl_secs: u64,
    /// Largest request body accepted, in bytes.
    pub body_limit_bytes: usize,
}

impl Default for InventorySettings {
    fn default() -> Self {
        Self {
            admin_token: Secret::default(),
            warmup_interval_secs: 300,
            reconcile_interval_secs: 60,
            reservation_deadline_secs: 60,
            drift_repair_after: 3,
            tombstone_ttl_secs: 7 * 24 * 3600,
            body_limit_bytes: 16 * 1024,
        }
    }
}
