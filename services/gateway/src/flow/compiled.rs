//! Rules turned into limiters. A rule that is unchanged by a reload keeps its limiter (and so
//! its counters, warm-up and breaker state); a changed or new rule starts fresh.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::Instant;

use super::breaker::DownstreamBreakers;
use super::param::ParamLimiter;
use super::qps::QpsLimiter;
use crate::resource::{Downstream, ResourceKey, RouteId};
use crate::rules::{ClusterRule, FlowRule, Grade, Rules, SoldOutRule, SystemRule};

/// One flow rule, ready to decide.
#[derive(Debug)]
pub enum FlowLimiter {
    Qps { rule: FlowRule, limiter: QpsLimiter },
    Concurrency { rule: FlowRule, limit: u64 },
}

impl FlowLimiter {
    fn new(rule: &FlowRule, now: Instant) -> Self {
        match rule.grade {
            Grade::Qps => Self::Qps {
                rule: rule.clone(),
                limiter: QpsLimiter::new(rule, now),
            },
            Grade::Concurrency => Self::Concurrency {
                rule: rule.clone(),
                limit: rule.count as u64,
            },
        }
    }

    pub fn rule(&self) -> &FlowRule {
        match self {
            Self::Qps { rule, .. } | Self::Concurrency { rule, .. } => rule,
        }
    }
}

#[derive(Debug)]
pub struct CompiledRules {
    rules: Rules,
    flow: HashMap<ResourceKey, Vec<Arc<FlowLimiter>>>,
    param: HashMap<ResourceKey, Vec<Arc<ParamLimiter>>>,
    cluster: HashMap<RouteId, ClusterRule>,
    breakers: HashMap<Downstream, Arc<DownstreamBreakers>>,
}

impl CompiledRules {
    /// Builds the limiters of `rules` (already validated), reusing those of `previous` whose
    /// rule did not change.
    pub fn compile(rules: Rules, previous: Option<&CompiledRules>, now: Instant) -> Self {
        let mut old_flow: Vec<(ResourceKey, Arc<FlowLimiter>)> = previous
            .map(|p| {
                p.flow
                    .iter()
                    .flat_map(|(k, v)| v.iter().map(|l| (*k, Arc::clone(l))))
                    .collect()
            })
            .unwrap_or_default();
        let mut flow: HashMap<ResourceKey, Vec<Arc<FlowLimiter>>> = HashMap::new();
        for rule in &rules.flow {
            let Ok(key) = rule.resource.parse::<ResourceKey>() else {
                continue;
            };
            let reused = old_flow
                .iter()
                .position(|(k, l)| *k == key && l.rule() == rule)
                .map(|i| old_flow.swap_remove(i).1);
            let limiter = reused.unwrap_or_else(|| Arc::new(FlowLimiter::new(rule, now)));
            flow.entry(key).or_default().push(limiter);
        }

        let mut old_param: Vec<(ResourceKey, Arc<ParamLimiter>)> = previous
            .map(|p| {
                p.param
                    .iter()
                    .flat_map(|(k, v)| v.iter().map(|l| (*k, Arc::clone(l))))
                    .collect()
            })
            .unwrap_or_default();
        let mut param: HashMap<ResourceKey, Vec<Arc<ParamLimiter>>> = HashMap::new();
        for rule in &rules.param {
            let Ok(key) = rule.resource.parse::<ResourceKey>() else {
                continue;
            };
            let reused = old_param
                .iter()
                .position(|(k, l)| *k == key && l.rule() == rule)
                .map(|i| old_param.swap_remove(i).1);
            let limiter = reused.unwrap_or_else(|| Arc::new(ParamLimiter::new(rule)));
            param.entry(key).or_default().push(limiter);
        }

        let mut cluster = HashMap::new();
        for rule in &rules.cluster {
            if let Ok(ResourceKey::Route(route)) = rule.resource.parse::<ResourceKey>() {
                cluster.insert(route, rule.clone());
            }
        }

        let mut breakers = HashMap::new();
        for downstream in Downstream::ALL {
            let wanted: Vec<_> = rules
                .breaker
                .iter()
                .filter(|r| r.downstream == downstream)
                .collect();
            if wanted.is_empty() {
                metrics::gauge!("gateway_circuit_state", "downstream" => downstream.as_str())
                    .set(0.0);
                continue;
            }
            let kept = previous
                .and_then(|p| p.breakers.get(&downstream))
                .filter(|b| b.rules().eq(wanted.iter().copied()))
                .cloned();
            let set =
                kept.unwrap_or_else(|| Arc::new(DownstreamBreakers::new(downstream, &wanted, now)));
            set.publish();
            breakers.insert(downstream, set);
        }

        Self {
            rules,
            flow,
            param,
            cluster,
            breakers,
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The flow rules of a resource, in file order.
    pub fn flow(&self, key: ResourceKey) -> &[Arc<FlowLimiter>] {
        self.flow.get(&key).map_or(&[], Vec::as_slice)
    }

    /// The tightest concurrency limit on a resource.
    pub fn concurrency_limit(&self, key: ResourceKey) -> Option<u64> {
        self.flow(key)
            .iter()
            .filter_map(|l| match **l {
                FlowLimiter::Concurrency { limit, .. } => Some(limit),
                FlowLimiter::Qps { .. } => None,
            })
            .min()
    }

    pub fn params(&self, key: ResourceKey) -> &[Arc<ParamLimiter>] {
        self.param.get(&key).map_or(&[], Vec::as_slice)
    }

    pub fn cluster(&self, route: RouteId) -> Option<&ClusterRule> {
        self.cluster.get(&route)
    }

    pub fn breakers(&self, downstream: Downstream) -> Option<&Arc<DownstreamBreakers>> {
        self.breakers.get(&downstream)
    }

    pub fn system(&self) -> &SystemRule {
        &self.rules.system
    }

    pub fn sold_out(&self) -> &SoldOutRule {
        &self.rules.sold_out
    }
}
