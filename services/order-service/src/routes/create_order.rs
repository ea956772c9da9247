//! `POST /api/flash-sale/order/create`: the buy path.

use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flash_sale_common::domain::{ActivityId, OrderEvent, OrderNo, Quantity, UserId};
use flash_sale_common::error::{ApiError, ErrorCode, Json, JsonObject};
use flash_sale_common::redis::{RedisFailure, ReservationState, ReserveOutcome};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::publisher::PublishError;
use crate::state::AppState;
use flash_sale_common::api::order::CreateOrderRequest;
use flash_sale_common::api::{self, USER_HEADER};

/// The 202 answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderAccepted {
    pub order_no: String,
    pub status: String,
}

/// What the buy path decided, for metrics and the answer.
struct Decision {
    outcome: &'static str,
    activity: Option<ActivityId>,
    result: Result<OrderNo, ApiError>,
}

pub(super) async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonObject(body): JsonObject<CreateOrderRequest>,
) -> Response {
    let started = Instant::now();
    let decision = decide(&state, &headers, &body).await;
    metrics::histogram!("flash_sale_order_create_duration_seconds", "outcome" => decision.outcome)
        .record(started.elapsed());
    if let Some(activity) = decision.activity {
        metrics::counter!(
            "flash_sale_orders_total",
            "activity" => activity.to_string(),
            "outcome" => decision.outcome
        )
        .increment(1);
    }
    match decision.result {
        Ok(order_no) => {
            let location = api::order::one(&order_no);
            let mut response = (
                StatusCode::ACCEPTED,
                Json(OrderAccepted {
                    order_no: order_no.to_string(),
                    status: "PENDING".into(),
                }),
            )
                .into_response();
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            response
        }
        Err(error) => error.into_response(),
    }
}

async fn decide(state: &AppState, headers: &HeaderMap, body: &CreateOrderRequest) -> Decision {
    let parsed = parse(state, headers, body);
    let (activity, user, quantity) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            return Decision {
                outcome: "invalid",
                activity: None,
                result: Err(error),
            };
        }
    };
    let (outcome, result) = buy(state, activity, user, quantity).await;
    Decision {
        outcome,
        activity: Some(activity),
        result,
    }
}

fn parse(
    state: &AppState,
    headers: &HeaderMap,
    body: &CreateOrderRequest,
) -> Result<(ActivityId, UserId, Quantity), ApiError> {
    let activity = ActivityId::parse(body.activity_id.as_ref())?;
    let quantity = Quantity::parse(body.quantity.as_ref(), state.settings.max_quantity)?;
    let user = match headers.get(USER_HEADER) {
        Some(value) => {
            let trusted: UserId = value
                .to_str()
                .map_err(|_| ApiError::invalid("x-user-id must be a positive integer"))?
                .parse()?;
            if let Some(claimed) = body.user_id.as_ref().filter(|v| !is_placeholder(v))
                && UserId::parse(Some(claimed)).ok() != Some(trusted)
            {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    "userId does not match the authenticated user",
                ));
            }
            trusted
        }
        None => match body.user_id.as_ref() {
            Some(v) if state.settings.random_user_placeholder && is_placeholder(v) => {
                UserId::new(rand::random_range(1..i64::MAX)).expect("drawn from 1..")
            }
            raw => UserId::parse(raw)?,
        },
    };
    Ok((activity, user, quantity))
}

/// The seed's load test sends `"{random}"` verbatim (hey does not expand it).
fn is_placeholder(value: &Value) -> bool {
    value.as_str() == Some("{random}")
}

async fn buy(
    state: &AppState,
    activity: ActivityId,
    user: UserId,
    quantity: Quantity,
) -> (&'static str, Result<OrderNo, ApiError>) {
    if state.sold_out.is_sold_out(activity) {
        metrics::counter!("flash_sale_sold_out_short_circuit_total", "activity" => activity.to_string())
            .increment(1);
        return ("sold_out", Err(sold_out()));
    }
    // From the reservation on, the order is finished whether or not anyone waits for the
    // answer. A buyer who hangs up (or a gateway that gives up) drops this future; dropped
    // between the reserve script and the publish, it would leave a reservation nobody
    // publishes, holding its stock until the reconciler's deadline (about 100 s under
    // `cargo xtask bench`, docs/performance.md). The task reserves, publishes and
    // acknowledges, or undoes, and the order of a buyer who left is theirs to find.
    let task = tokio::spawn({
        let state = state.clone();
        async move { reserve_and_publish(&state, activity, user, quantity).await }
    });
    match task.await {
        Ok(decided) => decided,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Only a runtime shutting down cancels it.
        Err(error) => (
            "unavailable",
            Err(ApiError::unavailable("order-service", error)),
        ),
    }
}

