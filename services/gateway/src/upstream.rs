//! The way to the downstream services: one pooled keep-alive HTTP/1.1 client for both, a
//! timeout per route, the request id passed on, hop-by-hop headers dropped, and the caller's
//! identity set in `x-user-id` (whatever the client sent there is gone by now).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::http::uri::{Authority, Scheme};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::configuration::{RoutesSettings, UpstreamSettings};
use crate::error::GatewayError;
use crate::identity::Caller;
use crate::resource::{Downstream, RouteId};

/// The header order-service trusts as the authenticated user.
pub const USER_HEADER: HeaderName = HeaderName::from_static("x-user-id");
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

#[derive(Debug, Clone)]
struct Base {
    scheme: Scheme,
    authority: Authority,
}

impl Base {
    fn parse(what: &str, url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("upstreams.{what} is not a URL: {url}"))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        anyhow::ensure!(
            scheme == Scheme::HTTP,
            "upstreams.{what}: only http:// is supported (the services talk plain HTTP inside the cluster)"
        );
        let authority = uri
            .authority()
            .cloned()
            .with_context(|| format!("upstreams.{what} has no host: {url}"))?;
        Ok(Self { scheme, authority })
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    order_service: Base,
    inventory_service: Base,
    flash_sale_timeout: Duration,
    inventory_timeout: Duration,
}

impl Upstream {
    pub fn new(upstreams: &UpstreamSettings, routes: &RoutesSettings) -> anyhow::Result<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(upstreams.connect_timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_millis(upstreams.pool_idle_timeout_ms))
            .pool_max_idle_per_host(upstreams.pool_max_idle_per_host)
            .build(connector);
        Ok(Self {
            client,
            order_service: Base::parse("order_service", &upstreams.order_service)?,
            inventory_service: Base::parse("inventory_service", &upstreams.inventory_service)?,
            flash_sale_timeout: Duration::from_millis(routes.flash_sale.timeout_ms),
            inventory_timeout: Duration::from_millis(routes.inventory.timeout_ms),
        })
    }

    fn target(&self, route: RouteId) -> (&Base, Duration) {
        match route {
            RouteId::FlashSale => (&self.order_service, self.flash_sale_timeout),
            RouteId::Inventory => (&self.inventory_service, self.inventory_timeout),
        }
    }

    /// Sends the request to the route's upstream and returns its response head (the body
    /// streams through). `peer`, the TCP peer, is appended to `X-Forwarded-For`.
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
    ) -> Result<Response<Body>, GatewayError> {
        let (base, timeout) = self.target(route);
        let downstream = route.downstream();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = Uri::builder()
            .scheme(base.scheme.clone())
            .authority(base.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|_| GatewayError::UpstreamUnreachable(downstream))?;

        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
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
        let request_id = headers.get(flash_sale_common::http::REQUEST_ID).cloned();
        let request_id = || {
            request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;

        let response = match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                return Err(if error.is_connect() {
                    tracing::warn!(%downstream, request_id = request_id(), error = %error, "upstream unreachable");
                    GatewayError::UpstreamUnreachable(downstream)
                } else {
                    tracing::warn!(%downstream, request_id = request_id(), error = %error, "upstream failed");
                    GatewayError::UpstreamFailed(downstream)
                });
            }
            Err(_) => {
                tracing::warn!(
                    %downstream,
                    request_id = request_id(),
                    timeout_ms = timeout.as_millis() as u64,
                    "upstream timed out"
                );
                return Err(GatewayError::UpstreamTimeout(downstream));
            }
        };
        let (mut head, body) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        Ok(Response::from_parts(head, Body::new(body)))
    }

    pub fn base_url(&self, downstream: Downstream) -> String {
        let base = match downstream {
            Downstream::OrderService => &self.order_service,
            Downstream::InventoryService => &self.inventory_service,
        };
        format!("{}://{}", base.scheme, base.authority)
    }
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
