//! The gateway's tests, in one binary: rule behaviour on a paused clock (`flow_rules`), the rule
//! file (`reload`), the router in process (`router`), the running gateway in front of small
//! upstream apps (`proxy`), and the cluster bucket on a private redis-server (`cluster`).

mod cluster;
mod configuration;
mod flow_rules;
mod helpers;
mod keys;
mod proxy;
mod reload;
mod router;
