//! Fair admission (docs/waiting-room.md): queue tickets and purchase passes, signed by the
//! gateway, and the waiting room's queue in Redis, shared by every replica.
//!
//! Tickets and passes are HS256 JWTs signed with `admission.secret` (`jsonwebtoken`, as the user
//! tokens are verified); their `typ` keeps one from being taken for the other. The queue, the
//! admission bucket and the passes' one use live in Redis, advanced by `lua/waiting_room.lua`
//! and spent by `lua/pass.lua`, atomically per activity (one hash tag).

use std::sync::LazyLock;
use std::time::Duration;

use flash_sale_common::domain::{ActivityId, UserId};
use flash_sale_common::error::{ApiError, ErrorCode};
use flash_sale_common::redis::{ActivityKeys, Redis, RedisFailure};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use redis::Script;
use serde::{Deserialize, Serialize};

use crate::configuration::AdmissionSettings;
use crate::rules::{AdmissionRule, WaitingRoomRule};

static WAITING_ROOM: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/waiting_room.lua")));
static PASS: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/pass.lua")));

/// The header an order creation carries its purchase pass in.
pub const PASS_HEADER: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-purchase-pass");

/// The header a poll carries its queue ticket in.
pub const TICKET_HEADER: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-queue-ticket");

/// Shortest secret accepted (RFC 7518: at least the hash output).
const MIN_SECRET: usize = 32;

/// Scores below this are the pre-opening draw (`lua/waiting_room.lua`).
const DRAW_BELOW: u64 = 1 << 41;

/// How far ahead of its slot in a room's redemption schedule an order may be forwarded: a
/// second takes at most the rate plus this much of it (`lua/pass.lua`).
const REDEEM_TOLERANCE_MS: u64 = 20;

/// The longest a redeemed pass waits for its slot; past it the pass is not spent and the buyer
/// is told to retry.
const REDEEM_MAX_WAIT_MS: u64 = 2000;

/// What spending a pass came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redemption {
    /// Spent: forward the order after `wait` (its slot in the room's schedule).
    Spent { wait: Duration },
    /// Refused; nothing changed.
    Refused(Refusal),
    /// Not spent: the schedule is `wait` ahead, longer than a buyer is kept waiting.
    Crowded { wait: Duration },
}

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A place in a waiting room's queue.
    Ticket,
    /// The right to one `create`.
    Pass,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub act: i64,
    pub typ: Kind,
    /// Seconds since the epoch (RFC 7519).
    pub exp: u64,
    /// A ticket: when its holder joined; a pass: its deadline (ms since the epoch).
    pub at: u64,
    /// A pass from a waiting room (its admission is in Redis), or a plain purchase pass.
    #[serde(default)]
    pub room: bool,
    /// The pass' one-use id.
    #[serde(default)]
    pub jti: String,
}

impl Claims {
    /// The user the token is bound to.
    pub fn user(&self) -> Option<UserId> {
        self.sub.parse().ok().and_then(UserId::new)
    }
}

