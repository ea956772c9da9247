//! The way to the downstream services: hyper-util's pooled client, keep-alive HTTP/1.1
//! connections per upstream, a timeout per route, the request id passed on, hop-by-hop headers
//! dropped, and the caller's identity set in `x-user-id` (whatever the client sent there is gone
//! by now).
//!
//! A pool of the gateway's own stood here until its trial with the broker's durable log: in five
//! interleaved rounds it saved nothing beyond the rounds' spread (docs/performance.md, "The
//! upstream pool on trial").

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::http::uri::{Authority, Scheme};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::configuration::{RoutesSettings, UpstreamSettings};
use crate::error::GatewayError;
use crate::identity::Caller;
use crate::resource::{Downstream, RouteId};

use flash_sale_common::api::{REQUEST_ID_HEADER, USER_HEADER};

const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Why an exchange produced no answer.
#[derive(Debug)]
enum ExchangeError {
    /// No connection could be opened (refused, name not resolved, or slower than the connect
    /// timeout): nothing was sent.
    Connect(hyper_util::client::legacy::Error),
    /// The client failed once the request could have been written.
    Client(hyper_util::client::legacy::Error),
    /// The answer's body failed midway.
    Body(hyper::Error),
    /// The answer's body was longer than the limit.
    TooLarge,
    /// No whole answer before the deadline.
    TimedOut,
}

