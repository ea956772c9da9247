//! The layers every app router gets: request id (generated or passed on), a tracing span per
//! request, the body size limit (enforced by the JSON extractor, so it answers
//! `PAYLOAD_TOO_LARGE`), a panic catcher answering in the common error shape, and the HTTP
//! metrics (`http_requests_total` and `http_request_duration_seconds` by matched route, method
//! and status; `http_requests_in_flight`).
//!
//! The metrics are a tower layer of their own with handles cached per worker thread: as an axum
//! `from_fn` middleware that built its labels and looked them up in the registry per request,
//! they cost the gateway about 4 µs of CPU per proxied request (docs/performance.md).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{Method, Response};
use axum::response::IntoResponse;
use axum::serve::{ListenerExt, TapIo};
use metrics::{Counter, Gauge, Histogram};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::api::REQUEST_ID_HEADER;
use crate::error::{ApiError, ErrorCode};
use crate::telemetry;

/// Wraps an app router with the common layers; `body_limit` is in bytes.
pub fn with_common_layers(router: Router, body_limit: usize) -> Router {
    router
        .fallback(crate::error::not_found)
        .method_not_allowed_fallback(crate::error::method_not_allowed)
        .layer(HttpMetricsLayer)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get(REQUEST_ID_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::debug_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
                }))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
}

/// Serves the app router on `listener` until `stop`, then finishes the requests in flight: the
/// "stop accepting" task of every service ([`crate::supervisor`]). Handlers may read the peer
/// address (`ConnectInfo<SocketAddr>`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(
        no_delay(listener),
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(stop.cancelled_owned())
    .await?;
    Ok(())
}

/// The app listener: every accepted connection sends small writes at once (`TCP_NODELAY`), so
/// that an answer leaving in two writes (head, then a body produced later) never waits for the
/// client's delayed ACK, up to 40 ms on Linux. Connections keep the peer address for
/// `ConnectInfo`.
pub fn no_delay(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    listener.tap_io(set_no_delay)
}

fn set_no_delay(stream: &mut TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        // The connection still works, only with Nagle's algorithm on.
        tracing::debug!(%error, "TCP_NODELAY not set on an accepted connection");
    }
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response<axum::body::Body> {
    tracing::error!("handler panicked");
    ApiError::new(ErrorCode::Internal, ErrorCode::Internal.description()).into_response()
}

/// The HTTP metrics, as a layer on every route (so the matched route is known).
#[derive(Debug, Clone, Copy)]
struct HttpMetricsLayer;

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> HttpMetrics<S> {
        HttpMetrics { inner }
    }
}

#[derive(Debug, Clone)]
struct HttpMetrics<S> {
    inner: S,
}

impl<S> Service<Request> for HttpMetrics<S>
where
    S: Service<Request, Response = axum::response::Response>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = HttpMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let route = req.extensions().get::<MatchedPath>().cloned();
        let method = method_label(req.method());
        let in_flight = InFlight::enter();
        HttpMetricsFuture {
            inner: self.inner.call(req),
            labels: Some((route, method)),
            started: Instant::now(),
            _in_flight: in_flight,
        }
    }
}

pin_project_lite::pin_project! {
    struct HttpMetricsFuture<F> {
        #[pin]
        inner: F,
        labels: Option<(Option<MatchedPath>, &'static str)>,
        started: Instant,
        _in_flight: InFlight,
    }
}

impl<F, E> Future for HttpMetricsFuture<F>
where
    F: Future<Output = Result<axum::response::Response, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let (Ok(response), Some((route, method))) = (&result, this.labels.take()) {
            let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
            let status = response.status().as_u16();
            record(route, method, status, this.started.elapsed());
        }
        Poll::Ready(result)
    }
}

/// Counts a request in `http_requests_in_flight` while it lives, even if it is dropped unanswered
/// (the client went away).
struct InFlight(Option<Gauge>);

impl InFlight {
    fn enter() -> Self {
        static GAUGE: OnceLock<Gauge> = OnceLock::new();
        let gauge = telemetry::recorder_installed().then(|| {
            GAUGE
                .get_or_init(|| metrics::gauge!("http_requests_in_flight"))
                .clone()
        });
        if let Some(gauge) = &gauge {
            gauge.increment(1.0);
        }
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.decrement(1.0);
        }
    }
}

