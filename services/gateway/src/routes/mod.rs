//! The gateway's routes: everything under `/api/flash-sale/` goes to order-service, everything
//! under `/api/inventory/` to inventory-service, through [`proxy`]; `/api/admission/{activity}`
//! (the waiting room and purchase passes) and `/shop` (the buyer's page) are answered here, by
//! [`admission`]; anything else is answered `404 NOT_FOUND`.

pub mod admission;
mod proxy;

use axum::Router;
use axum::routing::{any, get};
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
        .route(
            "/api/admission/{activity}",
            get(admission::poll).post(admission::join),
        )
        .route("/shop", get(admission::page))
        .with_state(state);
    flash_sale_common::http::with_common_layers(routes, body_limit)
}
