//! The gateway's own buyer routes (docs/waiting-room.md): join a waiting room or ask for a
//! purchase pass (`POST /api/admission/{activity}`), poll a queue ticket or see the room
//! (`GET /api/admission/{activity}`), and the buyer's page (`GET /shop`).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use flash_sale_common::domain::{ActivityId, UserId};
use flash_sale_common::error::{ApiError, ErrorCode};
use flash_sale_common::json;
use flash_sale_common::redis::Redis;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::admission::{Kind, Refusal, Room, RoomAnswer, Standing, TICKET_HEADER};
use crate::error::GatewayError;
use crate::identity::Caller;
use crate::resource::RouteId;
use crate::rules::WaitingRoomRule;
use crate::state::AppState;

/// The buyer's page: one file, plain HTML and a little script.
const BUYER_PAGE: &str = include_str!("../../static/buyer.html");

pub(super) async fn page() -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(BUYER_PAGE)).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PollQuery {
    user_id: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Waiting {
    state: &'static str,
    activity_id: i64,
    user_id: i64,
    /// Only in the answer to a join: a poll keeps the ticket it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    ticket: Option<String>,
    /// 1-based among those waiting; `null` before the opening (the draw is hidden).
    position: Option<u64>,
    estimated_wait_ms: Option<u64>,
    opens_at: u64,
    waiting: u64,
    retry_after_ms: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Admitted {
    state: &'static str,
    activity_id: i64,
    user_id: i64,
    pass: String,
    pass_expires_at: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Info {
    activity_id: i64,
    opens_at: u64,
    closes_at: Option<u64>,
    now: u64,
    stock_left: i64,
    waiting_room: bool,
    require_pass: bool,
    waiting: u64,
    mode: &'static str,
}

/// `POST /api/admission/{activity}`: join the activity's waiting room, or, without one, take a
/// purchase pass during the sale window.
pub(super) async fn join(
    State(state): State<AppState>,
    Path(activity): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, GatewayError> {
    let activity = activity_id(&activity)?;
    let body_user = body_user(&body)?;
    let user = buyer(&state, &headers, body_user)?;
    let redis = redis(&state)?;
    let current = state.flow.rules().current();
    let rules = current.rules();
    let Some(room) = rules.waiting_room(activity.get()) else {
        return plain_pass(&state, redis, activity, user).await;
    };
    let answer = Room::new(redis, activity)
        .join(user, room, &rules.admission)
        .await
        .map_err(room_down)?;
    record(room, activity, &answer, None);
    let ticket = matches!(answer.standing, Standing::Waiting { .. }).then(|| {
        state
            .admission
            .ticket(user, activity, now_ms(), rules.admission.ticket_ttl_secs)
    });
    respond(&state, room, activity, user, answer, ticket)
}

/// `GET /api/admission/{activity}`: with `X-Queue-Ticket`, where its holder stands (and the
/// pass once admitted); without, what anyone may see of the activity's admission.
pub(super) async fn poll(
    State(state): State<AppState>,
    Path(activity): Path<String>,
    Query(query): Query<PollQuery>,
    headers: HeaderMap,
) -> Result<Response, GatewayError> {
    let activity = activity_id(&activity)?;
    let redis = redis(&state)?;
    let current = state.flow.rules().current();
    let rules = current.rules();
    let room = rules.waiting_room(activity.get());
    let Some(ticket) = headers.get(TICKET_HEADER) else {
        let info = Room::new(redis, activity)
            .info(room, &rules.admission)
            .await
            .map_err(room_down)?
            .ok_or_else(not_found)?;
        return Ok(Json(Info {
            activity_id: activity.get(),
            opens_at: info.opens_ms,
            closes_at: info.closes_ms,
            now: info.now_ms,
            stock_left: info.stock,
            waiting_room: room.is_some(),
            require_pass: room.is_some() || rules.admission.require_pass,
            waiting: info.waiting,
            mode: info.mode.as_str(),
        })
        .into_response());
    };
    let query_user = match &query.user_id {
        Some(raw) => {
            Some(UserId::parse(Some(&Value::String(raw.clone()))).map_err(GatewayError::Api)?)
        }
        None => None,
    };
    let caller = caller(&state, &headers)?.or(query_user);
    let ticket = ticket
        .to_str()
        .map_err(|_| GatewayError::Admission(Refusal::TicketInvalid("it is not text")))?;
    let claims = state
        .admission
        .verify(ticket, Kind::Ticket, activity, caller)
        .map_err(GatewayError::Admission)?;
    let user = claims.user().expect("verify checked the holder");
    let Some(room) = room else {
        // The room was taken down by a rule reload: the ticket's holder simply buys.
        return plain_pass(&state, redis, activity, user).await;
    };
    let answer = Room::new(redis, activity)
        .status(user, room, &rules.admission)
        .await
        .map_err(room_down)?;
    record(room, activity, &answer, Some(claims.at));
    respond(&state, room, activity, user, answer, None)
}

/// A pass without a queue: only inside the sale window, only while stock is left.
async fn plain_pass(
    state: &AppState,
    redis: &Redis,
    activity: ActivityId,
    user: UserId,
) -> Result<Response, GatewayError> {
    let rules = state.flow.rules().current();
    let rule = &rules.rules().admission;
    let info = Room::new(redis, activity)
        .info(None, rule)
        .await
        .map_err(room_down)?
        .ok_or_else(not_found)?;
    if info.now_ms < info.opens_ms {
        return Err(GatewayError::Api(ApiError::new(
            ErrorCode::SaleNotStarted,
            format!("the sale opens at {} (ms since the epoch)", info.opens_ms),
        )));
    }
    if info.closes_ms.is_some_and(|c| info.now_ms >= c) {
        return Err(GatewayError::Api(ApiError::new(
            ErrorCode::SaleEnded,
            "the sale has ended",
        )));
    }
    if info.stock <= 0 {
        return Err(sold_out());
    }
    let deadline = info.now_ms + rule.pass_ttl_secs * 1000;
    metrics::counter!("gateway_admission_passes_total", "outcome" => "issued").increment(1);
    Ok(Json(Admitted {
        state: "admitted",
        activity_id: activity.get(),
        user_id: user.get(),
        pass: state.admission.pass(user, activity, deadline, false),
        pass_expires_at: deadline,
    })
    .into_response())
}

fn respond(
    state: &AppState,
    room: &WaitingRoomRule,
    activity: ActivityId,
    user: UserId,
    answer: RoomAnswer,
    ticket: Option<String>,
) -> Result<Response, GatewayError> {
    match answer.standing {
        Standing::Admitted { deadline_ms, first } => {
            if first {
                metrics::counter!("gateway_admission_passes_total", "outcome" => "issued")
                    .increment(1);
            }
            Ok(Json(Admitted {
                state: "admitted",
                activity_id: activity.get(),
                user_id: user.get(),
                pass: state.admission.pass(user, activity, deadline_ms, true),
                pass_expires_at: deadline_ms,
            })
            .into_response())
        }
        Standing::Waiting { position, paused } => {
            let rate = u64::from(room.rate.max(1));
            let estimated = position.map(|p| p * 1000 / rate);
            let until_open = answer.opens_ms.saturating_sub(now_ms());
            // Poll about twice per estimated wait, at most every 5 s, spread a little so the
            // polls of buyers who joined together do not arrive together. Near the head every
            // 100 ms: an admitted buyer learns it at the next poll, and the later that comes,
            // the more the buys of one second of admissions spill into the next.
            let base = match estimated {
                Some(wait) => (wait / 2).clamp(100, 5000),
                None => until_open.clamp(250, 5000),
            };
            let retry = base + rand::random::<u64>() % (base / 4 + 1);
            Ok(Json(Waiting {
                state: if paused { "paused" } else { "waiting" },
                activity_id: activity.get(),
                user_id: user.get(),
                ticket,
                position,
                estimated_wait_ms: estimated,
                opens_at: answer.opens_ms,
                waiting: answer.waiting,
                retry_after_ms: retry,
            })
            .into_response())
        }
        Standing::SoldOut => Err(sold_out()),
        Standing::SaleEnded => Err(GatewayError::Api(ApiError::new(
            ErrorCode::SaleEnded,
            "the sale has ended",
        ))),
        Standing::UnknownActivity => Err(not_found()),
        Standing::NotInQueue => Err(GatewayError::Admission(Refusal::TicketInvalid(
            "its holder is not in this activity's queue",
        ))),
        Standing::Spent => Err(GatewayError::Admission(Refusal::PassUsed)),
        Standing::Lapsed => Err(GatewayError::Admission(Refusal::PassExpired)),
    }
}

/// The room's metrics: a bounded `activity` label (the id for rooms named by activity,
/// `other` for the room of every activity).
fn record(room: &WaitingRoomRule, activity: ActivityId, answer: &RoomAnswer, joined: Option<u64>) {
    let label = match room.activity {
        Some(_) => activity.to_string(),
        None => "other".to_owned(),
    };
    metrics::gauge!("gateway_waiting_room_waiting", "activity" => label.clone())
        .set(answer.waiting as f64);
    if answer.admitted_now > 0 {
        metrics::counter!("gateway_waiting_room_admitted_total", "activity" => label.clone())
            .increment(answer.admitted_now);
    }
    if let Standing::Admitted { first: true, .. } = answer.standing {
        let waited = joined.map_or(0, |at| now_ms().saturating_sub(at));
        metrics::histogram!("gateway_waiting_room_wait_seconds", "activity" => label)
            .record(waited as f64 / 1000.0);
    }
}

fn activity_id(raw: &str) -> Result<ActivityId, GatewayError> {
    ActivityId::parse(Some(&Value::String(raw.to_owned()))).map_err(GatewayError::Api)
}

/// The body's `userId`, in development mode; any other field is ignored. An empty body is no
/// user; a body that is not one JSON object is refused.
fn body_user(body: &[u8]) -> Result<Option<UserId>, GatewayError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        user_id: Option<Value>,
    }
    let raw =
        json::parse_object::<Raw>(body).map_err(|e| GatewayError::InvalidBody(e.to_string()))?;
    match raw.user_id {
        None | Some(Value::Null) => Ok(None),
        Some(v) => UserId::parse(Some(&v)).map(Some).map_err(GatewayError::Api),
    }
}

/// The authenticated user, if the route authenticates and a token came (development mode lets
/// requests without one through as `None`).
fn caller(state: &AppState, headers: &HeaderMap) -> Result<Option<UserId>, GatewayError> {
    if !state.authenticates(RouteId::FlashSale) {
        return Ok(None);
    }
    Ok(match state.identity.authenticate(headers)? {
        Caller::User(user) => Some(user),
        Caller::Anonymous => None,
    })
}

/// The buyer: the token's user, or in development mode the body's.
fn buyer(
    state: &AppState,
    headers: &HeaderMap,
    body_user: Option<UserId>,
) -> Result<UserId, GatewayError> {
    caller(state, headers)?.or(body_user).ok_or_else(|| {
        GatewayError::Api(ApiError::invalid(
            "userId is required (development mode: the body's userId names the buyer)",
        ))
    })
}

fn redis(state: &AppState) -> Result<&Redis, GatewayError> {
    state.flow.cluster().redis().ok_or_else(|| {
        metrics::counter!("gateway_admission_redis_failures_total", "call" => "room").increment(1);
        GatewayError::Api(
            ApiError::new(
                ErrorCode::ServiceUnavailable,
                "the waiting room cannot reach Redis yet; retry in a moment",
            )
            .retry_after(1),
        )
    })
}

fn room_down(error: flash_sale_common::redis::RedisFailure) -> GatewayError {
    tracing::warn!(%error, "waiting room: Redis call failed");
    metrics::counter!("gateway_admission_redis_failures_total", "call" => "room").increment(1);
    GatewayError::Api(
        ApiError::new(
            ErrorCode::ServiceUnavailable,
            "the waiting room cannot reach Redis; your place is kept, retry in a moment",
        )
        .retry_after(1),
    )
}

fn not_found() -> GatewayError {
    GatewayError::Api(ApiError::new(
        ErrorCode::ActivityNotFound,
        "no such activity, or it is not open for sale",
    ))
}

fn sold_out() -> GatewayError {
    GatewayError::Api(ApiError::new(
        ErrorCode::SoldOut,
        "sold out: the buyers admitted can take everything left",
    ))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
