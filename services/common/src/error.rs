//! The one table of error codes, and the JSON error shape every service answers with:
//! `{"code": "SOLD_OUT", "message": "..."}`.

use std::borrow::Cow;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::json::StrictObject;

macro_rules! error_codes {
    ($($variant:ident => ($status:ident, $code:literal, $doc:literal),)*) => {
        /// Every error a service can answer with. The code string is part of the API.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $(#[doc = $doc] $variant,)*
        }

        impl ErrorCode {
            /// All codes, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The stable string clients match on.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The HTTP status this code is answered with.
            pub const fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status,)* }
            }

            /// What the code means.
            pub const fn description(self) -> &'static str {
                match self { $(ErrorCode::$variant => $doc,)* }
            }

            /// The code a wire string names, by the same table that writes it; `None` for a
            /// string no service writes.
            pub fn parse(code: &str) -> Option<Self> {
                match code { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    MalformedJson => (BAD_REQUEST, "MALFORMED_JSON", "The body is not valid JSON."),
    InvalidArgument => (BAD_REQUEST, "INVALID_ARGUMENT", "A field is missing, of the wrong type or out of range."),
    Unauthorized => (UNAUTHORIZED, "UNAUTHORIZED", "No valid credentials were presented."),
    Forbidden => (FORBIDDEN, "FORBIDDEN", "The credentials do not allow this call."),
    NotFound => (NOT_FOUND, "NOT_FOUND", "No such route."),
    ActivityNotFound => (NOT_FOUND, "ACTIVITY_NOT_FOUND", "No such activity, or it is not open for sale (not warmed up)."),
    OrderNotFound => (NOT_FOUND, "ORDER_NOT_FOUND", "No such order."),
    MethodNotAllowed => (METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED", "The route exists but not for this method."),
    SaleNotStarted => (CONFLICT, "SALE_NOT_STARTED", "The sale window has not opened yet."),
    SaleEnded => (CONFLICT, "SALE_ENDED", "The sale window has closed."),
    SoldOut => (CONFLICT, "SOLD_OUT", "Not enough stock left for this quantity."),
    AlreadyPurchased => (CONFLICT, "ALREADY_PURCHASED", "This user already holds an order in this activity."),
    ActivityExists => (CONFLICT, "ACTIVITY_EXISTS", "An activity with this id already exists."),
    OrderPending => (CONFLICT, "ORDER_PENDING", "The order is still on its way to the database; retry in a moment."),
    OrderExpired => (CONFLICT, "ORDER_EXPIRED", "The order was cancelled or expired and its stock given back; a payment for it must be refunded."),
    OrderPaid => (CONFLICT, "ORDER_ALREADY_PAID", "The order is paid: it cannot be cancelled, and another payment for it must be refunded."),
    BadSignature => (UNAUTHORIZED, "BAD_SIGNATURE", "The callback's signature does not match its timestamp and body."),
    StaleCallback => (UNAUTHORIZED, "STALE_CALLBACK", "The callback's timestamp is outside the replay window."),
    PaymentMismatch => (UNPROCESSABLE_ENTITY, "PAYMENT_MISMATCH", "The payment's amount or quantity is not the order's, or its id belongs to another order."),
    PassRequired => (FORBIDDEN, "PASS_REQUIRED", "This sale needs a purchase pass: get one from POST /api/admission/{activityId} and send it as X-Purchase-Pass."),
    PassInvalid => (FORBIDDEN, "PASS_INVALID", "The purchase pass is forged, malformed, or for another buyer or activity."),
    PassExpired => (FORBIDDEN, "PASS_EXPIRED", "The purchase pass has expired; join again for a new one."),
    PassUsed => (CONFLICT, "PASS_USED", "The purchase pass has been used already."),
    TicketInvalid => (FORBIDDEN, "TICKET_INVALID", "The queue ticket is forged, malformed, or for another buyer or activity."),
    TicketExpired => (FORBIDDEN, "TICKET_EXPIRED", "The queue ticket has expired; join the queue again."),
    RequestTimeout => (REQUEST_TIMEOUT, "REQUEST_TIMEOUT", "The request did not arrive in time; the connection is closed."),
    PayloadTooLarge => (PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "The body is larger than allowed."),
    UnsupportedMediaType => (UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "The body must be sent as application/json."),
    RateLimited => (TOO_MANY_REQUESTS, "RATE_LIMITED", "Too many requests; retry after the given delay."),
    Internal => (INTERNAL_SERVER_ERROR, "INTERNAL", "An unexpected error; it has been logged."),
    Overloaded => (SERVICE_UNAVAILABLE, "OVERLOADED", "The service sheds load; retry after the given delay."),
    ServiceUnavailable => (SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE", "A dependency failed; nothing was changed, retry later."),
    CircuitOpen => (SERVICE_UNAVAILABLE, "CIRCUIT_OPEN", "The downstream service is failing; the gateway fails fast."),
    UpstreamTimeout => (GATEWAY_TIMEOUT, "UPSTREAM_TIMEOUT", "The downstream service did not answer in time."),
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = <Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&code)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {code:?}")))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    /// The code of an error answer's body; `None` if the body is not one.
    pub fn code_of(body: &[u8]) -> Option<ErrorCode> {
        serde_json::from_slice::<Self>(body).ok().map(|b| b.code)
    }
}

/// An error answer: a code from the table, a message for humans, an optional `Retry-After`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// An unexpected failure: logged here with its cause, answered without it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(ErrorCode::Internal, ErrorCode::Internal.description())
    }

    /// A dependency failed and nothing was changed: logged with its cause, answered 503.
    pub fn unavailable(what: &'static str, cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, dependency = what, "dependency unavailable");
        Self::new(
            ErrorCode::ServiceUnavailable,
            format!("{what} is unavailable; nothing was changed, retry later"),
        )
        .retry_after(1)
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code,
            message: self.message.into_owned(),
        };
        let mut response = (self.code.status(), axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let code = match rejection.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::InvalidArgument,
            _ => ErrorCode::MalformedJson,
        };
        let message = match code {
            ErrorCode::UnsupportedMediaType => {
                "expected a body with content-type application/json".into()
            }
            ErrorCode::PayloadTooLarge => "the body is larger than allowed".into(),
            _ => rejection.body_text(),
        };
        Self::new(code, message)
    }
}

