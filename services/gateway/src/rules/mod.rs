//! The rule file: what the gateway lets through, in Sentinel's vocabulary (flow rules with a
//! grade and a control behaviour, hot-parameter rules, the system rule, degrade rules as circuit
//! breakers) plus the cluster-wide bucket and the sold-out short circuit.
//!
//! A section missing from the file keeps its built-in default (the seed's numbers); an empty
//! list (`cluster = []`) turns that kind of rule off. [`Rules::default`] is spelled out in
//! `services/gateway/rules.example.toml`.
//!
//! This module is the schema only: the flow modules compile it into limiters
//! (`flow::compiled`) and reload it (`flow::reload`); nothing here reaches into them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::resource::{Downstream, ResourceKey};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// QPS and concurrency limits per resource.
    pub flow: Vec<FlowRule>,
    /// Hot-parameter limits: a budget per user, client IP or activity.
    pub param: Vec<ParamRule>,
    /// Adaptive shedding of the whole gateway.
    pub system: SystemRule,
    /// Token buckets in Redis, shared by every gateway replica.
    pub cluster: Vec<ClusterRule>,
    /// Circuit breakers per downstream service.
    pub breaker: Vec<BreakerRule>,
    /// Answering for sold-out activities without a downstream call.
    pub sold_out: SoldOutRule,
    /// Purchase passes: whether `create` needs one, how long passes and tickets live.
    pub admission: AdmissionRule,
    /// Waiting rooms: activities whose buyers queue for a pass (docs/waiting-room.md).
    pub waiting_room: Vec<WaitingRoomRule>,
}

impl Default for Rules {
    fn default() -> Self {
        let breakers = Downstream::ALL.into_iter().flat_map(|downstream| {
            [
                BreakerRule {
                    downstream,
                    strategy: BreakerStrategy::ErrorRatio,
                    threshold: 0.5,
                    ..BreakerRule::defaults(downstream)
                },
                BreakerRule {
                    downstream,
                    strategy: BreakerStrategy::SlowRatio,
                    threshold: 0.5,
                    max_rt_ms: 1000,
                    ..BreakerRule::defaults(downstream)
                },
            ]
        });
        Self {
            flow: vec![
                // The seed's Sentinel rule for the order path: QPS 10000.
                FlowRule::qps("flash-sale-order", 10_000.0),
                // The named bound on requests this replica holds open towards each service.
                FlowRule {
                    grade: Grade::Concurrency,
                    ..FlowRule::qps("flash-sale-order", 4096.0)
                },
                FlowRule {
                    grade: Grade::Concurrency,
                    ..FlowRule::qps("inventory", 256.0)
                },
            ],
            // A buyer has no reason to send more than a few orders a second.
            param: vec![ParamRule {
                resource: "flash-sale-order".into(),
                param: ParamKind::User,
                count: 5,
                window_secs: 1,
                burst: 5,
                overrides: BTreeMap::new(),
                max_keys: default_max_keys(),
            }],
            system: SystemRule::default(),
            // The seed's RequestRateLimiter: replenishRate 1000, burstCapacity 2000.
            cluster: vec![ClusterRule {
                resource: "flash-sale-order".into(),
                replenish_rate: 1000,
                burst_capacity: 2000,
                requested_tokens: 1,
                lease_ms: default_lease_ms(),
            }],
            breaker: breakers.collect(),
            sold_out: SoldOutRule::default(),
            admission: AdmissionRule::default(),
            waiting_room: Vec::new(),
        }
    }
}

/// What a flow rule counts (Sentinel's `grade`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grade {
    /// Requests admitted per second.
    #[default]
    Qps,
    /// Requests in flight at once (Sentinel's thread grade).
    Concurrency,
}

