//! The admin API, all behind a bearer token (`inventory.admin_token`).

mod activities;
mod auth;

use axum::Router;
use axum::routing::{get, post};

use crate::startup::AppState;

pub use activities::{ActivityView, CreateActivityRequest, RedisView, RestockRequest, WarmupView};

pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.body_limit_bytes;
    let routes = Router::new()
        .route(
            "/api/inventory/activities",
            post(activities::create_activity).get(activities::list_activities),
        )
        .route(
            "/api/inventory/activities/{id}",
            get(activities::get_activity),
        )
        .route(
            "/api/inventory/activities/{id}/warmup",
            post(activities::warm_up_activity),
        )
        .route(
            "/api/inventory/activities/{id}/restock",
            post(activities::restock_activity),
        )
        .route("/api/inventory/warmup", post(activities::warm_up_all))
        .route("/api/inventory/reconcile", post(activities::reconcile_now))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ))
        .with_state(state);
    flash_sale_common::http::with_common_layers(routes, body_limit)
}