/// `axum::Json` whose rejections answer in the common error shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Json(value))
    }
}

/// A JSON body that must be an object without a key twice ([`crate::json`]), deserialized into
/// `T` by field name. serde would otherwise also accept an array and fill the fields by position
/// (`[1, 2, 3]`), and keep the last of two equal keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonObject<T>(pub T);

impl<T, S> FromRequest<S> for JsonObject<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(StrictObject(object)) = Json::<StrictObject>::from_request(req, state).await?;
        serde_json::from_value(serde_json::Value::Object(object))
            .map(JsonObject)
            .map_err(|e| ApiError::invalid(format!("the body does not fit: {e}")))
    }
}

/// A body read as raw bytes (to check a signature over them, or because it is optional) and
/// parsed with [`crate::json::parse_object`] answers like [`JsonObject`] does.
impl From<crate::json::ObjectError> for ApiError {
    fn from(error: crate::json::ObjectError) -> Self {
        if error.is_malformed() {
            Self::new(ErrorCode::MalformedJson, error.to_string())
        } else {
            Self::invalid(error.to_string())
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Fallback for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

/// Fallback for a known route called with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not accept that method",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_upper_snake_and_4xx_or_5xx() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "duplicate code {s}");
            assert!(s.chars().all(|c| c.is_ascii_uppercase() || c == '_'), "{s}");
            assert!(code.status().is_client_error() || code.status().is_server_error());
            assert_eq!(
                ErrorCode::parse(s),
                Some(*code),
                "read back by the same table"
            );
        }
        assert_eq!(
            ErrorCode::parse("sold_out"),
            None,
            "codes are matched exactly"
        );
    }

    #[tokio::test]
    async fn error_answers_have_the_common_shape_and_retry_after() {
        use http_body_util::BodyExt;
        let response = ApiError::new(ErrorCode::RateLimited, "slow down")
            .retry_after(2)
            .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let wire: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            wire["code"], "RATE_LIMITED",
            "the code travels as its string"
        );
        let body: ErrorBody = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            body,
            ErrorBody {
                code: ErrorCode::RateLimited,
                message: "slow down".into()
            }
        );
    }
}