/// What a QPS rule does with the request over the limit (Sentinel's `controlBehavior`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlBehavior {
    /// Refuse at once.
    #[default]
    Reject,
    /// Start cold at `count / cold_factor` per second and ramp to `count` over
    /// `warm_up_period_secs` of traffic; idle time cools it down again.
    WarmUp,
    /// Space requests evenly at `1 / count` s (leaky bucket); wait for a slot at most
    /// `max_queue_ms`, refuse when the wait would be longer.
    Queue,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRule {
    /// `flash-sale-order`, `inventory` or `activity:<id>`.
    pub resource: String,
    /// `qps` (default) or `concurrency`.
    #[serde(default)]
    pub grade: Grade,
    /// Requests per second (QPS) or in flight (concurrency).
    pub count: f64,
    /// `reject` (default), `warm_up` or `queue`; QPS rules only.
    #[serde(default)]
    pub control: ControlBehavior,
    /// `warm_up`: seconds of full pressure to ramp from `count / cold_factor` to `count`.
    #[serde(default = "default_warm_up_period_secs")]
    pub warm_up_period_secs: u64,
    /// `warm_up`: how much lower the cold rate is (> 1; Sentinel's default 3).
    #[serde(default = "default_cold_factor")]
    pub cold_factor: f64,
    /// `queue`: the longest a request waits for its slot before it is refused.
    #[serde(default = "default_max_queue_ms")]
    pub max_queue_ms: u64,
}

impl FlowRule {
    /// A QPS rule that rejects at once.
    pub fn qps(resource: &str, count: f64) -> Self {
        Self {
            resource: resource.into(),
            grade: Grade::Qps,
            count,
            control: ControlBehavior::Reject,
            warm_up_period_secs: default_warm_up_period_secs(),
            cold_factor: default_cold_factor(),
            max_queue_ms: default_max_queue_ms(),
        }
    }
}

fn default_warm_up_period_secs() -> u64 {
    10
}
fn default_cold_factor() -> f64 {
    3.0
}
fn default_max_queue_ms() -> u64 {
    500
}

/// Which value of a request a hot-parameter rule keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// The authenticated user (the token's `sub`; the body's `userId` in development mode).
    User,
    /// The client address (see `proxy.trusted_proxy_hops`).
    ClientIp,
    /// The body's `activityId` (order creation only).
    Activity,
}

impl ParamKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ClientIp => "client_ip",
            Self::Activity => "activity",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamRule {
    /// `flash-sale-order`, `inventory` or `activity:<id>`.
    pub resource: String,
    /// `user`, `client_ip` or `activity`: one budget per value.
    pub param: ParamKind,
    /// Requests per key per `window_secs` (0 refuses every request carrying the key).
    pub count: u32,
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Extra requests a key may send at once on top of `count` (Sentinel's `burstCount`).
    #[serde(default)]
    pub burst: u32,
    /// Per-key exceptions: `{ "42" = 100 }` lets key 42 send 100 per window.
    #[serde(default)]
    pub overrides: BTreeMap<String, u32>,
    /// Keys remembered at most; beyond it, idle keys are forgotten first.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_window_secs() -> u64 {
    1
}
fn default_max_keys() -> usize {
    100_000
}

/// System adaptive protection (Sentinel's system rule, BBR-style like Kratos'): when the gateway
/// is saturated, a request is shed if more requests are in flight than the measured pipe holds,
/// `max passes per second x min latency` over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemRule {
    /// The BBR check on/off.
    pub adaptive: bool,
    /// The BBR check applies while the gateway's CPU (its tokio workers' busy share, 0..1) is at
    /// or above this, and for a second after it last shed; 0 applies it always. Below
    /// saturation a long queue costs only latency, which the seed's P99 target allows.
    pub cpu_gate: f64,
    /// Never shed below this many requests in flight: the queue accepted even when saturated
    /// (the estimate is noisy when idle, and 1024 in flight at the seed's rates stays well
    /// within its 500 ms P99). The default lets the seed's `hey -c 1000` through unshed.
    pub min_in_flight: u64,
    /// Shed everything beyond `min_in_flight` while the CPU share stays above this (Sentinel's
    /// `highestCpuUsage`); absent: off.
    pub max_cpu: Option<f64>,
    /// Window over which max throughput and min latency are measured.
    pub window_ms: u64,
    /// Buckets of that window (throughput is per bucket, latency the bucket's mean).
    pub buckets: usize,
}

