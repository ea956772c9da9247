//! Test support for the flash-sale services, shared by the integration tests and `cargo xtask`.
//!
//! Layout:
//! - [`stack`]: private Redis, MariaDB and Kafka-protocol broker (nisshi) instances on free
//!   127.0.0.1 ports under a temporary directory, torn down on drop.
//! - [`admission`]: a buyer of a sale with a waiting room (join, poll, buy with the pass).
//! - [`apps`]: the services running in-process against a stack (`spawn_app`), on port 0.
//! - [`browser`]: Debian's headless Chromium, for the tests that render a page.
//! - [`payments`]: the payment simulator, a stand-in for the external provider that signs and
//!   sends payment callbacks.
//! - [`report`]: the sale's HTML report (charts in inline SVG) and the sampler of the stores.
//! - [`scenario`]: a sale driven through the public API, with the report and the invariant check
//!   of docs/design.md; the same code runs in the tests, in `cargo xtask sale` and in the NixOS VM
//!   test (`flash-sale-scenario`).
//!
//! The `flash-sale-service` binary runs one service in a process of its own, for the
//! integration tests that need its `/metrics` to itself or kill it like a pod.

pub mod admission;
pub mod apps;
pub mod browser;
pub mod payments;
pub mod prometheus;
pub mod report;
pub mod scenario;
pub mod stack;
pub mod webdriver;
