//! The order API.

mod cancel_order;
mod create_order;
mod get_order;
mod payment_callback;

use axum::Router;
use axum::routing::{get, post};
use flash_sale_common::api;

use crate::state::AppState;

pub use create_order::OrderAccepted;
pub use flash_sale_common::api::order::CreateOrderRequest;
pub use get_order::{OrderList, OrderView};

/// The app router, without binding: tests drive it with `oneshot`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.body_limit_bytes;
    let routes = Router::new()
        .route(api::order::CREATE, post(create_order::create_order))
        .route(api::order::ONE, get(get_order::get_order))
        .route(api::order::CANCEL, post(cancel_order::cancel_order))
        .route(api::order::MINE, get(get_order::my_orders))
        .route(
            api::order::PAYMENT_CALLBACK,
            post(payment_callback::payment_callback),
        )
        .with_state(state);
    flash_sale_common::http::with_common_layers(routes, body_limit)
}