/// The method label: the standard methods by name, anything else `OTHER` (a client must not
/// be able to make new series at will).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// The handles of one `(route, method, status)` series.
struct Series {
    method: &'static str,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

thread_local! {
    /// Series handles by route, made once per worker thread: building a labelled key and finding
    /// it in the registry on every request cost more than the rest of the bookkeeping.
    static SERIES: RefCell<HashMap<Box<str>, Vec<Series>>> = RefCell::new(HashMap::new());
}

fn record(route: &str, method: &'static str, status: u16, elapsed: Duration) {
    if !telemetry::recorder_installed() {
        return;
    }
    SERIES.with_borrow_mut(|series| {
        if !series.contains_key(route) {
            series.insert(route.into(), Vec::new());
        }
        let of_route = series.get_mut(route).expect("inserted above");
        let index = match of_route
            .iter()
            .position(|s| s.method == method && s.status == status)
        {
            Some(index) => index,
            None => {
                let labels = [
                    ("route", route.to_owned()),
                    ("method", method.to_owned()),
                    ("status", status.to_string()),
                ];
                of_route.push(Series {
                    method,
                    status,
                    requests: metrics::counter!("http_requests_total", &labels),
                    duration: metrics::histogram!("http_request_duration_seconds", &labels),
                });
                of_route.len() - 1
            }
        };
        of_route[index].requests.increment(1);
        of_route[index].duration.record(elapsed);
    });
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_small_writes_at_once() {
        use axum::serve::Listener;

        let mut listener = no_delay(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let address = listener.local_addr().unwrap();
        let client = TcpStream::connect(address).await.unwrap();
        let (accepted, peer) = listener.accept().await;
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(accepted.nodelay().unwrap());
        // A socket accepted without the tap keeps the kernel's default.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(plain.local_addr().unwrap())
            .await
            .unwrap();
        assert!(!plain.accept().await.unwrap().0.nodelay().unwrap());
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[tokio::test]
    async fn requests_are_counted_by_matched_route_method_and_status() {
        let handle = telemetry::metrics_handle();
        let app = with_common_layers(
            Router::new()
                .route("/metrics-test/{id}", post(|| async { "made" }))
                .route(
                    "/metrics-test/{id}/slow",
                    get(|| async {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        "late"
                    }),
                ),
            1024,
        );
        let send = |method: &str, uri: &str| {
            let request = Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .unwrap();
            app.clone().oneshot(request)
        };
        for id in 1..=3 {
            let response = send("POST", &format!("/metrics-test/{id}")).await.unwrap();
            assert_eq!(response.status(), 200);
        }
        assert_eq!(send("GET", "/metrics-test/1").await.unwrap().status(), 405);
        assert_eq!(send("BREW", "/metrics-test/1").await.unwrap().status(), 405);
        assert_eq!(send("GET", "/elsewhere").await.unwrap().status(), 404);

        // A request whose client goes away is no longer in flight.
        let slow = send("GET", "/metrics-test/1/slow");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), slow)
                .await
                .is_err()
        );

        let text = handle.render();
        let count = |labels: &str| sample(&text, &format!("http_requests_total{{{labels}}}"));
        assert_eq!(
            count(r#"route="/metrics-test/{id}",method="POST",status="200""#),
            Some(3.0)
        );
        assert_eq!(
            count(r#"route="/metrics-test/{id}",method="GET",status="405""#),
            Some(1.0)
        );
        assert_eq!(
            count(r#"route="/metrics-test/{id}",method="OTHER",status="405""#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"http_request_duration_seconds_count{route="/metrics-test/{id}",method="POST",status="200"}"#
            ),
            Some(3.0)
        );
        assert!(count(r#"route="unmatched",method="GET",status="404""#).is_some_and(|n| n >= 1.0));
        assert!(!text.contains("BREW"));
        assert_eq!(sample(&text, "http_requests_in_flight"), Some(0.0));
    }
}
