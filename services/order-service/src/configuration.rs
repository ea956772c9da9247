//! order-service settings.

use flash_sale_common::configuration::Secret;
use flash_sale_common::configuration::{
    DatabaseSettings, KafkaSettings, ListenerSettings, RedisSettings, TelemetrySettings,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The buy path's listener (seed: 8082).
    pub server: ListenerSettings,
    /// `/health/*` and `/metrics` (seed: 8083).
    pub management: ListenerSettings,
    pub redis: RedisSettings,
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub order: OrderSettings,
    pub consumer: ConsumerSettings,
    pub lifecycle: LifecycleSettings,
    pub payment: PaymentSettings,
    pub telemetry: TelemetrySettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ListenerSettings::new(8082),
            management: ListenerSettings::new(8083),
            redis: RedisSettings::default(),
            database: DatabaseSettings::default(),
            kafka: KafkaSettings::default(),
            order: OrderSettings::default(),
            consumer: ConsumerSettings::default(),
            lifecycle: LifecycleSettings::default(),
            payment: PaymentSettings::default(),
            telemetry: TelemetrySettings::default(),
        }
    }
}

/// The buy path's rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderSettings {
    /// Largest quantity one order may buy.
    pub max_quantity: u32,
    /// How long this pod answers SOLD_OUT for an activity without asking Redis, once Redis said
    /// it has no stock left. Short, so stock given back by a release or a restock sells again.
    pub sold_out_ttl_ms: u64,
    /// Accept the literal `"{random}"` as userId and draw a random id: the seed's `hey` command
    /// sends it verbatim. Harmless behind the gateway, which replaces userId with the token's.
    pub random_user_placeholder: bool,
    /// Largest request body accepted, in bytes.
    pub body_limit_bytes: usize,
}

impl Default for OrderSettings {
    fn default() -> Self {
        Self {
            max_quantity: 5,
            sold_out_ttl_ms: 1000,
            random_user_placeholder: true,
            body_limit_bytes: 4096,
        }
    }
}

/// The order consumer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerSettings {
    /// Run the consumer in this process (every pod joins the group; off for a pure API pod).
    pub enabled: bool,
    /// Most orders written to MySQL in one transaction.
    pub batch_size: usize,
    /// How long to wait for a batch to fill once its first message arrived.
    pub batch_linger_ms: u64,
    /// Pause before retrying a batch whose MySQL or Redis step failed (offsets stay put).
    pub retry_backoff_ms: u64,
    /// Partitions of the order topic when this service creates it (it does if it is missing).
    pub topic_partitions: i32,
    /// Replication factor when this service creates the topic (3 on a 3-broker Redpanda).
    pub topic_replication: i32,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: 500,
            batch_linger_ms: 20,
            retry_backoff_ms: 500,
            topic_partitions: 6,
            topic_replication: 1,
        }
    }
}

/// After `CREATED`: the sweeper that expires unpaid orders and returns their stock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LifecycleSettings {
    /// Run the sweeper in this pod (several pods share the work).
    pub enabled: bool,
    /// Pause between passes. An unpaid order expires at most this long after its deadline.
    pub sweep_interval_ms: u64,
    /// Most orders expired in one transaction.
    pub sweep_batch: u32,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            sweep_interval_ms: 1000,
            sweep_batch: 200,
        }
    }
}

/// The payment provider's callback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentSettings {
    /// The HMAC-SHA256 key shared with the provider. Empty: every callback is refused.
    pub callback_secret: Secret,
    /// How far a callback's timestamp may be from now, either way.
    pub replay_window_secs: i64,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        Self {
            callback_secret: Secret::default(),
            replay_window_secs: 300,
        }
    }
}
