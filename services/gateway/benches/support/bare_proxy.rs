//! The least an HTTP proxy can do: one axum handler forwarding every request to `upstream`
//! with hyper-util's pooled client, no layers and no checks. What separates it from the gateway
//! is the gateway's own work. Shared by the overhead bench (in process) and the `bare_proxy`
//! example (a process of its own, which `cargo xtask bench` runs beside the gateway).

use axum::Router;
use axum::http::{Request, StatusCode, Uri, header};
use axum::response::IntoResponse;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub(crate) fn router(upstream: Uri) -> Router {
    let client: Client<HttpConnector, axum::body::Body> =
        Client::builder(TokioExecutor::new()).build_http();
    Router::new().fallback(move |request: axum::extract::Request| {
        let (client, upstream) = (client.clone(), upstream.clone());
        async move {
            let (mut parts, body) = request.into_parts();
            let mut uri = upstream.into_parts();
            uri.path_and_query = parts.uri.path_and_query().cloned();
            parts.uri = match Uri::from_parts(uri) {
                Ok(uri) => uri,
                Err(_) => return StatusCode::BAD_REQUEST.into_response(),
            };
            parts.headers.remove(header::HOST);
            match client.request(Request::from_parts(parts, body)).await {
                Ok(response) => response.map(axum::body::Body::new).into_response(),
                Err(_) => StatusCode::BAD_GATEWAY.into_response(),
            }
        }
    })
}
