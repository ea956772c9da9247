//! The admin API, all behind a bearer token (`inventory.admin_token`).

mod activities;
mod auth;

use axum::Router;
use axum::routing::{get, post};
use flash_sale_common::api::inventory;

use crate::state::AppState;

pub use activities::{ActivityView, CreateActivityRequest, RedisView, RestockRequest, WarmupView};

pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.body_limit_bytes;
    let routes = Router::new()
        .route(
            inventory::ACTIVITIES,
            post(activities::create_activity).get(activities::list_activities),
        )
        .route(inventory::ACTIVITY, get(activities::get_activity))
        .route(inventory::WARMUP_ONE, post(activities::warm_up_activity))
        .route(inventory::RESTOCK, post(activities::restock_activity))
        .route(inventory::WARMUP_ALL, post(activities::warm_up_all))
        .route(inventory::RECONCILE, post(activities::reconcile_now))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ))
        .with_state(state);
    flash_sale_common::http::with_common_layers(routes, body_limit)
}
