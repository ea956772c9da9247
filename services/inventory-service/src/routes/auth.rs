//! Bearer-token check of the admin API, in constant time.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flash_sale_common::error::{ApiError, ErrorCode};

use crate::state::AppState;

pub(super) async fn require_admin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let expected = state.settings.admin_token.expose();
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token)
            if !expected.is_empty() && constant_time_eq(token.as_bytes(), expected.as_bytes()) =>
        {
            next.run(req).await
        }
        Some(_) => {
            ApiError::new(ErrorCode::Forbidden, "the admin token is not valid").into_response()
        }
        None => ApiError::new(
            ErrorCode::Unauthorized,
            "the admin API needs an Authorization: Bearer <token> header",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
