//! The order API.

mod create_order;
mod get_order;

use axum::Router;
use axum::routing::{get, post};
use flash_sale_common::api;

use crate::state::AppState;

pub use create_order::OrderAccepted;
pub use flash_sale_common::api::order::CreateOrderRequest;
pub use get_order::OrderView;

/// The app router, without binding: tests drive it with `oneshot`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.body_limit_bytes;
    let routes = Router::new()
        .route(api::order::CREATE, post(create_order::create_order))
        .route(api::order::ONE, get(get_order::get_order))
        .with_state(state);
    flash_sale_common::http::with_common_layers(routes, body_limit)
}
