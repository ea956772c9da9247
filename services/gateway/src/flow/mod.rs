//! Flow control: every request passes these checks, cheapest first, before it is forwarded.
//!
//! ```text
//! sold_out   the activity is known to be sold out          409 SOLD_OUT (no downstream call)
//! system     BBR in-flight estimate / CPU ceiling          503 OVERLOADED
//! param      hot-parameter budget per user, IP, activity   429 RATE_LIMITED
//! qps        per route and per activity: reject, warm-up, queue   429
//! concurrency  in flight per route and per activity        429
//! breaker    the downstream's circuit is open               503 CIRCUIT_OPEN
//! cluster    the shared Redis token bucket (local share without Redis)   429
//! ```
//!
//! Each rule type has its module: [`qps`], [`param`], [`system`], [`breaker`], [`cluster`],
//! [`sold_out`]; [`stats`] keeps the per-resource metrics; [`window`] and [`bucket`] are the
//! counting primitives; [`compiled`] turns the rule file ([`crate::rules`]) into limiters and
//! [`reload`] keeps it current. Time is tokio's, so tests run the rules on a paused clock.

pub mod breaker;
pub mod bucket;
pub mod cluster;
pub mod compiled;
pub mod param;
pub mod qps;
pub mod reload;
pub mod sold_out;
pub mod stats;
pub mod system;
pub mod window;

pub use compiled::{CompiledRules, FlowLimiter};
pub use reload::{ReloadOutcome, RulesStore};

use std::cell::OnceCell;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use flash_sale_common::domain::ActivityId;
use flash_sale_common::error::ErrorCode;
use tokio::time::Instant;

use self::breaker::{BreakerPermit, Outcome};
use self::cluster::{ClusterDecision, ClusterLimiter};
use self::qps::QpsDecision;
use self::sold_out::{SoldOut, SoldOutCheck, SoldOutProbe};
use self::stats::{InFlight, ResourceStats, Resources};
use self::system::{SystemBlock, SystemGuard, SystemPermit};
use crate::resource::{Downstream, ResourceKey, RouteId};
use crate::rules::{ControlBehavior, ParamKind};

/// Why a request was refused: the `reason` label of `gateway_flow_blocked_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    SoldOut,
    System,
    Cpu,
    ParamUser,
    ParamClientIp,
    ParamActivity,
    Qps,
    WarmUp,
    Queue,
    Concurrency,
    CircuitOpen,
    Cluster,
}

impl BlockReason {
    pub const ALL: [BlockReason; 12] = [
        Self::SoldOut,
        Self::System,
        Self::Cpu,
        Self::ParamUser,
        Self::ParamClientIp,
        Self::ParamActivity,
        Self::Qps,
        Self::WarmUp,
        Self::Queue,
        Self::Concurrency,
        Self::CircuitOpen,
        Self::Cluster,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SoldOut => "sold_out",
            Self::System => "system",
            Self::Cpu => "cpu",
            Self::ParamUser => "param_user",
            Self::ParamClientIp => "param_client_ip",
            Self::ParamActivity => "param_activity",
            Self::Qps => "qps",
            Self::WarmUp => "warm_up",
            Self::Queue => "queue",
            Self::Concurrency => "concurrency",
            Self::CircuitOpen => "circuit_open",
            Self::Cluster => "cluster",
        }
    }

    fn of_param(kind: ParamKind) -> Self {
        match kind {
            ParamKind::User => Self::ParamUser,
            ParamKind::ClientIp => Self::ParamClientIp,
            ParamKind::Activity => Self::ParamActivity,
        }
    }

    fn of_control(control: ControlBehavior) -> Self {
        match control {
            ControlBehavior::Reject => Self::Qps,
            ControlBehavior::WarmUp => Self::WarmUp,
            ControlBehavior::Queue => Self::Queue,
        }
    }
}

/// A refused request: why, what to answer, and when a retry makes sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: BlockReason,
    /// The resource whose rule refused (for the message).
    pub resource: String,
    pub downstream: Downstream,
    /// The code the short circuit remembered (`SOLD_OUT`, `SALE_ENDED`), for `sold_out`.
    pub remembered: Option<ErrorCode>,
    pub retry_after: Option<Duration>,
}

