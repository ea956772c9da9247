//! `GET /api/flash-sale/order/{orderNo}`: PENDING while Redis holds the reservation, CREATED once
//! the order is in MySQL.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use chrono::{DateTime, NaiveDateTime, Utc};
use flash_sale_common::domain::{OrderNo, UserId};
use flash_sale_common::error::{ApiError, ErrorCode, Json};
use serde::{Deserialize, Serialize};

use crate::state::AppState;
use flash_sale_common::api::USER_HEADER;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_no: String,
    pub activity_id: String,
    pub user_id: String,
    pub quantity: u32,
    /// `PENDING` (reserved, on its way to MySQL) or `CREATED` (in MySQL).
    pub status: String,
    pub reserved_at: Option<DateTime<Utc>>,
    pub created_at: Option<DateTime<Utc>>,
}

pub(super) async fn get_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let order_no = OrderNo::parse(&raw)?;
    // Redis first: an order leaves Redis only after it is committed to MySQL, so this order of
    // lookups never misses an order that moves between the two.
    let view = match state.redis.reservation(&order_no).await {
        Ok(Some(r)) => Some(OrderView {
            order_no: order_no.to_string(),
            activity_id: order_no.activity().to_string(),
            user_id: r.user.to_string(),
            quantity: r.quantity.get(),
            status: "PENDING".into(),
            reserved_at: DateTime::from_timestamp_millis(r.reserved_ms),
            created_at: None,
        }),
        Ok(None) => None,
        Err(error) => return Err(ApiError::unavailable("Redis", error)),
    };
    let view = match view {
        Some(view) => view,
        None => from_mysql(&state, &order_no).await?,
    };
    // Behind the gateway, a buyer sees only their own orders.
    if let Some(user) = headers.get(USER_HEADER).and_then(|v| v.to_str().ok())
        && user.parse::<UserId>().ok().map(|u| u.to_string()) != Some(view.user_id.clone())
    {
        return Err(not_found(&order_no));
    }
    Ok(Json(view))
}

/// user_id, activity_id, quantity, reserved_at, create_time
type OrderRow = (i64, i64, i32, Option<NaiveDateTime>, Option<NaiveDateTime>);

async fn from_mysql(state: &AppState, order_no: &OrderNo) -> Result<OrderView, ApiError> {
    let row: Option<OrderRow> = sqlx::query_as(
        "SELECT user_id, activity_id, quantity, reserved_at, create_time FROM orders WHERE order_no = ?",
    )
    .bind(order_no.as_str())
    .fetch_optional(&state.db)
    .await
    .map_err(|e| ApiError::unavailable("MySQL", e))?;
    let (user, activity, quantity, reserved_at, created_at) =
        row.ok_or_else(|| not_found(order_no))?;
    Ok(OrderView {
        order_no: order_no.to_string(),
        activity_id: activity.to_string(),
        user_id: user.to_string(),
        quantity: u32::try_from(quantity).unwrap_or_default(),
        status: "CREATED".into(),
        reserved_at: reserved_at.map(|t| t.and_utc()),
        created_at: created_at.map(|t| t.and_utc()),
    })
}

fn not_found(order_no: &OrderNo) -> ApiError {
    ApiError::new(ErrorCode::OrderNotFound, format!("no order {order_no}"))
}