/// Signs and checks tickets and passes.
pub struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// The configured secret; in development mode without one, a random secret of this process
    /// (tickets then do not survive a restart, which is said in the log).
    pub fn from_settings(
        settings: &AdmissionSettings,
        leeway_secs: u64,
        development: bool,
    ) -> anyhow::Result<Self> {
        let configured = settings.secret.expose();
        let secret = if configured.is_empty() {
            anyhow::ensure!(
                development,
                "admission.secret is required (at least {MIN_SECRET} bytes, the same on every \
                 replica): it signs queue tickets and purchase passes"
            );
            tracing::warn!(
                "admission.secret is empty: tickets and passes are signed with a random secret \
                 of this process (development mode)"
            );
            (0..4)
                .map(|_| format!("{:016x}", rand::random::<u64>()))
                .collect::<String>()
        } else {
            anyhow::ensure!(
                configured.len() >= MIN_SECRET,
                "admission.secret must be at least {MIN_SECRET} bytes"
            );
            configured.to_owned()
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        })
    }

    fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// A ticket for `user`'s place in `activity`'s queue, who joined at `joined_ms`.
    pub fn ticket(
        &self,
        user: UserId,
        activity: ActivityId,
        joined_ms: u64,
        ttl_secs: u64,
    ) -> String {
        self.sign(&Claims {
            sub: user.to_string(),
            act: activity.get(),
            typ: Kind::Ticket,
            exp: joined_ms / 1000 + ttl_secs,
            at: joined_ms,
            room: true,
            jti: String::new(),
        })
    }

    /// A pass for one `create`, good until `deadline_ms`. A room's pass is the same token for
    /// the same admission (its id is the buyer and the deadline), so a buyer who polls twice
    /// holds one pass.
    pub fn pass(&self, user: UserId, activity: ActivityId, deadline_ms: u64, room: bool) -> String {
        // Buyers admitted by one call share a deadline: the id names the buyer too.
        let jti = if room {
            format!("r{user}-{deadline_ms}")
        } else {
            uuid::Uuid::now_v7().simple().to_string()
        };
        self.sign(&Claims {
            sub: user.to_string(),
            act: activity.get(),
            typ: Kind::Pass,
            exp: deadline_ms.div_ceil(1000),
            at: deadline_ms,
            room,
            jti,
        })
    }

    /// Checks a token's signature, expiry, kind, activity and holder.
    pub fn verify(
        &self,
        token: &str,
        kind: Kind,
        activity: ActivityId,
        user: Option<UserId>,
    ) -> Result<Claims, Refusal> {
        let (invalid, expired) = match kind {
            Kind::Ticket => (Refusal::TicketInvalid as fn(_) -> _, Refusal::TicketExpired),
            Kind::Pass => (Refusal::PassInvalid as fn(_) -> _, Refusal::PassExpired),
        };
        let data = jsonwebtoken::decode::<Claims>(token.trim(), &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => expired,
            ErrorKind::InvalidSignature => invalid("its signature does not match"),
            _ => invalid("it is not a token this gateway issued"),
        })?;
        let claims = data.claims;
        if claims.typ != kind {
            return Err(invalid(match kind {
                Kind::Ticket => "it is a pass, not a queue ticket",
                Kind::Pass => "it is a queue ticket, not a pass: poll the queue for a pass",
            }));
        }
        if claims.act != activity.get() {
            return Err(invalid("it is for another activity"));
        }
        let holder = claims.user().ok_or(invalid("it names no user"))?;
        if user.is_some_and(|u| u != holder) {
            return Err(invalid("it is someone else's"));
        }
        Ok(claims)
    }
}

/// Registers the admission counters at zero, so a dashboard and an alert see their first
/// increase (a counter that appears at its first event has no rate for that event).
pub fn register_metrics() {
    for refusal in [
        Refusal::PassRequired,
        Refusal::PassInvalid(""),
        Refusal::PassExpired,
        Refusal::PassUsed,
        Refusal::TicketInvalid(""),
        Refusal::TicketExpired,
    ] {
        metrics::counter!("gateway_admission_refused_total", "reason" => refusal.reason())
            .increment(0);
    }
    for outcome in ["issued", "redeemed", "restored"] {
        metrics::counter!("gateway_admission_passes_total", "outcome" => outcome).increment(0);
    }
    for call in ["room", "redeem"] {
        metrics::counter!("gateway_admission_redis_failures_total", "call" => call).increment(0);
    }
}

/// A ticket or pass refused; nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PassRequired,
    PassInvalid(&'static str),
    PassExpired,
    PassUsed,
    TicketInvalid(&'static str),
    TicketExpired,
}

impl Refusal {
    /// The `reason` label of `gateway_admission_refused_total`.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::PassRequired => "pass_required",
            Self::PassInvalid(_) => "pass_invalid",
            Self::PassExpired => "pass_expired",
            Self::PassUsed => "pass_used",
            Self::TicketInvalid(_) => "ticket_invalid",
            Self::TicketExpired => "ticket_expired",
        }
    }

    pub fn to_api_error(self) -> ApiError {
        match self {
            Self::PassRequired => ApiError::new(
                ErrorCode::PassRequired,
                "this sale needs a purchase pass: POST /api/admission/{activityId} for one, then \
                 send it as X-Purchase-Pass",
            ),
            Self::PassInvalid(why) => ApiError::new(
                ErrorCode::PassInvalid,
                format!("the purchase pass is refused: {why}"),
            ),
            Self::PassExpired => ApiError::new(
                ErrorCode::PassExpired,
                "the purchase pass has expired: ask for a new one",
            ),
            Self::PassUsed => ApiError::new(
                ErrorCode::PassUsed,
                "the purchase pass has been used already",
            ),
            Self::TicketInvalid(why) => ApiError::new(
                ErrorCode::TicketInvalid,
                format!("the queue ticket is refused: {why}"),
            ),
            Self::TicketExpired => ApiError::new(
                ErrorCode::TicketExpired,
                "the queue ticket has expired: join the queue again",
            ),
        }
    }

    pub fn count(self) {
        metrics::counter!("gateway_admission_refused_total", "reason" => self.reason())
            .increment(1);
    }
}