/// Reserves in Redis, publishes to the broker and marks the reservation acknowledged: the
/// buy path's steps, run to the end once started (`buy`).
async fn reserve_and_publish(
    state: &AppState,
    activity: ActivityId,
    user: UserId,
    quantity: Quantity,
) -> (&'static str, Result<OrderNo, ApiError>) {
    let order_no = OrderNo::generate(activity);
    // The reservations asked for together go to Redis together (`reserver`).
    let reserved_at_ms = match state
        .reserver
        .reserve(activity, user, quantity, &order_no)
        .await
    {
        Ok(ReserveOutcome::Reserved { .. }) => chrono::Utc::now().timestamp_millis(),
        Ok(ReserveOutcome::SoldOut { stock_left }) => {
            if stock_left <= 0 {
                state.sold_out.mark(activity);
            }
            return ("sold_out", Err(sold_out()));
        }
        Ok(ReserveOutcome::AlreadyPurchased) => {
            return (
                "duplicate",
                Err(ApiError::new(
                    ErrorCode::AlreadyPurchased,
                    "this user already holds an order in this activity",
                )),
            );
        }
        Ok(ReserveOutcome::NotStarted { starts_ms }) => {
            let at = chrono::DateTime::from_timestamp_millis(starts_ms)
                .map_or_else(|| starts_ms.to_string(), |t| t.to_rfc3339());
            return (
                "not_started",
                Err(ApiError::new(
                    ErrorCode::SaleNotStarted,
                    format!("the sale opens at {at}"),
                )),
            );
        }
        Ok(ReserveOutcome::Ended) => {
            state.sold_out.mark(activity);
            return (
                "ended",
                Err(ApiError::new(ErrorCode::SaleEnded, "the sale has ended")),
            );
        }
        Ok(ReserveOutcome::UnknownActivity) => {
            return (
                "not_found",
                Err(ApiError::new(
                    ErrorCode::ActivityNotFound,
                    format!("activity {activity} is not on sale"),
                )),
            );
        }
        Ok(ReserveOutcome::Unverified) => {
            state.unverified.mark(activity);
            return (
                "unverified",
                Err(ApiError::new(
                    ErrorCode::ServiceUnavailable,
                    "stock is being verified after a Redis restart; retry in a moment",
                )
                .retry_after(1)),
            );
        }
        Err(RedisFailure::Busy) => {
            return (
                "overloaded",
                Err(
                    ApiError::new(ErrorCode::Overloaded, "too many requests in flight")
                        .retry_after(1),
                ),
            );
        }
        Err(error) => return ("unavailable", Err(ApiError::unavailable("Redis", error))),
    };

    let event = OrderEvent {
        order_no: order_no.clone(),
        user_id: user,
        activity_id: activity,
        quantity,
        reserved_at_ms,
    };
    if let Err(error) = state.publisher.publish(&event).await {
        undo(state, &order_no).await;
        let answer = match error {
            PublishError::QueueFull => {
                ApiError::new(ErrorCode::Overloaded, "the order queue is full").retry_after(1)
            }
            PublishError::Failed(e) => ApiError::unavailable("the order queue", e),
        };
        return ("publish_failed", Err(answer));
    }

    // The broker has the order. Mark the reservation acknowledged so the reconciler never
    // releases it; only then may the buyer be told yes. The acknowledgements of orders
    // published together go to Redis together (`acker`).
    for attempt in 0..3 {
        match state.acker.ack(&order_no).await {
            // Moved to Acked, or the consumer was faster and already claimed or settled it.
            Ok(-1..=1) => return ("accepted", Ok(order_no)),
            Ok(_) => break, // released: the consumer will skip the message
            Err(error) if attempt == 2 => {
                tracing::warn!(%order_no, %error, "cannot mark the reservation acknowledged");
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    (
        "unconfirmed",
        Err(ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!(
                "the order {order_no} could not be confirmed; query its status before retrying"
            ),
        )
        .retry_after(1)),
    )
}

/// Gives the reservation back after a failed publish. If Redis cannot be reached either, the
/// reconciler releases it after its deadline.
async fn undo(state: &AppState, order_no: &OrderNo) {
    if let Err(error) = state
        .redis
        .release(order_no, &[ReservationState::Reserved])
        .await
    {
        tracing::warn!(%order_no, %error, "cannot undo the reservation; the reconciler will");
    }
}

fn sold_out() -> ApiError {
    ApiError::new(ErrorCode::SoldOut, "this activity is sold out")
}
