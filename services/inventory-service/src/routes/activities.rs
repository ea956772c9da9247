//! Activities: create, read, warm up, restock, reconcile.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use flash_sale_common::domain::ActivityId;
use flash_sale_common::error::{ApiError, ErrorCode, Json, JsonObject};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::activities::{self, Activity, NewActivity};
use crate::reconciler::{self, ActivityReport};
use crate::state::AppState;
use crate::warmup::{self, WarmupError};

/// Largest stock one activity may hold: a flash sale of a few thousand items, with headroom.
const MAX_STOCK: i64 = 10_000_000;

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateActivityRequest {
    pub activity_id: Option<Value>,
    pub name: Option<String>,
    pub stock: Option<Value>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    /// Price of one item in the currency's smallest unit (default 0).
    pub price_cents: Option<Value>,
    /// Seconds a buyer has to pay once the order is in (default 900: 15 minutes).
    pub pay_timeout_secs: Option<Value>,
    /// Load it into Redis at once (default true); false leaves it to the scheduled warm-up.
    pub warm_up: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivityView {
    pub activity_id: String,
    pub name: Option<String>,
    /// Stock left in MySQL (the book of record).
    pub stock: i64,
    pub total_stock: Option<i64>,
    /// Quantity held by live (`CREATED` or `PAID`) orders in MySQL.
    pub ordered: i64,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub price_cents: i64,
    pub pay_timeout_secs: i64,
    /// What Redis holds; `null` when Redis could not be asked.
    pub redis: Option<RedisView>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedisView {
    pub warmed: bool,
    pub stock: i64,
    pub pending_reservations: i64,
    pub pending_quantity: i64,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestockRequest {
    pub quantity: Option<Value>,
}

/// Longest payment window: a day.
const MAX_PAY_TIMEOUT_SECS: i64 = 86_400;
/// Highest price of one item: ten million in the currency's unit.
const MAX_PRICE_CENTS: i64 = 1_000_000_000;

fn parse_stock(field: &'static str, raw: Option<&Value>, min: i64) -> Result<i64, ApiError> {
    parse_bounded(field, raw, min, MAX_STOCK)
}

fn parse_bounded(
    field: &'static str,
    raw: Option<&Value>,
    min: i64,
    max: i64,
) -> Result<i64, ApiError> {
    raw.and_then(|v| match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    })
    .filter(|n| (min..=max).contains(n))
    .ok_or_else(|| ApiError::invalid(format!("{field} must be an integer from {min} to {max}")))
}

fn path_id(raw: &str) -> Result<ActivityId, ApiError> {
    raw.parse()
}

async fn view(state: &AppState, activity: Activity) -> ActivityView {
    let redis = state
        .redis
        .snapshot(activity.id)
        .await
        .ok()
        .map(|s| RedisView {
            warmed: s.warmed,
            stock: s.stock,
            pending_reservations: s.pending,
            pending_quantity: s.pending_quantity,
        });
    ActivityView {
        activity_id: activity.id.to_string(),
        name: activity.name,
        stock: activity.stock,
        total_stock: activity.total_stock,
        ordered: activity.ordered,
        start_time: activity.start_time,
        end_time: activity.end_time,
        price_cents: activity.price_cents,
        pay_timeout_secs: activity.pay_timeout_secs,
        redis,
    }
}

async fn load(state: &AppState, id: ActivityId) -> Result<Activity, ApiError> {
    activities::find(&state.db, id)
        .await
        .map_err(|e| ApiError::unavailable("MySQL", e))?
        .ok_or_else(|| ApiError::new(ErrorCode::ActivityNotFound, format!("no activity {id}")))
}

fn warmup_error(error: WarmupError) -> ApiError {
    match error {
        WarmupError::NotFound(id) => {
            ApiError::new(ErrorCode::ActivityNotFound, format!("no activity {id}"))
        }
        WarmupError::Database(e) => ApiError::unavailable("MySQL", e),
        WarmupError::Redis(e) => ApiError::unavailable("Redis", e),
    }
}

pub(super) async fn create_activity(
    State(state): State<AppState>,
    JsonObject(body): JsonObject<CreateActivityRequest>,
) -> Result<(StatusCode, Json<ActivityView>), ApiError> {
    let id = ActivityId::parse(body.activity_id.as_ref())?;
    let stock = parse_stock("stock", body.stock.as_ref(), 0)?;
    let price_cents = match &body.price_cents {
        None | Some(Value::Null) => 0,
        raw => parse_bounded("priceCents", raw.as_ref(), 0, MAX_PRICE_CENTS)?,
    };
    let pay_timeout_secs = match &body.pay_timeout_secs {
        None | Some(Value::Null) => 900,
        raw => parse_bounded("payTimeoutSecs", raw.as_ref(), 1, MAX_PAY_TIMEOUT_SECS)?,
    };
    let name = body
        .name
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty());
    if name.as_ref().is_some_and(|n| n.chars().count() > 128) {
        return Err(ApiError::invalid("name must be at most 128 characters"));
    }
    if let (Some(start), Some(end)) = (body.start_time, body.end_time)
        && end <= start
    {
        return Err(ApiError::invalid("endTime must be after startTime"));
    }
    let new = NewActivity {
        id,
        name,
        stock,
        start_time: body.start_time,
        end_time: body.end_time,
        price_cents,
        pay_timeout_secs,
    };
    let created = activities::create(&state.db, &new)
        .await
        .map_err(|e| ApiError::unavailable("MySQL", e))?;
    if !created {
        return Err(ApiError::new(
            ErrorCode::ActivityExists,
            format!("activity {id} already exists"),
        ));
    }
    if body.warm_up.unwrap_or(true) {
        warmup::warm_up(&state.db, &state.redis, id)
            .await
            .map_err(warmup_error)?;
    }
    let activity = load(&state, id).await?;
    Ok((StatusCode::CREATED, Json(view(&state, activity).await)))
}

pub(super) async fn list_activities(
    State(state): State<AppState>,
) -> Result<Json<Vec<ActivityView>>, ApiError> {
    let all = activities::list(&state.db)
        .await
        .map_err(|e| ApiError::unavailable("MySQL", e))?;
    let mut views = Vec::with_capacity(all.len());
    for activity in all {
        views.push(view(&state, activity).await);
    }
    Ok(Json(views))
}

pub(super) async fn get_activity(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<ActivityView>, ApiError> {
    let activity = load(&state, path_id(&raw)?).await?;
    Ok(Json(view(&state, activity).await))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarmupView {
    pub activity_id: String,
    pub outcome: String,
}

pub(super) async fn warm_up_activity(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<WarmupView>, ApiError> {
    let id = path_id(&raw)?;
    let outcome = warmup::warm_up(&state.db, &state.redis, id)
        .await
        .map_err(warmup_error)?;
    Ok(Json(WarmupView {
        activity_id: id.to_string(),
        outcome: outcome.as_str().into(),
    }))
}

pub(super) async fn warm_up_all(
    State(state): State<AppState>,
) -> Result<Json<Vec<WarmupView>>, ApiError> {
    let results = warmup::warm_up_all(&state.db, &state.redis)
        .await
        .map_err(|e| ApiError::unavailable("MySQL", e))?;
    let mut views = Vec::new();
    for (id, result) in results {
        let outcome = result.map_err(warmup_error)?;
        views.push(WarmupView {
            activity_id: id.to_string(),
            outcome: outcome.as_str().into(),
        });
    }
    Ok(Json(views))
}

pub(super) async fn restock_activity(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    JsonObject(body): JsonObject<RestockRequest>,
) -> Result<Json<ActivityView>, ApiError> {
    let id = path_id(&raw)?;
    let quantity = parse_stock("quantity", body.quantity.as_ref(), 1)?;
    // Fill the total of a hand-inserted row first, so restock always adds to a known total.
    activities::fill_total(&state.db, id)
        .await
        .map_err(|e| ApiError::unavailable("MySQL", e))?;
    if !activities::restock(&state.db, id, quantity)
        .await
        .map_err(|e| ApiError::unavailable("MySQL", e))?
    {
        return Err(ApiError::new(
            ErrorCode::ActivityNotFound,
            format!("no activity {id}"),
        ));
    }
    // MySQL is the book of record; if Redis misses this, the reconciler repairs the drift.
    if let Err(error) = state.redis.adjust(id, quantity, quantity).await {
        tracing::warn!(activity = %id, %error, "restock not applied to Redis; the reconciler will repair it");
    }
    let activity = load(&state, id).await?;
    Ok(Json(view(&state, activity).await))
}

pub(super) async fn reconcile_now(
    State(state): State<AppState>,
) -> Result<Json<Vec<ActivityReport>>, ApiError> {
    let mut tracker = state.drift.lock().await;
    let reports = reconciler::reconcile_all(&state.db, &state.redis, &state.settings, &mut tracker)
        .await
        .map_err(|e| ApiError::unavailable("the stores", e))?;
    Ok(Json(reports))
}
