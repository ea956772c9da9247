//! inventory-service: activities and their stock in MySQL, the warm-up that loads them into
//! Redis, and the reconciler that keeps the two honest.
//!
//! Layout: `configuration`, `startup` (binding, the scheduled jobs, drain), `state` (what
//! handlers and jobs share), `routes` (the admin API, bearer-token protected), `activities`
//! (MySQL access), `warmup`, `reconciler`.

pub mod activities;
pub mod configuration;
pub mod reconciler;
pub mod routes;
pub mod startup;
pub mod state;
pub mod warmup;

pub use configuration::Settings;
pub use startup::Application;
pub use state::AppState;
