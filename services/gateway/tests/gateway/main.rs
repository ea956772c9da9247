//! The gateway's tests, in one binary: rule behaviour on a paused clock (`flow_rules`), the rule
//! file (`reload`), the router in process (`router`), the running gateway in front of small
//! upstream apps (`proxy`), and the settings (`configuration`). None starts an outside server:
//! the cluster bucket on a real Redis is tested in `flash-sale-tests`
//! (tests/integration/tests/gateway_cluster.rs), whose stack starts one.

mod configuration;
mod flow_rules;
mod helpers;
mod keys;
mod proxy;
mod reload;
mod router;
