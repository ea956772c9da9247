//! The proxy handler: identity, body, flow control, forward, and what the answer teaches the
//! sold-out short circuit.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flash_sale_common::api::order::CreateOrderRequest;
use flash_sale_common::api::{self, inventory::StockChange};
use flash_sale_common::domain::{ActivityId, OrderNo, Quantity, UserId};
use flash_sale_common::error::{ApiError, ErrorBody, ErrorCode};
use flash_sale_common::json::{self, ObjectError};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;
use tokio::time::Instant;

use crate::admission::{Claims, Kind, PASS_HEADER, Redemption, Refusal, Room};
use crate::error::GatewayError;
use crate::flow::FlowRequest;
use crate::flow::sold_out::SoldOutProbe;
use crate::identity::Caller;
use crate::resource::RouteId;
use crate::state::AppState;

pub(super) async fn to_order_service(State(state): State<AppState>, request: Request) -> Response {
    proxy(&state, RouteId::FlashSale, request).await
}

pub(super) async fn to_inventory_service(
    State(state): State<AppState>,
    request: Request,
) -> Response {
    proxy(&state, RouteId::Inventory, request).await
}

async fn proxy(state: &AppState, route: RouteId, request: Request) -> Response {
    match handle(state, route, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: &AppState,
    route: RouteId,
    request: Request,
) -> Result<Response, GatewayError> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let client_ip = client_ip(&request, peer, state.settings.proxy.trusted_proxy_hops);
    // Held until the answer is on its way, so a slow body or a slow upstream holds it too.
    let _in_flight = match client_ip {
        Some(ip) => Some(state.clients.take(ip).ok_or_else(|| {
            metrics::counter!("gateway_connections_refused_total", "reason" => "client_cap")
                .increment(1);
            GatewayError::ClientBusy
        })?),
        None => None,
    };
    let (parts, body) = request.into_parts();
    let Parts {
        method,
        uri,
        headers,
        ..
    } = parts;

    // The API's methods only: an extension method is nobody's to answer, so it goes nowhere.
    if ![
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ]
    .contains(&method)
    {
        return Err(GatewayError::UnknownMethod);
    }
    let body_timeout = Duration::from_millis(state.settings.connections.body_timeout_ms);
    let reading = read_body(body, &headers, state.settings.proxy.body_limit_bytes);
    let body = match tokio::time::timeout(body_timeout, reading).await {
        Ok(body) => body?,
        Err(_) => {
            metrics::counter!("gateway_connection_timeouts_total", "phase" => "body").increment(1);
            return Err(GatewayError::BodyTimeout);
        }
    };
    let order =
        (route == RouteId::FlashSale && method == Method::POST && uri.path() == api::order::CREATE)
            .then(|| OrderFacts::parse(&body))
            .transpose()?;
    if let Some(activity) = order.and_then(|o| o.activity)
        && let Some(refusal) = state.flow.known_sold_out(route, activity)
    {
        return Err(GatewayError::Blocked(refusal));
    }

    // The payment provider is no buyer: its callback carries no token, and order-service checks
    // its signature instead.
    let provider = route == RouteId::FlashSale && uri.path() == api::order::PAYMENT_CALLBACK;
    let caller = if state.authenticates(route) && !provider {
        state.identity.authenticate(&headers)?
    } else {
        Caller::Anonymous
    };
    let user = match caller {
        Caller::User(user) => Some(user.to_string()),
        // Development mode: the body's user, when it is a real id (the seed's "{random}" is not).
        Caller::Anonymous => order.and_then(|o| o.body_user).map(|u| u.to_string()),
    };
    // The purchase pass, checked before the flow rules (a forged one costs nothing more) and
    // spent after them (a buyer they refuse keeps it).
    let pass = match order.and_then(|o| o.activity) {
        Some(activity) => purchase_pass(state, &headers, activity, caller, order)?,
        None => None,
    };
    let flow_request = FlowRequest {
        route,
        activity: order.and_then(|o| o.activity),
        user: user.as_deref(),
        client_ip,
    };
    let admission = state
        .flow
        .admit(&flow_request)
        .await
        .map_err(GatewayError::Blocked)?;
    if let Some(pass) = &pass {
        pass.spend(state).await?;
    }

    let forwarded = state
        .upstream
        .forward(route, method.clone(), &uri, headers, body, caller, peer)
        .await;
    match forwarded {
        Ok(response) => {
            let probe = admission.finish(response.status().is_server_error());
            if let Some(pass) = &pass
                && response.status().is_server_error()
            {
                pass.give_back(state).await;
            }
            learn(state, route, &method, uri.path(), order, &response, probe);
            Ok(response.map(Body::from))
        }
        Err(error) => {
            // A sold-out probe without an answer is abandoned: the next request probes.
            drop(admission.finish(error.is_upstream_failure()));
            if let Some(pass) = &pass {
                pass.give_back(state).await;
            }
            Err(error)
        }
    }
}