/// What the flow checks need to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct FlowRequest<'a> {
    pub route: RouteId,
    /// The body's `activityId` (order creation).
    pub activity: Option<ActivityId>,
    /// The user: the token's subject, or in development mode the body's `userId`.
    pub user: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
}

/// Flow control for the whole gateway: the rules in force and the state they act on.
#[derive(Debug)]
pub struct Flow {
    rules: Arc<RulesStore>,
    resources: Resources,
    system: Arc<SystemGuard>,
    cluster: Arc<ClusterLimiter>,
    sold_out: Arc<SoldOut>,
}

impl Flow {
    pub fn new(
        rules: Arc<RulesStore>,
        cluster: Arc<ClusterLimiter>,
        max_tracked_activities: usize,
    ) -> Self {
        let system = Arc::new(SystemGuard::new(rules.current().system(), Instant::now()));
        Self {
            rules,
            resources: Resources::new(max_tracked_activities),
            system,
            cluster,
            sold_out: Arc::new(SoldOut::new()),
        }
    }

    pub fn rules(&self) -> &Arc<RulesStore> {
        &self.rules
    }

    pub fn system(&self) -> &Arc<SystemGuard> {
        &self.system
    }

    pub fn cluster(&self) -> &Arc<ClusterLimiter> {
        &self.cluster
    }

    pub fn sold_out(&self) -> &Arc<SoldOut> {
        &self.sold_out
    }

    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// The sold-out short circuit alone, for a request whose token has not been checked yet:
    /// whether an activity is sold out is no secret, and a refusal that does no cryptography is
    /// the cheapest. A lapsed mark is left to [`Self::admit`], whose probe needs a full request.
    pub fn known_sold_out(&self, route: RouteId, activity: ActivityId) -> Option<Refusal> {
        let rules = self.rules.current();
        if !rules.sold_out().enabled {
            return None;
        }
        let code = self.sold_out.known(activity, Instant::now())?;
        let stats = self.resources.activity(activity);
        self.resources.route(route).blocked(BlockReason::SoldOut);
        stats.blocked(BlockReason::SoldOut);
        Some(Refusal {
            reason: BlockReason::SoldOut,
            resource: stats.name().to_owned(),
            downstream: route.downstream(),
            remembered: Some(code),
            retry_after: None,
        })
    }