impl Default for SystemRule {
    fn default() -> Self {
        Self {
            adaptive: true,
            cpu_gate: 0.8,
            min_in_flight: 1024,
            max_cpu: None,
            window_ms: 10_000,
            buckets: 100,
        }
    }
}

/// A token bucket in Redis shared by all gateway replicas (the seed's `RequestRateLimiter`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterRule {
    /// A route id (`flash-sale-order` or `inventory`).
    pub resource: String,
    /// Tokens added per second, cluster-wide.
    pub replenish_rate: u32,
    /// Bucket size: the burst the cluster admits after a quiet spell.
    pub burst_capacity: u32,
    /// Tokens one request costs.
    #[serde(default = "default_requested_tokens")]
    pub requested_tokens: u32,
    /// How long tokens a replica takes from the shared bucket in one call stay usable. A
    /// replica takes at most what the whole cluster earns in that time
    /// (`replenish_rate x lease_ms`), sized to its own recent use; 0 asks Redis for every
    /// request.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_requested_tokens() -> u32 {
    1
}

fn default_lease_ms() -> u64 {
    100
}

/// What trips a breaker (Sentinel's degrade grades).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerStrategy {
    /// Share of requests slower than `max_rt_ms` reaches `threshold` (0..1).
    SlowRatio,
    /// Share of failed requests (5xx, timeout, unreachable) reaches `threshold` (0..1).
    ErrorRatio,
    /// Number of failed requests in the window reaches `threshold`.
    ErrorCount,
}

impl BreakerStrategy {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SlowRatio => "slow_ratio",
            Self::ErrorRatio => "error_ratio",
            Self::ErrorCount => "error_count",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerRule {
    /// `order-service` or `inventory-service`.
    pub downstream: Downstream,
    /// `slow_ratio`, `error_ratio` or `error_count`.
    pub strategy: BreakerStrategy,
    /// A ratio (0, 1] for the ratio strategies, a count for `error_count`; reaching it opens.
    pub threshold: f64,
    /// Slower than this counts as slow (`slow_ratio` only).
    #[serde(default = "default_max_rt_ms")]
    pub max_rt_ms: u64,
    /// Fewer requests than this in the window never trip the breaker.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// The statistics window.
    #[serde(default = "default_breaker_window_ms")]
    pub window_ms: u64,
    /// How long the breaker stays open before one probe request is let through (half-open).
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
}

impl BreakerRule {
    fn defaults(downstream: Downstream) -> Self {
        Self {
            downstream,
            strategy: BreakerStrategy::ErrorRatio,
            threshold: 0.5,
            max_rt_ms: default_max_rt_ms(),
            min_requests: default_min_requests(),
            window_ms: default_breaker_window_ms(),
            open_ms: default_open_ms(),
        }
    }
}

fn default_max_rt_ms() -> u64 {
    1000
}
fn default_min_requests() -> u64 {
    20
}
fn default_breaker_window_ms() -> u64 {
    2000
}
fn default_open_ms() -> u64 {
    5000
}

/// The sold-out short circuit: once order-service answers `409 SOLD_OUT` to a one-item order,
/// the gateway answers the same for that activity for `ttl_ms` without a downstream call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SoldOutRule {
    /// Whether the gateway learns sold-out activities and answers for them.
    pub enabled: bool,
    /// How long a learned sold-out holds; then one probe request asks order-service again, so
    /// stock given back (a released reservation, a restock) sells again within about this long.
    pub ttl_ms: u64,
}

impl SoldOutRule {
    /// How long a learned sold-out holds.
    pub fn ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.ttl_ms)
    }
}

impl Default for SoldOutRule {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_ms: 1000,
        }
    }
}