/// One upstream: where it is, its connections, and the `Host` its requests carry.
#[derive(Debug)]
struct Target {
    base_url: String,
    authority: Authority,
    host: HeaderValue,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Target {
    fn new(downstream: Downstream, url: &str, pool: &UpstreamSettings) -> anyhow::Result<Self> {
        // The setting's name, for messages: `upstreams.order_service`.
        let what = downstream.as_str().replace('-', "_");
        let uri: Uri = url
            .parse()
            .with_context(|| format!("upstreams.{what} is not a URL: {url}"))?;
        anyhow::ensure!(
            uri.scheme().is_none_or(|s| *s == Scheme::HTTP),
            "upstreams.{what}: only http:// is supported (the services talk plain HTTP inside the cluster)"
        );
        anyhow::ensure!(
            uri.path_and_query().is_none_or(|p| p.as_str() == "/"),
            "upstreams.{what} is a base URL (scheme, host and port), without a path: {url}"
        );
        let authority: Authority = uri
            .authority()
            .cloned()
            .with_context(|| format!("upstreams.{what} has no host: {url}"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(pool.connect_timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(pool.pool_max_idle_per_host)
            .pool_idle_timeout(Duration::from_millis(pool.pool_idle_timeout_ms))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            base_url: format!("http://{authority}"),
            host: HeaderValue::from_str(authority.as_str())?,
            authority,
            client,
        })
    }

    /// One request and its whole answer (at most `limit` bytes of body) within `timeout`.
    async fn exchange(
        &self,
        mut request: Request<Full<Bytes>>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Response<Bytes>, ExchangeError> {
        // hyper-util's client takes the absolute URI.
        let mut uri = std::mem::take(request.uri_mut()).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        *request.uri_mut() = Uri::from_parts(uri).expect("a path with a scheme and an authority");
        let exchange = async {
            let response = self.client.request(request).await.map_err(|error| {
                if error.is_connect() {
                    ExchangeError::Connect(error)
                } else {
                    ExchangeError::Client(error)
                }
            })?;
            let (head, body) = response.into_parts();
            let body = Limited::new(body, limit)
                .collect()
                .await
                .map_err(|error| match error.downcast::<hyper::Error>() {
                    Ok(error) => ExchangeError::Body(*error),
                    Err(_) => ExchangeError::TooLarge,
                })?;
            Ok(Response::from_parts(head, body.to_bytes()))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ExchangeError::TimedOut)?
    }
}

#[derive(Debug, Clone)]
pub struct Upstream(Arc<Upstreams>);

#[derive(Debug)]
struct Upstreams {
    order_service: Target,
    inventory_service: Target,
    flash_sale_timeout: Duration,
    inventory_timeout: Duration,
    /// The longest answer body passed on.
    max_response_bytes: usize,
}

impl Upstream {
    pub fn new(upstreams: &UpstreamSettings, routes: &RoutesSettings) -> anyhow::Result<Self> {
        Ok(Self(Arc::new(Upstreams {
            order_service: Target::new(
                Downstream::OrderService,
                &upstreams.order_service,
                upstreams,
            )?,
            inventory_service: Target::new(
                Downstream::InventoryService,
                &upstreams.inventory_service,
                upstreams,
            )?,
            flash_sale_timeout: Duration::from_millis(routes.flash_sale.timeout_ms),
            inventory_timeout: Duration::from_millis(routes.inventory.timeout_ms),
            max_response_bytes: upstreams.max_response_bytes,
        })))
    }

    fn target(&self, downstream: Downstream) -> &Target {
        match downstream {
            Downstream::OrderService => &self.0.order_service,
            Downstream::InventoryService => &self.0.inventory_service,
        }
    }

    fn timeout(&self, route: RouteId) -> Duration {
        match route {
            RouteId::FlashSale => self.0.flash_sale_timeout,
            RouteId::Inventory => self.0.inventory_timeout,
        }
    }

    /// Sends the request to the route's upstream and returns its whole answer. `peer`, the TCP
    /// peer, is appended to `X-Forwarded-For`.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward(
        &self,
        route: RouteId,
        method: Method,
        uri: &Uri,
        mut headers: HeaderMap,
        body: Bytes,
        caller: Caller,
        peer: Option<IpAddr>,
    ) -> Result<Response<Bytes>, GatewayError> {
        let downstream = route.downstream();
        let (target, timeout) = (self.target(downstream), self.timeout(route));
        let path = uri
            .path_and_query()
            .cloned()
            .map_or_else(|| Uri::from_static("/"), Uri::from);

        strip_hop_by_hop(&mut headers);
        headers.insert(header::HOST, target.host.clone());
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(USER_HEADER);
        if let Caller::User(user) = caller {
            headers.insert(USER_HEADER, HeaderValue::from(user.get()));
        }
        if let Some(ip) = peer {
            let forwarded = match headers.get(&FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(earlier) => format!("{earlier}, {ip}"),
                None => ip.to_string(),
            };
            if let Ok(value) = HeaderValue::from_str(&forwarded) {
                headers.insert(FORWARDED_FOR, value);
            }
        }
        let request_id = headers.get(REQUEST_ID_HEADER).cloned();
        let request_id = || {
            request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = path;
        *request.headers_mut() = headers;

        let exchange = target.exchange(request, self.0.max_response_bytes, timeout);
        let response = match exchange.await {
            Ok(response) => response,
            Err(ExchangeError::Connect(error)) => {
                let error = with_sources(&error);
                tracing::warn!(%downstream, request_id = request_id(), %error, "upstream unreachable");
                return Err(GatewayError::UpstreamUnreachable(downstream));
            }
            Err(ExchangeError::TooLarge) => {
                tracing::warn!(
                    %downstream,
                    request_id = request_id(),
                    limit = self.0.max_response_bytes,
                    "upstream answer longer than upstreams.max_response_bytes; not passed on"
                );
                return Err(GatewayError::UpstreamAnswerTooLarge(downstream));
            }
            Err(ExchangeError::TimedOut) => {
                tracing::warn!(
                    %downstream,
                    request_id = request_id(),
                    timeout_ms = timeout.as_millis() as u64,
                    "upstream timed out"
                );
                return Err(GatewayError::UpstreamTimeout(downstream));
            }
            Err(ExchangeError::Client(error)) => {
                let error = with_sources(&error);
                tracing::warn!(%downstream, request_id = request_id(), %error, "upstream failed");
                return Err(GatewayError::UpstreamFailed(downstream));
            }
            Err(ExchangeError::Body(error)) => {
                let error = error.to_string();
                tracing::warn!(%downstream, request_id = request_id(), %error, "upstream failed");
                return Err(GatewayError::UpstreamFailed(downstream));
            }
        };
        let (mut head, body) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        Ok(Response::from_parts(head, body))
    }

    pub fn base_url(&self, downstream: Downstream) -> &str {
        &self.target(downstream).base_url
    }
}

/// An error and its causes, `outer: inner: innermost` (hyper-util's errors say only "client
/// error (Connect)" by themselves).
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Removes the hop-by-hop headers, and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(connection) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = connection
            .to_str()
            .unwrap_or_default()
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}
