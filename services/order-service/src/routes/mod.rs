//! The order API.

mod create_order;
mod get_order;

use axum::Router;
use axum::routing::{get, post};

use crate::state::AppState;

pub use create_order::{CreateOrderRequest, OrderAccepted};
pub use get_order::OrderView;

/// Header by which the gateway passes the authenticated user; it wins over the body's userId.
pub const USER_HEADER: &str = "x-user-id";

/// The app router, without binding: tests drive it with `oneshot`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.body_limit_bytes;
    let routes = Router::new()
        .route(
            "/api/flash-sale/order/create",
            post(create_order::create_order),
        )
        .route(
            "/api/flash-sale/order/{order_no}",
            get(get_order::get_order),
        )
        .with_state(state);
    flash_sale_common::http::with_common_layers(routes, body_limit)
}
