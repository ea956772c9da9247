//! Everything the gateway refuses, answered in the common JSON error shape
//! (`{"code": "...", "message": "..."}`) with the codes of `flash_sale_common::error`.
//! Status codes and headers are decided in the one `match` below.

use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use flash_sale_common::error::{ApiError, ErrorCode};

use crate::flow::bucket::retry_after_secs;
use crate::flow::{BlockReason, Refusal};
use crate::resource::Downstream;

/// Names the flow rule that refused a request (`qps`, `circuit_open`, ...).
pub const BLOCKED_HEADER: HeaderName = HeaderName::from_static("x-gateway-blocked");

#[derive(Debug)]
pub enum GatewayError {
    /// No `Authorization` header on a route that needs a user.
    MissingToken,
    /// A token that is forged, malformed, for another audience...; the reason is safe to show.
    InvalidToken(&'static str),
    ExpiredToken,
    /// The body is larger than `proxy.body_limit_bytes`.
    PayloadTooLarge,
    /// The client stopped sending its body.
    BodyNotReceived,
    /// The body did not arrive within `connections.body_timeout_ms`.
    BodyTimeout,
    /// A method no route of the API has (an extension method such as `FOOBAR`).
    UnknownMethod,
    /// The buy path's body is JSON but not one object without a key twice.
    InvalidBody(String),
    /// The client (behind trusted proxies) has `connections.max_requests_per_client` requests
    /// in flight already.
    ClientBusy,
    /// A flow rule refused the request.
    Blocked(Refusal),
    /// A queue ticket or purchase pass refused (`crate::admission`); nothing changed.
    Admission(crate::admission::Refusal),
    /// An answer decided here in full (the waiting room's: sold out, not started, Redis down).
    Api(ApiError),
    /// The upstream did not answer within the route's timeout.
    UpstreamTimeout(Downstream),
    /// No connection could be made: nothing was sent.
    UpstreamUnreachable(Downstream),
    /// The connection failed after the request was sent: it may have been processed.
    UpstreamFailed(Downstream),
    /// The answer was longer than `upstreams.max_response_bytes`: the request was processed.
    UpstreamAnswerTooLarge(Downstream),
}

impl GatewayError {
    /// Whether the downstream failed (counts for the breaker and `gateway_flow_errors_total`).
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            Self::UpstreamTimeout(_)
                | Self::UpstreamUnreachable(_)
                | Self::UpstreamFailed(_)
                | Self::UpstreamAnswerTooLarge(_)
        )
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut blocked = None;
        let mut challenge = None;
        let mut close = false;
        let error = match self {
            Self::MissingToken => {
                challenge = Some("Bearer");
                ApiError::new(
                    ErrorCode::Unauthorized,
                    "this route needs a user token: Authorization: Bearer <token>",
                )
            }
            Self::InvalidToken(reason) => {
                challenge = Some("Bearer error=\"invalid_token\"");
                ApiError::new(ErrorCode::Unauthorized, reason)
            }
            Self::ExpiredToken => {
                challenge = Some("Bearer error=\"invalid_token\"");
                ApiError::new(ErrorCode::Unauthorized, "the token has expired")
            }
            Self::PayloadTooLarge => ApiError::new(
                ErrorCode::PayloadTooLarge,
                "the body is larger than allowed",
            ),
            Self::BodyNotReceived => {
                ApiError::new(ErrorCode::MalformedJson, "the body could not be read")
            }
            Self::UnknownMethod => ApiError::new(
                ErrorCode::MethodNotAllowed,
                "the API has no route for this method",
            ),
            Self::BodyTimeout => {
                close = true;
                ApiError::new(ErrorCode::RequestTimeout, "the body did not arrive in time")
            }
            Self::InvalidBody(reason) => ApiError::invalid(reason),
            Self::ClientBusy => ApiError::new(
                ErrorCode::RateLimited,
                "too many requests in flight from this address; retry after the given delay",
            )
            .retry_after(1),
            Self::Blocked(refusal) => {
                blocked = Some(refusal.reason.as_str());
                refusal_error(&refusal)
            }
            Self::Admission(refusal) => {
                refusal.count();
                refusal.to_api_error()
            }
            Self::Api(error) => error,
            Self::UpstreamTimeout(downstream) => ApiError::new(
                ErrorCode::UpstreamTimeout,
                format!("{downstream} did not answer in time; the request may still be processed"),
            ),
            Self::UpstreamUnreachable(downstream) => ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!("{downstream} is unreachable; nothing was sent, retry later"),
            )
            .retry_after(1),
            Self::UpstreamFailed(downstream) => ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "{downstream} failed before answering; the request may have been processed"
                ),
            ),
            Self::UpstreamAnswerTooLarge(downstream) => ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "{downstream} answered with more than the gateway passes on; the request was processed"
                ),
            ),
        };
        let mut response = error.into_response();
        if let Some(reason) = blocked {
            response
                .headers_mut()
                .insert(BLOCKED_HEADER, HeaderValue::from_static(reason));
        }
        if close {
            // The rest of the body may still come: it cannot be told from a next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(challenge) = challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

fn refusal_error(refusal: &Refusal) -> ApiError {
    let retry = refusal.retry_after.map_or(1, retry_after_secs);
    let limited = |what: String| ApiError::new(ErrorCode::RateLimited, what).retry_after(retry);
    match refusal.reason {
        BlockReason::SoldOut => match refusal.remembered {
            Some(ErrorCode::SaleEnded) => ApiError::new(ErrorCode::SaleEnded, "the sale has ended"),
            _ => ApiError::new(ErrorCode::SoldOut, "this activity is sold out"),
        },
        BlockReason::System | BlockReason::Cpu => ApiError::new(
            ErrorCode::Overloaded,
            "the gateway sheds load; retry after the given delay",
        )
        .retry_after(retry),
        BlockReason::ParamUser => {
            limited("too many requests from this user; retry after the given delay".into())
        }
        BlockReason::ParamClientIp => {
            limited("too many requests from this address; retry after the given delay".into())
        }
        BlockReason::ParamActivity => {
            limited("too many requests for this activity; retry after the given delay".into())
        }
        BlockReason::Qps
        | BlockReason::WarmUp
        | BlockReason::Queue
        | BlockReason::Concurrency
        | BlockReason::Cluster => limited(format!(
            "too many requests for {}; retry after the given delay",
            refusal.resource
        )),
        BlockReason::CircuitOpen => ApiError::new(
            ErrorCode::CircuitOpen,
            format!(
                "{} is failing; the gateway fails fast, retry after the given delay",
                refusal.downstream
            ),
        )
        .retry_after(retry),
    }
}
