//! `POST /api/flash-sale/payment/callback`: the payment provider confirms a payment.
//!
//! Checked in this order, and nothing changes until all pass: the signature over timestamp and
//! body (`flash_sale_common::payment`), the replay window, the body's shape, the order, its
//! amount and quantity. Then one conditional update decides (`lifecycle::pay`). Answers:
//!
//! | case | status | code |
//! |---|---|---|
//! | first confirmation | 200 | the order, `PAID` |
//! | the same payment again | 200 | the same order, nothing changed |
//! | order cancelled or expired (stock given back) | 409 | `ORDER_EXPIRED`: refund |
//! | order paid by another payment | 409 | `ORDER_ALREADY_PAID`: refund |
//! | order still in the queue | 409 | `ORDER_PENDING`, `Retry-After` |
//! | bad or missing signature / outside the window | 401 | `BAD_SIGNATURE` / `STALE_CALLBACK` |
//! | wrong amount or quantity, payment id of another order | 422 | `PAYMENT_MISMATCH` |
//! | unknown order | 404 | `ORDER_NOT_FOUND` |
//! | malformed body | 400 | `MALFORMED_JSON` / `INVALID_ARGUMENT` |

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use flash_sale_common::api::order::PaymentCallback;
use flash_sale_common::domain::{OrderNo, OrderStatus};
use flash_sale_common::error::{ApiError, ErrorCode, Json};
use flash_sale_common::payment::{self, SignatureError};

use super::get_order::{OrderView, not_found};
use crate::lifecycle::{self, PayOutcome};
use crate::state::AppState;

/// Longest payment id accepted (`orders.payment_ref`).
const MAX_PAYMENT_ID: usize = 64;

pub(super) async fn payment_callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<OrderView>, ApiError> {
    let (outcome, result) = decide(&state, &headers, &body).await;
    metrics::counter!("flash_sale_payment_callbacks_total", "outcome" => outcome).increment(1);
    if let Err(error) = &result {
        tracing::info!(outcome, code = %error.code, message = %error.message, "payment callback refused");
    }
    result
}

async fn decide(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> (&'static str, Result<Json<OrderView>, ApiError>) {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    let checked = payment::verify(
        state.payment.callback_secret.expose().as_bytes(),
        header(&payment::TIMESTAMP_HEADER),
        header(&payment::SIGNATURE_HEADER),
        body,
        chrono::Utc::now().timestamp(),
        state.payment.replay_window_secs,
    );
    match checked {
        Ok(()) => {}
        Err(error @ SignatureError::Stale { .. }) => {
            return (
                "stale",
                Err(ApiError::new(ErrorCode::StaleCallback, error.to_string())),
            );
        }
        Err(error) => {
            return (
                "bad_signature",
                Err(ApiError::new(ErrorCode::BadSignature, error.to_string())),
            );
        }
    }
    let callback: PaymentCallback = match flash_sale_common::json::parse_object(body) {
        Ok(callback) => callback,
        Err(error) => return ("malformed", Err(error.into())),
    };
    if callback.payment_id.is_empty() || callback.payment_id.len() > MAX_PAYMENT_ID {
        let message = format!("paymentId must be 1 to {MAX_PAYMENT_ID} characters");
        return ("malformed", Err(ApiError::invalid(message)));
    }
    let order_no = match OrderNo::parse(&callback.order_no) {
        Ok(no) => no,
        Err(error) => return ("malformed", Err(error)),
    };
    let outcome = match lifecycle::pay(&state.db, &state.redis, &callback, &order_no).await {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::warn!(%error, %order_no, "payment callback failed in MySQL");
            return ("error", Err(ApiError::unavailable("MySQL", error)));
        }
    };
    match outcome {
        PayOutcome::Paid(order) => ("paid", Ok(Json(order.into()))),
        PayOutcome::AlreadyPaid(order) => ("duplicate", Ok(Json(order.into()))),
        PayOutcome::PaidByAnother => (
            "refund",
            Err(ApiError::new(
                ErrorCode::OrderPaid,
                format!("order {order_no} was paid by another payment: refund this one"),
            )),
        ),
        PayOutcome::Closed(status) => {
            let how = if status == OrderStatus::Cancelled {
                "was cancelled"
            } else {
                "expired"
            };
            (
                "refund",
                Err(ApiError::new(
                    ErrorCode::OrderExpired,
                    format!(
                        "order {order_no} {how} and its stock was given back: refund the payment"
                    ),
                )),
            )
        }
        PayOutcome::Mismatch(message) => (
            "mismatch",
            Err(ApiError::new(ErrorCode::PaymentMismatch, message)),
        ),
        PayOutcome::NotFound => match state.redis.reservation(&order_no).await {
            Ok(Some(_)) => (
                "pending",
                Err(ApiError::new(
                    ErrorCode::OrderPending,
                    format!("order {order_no} is still being created; retry the callback"),
                )
                .retry_after(1)),
            ),
            _ => ("unknown_order", Err(not_found(&order_no))),
        },
    }
}
