//! The management listener: the common `/health/live`, `/health/ready` and `/metrics`, plus
//! `GET /flow`, the flow state of this replica as JSON (the rules in force, circuit states,
//! the cluster bucket's mode, the system estimate, the activities answered as sold out):
//! what Sentinel's dashboard shows for one machine. `GET /waiting-room/{activity}` shows a
//! waiting room, `POST /waiting-room/{activity}/{pause|resume|queue-all}` sets its mode for
//! every replica (the listener is the cluster's inside: no ingress routes to it).

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::Path;
use axum::extract::State;
use axum::routing::{get, post};
use flash_sale_common::domain::ActivityId;
use flash_sale_common::error::{ApiError, ErrorCode, Json};
use flash_sale_common::management::{self, Readiness};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::time::Instant;

use crate::admission::{Mode, Room};
use crate::resource::{Downstream, RouteId};
use crate::rules::Rules;
use crate::state::AppState;

pub fn router(state: AppState, readiness: Readiness, metrics: PrometheusHandle) -> Router {
    management::router(readiness, metrics).merge(
        Router::new()
            .route("/flow", get(flow_view))
            .route("/waiting-room/{activity}", get(room_view))
            .route("/waiting-room/{activity}/{action}", post(room_mode))
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

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomView {
    pub activity_id: i64,
    /// The rule in force, if the activity has a room.
    pub rule: Option<crate::rules::WaitingRoomRule>,
    pub mode: Mode,
    pub waiting: u64,
    /// Admitted buyers whose pass is neither spent nor lapsed.
    pub outstanding: u64,
    pub stock_left: i64,
    pub opens_at: u64,
    pub now: u64,
}

async fn room_view(
    State(state): State<AppState>,
    Path(activity): Path<String>,
) -> Result<Json<RoomView>, ApiError> {
    let activity = activity_of(&activity)?;
    let redis = state.flow.cluster().redis().ok_or_else(no_redis)?;
    let rules = state.flow.rules().current();
    let rule = rules.rules().waiting_room(activity.get()).cloned();
    // Looking does not advance the queue (no rate given): the view changes nothing.
    let info = Room::new(redis, activity)
        .info(None, &rules.rules().admission)
        .await
        .map_err(|e| ApiError::unavailable("Redis", e))?
        .ok_or_else(|| ApiError::new(ErrorCode::ActivityNotFound, "no such activity"))?;
    Ok(Json(RoomView {
        activity_id: activity.get(),
        rule,
        mode: info.mode,
        waiting: info.waiting,
        outstanding: info.outstanding,
        stock_left: info.stock,
        opens_at: info.opens_ms,
        now: info.now_ms,
    }))
}

async fn room_mode(
    State(state): State<AppState>,
    Path((activity, action)): Path<(String, String)>,
) -> Result<Json<RoomView>, ApiError> {
    let id = activity_of(&activity)?;
    let mode = Mode::parse(&action).ok_or_else(|| {
        ApiError::invalid(format!(
            "unknown action `{action}`: expected pause, resume or queue-all"
        ))
    })?;
    let redis = state.flow.cluster().redis().ok_or_else(no_redis)?;
    // An activity that is not warmed up has no room to set: refused, nothing written.
    let rules = state.flow.rules().current();
    Room::new(redis, id)
        .info(None, &rules.rules().admission)
        .await
        .map_err(|e| ApiError::unavailable("Redis", e))?
        .ok_or_else(|| ApiError::new(ErrorCode::ActivityNotFound, "no such activity"))?;
    Room::new(redis, id)
        .set_mode(mode)
        .await
        .map_err(|e| ApiError::unavailable("Redis", e))?;
    tracing::info!(
        activity = id.get(),
        mode = mode.as_str(),
        "waiting room mode set"
    );
    room_view(State(state), Path(activity)).await
}

fn activity_of(raw: &str) -> Result<ActivityId, ApiError> {
    ActivityId::parse(Some(&serde_json::Value::String(raw.to_owned())))
}

fn no_redis() -> ApiError {
    ApiError::new(ErrorCode::ServiceUnavailable, "Redis is not connected yet").retry_after(1)
}
