//! Building blocks shared by the flash-sale services.
//!
//! Layout:
//! - [`api`]: the contract on the wire: route paths, headers, error codes read back.
//! - [`configuration`]: typed settings, loaded defaults -> TOML file -> `FLASH_SALE_*` env.
//! - [`telemetry`]: tracing, the Prometheus recorder, process and tokio runtime gauges.
//! - [`error`]: the one table of error codes and the JSON error shape every service answers with.
//! - [`domain`]: parsed ids, quantities and order numbers; handlers never see raw input.
//! - [`json`]: the one parser of JSON object bodies (no key twice).
//! - [`http`]: the layers every app router gets (request id, tracing, metrics, limits).
//! - [`payment`]: how a payment provider signs its callbacks, and how they are checked.
//! - [`management`]: `/health/live`, `/health/ready` and `/metrics` on the management port.
//! - [`redis`]: the per-activity key layout and the Lua scripts of the buy path.
//! - [`db`]: the MySQL pool and the embedded migrations.
//! - [`shutdown`]: the signal that starts a graceful drain.
//! - [`supervisor`]: named tasks, one shutdown token, the drain in declared steps.

pub mod api;
pub mod configuration;
pub mod db;
pub mod domain;
pub mod error;
pub mod http;
pub mod json;
pub mod management;
pub mod payment;
pub mod redis;
pub mod shutdown;
pub mod supervisor;
pub mod telemetry;
