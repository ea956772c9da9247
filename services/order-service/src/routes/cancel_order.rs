//! `POST /api/flash-sale/order/{orderNo}/cancel`: the buyer cancels an order awaiting payment;
//! its stock goes back on sale and the buyer may buy again. Only one's own orders (another
//! buyer's is 404); a paid order cannot be cancelled; cancelling twice answers the same.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use flash_sale_common::domain::OrderNo;
use flash_sale_common::error::{ApiError, ErrorCode, Json};
use serde::Deserialize;
use serde_json::Value;

use super::get_order::{OrderView, buyer, not_found};
use crate::lifecycle::{self, CancelOutcome};
use crate::state::AppState;

/// The optional body: `{"userId": ...}` names the buyer in development mode.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct CancelRequest {
    user_id: Option<Value>,
}

pub(super) async fn cancel_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<OrderView>, ApiError> {
    let order_no = OrderNo::parse(&raw)?;
    let request: CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        flash_sale_common::json::parse_object(&body)?
    };
    let user = buyer(&headers, request.user_id.as_ref())?;
    let outcome = lifecycle::cancel(&state.db, &state.redis, user, &order_no)
        .await
        .map_err(|e| ApiError::unavailable("MySQL", e))?;
    match outcome {
        CancelOutcome::Cancelled(order) | CancelOutcome::AlreadyCancelled(order) => {
            Ok(Json(order.into()))
        }
        CancelOutcome::Paid => Err(ApiError::new(
            ErrorCode::OrderPaid,
            format!("order {order_no} is paid and cannot be cancelled"),
        )),
        CancelOutcome::Expired => Err(ApiError::new(
            ErrorCode::OrderExpired,
            format!("order {order_no} expired; its stock is back on sale"),
        )),
        CancelOutcome::NotFound => {
            // Still in the queue: it exists, but there is nothing to cancel in MySQL yet.
            match state.redis.reservation(&order_no).await {
                Ok(Some(r)) if r.user == user => Err(ApiError::new(
                    ErrorCode::OrderPending,
                    format!("order {order_no} is still being created; retry in a moment"),
                )
                .retry_after(1)),
                _ => Err(not_found(&order_no)),
            }
        }
    }
}