    /// Runs every check; on success the request is counted passed and in flight until the
    /// returned admission is finished or dropped.
    pub async fn admit(&self, request: &FlowRequest<'_>) -> Result<Admission, Refusal> {
        let rules = self.rules.current();
        let route = request.route;
        let downstream = route.downstream();
        let route_stats = Arc::clone(self.resources.route(route));
        let activity_stats = request.activity.map(|a| self.resources.activity(a));
        let refuse = |reason: BlockReason, resource: &str, retry_after: Option<Duration>| {
            route_stats.blocked(reason);
            if let Some(stats) = &activity_stats {
                stats.blocked(reason);
            }
            Refusal {
                reason,
                resource: resource.to_owned(),
                downstream,
                remembered: None,
                retry_after,
            }
        };
        let now = Instant::now();

        let mut sold_out_probe = None;
        if let (true, Some(activity)) = (rules.sold_out().enabled, request.activity) {
            match self.sold_out.check(activity, now) {
                SoldOutCheck::Open => {}
                SoldOutCheck::Known(code) => {
                    let resource = format!("activity:{activity}");
                    let mut refusal = refuse(BlockReason::SoldOut, &resource, None);
                    refusal.remembered = Some(code);
                    return Err(refusal);
                }
                SoldOutCheck::Probe(probe) => sold_out_probe = Some(probe),
            }
        }

        let system = self
            .system
            .try_enter(rules.system(), now)
            .map_err(|block| {
                let reason = match block {
                    SystemBlock::Adaptive => BlockReason::System,
                    SystemBlock::Cpu => BlockReason::Cpu,
                };
                refuse(reason, "system", Some(Duration::from_secs(1)))
            })?;

        let mut keys = vec![ResourceKey::Route(route)];
        keys.extend(request.activity.map(ResourceKey::Activity));

        // Keys as text, made only if a rule asks for them.
        let client_ip = OnceCell::new();
        let activity_key = OnceCell::new();
        for key in &keys {
            for limiter in rules.params(*key) {
                let kind = limiter.rule().param;
                let value = match kind {
                    ParamKind::User => request.user,
                    ParamKind::ClientIp => client_ip
                        .get_or_init(|| request.client_ip.map(|ip| ip.to_string()))
                        .as_deref(),
                    ParamKind::Activity => activity_key
                        .get_or_init(|| request.activity.map(|a| a.to_string()))
                        .as_deref(),
                };
                if let Some(value) = value
                    && let Err(wait) = limiter.try_acquire(value)
                {
                    return Err(refuse(
                        BlockReason::of_param(kind),
                        &key.to_string(),
                        Some(wait),
                    ));
                }
            }
        }

        for key in &keys {
            for limiter in rules.flow(*key) {
                let FlowLimiter::Qps { rule, limiter } = &**limiter else {
                    continue;
                };
                match limiter.try_acquire(Instant::now()) {
                    QpsDecision::Pass => {}
                    QpsDecision::PassAfter(wait) => tokio::time::sleep(wait).await,
                    QpsDecision::Block(wait) => {
                        return Err(refuse(
                            BlockReason::of_control(rule.control),
                            &key.to_string(),
                            Some(wait),
                        ));
                    }
                }
            }
        }

        let route_entry = route_stats
            .try_enter(rules.concurrency_limit(ResourceKey::Route(route)))
            .ok_or_else(|| {
                refuse(
                    BlockReason::Concurrency,
                    route.as_str(),
                    Some(Duration::from_secs(1)),
                )
            })?;
        let activity_entry = match (&activity_stats, request.activity) {
            (Some(stats), Some(activity)) => Some(
                stats
                    .try_enter(rules.concurrency_limit(ResourceKey::Activity(activity)))
                    .ok_or_else(|| {
                        refuse(
                            BlockReason::Concurrency,
                            stats.name(),
                            Some(Duration::from_secs(1)),
                        )
                    })?,
            ),
            _ => None,
        };

        let breaker = match rules.breakers(downstream) {
            Some(breakers) => Some(breakers.try_pass(Instant::now()).map_err(|retry| {
                refuse(BlockReason::CircuitOpen, downstream.as_str(), Some(retry))
            })?),
            None => None,
        };

        if let Some(rule) = rules.cluster(route)
            && let ClusterDecision::Block(wait) = self.cluster.acquire(route, rule).await
        {
            return Err(refuse(BlockReason::Cluster, route.as_str(), Some(wait)));
        }

        route_entry.passed();
        if let Some(entry) = &activity_entry {
            entry.passed();
        }
        Ok(Admission {
            started: Instant::now(),
            system,
            entries: [Some(route_entry), activity_entry],
            breaker,
            sold_out_probe,
        })
    }
}

/// A request let through. Finish it with the upstream's outcome; dropping it instead (the
/// client went away) ends its in-flight count without statistics.
#[derive(Debug)]
pub struct Admission {
    started: Instant,
    system: SystemPermit,
    entries: [Option<InFlight>; 2],
    breaker: Option<BreakerPermit>,
    sold_out_probe: Option<SoldOutProbe>,
}

impl Admission {
    /// Records the outcome (latency to the response head; `error`: 5xx, timeout, unreachable)
    /// and hands back the sold-out probe, if this request is one, for the caller to report.
    pub fn finish(self, error: bool) -> Option<SoldOutProbe> {
        let Self {
            started,
            system,
            entries,
            breaker,
            sold_out_probe,
        } = self;
        let now = Instant::now();
        let rt = now.saturating_duration_since(started);
        system.complete(now);
        for entry in entries.iter().flatten() {
            entry.finished(rt, error);
        }
        if let Some(breaker) = breaker {
            breaker.complete(Outcome { error, rt }, now);
        }
        sold_out_probe
    }

    /// The resources the request is counted on.
    pub fn resources(&self) -> impl Iterator<Item = &ResourceStats> {
        self.entries.iter().flatten().map(InFlight::stats)
    }
}