/// Where a buyer stands in a waiting room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Admitted: the pass is good until `deadline_ms`. `first`: this is the first time the
    /// admission is handed out.
    Admitted {
        deadline_ms: u64,
        first: bool,
    },
    /// Waiting, at `position` (1-based; `None` before the opening, when the draw is hidden).
    Waiting {
        position: Option<u64>,
        paused: bool,
    },
    /// The admitted buyers can take everything left.
    SoldOut,
    SaleEnded,
    UnknownActivity,
    /// A state this gateway does not know (the script never answers one): refused as a bad
    /// ticket. A holder who left the queue is queued again by its next poll.
    NotInQueue,
    /// Admitted once, and the pass was spent.
    Spent,
    /// Admitted once, and the admission lapsed unused.
    Lapsed,
}

/// A waiting room's answer: the buyer's standing and the room around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomAnswer {
    pub standing: Standing,
    pub opens_ms: u64,
    /// Buyers waiting behind the admitted.
    pub waiting: u64,
    /// Admitted by this call (for `gateway_waiting_room_admitted_total`).
    pub admitted_now: u64,
}

/// The operator's mode of a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Open,
    Paused,
    QueueAll,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Paused => "paused",
            Self::QueueAll => "queue-all",
        }
    }

    pub fn parse(action: &str) -> Option<Self> {
        match action {
            "resume" | "open" => Some(Self::Open),
            "pause" | "paused" => Some(Self::Paused),
            "queue-all" => Some(Self::QueueAll),
            _ => None,
        }
    }
}

/// What anyone may see of an activity's admission (`GET /api/admission/{id}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomInfo {
    pub opens_ms: u64,
    /// `None`: open ended.
    pub closes_ms: Option<u64>,
    /// Redis' clock.
    pub now_ms: u64,
    pub stock: i64,
    pub waiting: u64,
    /// Unexpired, unspent admissions.
    pub outstanding: u64,
    pub mode: Mode,
    pub admitted_now: u64,
}

/// The Redis side of admission for one activity.
pub struct Room<'a> {
    redis: &'a Redis,
    activity: ActivityId,
    prefix: String,
}

impl<'a> Room<'a> {
    pub fn new(redis: &'a Redis, activity: ActivityId) -> Self {
        Self {
            redis,
            activity,
            prefix: ActivityKeys::prefix(activity),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}:wr:{name}", self.prefix)
    }

    async fn call(
        &self,
        op: &str,
        user: Option<UserId>,
        room: &WaitingRoomRule,
        rule: &AdmissionRule,
    ) -> Result<Vec<i64>, RedisFailure> {
        let keys = ActivityKeys::new(self.activity);
        let mut invocation = WAITING_ROOM.prepare_invoke();
        invocation
            .key(keys.meta)
            .key(keys.stock)
            .key(self.key("queue"))
            .key(self.key("state"))
            .key(self.key("passes"))
            .key(self.key("spent"))
            .key(self.key("handed"))
            .arg(op)
            .arg(user.map(|u| u.get()).unwrap_or(0))
            .arg(room.rate)
            .arg(room.burst)
            .arg(rule.pass_ttl_secs.saturating_mul(1000))
            .arg(rand::random::<u64>() % DRAW_BELOW);
        self.redis.run("gateway_waiting_room", &invocation).await
    }

    /// Joins (or finds again) `user`'s place, after advancing the queue.
    pub async fn join(
        &self,
        user: UserId,
        room: &WaitingRoomRule,
        rule: &AdmissionRule,
    ) -> Result<RoomAnswer, RedisFailure> {
        self.call("join", Some(user), room, rule).await.map(answer)
    }

    /// Where `user` stands, after advancing the queue.
    pub async fn status(
        &self,
        user: UserId,
        room: &WaitingRoomRule,
        rule: &AdmissionRule,
    ) -> Result<RoomAnswer, RedisFailure> {
        self.call("status", Some(user), room, rule)
            .await
            .map(answer)
    }