/// Purchase passes (docs/waiting-room.md): a short-lived signed token, bound to a user and an
/// activity, that `create` spends once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionRule {
    /// Whether `create` needs a pass for every activity (an activity with a waiting room always
    /// does). Off in development, so the seed's `hey` command works; on in staging and production.
    pub require_pass: bool,
    /// How long a pass is good for from its issue (an admission from the queue: from the
    /// admission).
    pub pass_ttl_secs: u64,
    /// How long a queue ticket is good for.
    pub ticket_ttl_secs: u64,
}

impl Default for AdmissionRule {
    fn default() -> Self {
        Self {
            require_pass: false,
            pass_ttl_secs: 60,
            ticket_ttl_secs: 6 * 3600,
        }
    }
}

/// A waiting room: buyers of the activity queue for a pass, admitted at `rate` per second
/// cluster-wide, first come first served after the opening and shuffled before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitingRoomRule {
    /// The activity; absent: every activity without a rule of its own.
    #[serde(default)]
    pub activity: Option<i64>,
    /// Buyers admitted per second, cluster-wide.
    pub rate: u32,
    /// Admissions a quiet room may grant at once (0: strictly `rate`, every buyer queues).
    #[serde(default)]
    pub burst: u32,
}

impl Rules {
    /// The waiting room of `activity`: its own rule, else the rule without an activity.
    pub fn waiting_room(&self, activity: i64) -> Option<&WaitingRoomRule> {
        self.waiting_room
            .iter()
            .find(|r| r.activity == Some(activity))
            .or_else(|| self.waiting_room.iter().find(|r| r.activity.is_none()))
    }

