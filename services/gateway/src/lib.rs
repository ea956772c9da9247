//! gateway: the edge of the flash sale, Sentinel's job on axum and tower.
//!
//! ```text
//! request -> request id, tracing, http metrics          flash_sale_common::http
//!   -> route: /api/flash-sale/** or /api/inventory/**  routes/
//!   -> body (size limit), activity from the order body   routes/proxy.rs
//!   -> sold-out short circuit (no token check needed)     flow/sold_out.rs
//!   -> identity: JWT -> x-user-id (client's copy dropped) identity.rs
//!   -> flow: system, param, qps, concurrency, breaker, cluster   flow/
//!   -> pooled keep-alive client, per-route timeout        upstream.rs
//!   <- answer (a 409 SOLD_OUT teaches the short circuit)  routes/proxy.rs
//! rules: a TOML file polled and reloaded without restart rules/, flow/reload.rs
//! ```
//!
//! Layout: `configuration` (settings), `startup` (binding, background jobs, drain), `state`,
//! `routes` (the proxy handler), `identity`, `upstream`, `flow` (one module per rule type,
//! compilation and reload), `rules` (the schema), `resource` (route, activity and downstream names),
//! `error` (every refusal in the common JSON shape), `management` (health, metrics, `/flow`). See docs/gateway.md.

pub mod admission;
pub mod configuration;
pub mod edge;
pub mod error;
pub mod flow;
pub mod identity;
pub mod management;
pub mod resource;
pub mod routes;
pub mod rules;
pub mod startup;
pub mod state;
pub mod upstream;

pub use configuration::Settings;
pub use startup::Application;