    /// The public view; `None` for an activity that is not warmed up. Without a room rule the
    /// queue is not advanced (its rate is 0).
    pub async fn info(
        &self,
        room: Option<&WaitingRoomRule>,
        rule: &AdmissionRule,
    ) -> Result<Option<RoomInfo>, RedisFailure> {
        let idle = WaitingRoomRule {
            activity: None,
            rate: 0,
            burst: 0,
        };
        let v = self.call("info", None, room.unwrap_or(&idle), rule).await?;
        if v.first() == Some(&-3) {
            return Ok(None);
        }
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Ok(Some(RoomInfo {
            closes_ms: u64::try_from(at(0)).ok(),
            now_ms: at(1).max(0) as u64,
            stock: at(2),
            waiting: at(3).max(0) as u64,
            outstanding: at(4).max(0) as u64,
            mode: match at(5) {
                1 => Mode::Paused,
                2 => Mode::QueueAll,
                _ => Mode::Open,
            },
            opens_ms: at(6).max(0) as u64,
            admitted_now: 0,
        }))
    }

    /// Spends a pass once. A room's pass takes the next slot of the room's redemption
    /// schedule (`room`'s rate, cluster-wide), and its order is to be forwarded after the wait.
    pub async fn redeem(
        &self,
        user: UserId,
        claims: &Claims,
        room: Option<&WaitingRoomRule>,
    ) -> Result<Redemption, RedisFailure> {
        let (rate, tolerance_ms) = room.map_or((0, 0), |r| {
            let rate = r.rate.max(1);
            (
                rate,
                REDEEM_TOLERANCE_MS + u64::from(r.burst) * 1000 / u64::from(rate),
            )
        });
        let outcome: Vec<i64> = self
            .pass("redeem", user, claims, rate, tolerance_ms)
            .await?;
        let wait = || Duration::from_millis(outcome.get(1).copied().unwrap_or(0).max(0) as u64);
        Ok(match outcome.first() {
            Some(1) => Redemption::Spent { wait: wait() },
            Some(-1) => Redemption::Refused(Refusal::PassUsed),
            Some(-3) => Redemption::Crowded { wait: wait() },
            _ => Redemption::Refused(Refusal::PassExpired),
        })
    }

    /// Gives a spent pass back (the order could not be forwarded).
    pub async fn restore(&self, user: UserId, claims: &Claims) -> Result<(), RedisFailure> {
        self.pass::<i64>("restore", user, claims, 0, 0)
            .await
            .map(drop)
    }

    async fn pass<T: redis::FromRedisValue>(
        &self,
        op: &str,
        user: UserId,
        claims: &Claims,
        rate: u32,
        tolerance_ms: u64,
    ) -> Result<T, RedisFailure> {
        let mut invocation = PASS.prepare_invoke();
        invocation
            .key(self.key(&format!("used:{}", claims.jti)))
            .key(self.key("passes"))
            .key(self.key("spent"))
            .key(self.key("state"))
            .arg(op)
            .arg(user.get())
            .arg(u8::from(claims.room))
            .arg(claims.at)
            .arg(rate)
            .arg(tolerance_ms)
            .arg(REDEEM_MAX_WAIT_MS);
        self.redis.run("gateway_pass", &invocation).await
    }

    /// Sets the operator's mode.
    pub async fn set_mode(&self, mode: Mode) -> Result<(), RedisFailure> {
        self.redis
            .query::<()>(
                redis::cmd("HSET")
                    .arg(self.key("state"))
                    .arg("mode")
                    .arg(mode.as_str()),
            )
            .await
    }
}