    /// Parses and checks a rule file.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let rules: Rules = toml::from_str(text).map_err(|e| e.to_string())?;
        rules.validate()?;
        Ok(rules)
    }

    /// Every problem of the rule set, or Ok.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                problems.push(what);
            }
        };
        for (i, r) in self.flow.iter().enumerate() {
            let at = format!("flow[{i}] ({})", r.resource);
            if let Err(e) = r.resource.parse::<ResourceKey>() {
                check(false, format!("{at}: {e}"));
            }
            check(
                r.count.is_finite() && r.count > 0.0,
                format!("{at}: count must be > 0"),
            );
            if r.grade == Grade::Concurrency {
                check(
                    r.control == ControlBehavior::Reject,
                    format!("{at}: a concurrency rule can only reject"),
                );
                check(
                    r.count.fract() == 0.0,
                    format!("{at}: a concurrency count must be a whole number"),
                );
            }
            if r.control == ControlBehavior::WarmUp {
                check(
                    r.cold_factor > 1.0 && r.cold_factor.is_finite(),
                    format!("{at}: cold_factor must be > 1"),
                );
                check(
                    r.warm_up_period_secs > 0,
                    format!("{at}: warm_up_period_secs must be > 0"),
                );
            }
        }
        for (i, r) in self.param.iter().enumerate() {
            let at = format!("param[{i}] ({})", r.resource);
            if let Err(e) = r.resource.parse::<ResourceKey>() {
                check(false, format!("{at}: {e}"));
            }
            check(r.window_secs > 0, format!("{at}: window_secs must be > 0"));
            check(r.max_keys > 0, format!("{at}: max_keys must be > 0"));
        }
        let s = &self.system;
        check(
            (0.0..=1.0).contains(&s.cpu_gate),
            "system: cpu_gate must be within 0..1".into(),
        );
        check(
            s.max_cpu.is_none_or(|c| c > 0.0 && c <= 1.0),
            "system: max_cpu must be within 0..1".into(),
        );
        check(
            s.window_ms > 0 && s.buckets > 0 && s.window_ms >= s.buckets as u64,
            "system: window_ms and buckets must be > 0, at least 1 ms per bucket".into(),
        );
        let mut cluster_resources = Vec::new();
        for (i, r) in self.cluster.iter().enumerate() {
            let at = format!("cluster[{i}] ({})", r.resource);
            match r.resource.parse::<ResourceKey>() {
                Ok(ResourceKey::Route(route)) => {
                    check(
                        !cluster_resources.contains(&route),
                        format!("{at}: a second cluster rule for the same route"),
                    );
                    cluster_resources.push(route);
                }
                Ok(ResourceKey::Activity(_)) => {
                    check(false, format!("{at}: cluster rules apply to routes only"));
                }
                Err(e) => check(false, format!("{at}: {e}")),
            }
            check(
                r.replenish_rate > 0,
                format!("{at}: replenish_rate must be > 0"),
            );
            check(
                r.burst_capacity >= r.requested_tokens && r.requested_tokens > 0,
                format!("{at}: burst_capacity must be >= requested_tokens > 0"),
            );
            check(
                r.lease_ms <= 1000,
                format!("{at}: lease_ms must be at most 1000"),
            );
        }
        for (i, r) in self.breaker.iter().enumerate() {
            let at = format!("breaker[{i}] ({} {})", r.downstream, r.strategy.as_str());
            let threshold_ok = match r.strategy {
                BreakerStrategy::SlowRatio | BreakerStrategy::ErrorRatio => {
                    r.threshold > 0.0 && r.threshold <= 1.0
                }
                BreakerStrategy::ErrorCount => r.threshold >= 1.0,
            };
            check(
                threshold_ok,
                format!("{at}: threshold must be a ratio within (0, 1], or a count >= 1"),
            );
            check(
                r.window_ms > 0 && r.open_ms > 0,
                format!("{at}: window_ms and open_ms must be > 0"),
            );
        }
        check(
            self.sold_out.ttl_ms > 0,
            "sold_out: ttl_ms must be > 0".into(),
        );
        let a = &self.admission;
        check(
            a.pass_ttl_secs > 0 && a.ticket_ttl_secs > 0,
            "admission: pass_ttl_secs and ticket_ttl_secs must be > 0".into(),
        );
        let mut rooms = Vec::new();
        for (i, r) in self.waiting_room.iter().enumerate() {
            let at = match r.activity {
                Some(id) => format!("waiting_room[{i}] (activity {id})"),
                None => format!("waiting_room[{i}] (every activity)"),
            };
            check(
                r.activity.is_none_or(|id| id > 0),
                format!("{at}: activity must be > 0"),
            );
            check(r.rate > 0, format!("{at}: rate must be > 0"));
            check(
                !rooms.contains(&r.activity),
                format!("{at}: a second waiting room for the same activity"),
            );
            rooms.push(r.activity);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_the_example_file_spells_them_out() {
        Rules::default().validate().unwrap();
        let example = include_str!("../../rules.example.toml");
        assert_eq!(Rules::from_toml(example).unwrap(), Rules::default());
    }

    #[test]
    fn the_kubernetes_rule_file_is_the_example() {
        // k8s/gateway/rules.toml becomes the gateway-rules ConfigMap: kustomize only reads files
        // inside its own directory, so it is a copy, kept equal here.
        let example = include_str!("../../rules.example.toml");
        let deployed = include_str!("../../../../k8s/gateway/rules.toml");
        assert!(
            deployed == example,
            "k8s/gateway/rules.toml differs from services/gateway/rules.example.toml"
        );
    }

    #[test]
    fn a_missing_section_keeps_its_default_and_an_empty_list_turns_it_off() {
        let rules = Rules::from_toml("cluster = []\n").unwrap();
        assert!(rules.cluster.is_empty());
        assert_eq!(rules.flow, Rules::default().flow);
    }

    #[test]
    fn problems_are_named() {
        let err = Rules::from_toml(
            "[[flow]]\nresource = \"nowhere\"\ncount = 0\n[[cluster]]\nresource = \"activity:1\"\nreplenish_rate = 1\nburst_capacity = 1\n",
        )
        .unwrap_err();
        assert!(err.contains("flow[0] (nowhere): unknown resource"), "{err}");
        assert!(err.contains("count must be > 0"), "{err}");
        assert!(err.contains("cluster rules apply to routes only"), "{err}");
        let err = Rules::from_toml("[[flow]]\nresource = \"inventory\"\ncount = 1\nspeed = 3\n")
            .unwrap_err();
        assert!(err.contains("unknown field `speed`"), "{err}");
    }
}
