//! The gateway's routes: everything under `/api/flash-sale/` goes to order-service, everything
//! under `/api/inventory/` to inventory-service, through [`proxy`]; anything else is answered
//! `404 NOT_FOUND` here.

mod proxy;

use axum::Router;
use axum::routing::any;
use flash_sale_common::api;

use crate::state::AppState;

/// The app router, without binding: tests drive it with `oneshot`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.proxy.body_limit_bytes;
    let routes = Router::new()
        .route(
            &format!("{}{{*rest}}", api::order::PREFIX),
            any(proxy::to_order_service),
        )
        .route(
            &format!("{}{{*rest}}", api::inventory::PREFIX),
            any(proxy::to_inventory_service),
        )
        .with_state(state);
    flash_sale_common::http::with_common_layers(routes, body_limit)
}
