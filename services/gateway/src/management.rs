//! The management listener: the common `/health/live`, `/health/ready` and `/metrics`, plus
//! `GET /flow`, the flow state of this replica as JSON (the rules in force, circuit states,
//! the cluster bucket's mode, the system estimate, the activities answered as sold out):
//! what Sentinel's dashboard shows for one machine.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use flash_sale_common::error::Json;
use flash_sale_common::management::{self, Readiness};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::time::Instant;

use crate::resource::{Downstream, RouteId};
use crate::rules::Rules;
use crate::state::AppState;

pub fn router(state: AppState, readiness: Readiness, metrics: PrometheusHandle) -> Router {
    management::router(readiness, metrics).merge(
        Router::new()
            .route("/flow", get(flow_view))
            .with_state(state),
    )
}

#[derive(Debug, Serialize)]
pub struct FlowView {
    pub rules: Rules,
    /// `closed`, `open` or `half-open` per downstream with breakers.
    pub circuits: BTreeMap<&'static str, &'static str>,
    pub cluster: ClusterView,
    pub system: SystemView,
    /// In flight per route.
    pub in_flight: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub connected: bool,
    pub fallback: bool,
    pub replicas: usize,
    /// Tokens this replica holds from the shared bucket, per route with a cluster rule.
    pub leased: BTreeMap<&'static str, u32>,
}

#[derive(Debug, Serialize)]
pub struct SystemView {
    pub in_flight: u64,
    pub cpu: f64,
    /// The BBR estimate of what the pipe holds (None until measured).
    pub capacity: Option<f64>,
}

async fn flow_view(State(state): State<AppState>) -> Json<FlowView> {
    let flow = &state.flow;
    let rules = flow.rules().current();
    let circuits = Downstream::ALL
        .into_iter()
        .filter_map(|d| rules.breakers(d).map(|b| (d.as_str(), b.state().as_str())))
        .collect();
    let in_flight = RouteId::ALL
        .into_iter()
        .map(|r| (r.as_str(), flow.resources().route(r).in_flight()))
        .collect();
    Json(FlowView {
        rules: rules.rules().clone(),
        circuits,
        cluster: ClusterView {
            connected: flow.cluster().is_connected(),
            fallback: flow.cluster().is_in_fallback(),
            replicas: flow.cluster().replicas(),
            leased: RouteId::ALL
                .into_iter()
                .filter(|r| rules.cluster(*r).is_some())
                .map(|r| (r.as_str(), flow.cluster().leased(r)))
                .collect(),
        },
        system: SystemView {
            in_flight: flow.system().in_flight(),
            cpu: flow.system().cpu(),
            capacity: flow
                .system()
                .estimated_capacity(rules.system(), Instant::now()),
        },
        in_flight,
    })
}
