//! order-service: the buy path of the flash sale.
//!
//! ```text
//! POST /api/flash-sale/order/create
//!   -> sold-out short circuit (this pod already knows)       routes/create_order.rs, sold_out.rs
//!   -> one Lua call per lot: window, dedupe, stock, reservation  reserver.rs, lots.rs
//!   -> publish to Kafka in lots, wait for the broker's ack    publisher.rs
//!   -> mark the reservation acknowledged, in lots             acker.rs
//!   -> 202 PENDING   (a failed publish undoes the reservation and answers 503)
//! consumer: batches -> claim in Redis -> one MySQL transaction -> settle -> commit offsets
//!                                                             consumer.rs
//! GET /api/flash-sale/order/{orderNo}: PENDING while Redis holds the reservation, then the
//!   MySQL state: CREATED (awaiting payment) -> PAID | CANCELLED | EXPIRED   lifecycle.rs
//! POST .../order/{orderNo}/cancel, GET /api/flash-sale/orders          routes/
//! POST /api/flash-sale/payment/callback (HMAC-signed by the provider)  routes/payment_callback.rs
//! sweeper: expires unpaid orders, applies stock returns to Redis       sweeper.rs
//! ```
//!
//! Layout: `configuration` (settings), `startup` (binding, tasks, drain), `routes` (handlers),
//! `lots` (with `reserver` and `acker`), `publisher`, `consumer`, `lifecycle`, `sweeper`,
//! `sold_out`, `state`.

pub mod acker;
pub mod configuration;
pub mod consumer;
pub mod fence;
pub mod lifecycle;
pub mod lots;
pub mod publisher;
pub mod reserver;
pub mod routes;
pub mod sold_out;
pub mod startup;
pub mod state;
pub mod sweeper;

pub use configuration::Settings;
pub use startup::Application;