fn answer(v: Vec<i64>) -> RoomAnswer {
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let standing = match at(0) {
        1 => Standing::Admitted {
            deadline_ms: at(3).max(0) as u64,
            first: at(6) == 1,
        },
        0 | -5 => Standing::Waiting {
            position: u64::try_from(at(1)).ok(),
            paused: at(0) == -5,
        },
        -1 => Standing::SoldOut,
        -2 => Standing::SaleEnded,
        -3 => Standing::UnknownActivity,
        -6 => Standing::Spent,
        -7 => Standing::Lapsed,
        _ => Standing::NotInQueue,
    };
    RoomAnswer {
        standing,
        opens_ms: at(2).max(0) as u64,
        waiting: at(4).max(0) as u64,
        admitted_now: at(5).max(0) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flash_sale_common::configuration::Secret;

    fn signer(secret: &str) -> Signer {
        let settings = AdmissionSettings {
            secret: Secret::new(secret),
        };
        Signer::from_settings(&settings, 0, false).unwrap()
    }

    fn ids(user: i64, activity: i64) -> (UserId, ActivityId) {
        (
            UserId::new(user).unwrap(),
            ActivityId::new(activity).unwrap(),
        )
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    #[test]
    fn a_pass_is_good_for_its_holder_and_activity_only() {
        let s = signer(&"k".repeat(32));
        let (user, activity) = ids(7, 3);
        let pass = s.pass(user, activity, now_ms() + 60_000, true);
        let claims = s.verify(&pass, Kind::Pass, activity, Some(user)).unwrap();
        assert_eq!(
            (claims.user(), claims.act, claims.room),
            (Some(user), 3, true)
        );
        assert_eq!(
            s.verify(&pass, Kind::Pass, activity, UserId::new(8))
                .unwrap_err(),
            Refusal::PassInvalid("it is someone else's")
        );
        assert_eq!(
            s.verify(&pass, Kind::Pass, ActivityId::new(4).unwrap(), Some(user))
                .unwrap_err(),
            Refusal::PassInvalid("it is for another activity")
        );
        assert!(matches!(
            s.verify(&pass, Kind::Ticket, activity, Some(user)),
            Err(Refusal::TicketInvalid(_))
        ));
    }

    #[test]
    fn forged_expired_and_foreign_tokens_are_refused() {
        let s = signer(&"k".repeat(32));
        let other = signer(&"o".repeat(32));
        let (user, activity) = ids(7, 3);
        let forged = other.pass(user, activity, now_ms() + 60_000, false);
        assert_eq!(
            s.verify(&forged, Kind::Pass, activity, Some(user))
                .unwrap_err(),
            Refusal::PassInvalid("its signature does not match")
        );
        let expired = s.pass(user, activity, now_ms() - 5_000, false);
        assert_eq!(
            s.verify(&expired, Kind::Pass, activity, Some(user))
                .unwrap_err(),
            Refusal::PassExpired
        );
        let old_ticket = s.ticket(user, activity, now_ms() - 10_000, 1);
        assert_eq!(
            s.verify(&old_ticket, Kind::Ticket, activity, Some(user))
                .unwrap_err(),
            Refusal::TicketExpired
        );
        let ticket = s.ticket(user, activity, now_ms(), 60);
        assert!(matches!(
            s.verify(&ticket, Kind::Pass, activity, Some(user)),
            Err(Refusal::PassInvalid(
                "it is a queue ticket, not a pass: poll the queue for a pass"
            ))
        ));
        assert!(matches!(
            s.verify("not.a.token", Kind::Ticket, activity, Some(user)),
            Err(Refusal::TicketInvalid(_))
        ));
    }

    #[test]
    fn a_rooms_pass_is_the_same_token_for_the_same_admission() {
        let s = signer(&"k".repeat(32));
        let (user, activity) = ids(7, 3);
        let deadline = now_ms() + 60_000;
        assert_eq!(
            s.pass(user, activity, deadline, true),
            s.pass(user, activity, deadline, true)
        );
        let other = s.pass(UserId::new(8).unwrap(), activity, deadline, true);
        let id = |pass: &str, user| {
            s.verify(pass, Kind::Pass, activity, Some(user))
                .unwrap()
                .jti
        };
        assert_ne!(
            id(&s.pass(user, activity, deadline, true), user),
            id(&other, UserId::new(8).unwrap()),
            "buyers admitted together spend passes of their own"
        );
        assert_ne!(
            s.pass(user, activity, deadline, false),
            s.pass(user, activity, deadline, false),
            "a plain pass has an id of its own"
        );
    }

    #[test]
    fn a_short_or_missing_secret_is_refused_outside_development() {
        let short = AdmissionSettings {
            secret: Secret::new("short"),
        };
        assert!(Signer::from_settings(&short, 0, true).is_err());
        let empty = AdmissionSettings {
            secret: Secret::new(""),
        };
        assert!(Signer::from_settings(&empty, 0, false).is_err());
        assert!(Signer::from_settings(&empty, 0, true).is_ok());
    }
}