/// A checked purchase pass of an order creation, to be spent once.
#[derive(Clone)]
struct Pass {
    activity: ActivityId,
    user: UserId,
    claims: Claims,
}

/// The order's pass, checked (signature, expiry, activity, holder), if it carries one; refused
/// when the activity needs one and it carries none (docs/waiting-room.md).
fn purchase_pass(
    state: &AppState,
    headers: &HeaderMap,
    activity: ActivityId,
    caller: Caller,
    order: Option<OrderFacts>,
) -> Result<Option<Pass>, GatewayError> {
    let token = headers.get(PASS_HEADER);
    if token.is_none() {
        let rules = state.flow.rules().current();
        let needed = rules.rules().admission.require_pass
            || rules.rules().waiting_room(activity.get()).is_some();
        return if needed {
            Err(GatewayError::Admission(Refusal::PassRequired))
        } else {
            Ok(None)
        };
    }
    let buyer = match caller {
        Caller::User(user) => Some(user),
        Caller::Anonymous => order.and_then(|o| o.body_user),
    };
    // Development mode: the body names the buyer, and a pass is only good for the one it names.
    let user = buyer.ok_or(GatewayError::Admission(Refusal::PassInvalid(
        "the order names no buyer for it",
    )))?;
    let token = token
        .and_then(|t| t.to_str().ok())
        .ok_or(GatewayError::Admission(Refusal::PassInvalid(
            "it is not text",
        )))?;
    let claims = state
        .admission
        .verify(token, Kind::Pass, activity, Some(user))
        .map_err(GatewayError::Admission)?;
    Ok(Some(Pass {
        activity,
        user,
        claims,
    }))
}

impl Pass {
    /// Spends the pass in Redis. Without Redis its one use cannot be recorded: the order goes
    /// on (order-service's one order per buyer still holds), counted as a Redis failure.
    async fn spend(&self, state: &AppState) -> Result<(), GatewayError> {
        let Some(redis) = state.flow.cluster().redis() else {
            metrics::counter!("gateway_admission_redis_failures_total", "call" => "redeem")
                .increment(1);
            return Ok(());
        };
        let rules = state.flow.rules().current();
        let room = self
            .claims
            .room
            .then(|| rules.rules().waiting_room(self.activity.get()))
            .flatten();
        match Room::new(redis, self.activity)
            .redeem(self.user, &self.claims, room)
            .await
        {
            Ok(Redemption::Spent { wait }) => {
                metrics::counter!("gateway_admission_passes_total", "outcome" => "redeemed")
                    .increment(1);
                if room.is_some() {
                    metrics::histogram!("gateway_admission_redeem_wait_seconds")
                        .record(wait.as_secs_f64());
                }
                // The order's slot in the room's schedule: order-service takes a room's
                // orders at its rate, however its buyers bunch. A buyer who hangs up while it
                // waits gets the pass back.
                if !wait.is_zero() {
                    let waiting = GiveBackOnDrop(Some((state.clone(), self.clone())));
                    tokio::time::sleep(wait).await;
                    waiting.disarm();
                }
                Ok(())
            }
            Ok(Redemption::Refused(refusal)) => Err(GatewayError::Admission(refusal)),
            Ok(Redemption::Crowded { wait }) => {
                metrics::counter!("gateway_admission_passes_total", "outcome" => "crowded")
                    .increment(1);
                Err(GatewayError::Api(
                    ApiError::new(
                        ErrorCode::RateLimited,
                        "more buyers are ahead of this order than the room lets wait; the pass \
                         is kept, retry after the given delay",
                    )
                    .retry_after(wait.as_secs().max(1)),
                ))
            }
            Err(error) => {
                tracing::warn!(%error, "purchase pass: Redis failed, the order goes on unrecorded");
                metrics::counter!("gateway_admission_redis_failures_total", "call" => "redeem")
                    .increment(1);
                Ok(())
            }
        }
    }

