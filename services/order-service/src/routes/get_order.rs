//! `GET /api/flash-sale/order/{orderNo}`: PENDING while Redis holds the reservation, then the
//! state in MySQL (CREATED awaiting payment, PAID, CANCELLED, EXPIRED) with its deadline.
//! `GET /api/flash-sale/orders`: the buyer's own orders in MySQL, newest first.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use flash_sale_common::domain::{OrderNo, OrderStatus, UserId};
use flash_sale_common::error::{ApiError, ErrorCode, Json};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::lifecycle::{self, Order};
use crate::state::AppState;
use flash_sale_common::api::USER_HEADER;

/// Most orders one listing returns.
const LIST_LIMIT: u32 = 100;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_no: String,
    pub activity_id: String,
    pub user_id: String,
    pub quantity: u32,
    pub status: OrderStatus,
    /// What the buyer owes, in the currency's smallest unit (`null` while PENDING).
    pub amount_cents: Option<i64>,
    pub reserved_at: Option<DateTime<Utc>>,
    pub created_at: Option<DateTime<Utc>>,
    /// Pay by then, or the order expires and its stock goes back on sale.
    pub pay_deadline: Option<DateTime<Utc>>,
    pub paid_at: Option<DateTime<Utc>>,
    /// When it was cancelled or expired.
    pub closed_at: Option<DateTime<Utc>>,
}

impl From<Order> for OrderView {
    fn from(o: Order) -> Self {
        Self {
            activity_id: o.order_no.activity().to_string(),
            order_no: o.order_no.to_string(),
            user_id: o.user.to_string(),
            quantity: o.quantity.get(),
            status: o.status,
            amount_cents: Some(o.amount_cents),
            reserved_at: o.reserved_at,
            created_at: o.created_at,
            pay_deadline: o.pay_deadline,
            paid_at: o.paid_at,
            closed_at: o.closed_at,
        }
    }
}

/// The buyer a request acts for: the gateway's `x-user-id` (from a verified token) wins; without
/// it (development mode, or a direct call) the `userId` the client gave.
pub(super) fn buyer(headers: &HeaderMap, given: Option<&Value>) -> Result<UserId, ApiError> {
    match headers.get(USER_HEADER) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<UserId>().ok())
            .ok_or_else(|| ApiError::invalid("x-user-id must be a positive integer")),
        None => UserId::parse(given),
    }
}

pub(super) fn not_found(order_no: &OrderNo) -> ApiError {
    ApiError::new(ErrorCode::OrderNotFound, format!("no order {order_no}"))
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
            status: OrderStatus::Pending,
            amount_cents: None,
            reserved_at: DateTime::from_timestamp_millis(r.reserved_ms),
            created_at: None,
            pay_deadline: None,
            paid_at: None,
            closed_at: None,
        }),
        Ok(None) => None,
        Err(error) => return Err(ApiError::unavailable("Redis", error)),
    };
    let view = match view {
        Some(view) => view,
        None => lifecycle::find(&state.db, &order_no)
            .await
            .map_err(|e| ApiError::unavailable("MySQL", e))?
            .map(OrderView::from)
            .ok_or_else(|| not_found(&order_no))?,
    };
    // Behind the gateway, a buyer sees only their own orders.
    if let Some(user) = headers.get(USER_HEADER).and_then(|v| v.to_str().ok())
        && user.parse::<UserId>().ok().map(|u| u.to_string()) != Some(view.user_id.clone())
    {
        return Err(not_found(&order_no));
    }
    Ok(Json(view))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MineQuery {
    user_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderList {
    pub orders: Vec<OrderView>,
}

pub(super) async fn my_orders(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<MineQuery>,
) -> Result<Json<OrderList>, ApiError> {
    let given = query.user_id.map(Value::String);
    let user = buyer(&headers, given.as_ref())?;
    let orders = lifecycle::of_user(&state.db, user, LIST_LIMIT)
        .await
        .map_err(|e| ApiError::unavailable("MySQL", e))?;
    Ok(Json(OrderList {
        orders: orders.into_iter().map(OrderView::from).collect(),
    }))
}