    /// Gives the pass back: the order was not taken (5xx, or no answer).
    async fn give_back(&self, state: &AppState) {
        let Some(redis) = state.flow.cluster().redis() else {
            return;
        };
        match Room::new(redis, self.activity)
            .restore(self.user, &self.claims)
            .await
        {
            Ok(()) => metrics::counter!("gateway_admission_passes_total", "outcome" => "restored")
                .increment(1),
            Err(error) => tracing::warn!(%error, "purchase pass: could not give it back"),
        }
    }
}

/// Gives a spent pass back if dropped armed: the request was dropped (its client hung up)
/// before its order was forwarded.
struct GiveBackOnDrop(Option<(AppState, Pass)>);

impl GiveBackOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GiveBackOnDrop {
    fn drop(&mut self) {
        if let Some((state, pass)) = self.0.take() {
            tokio::spawn(async move { pass.give_back(&state).await });
        }
    }
}

/// What the body of an order creation says. It is read by the parser order-service reads it
/// with, so both see the same buyer; a body that is JSON but not one object (an array, a key
/// twice) is refused here, as order-service would. Other bad input is order-service's to answer:
/// the gateway only needs the activity, the quantity and (in development mode) the user.
#[derive(Debug, Clone, Copy, Default)]
struct OrderFacts {
    activity: Option<ActivityId>,
    body_user: Option<UserId>,
    /// The order is for one item: a `SOLD_OUT` to it means nothing is left.
    single_item: bool,
}

impl OrderFacts {
    fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let raw = match json::parse_object::<CreateOrderRequest>(body) {
            Ok(raw) => raw,
            Err(error @ ObjectError::NotAnObject(_)) => {
                return Err(GatewayError::InvalidBody(error.to_string()));
            }
            Err(_) => return Ok(Self::default()),
        };
        let single_item = match &raw.quantity {
            None | Some(Value::Null) => true,
            Some(q) => Quantity::parse(Some(q), u32::MAX).is_ok_and(|q| q.get() == 1),
        };
        Ok(Self {
            activity: ActivityId::parse(raw.activity_id.as_ref()).ok(),
            body_user: UserId::parse(raw.user_id.as_ref()).ok(),
            single_item,
        })
    }
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::PayloadTooLarge);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(GatewayError::PayloadTooLarge)
        }
        Err(_) => Err(GatewayError::BodyNotReceived),
    }
}

/// The client's address: the TCP peer, or with `hops` trusted proxies in front the entry the
/// outermost of them appended to `X-Forwarded-For` (entries left of it are the client's own
/// claims).
fn client_ip(request: &Request, peer: Option<IpAddr>, hops: usize) -> Option<IpAddr> {
    if hops == 0 {
        return peer;
    }
    let entries: Vec<&str> = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    entries
        .len()
        .checked_sub(hops)
        .and_then(|i| entries[i].parse().ok())
        .or(peer)
}

/// The activity of the order a cancel path names (`api::order::CANCEL`), if it is one.
fn cancelled_activity(path: &str) -> Option<ActivityId> {
    let (prefix, suffix) = api::order::CANCEL.split_once("{order_no}")?;
    let no = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
    OrderNo::parse(no).ok().map(|no| no.activity())
}

/// Learns from the upstream's answer: a one-item order refused `SOLD_OUT` (or any order refused
/// `SALE_ENDED`) marks the activity; a restock or warm-up through the inventory route, or a
/// buyer's cancel, lifts it.
fn learn(
    state: &AppState,
    route: RouteId,
    method: &Method,
    path: &str,
    order: Option<OrderFacts>,
    response: &Response<Bytes>,
    probe: Option<SoldOutProbe>,
) {
    if route == RouteId::Inventory && *method == Method::POST && response.status().is_success() {
        match StockChange::of_post(path) {
            Some(StockChange::Activity(activity)) => state.flow.sold_out().clear(activity),
            Some(StockChange::All) => state.flow.sold_out().clear_all(),
            None => {}
        }
        return;
    }
    // A buyer's cancel gives the order's stock back: the activity may sell again at once,
    // rather than after the mark's TTL.
    if route == RouteId::FlashSale
        && *method == Method::POST
        && response.status().is_success()
        && let Some(activity) = cancelled_activity(path)
    {
        state.flow.sold_out().clear(activity);
        return;
    }
    let Some(OrderFacts {
        activity: Some(activity),
        single_item,
        ..
    }) = order
    else {
        return;
    };
    // The rules in force, loaded once for both what is learned and for how long.
    let rules = state.flow.rules().current();
    let sold_out = rules.sold_out();
    if !sold_out.enabled {
        return;
    }
    let code = (response.status() == StatusCode::CONFLICT)
        .then(|| ErrorBody::code_of(response.body()))
        .flatten();
    let remembered = match code {
        Some(ErrorCode::SoldOut) if single_item => code,
        Some(ErrorCode::SaleEnded) => code,
        _ => None,
    };
    let ttl = sold_out.ttl();
    match (remembered, probe) {
        (Some(code), Some(probe)) => probe.still(code, ttl, Instant::now()),
        (Some(code), None) => state
            .flow
            .sold_out()
            .mark(activity, code, ttl, Instant::now()),
        (None, Some(probe)) => probe.open(),
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_path_names_its_orders_activity() {
        let no = "7-0123456789abcdef0123456789abcdef";
        assert_eq!(
            cancelled_activity(&api::order::cancel(no)),
            ActivityId::new(7)
        );
        assert_eq!(
            cancelled_activity(&api::order::one(no)),
            None,
            "not a cancel"
        );
        assert_eq!(
            cancelled_activity(&api::order::cancel("7-not-an-order")),
            None
        );
        assert_eq!(cancelled_activity(api::order::CREATE), None);
    }

    #[test]
    fn order_facts_read_ids_as_numbers_or_strings() {
        let f =
            OrderFacts::parse(br#"{"userId":"{random}","activityId":"1","quantity":1}"#).unwrap();
        assert_eq!(f.activity, ActivityId::new(1));
        assert_eq!(f.body_user, None);
        assert!(f.single_item);
        let f = OrderFacts::parse(br#"{"userId":7,"activityId":2,"quantity":"3"}"#).unwrap();
        assert_eq!(f.activity, ActivityId::new(2));
        assert_eq!(f.body_user, UserId::new(7));
        assert!(!f.single_item);
        let f = OrderFacts::parse(b"{\"userId\":").unwrap();
        assert_eq!(f.activity, None, "not JSON: order-service answers it");
        for refused in [
            &b"[1,2,3]"[..],
            br#"{"userId":"1","activityId":1,"userId":"2"}"#,
        ] {
            assert!(matches!(
                OrderFacts::parse(refused),
                Err(GatewayError::InvalidBody(_))
            ));
        }
    }
}
