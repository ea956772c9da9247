//! Each rule type's exact behaviour, on tokio's paused clock: time moves only when the test
//! advances it, so every count below is exact and nothing depends on how fast the machine is.

use std::sync::Arc;
use std::time::Duration;

use flash_sale_common::domain::ActivityId;
use flash_sale_common::error::ErrorCode;
use gateway::configuration::ClusterSettings;
use gateway::flow::breaker::{CircuitState, DownstreamBreakers, Outcome};
use gateway::flow::cluster::{ClusterDecision, ClusterLimiter, Grant, Lease};
use gateway::flow::param::ParamLimiter;
use gateway::flow::qps::{QpsDecision, QpsLimiter};
use gateway::flow::sold_out::{SoldOut, SoldOutCheck};
use gateway::flow::system::{SystemBlock, SystemGuard};
use gateway::flow::{BlockReason, Flow, FlowRequest, RulesStore};
use gateway::resource::{Downstream, RouteId};
use gateway::rules::{
    BreakerRule, BreakerStrategy, ClusterRule, ControlBehavior, FlowRule, Grade, ParamKind,
    ParamRule, Rules, SystemRule,
};
use tokio::time::{Instant, advance};

use crate::helpers::no_rules;

fn passes(decisions: &[QpsDecision]) -> usize {
    decisions
        .iter()
        .filter(|d| matches!(d, QpsDecision::Pass))
        .count()
}

#[tokio::test(start_paused = true)]
async fn a_qps_limit_of_n_lets_n_through_per_second_and_refuses_the_rest() {
    let limiter = QpsLimiter::new(&FlowRule::qps("flash-sale-order", 10.0), Instant::now());

    // A burst of 25 at once: 10 pass, 15 are refused with a retry hint of a second.
    let burst: Vec<_> = (0..25)
        .map(|_| limiter.try_acquire(Instant::now()))
        .collect();
    assert_eq!(passes(&burst), 10);
    assert!(
        burst[10..]
            .iter()
            .all(|d| *d == QpsDecision::Block(Duration::from_secs(1)))
    );

    // Then 100 requests a second, evenly, for five seconds: exactly 10 pass in each second.
    advance(Duration::from_secs(1)).await;
    for second in 1..=5 {
        let mut passed = 0;
        for _ in 0..100 {
            if limiter.try_acquire(Instant::now()) == QpsDecision::Pass {
                passed += 1;
            }
            advance(Duration::from_millis(10)).await;
        }
        assert_eq!(passed, 10, "second {second}");
    }
}

#[tokio::test(start_paused = true)]
async fn warm_up_starts_at_a_third_and_ramps_to_the_limit_over_the_period() {
    let rule = FlowRule {
        control: ControlBehavior::WarmUp,
        warm_up_period_secs: 10,
        cold_factor: 3.0,
        ..FlowRule::qps("activity:1", 100.0)
    };
    let limiter = QpsLimiter::new(&rule, Instant::now());

    // 200 requests a second (twice the limit) for 30 seconds.
    let mut per_second = Vec::new();
    for _ in 0..30 {
        let mut passed = 0;
        for _ in 0..200 {
            if limiter.try_acquire(Instant::now()) == QpsDecision::Pass {
                passed += 1;
            }
            advance(Duration::from_millis(5)).await;
        }
        per_second.push(passed);
    }
    // Cold: count / cold_factor in the first second.
    assert!((32..=34).contains(&per_second[0]), "{per_second:?}");
    // It ramps up and never passes the limit...
    assert!(
        per_second.windows(2).all(|w| w[1] + 1 >= w[0]),
        "{per_second:?}"
    );
    assert!(per_second.iter().all(|&n| n <= 100), "{per_second:?}");
    // ...reaches it after about the warm-up period under full pressure (33, 34, 36, ... 83,
    // then 100 from the 12th second) and stays there.
    let warm_from = per_second
        .iter()
        .position(|&n| n == 100)
        .expect("reaches the limit");
    assert!((10..=12).contains(&warm_from), "{per_second:?}");
    assert!(
        per_second[warm_from..].iter().all(|&n| n == 100),
        "{per_second:?}"
    );
    assert!((limiter.allowed_qps(Instant::now()) - 100.0).abs() < 1e-9);

    // A long quiet spell cools it down again.
    advance(Duration::from_secs(60)).await;
    let allowed = limiter.allowed_qps(Instant::now());
    assert!((allowed - 100.0 / 3.0).abs() < 0.5, "cold again: {allowed}");
}

#[tokio::test(start_paused = true)]
async fn queueing_spaces_requests_evenly_and_never_waits_past_its_maximum() {
    let rule = FlowRule {
        control: ControlBehavior::Queue,
        max_queue_ms: 500,
        ..FlowRule::qps("flash-sale-order", 10.0)
    };
    let limiter = QpsLimiter::new(&rule, Instant::now());
    let decisions: Vec<_> = (0..20)
        .map(|_| limiter.try_acquire(Instant::now()))
        .collect();
    // Slots every 100 ms: now, +100 ms, ... +500 ms; the 7th would wait 600 ms and is refused.
    assert_eq!(decisions[0], QpsDecision::Pass);
    for (i, decision) in decisions.iter().enumerate().take(6).skip(1) {
        assert_eq!(
            *decision,
            QpsDecision::PassAfter(Duration::from_millis(100 * i as u64))
        );
    }
    assert!(
        decisions[6..]
            .iter()
            .all(|d| matches!(d, QpsDecision::Block(_)))
    );

    // Through the flow pipeline, 20 concurrent requests: every admitted one waited at most 500 ms.
    let mut rules = no_rules();
    rules.flow = vec![rule];
    let flow = Arc::new(flow_with(rules));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let flow = flow.clone();
        tasks.push(tokio::spawn(async move {
            let outcome = flow
                .admit(&request(None, None))
                .await
                .map(|a| a.finish(false));
            (outcome.is_ok(), started.elapsed())
        }));
    }
    let mut admitted = Vec::new();
    for task in tasks {
        let (ok, waited) = task.await.unwrap();
        if ok {
            admitted.push(waited);
        } else {
            assert_eq!(waited, Duration::ZERO, "a refusal is immediate");
        }
    }
    // The first slot plus 5 queued (500 ms of 100 ms slots; the limiter above took none of these).
    assert_eq!(admitted.len(), 6, "{admitted:?}");
    assert!(
        admitted.iter().all(|w| *w <= Duration::from_millis(500)),
        "{admitted:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_counts_requests_in_flight() {
    let mut rules = no_rules();
    rules.flow = vec![FlowRule {
        grade: Grade::Concurrency,
        ..FlowRule::qps("flash-sale-order", 2.0)
    }];
    let flow = flow_with(rules);
    let first = flow.admit(&request(None, None)).await.unwrap();
    let second = flow.admit(&request(None, None)).await.unwrap();
    let refused = flow.admit(&request(None, None)).await.unwrap_err();
    assert_eq!(refused.reason, BlockReason::Concurrency);
    drop(first.finish(false));
    let third = flow.admit(&request(None, None)).await.unwrap();
    assert_eq!(flow.resources().route(RouteId::FlashSale).in_flight(), 2);
    drop((second, third));
    assert_eq!(flow.resources().route(RouteId::FlashSale).in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn per_activity_rules_hold_one_activity_back_and_not_the_others() {
    let mut rules = no_rules();
    rules.flow = vec![FlowRule::qps("activity:1", 3.0)];
    let flow = flow_with(rules);
    let one = ActivityId::new(1);
    let two = ActivityId::new(2);
    for _ in 0..3 {
        flow.admit(&request(one, None)).await.unwrap().finish(false);
    }
    let refused = flow.admit(&request(one, None)).await.unwrap_err();
    assert_eq!(
        (refused.reason, refused.resource.as_str()),
        (BlockReason::Qps, "activity:1")
    );
    for _ in 0..10 {
        flow.admit(&request(two, None)).await.unwrap().finish(false);
    }
}

#[tokio::test(start_paused = true)]
async fn hot_parameter_limits_act_per_key() {
    let rule = ParamRule {
        resource: "flash-sale-order".into(),
        param: ParamKind::User,
        count: 2,
        window_secs: 1,
        burst: 0,
        overrides: [("vip".to_owned(), 5)].into(),
        max_keys: 1000,
    };
    let limiter = ParamLimiter::new(&rule);
    assert!(limiter.try_acquire("alice").is_ok());
    assert!(limiter.try_acquire("alice").is_ok());
    let wait = limiter.try_acquire("alice").unwrap_err();
    assert_eq!(
        wait,
        Duration::from_millis(500),
        "one token comes back every 1/2 s"
    );
    // Another key has its own budget; an override its own size.
    assert!(limiter.try_acquire("bob").is_ok());
    assert!(limiter.try_acquire("bob").is_ok());
    assert!(limiter.try_acquire("bob").is_err());
    for _ in 0..5 {
        assert!(limiter.try_acquire("vip").is_ok());
    }
    assert!(limiter.try_acquire("vip").is_err());
    // A second later alice has her two again.
    advance(Duration::from_secs(1)).await;
    assert!(limiter.try_acquire("alice").is_ok());
    assert!(limiter.try_acquire("alice").is_ok());
    assert!(limiter.try_acquire("alice").is_err());

    // Through the pipeline, per user, per client address and per activity.
    let mut rules = no_rules();
    rules.param = vec![
        rule.clone(),
        ParamRule {
            param: ParamKind::ClientIp,
            count: 3,
            overrides: Default::default(),
            ..rule.clone()
        },
        ParamRule {
            param: ParamKind::Activity,
            count: 4,
            overrides: Default::default(),
            ..rule
        },
    ];
    let flow = flow_with(rules);
    let ip = Some("10.0.0.1".parse().unwrap());
    let req = |user: &'static str, activity: i64| FlowRequest {
        route: RouteId::FlashSale,
        activity: ActivityId::new(activity),
        user: Some(user),
        client_ip: ip,
    };
    flow.admit(&req("u1", 1)).await.unwrap().finish(false);
    flow.admit(&req("u1", 1)).await.unwrap().finish(false);
    assert_eq!(
        flow.admit(&req("u1", 1)).await.unwrap_err().reason,
        BlockReason::ParamUser
    );
    flow.admit(&req("u2", 1)).await.unwrap().finish(false);
    assert_eq!(
        flow.admit(&req("u3", 1)).await.unwrap_err().reason,
        BlockReason::ParamClientIp
    );
    let other_ip = |user: &'static str| FlowRequest {
        client_ip: Some("10.0.0.2".parse().unwrap()),
        ..req(user, 1)
    };
    // Activity 1 has taken 3 (u1, u1, u2) of its 4; the IP refusal took none.
    flow.admit(&other_ip("u4")).await.unwrap().finish(false);
    assert_eq!(
        flow.admit(&other_ip("u5")).await.unwrap_err().reason,
        BlockReason::ParamActivity
    );
}

#[tokio::test(start_paused = true)]
async fn hot_parameter_limits_remember_the_keys_of_one_window_not_every_key_seen() {
    let rule = ParamRule {
        resource: "flash-sale-order".into(),
        param: ParamKind::User,
        count: 1,
        window_secs: 1,
        burst: 0,
        overrides: Default::default(),
        max_keys: 10_000_000,
    };
    let limiter = ParamLimiter::new(&rule);
    // 100,000 buyers, each once, 1,000 every 100 ms: about 10,000 are within their window at
    // any time.
    for batch in 0..100 {
        for user in 0..1000 {
            let key = format!("user-{}", batch * 1000 + user);
            assert!(limiter.try_acquire(&key).is_ok());
            assert!(limiter.try_acquire(&key).is_err(), "once per window");
        }
        advance(Duration::from_millis(100)).await;
    }
    let keys = limiter.keys();
    assert!(
        (10_000..=30_000).contains(&keys),
        "the buckets of the last window or two are kept, not 100,000: {keys}"
    );
    // The last buyers are still held to their limit.
    assert!(limiter.try_acquire("user-99999").is_err());
}

#[tokio::test(start_paused = true)]
async fn hot_parameter_limits_forget_every_key_rather_than_hold_more_than_max_keys() {
    let rule = ParamRule {
        resource: "flash-sale-order".into(),
        param: ParamKind::User,
        count: 1,
        window_secs: 10,
        burst: 0,
        overrides: Default::default(),
        max_keys: 100,
    };
    let limiter = ParamLimiter::new(&rule);
    // Every key stays busy for 10 s, so no sweep frees any: the bound forgets them all.
    for user in 0..1000 {
        assert!(limiter.try_acquire(&format!("user-{user}")).is_ok());
        assert!(
            limiter.keys() <= 110,
            "max_keys, overshot by a few between looks"
        );
    }
    // Forgotten keys err towards letting requests through.
    assert!(limiter.try_acquire("user-0").is_ok());
}

#[tokio::test(start_paused = true)]
async fn adaptive_protection_sheds_beyond_max_throughput_times_min_latency() {
    let rule = SystemRule {
        adaptive: true,
        cpu_gate: 0.0,
        min_in_flight: 4,
        max_cpu: None,
        window_ms: 1000,
        buckets: 10,
    };
    let guard = Arc::new(SystemGuard::new(&rule, Instant::now()));
    assert_eq!(guard.estimated_capacity(&rule, Instant::now()), None);

    // Ten 100 ms buckets, each with 20 requests answered in 50 ms (measured whatever the rule):
    // 200 per second x 0.05 s = the pipe holds 10 requests.
    let measuring = SystemRule {
        adaptive: false,
        ..rule.clone()
    };
    for _ in 0..10 {
        let permits: Vec<_> = (0..20)
            .map(|_| guard.try_enter(&measuring, Instant::now()).unwrap())
            .collect();
        advance(Duration::from_millis(50)).await;
        for permit in permits {
            permit.complete(Instant::now());
        }
        advance(Duration::from_millis(50)).await;
    }
    let capacity = guard.estimated_capacity(&rule, Instant::now()).unwrap();
    assert!((capacity - 10.0).abs() < 1e-6, "{capacity}");

    let held: Vec<_> = (0..10)
        .map(|_| guard.try_enter(&rule, Instant::now()).unwrap())
        .collect();
    assert_eq!(
        guard.try_enter(&rule, Instant::now()).unwrap_err(),
        SystemBlock::Adaptive
    );
    drop(held);
    assert!(guard.try_enter(&rule, Instant::now()).is_ok());

    // Gated by CPU: below the gate the queue only costs latency, nothing is shed.
    let gated = SystemRule {
        cpu_gate: 0.8,
        ..rule.clone()
    };
    advance(Duration::from_secs(2)).await; // past the cool-down after the last shed
    for _ in 0..10 {
        let permits: Vec<_> = (0..20)
            .map(|_| guard.try_enter(&gated, Instant::now()).unwrap())
            .collect();
        advance(Duration::from_millis(50)).await;
        for permit in permits {
            permit.complete(Instant::now());
        }
        advance(Duration::from_millis(50)).await;
    }
    let held: Vec<_> = (0..30)
        .map(|_| guard.try_enter(&gated, Instant::now()).unwrap())
        .collect();
    guard.set_cpu(0.9);
    assert_eq!(
        guard.try_enter(&gated, Instant::now()).unwrap_err(),
        SystemBlock::Adaptive
    );
    drop(held);

    // A CPU ceiling sheds on its own, above the floor.
    let ceiling = SystemRule {
        adaptive: false,
        max_cpu: Some(0.85),
        ..rule
    };
    let held: Vec<_> = (0..4)
        .map(|_| guard.try_enter(&ceiling, Instant::now()).unwrap())
        .collect();
    assert_eq!(
        guard.try_enter(&ceiling, Instant::now()).unwrap_err(),
        SystemBlock::Cpu
    );
    guard.set_cpu(0.5);
    assert!(guard.try_enter(&ceiling, Instant::now()).is_ok());
    drop(held);
}

fn breaker_rule(strategy: BreakerStrategy, threshold: f64) -> BreakerRule {
    BreakerRule {
        downstream: Downstream::OrderService,
        strategy,
        threshold,
        max_rt_ms: 100,
        min_requests: 4,
        window_ms: 1000,
        open_ms: 2000,
    }
}

const OK: Outcome = Outcome {
    error: false,
    rt: Duration::from_millis(10),
};
const FAILED: Outcome = Outcome {
    error: true,
    rt: Duration::from_millis(10),
};
const SLOW: Outcome = Outcome {
    error: false,
    rt: Duration::from_millis(300),
};

async fn complete_n(breakers: &Arc<DownstreamBreakers>, outcomes: &[Outcome]) {
    for outcome in outcomes {
        let permit = breakers.try_pass(Instant::now()).expect("closed");
        permit.complete(*outcome, Instant::now());
    }
}

#[tokio::test(start_paused = true)]
async fn the_error_ratio_breaker_opens_half_opens_and_closes() {
    let rule = breaker_rule(BreakerStrategy::ErrorRatio, 0.5);
    let breakers = Arc::new(DownstreamBreakers::new(
        Downstream::OrderService,
        &[&rule],
        Instant::now(),
    ));

    // Three answers, two failed: under the minimum request count, stays closed.
    complete_n(&breakers, &[OK, FAILED, FAILED]).await;
    assert_eq!(breakers.state(), CircuitState::Closed);
    // The fourth, a success: 2 of 4 failed reaches 0.5.
    complete_n(&breakers, &[OK]).await;
    assert_eq!(breakers.state(), CircuitState::Open);
    assert_eq!(
        breakers.try_pass(Instant::now()).unwrap_err(),
        Duration::from_secs(2)
    );

    // After open_ms, one probe goes through; everything else still fails fast.
    advance(Duration::from_millis(1999)).await;
    assert!(breakers.try_pass(Instant::now()).is_err());
    advance(Duration::from_millis(1)).await;
    let probe = breakers.try_pass(Instant::now()).expect("the probe");
    assert_eq!(breakers.state(), CircuitState::HalfOpen);
    assert!(breakers.try_pass(Instant::now()).is_err(), "only one probe");
    // The probe fails: open again for another open_ms.
    probe.complete(FAILED, Instant::now());
    assert_eq!(breakers.state(), CircuitState::Open);
    advance(Duration::from_secs(2)).await;
    // A probe that never got an answer lets the next request probe at once.
    drop(breakers.try_pass(Instant::now()).expect("a probe"));
    assert_eq!(breakers.state(), CircuitState::Open);
    let probe = breakers.try_pass(Instant::now()).expect("another probe");
    // It succeeds: closed, with fresh statistics.
    probe.complete(OK, Instant::now());
    assert_eq!(breakers.state(), CircuitState::Closed);
    complete_n(&breakers, &[FAILED, FAILED, FAILED]).await;
    assert_eq!(
        breakers.state(),
        CircuitState::Closed,
        "the old failures were forgotten"
    );
}

#[tokio::test(start_paused = true)]
async fn the_error_count_and_slow_ratio_breakers_trip_on_their_own_measure() {
    let count = breaker_rule(BreakerStrategy::ErrorCount, 3.0);
    let breakers = Arc::new(DownstreamBreakers::new(
        Downstream::OrderService,
        &[&count],
        Instant::now(),
    ));
    complete_n(&breakers, &[OK, OK, OK, OK, OK, FAILED, FAILED]).await;
    assert_eq!(breakers.state(), CircuitState::Closed);
    complete_n(&breakers, &[FAILED]).await;
    assert_eq!(breakers.state(), CircuitState::Open);

    // Failures older than the window do not count.
    let breakers = Arc::new(DownstreamBreakers::new(
        Downstream::OrderService,
        &[&count],
        Instant::now(),
    ));
    complete_n(&breakers, &[OK, OK, FAILED, FAILED]).await;
    advance(Duration::from_millis(1500)).await;
    complete_n(&breakers, &[OK, OK, FAILED, OK]).await;
    assert_eq!(breakers.state(), CircuitState::Closed);

    let slow = breaker_rule(BreakerStrategy::SlowRatio, 0.5);
    let breakers = Arc::new(DownstreamBreakers::new(
        Downstream::OrderService,
        &[&slow],
        Instant::now(),
    ));
    // Errors are not slow.
    complete_n(&breakers, &[FAILED, FAILED, FAILED, FAILED, OK, SLOW]).await;
    assert_eq!(breakers.state(), CircuitState::Closed);
    complete_n(&breakers, &[SLOW, SLOW, SLOW]).await;
    assert_eq!(breakers.state(), CircuitState::Closed, "4 slow of 9");
    complete_n(&breakers, &[SLOW]).await;
    assert_eq!(
        breakers.state(),
        CircuitState::Open,
        "5 slow of 10 reaches 0.5"
    );
    advance(Duration::from_secs(2)).await;
    // A slow probe keeps it open; a fast one closes it.
    breakers
        .try_pass(Instant::now())
        .unwrap()
        .complete(SLOW, Instant::now());
    assert_eq!(breakers.state(), CircuitState::Open);
    advance(Duration::from_secs(2)).await;
    breakers
        .try_pass(Instant::now())
        .unwrap()
        .complete(OK, Instant::now());
    assert_eq!(breakers.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_refuses_through_the_pipeline_with_its_retry_delay() {
    let mut rules = no_rules();
    rules.breaker = vec![breaker_rule(BreakerStrategy::ErrorCount, 1.0)];
    let flow = flow_with(rules);
    for _ in 0..4 {
        flow.admit(&request(None, None)).await.unwrap().finish(true);
    }
    let refused = flow.admit(&request(None, None)).await.unwrap_err();
    assert_eq!(refused.reason, BlockReason::CircuitOpen);
    assert_eq!(refused.downstream, Downstream::OrderService);
    assert_eq!(refused.retry_after, Some(Duration::from_secs(2)));
}

#[tokio::test(start_paused = true)]
async fn without_redis_each_replica_enforces_its_share_of_the_cluster_bucket() {
    let settings = ClusterSettings {
        replicas_hint: 2,
        ..ClusterSettings::default()
    };
    let cluster = ClusterLimiter::new(&settings);
    let rule = ClusterRule {
        resource: "flash-sale-order".into(),
        replenish_rate: 10,
        burst_capacity: 20,
        requested_tokens: 1,
        lease_ms: 100,
    };
    let mut passed = 0;
    for _ in 0..15 {
        if cluster.acquire(RouteId::FlashSale, &rule).await == ClusterDecision::Pass {
            passed += 1;
        }
    }
    assert_eq!(passed, 10, "half of the burst on each of two replicas");
    assert!(cluster.is_in_fallback(), "and it says so");
    advance(Duration::from_secs(1)).await;
    let mut passed = 0;
    for _ in 0..15 {
        if cluster.acquire(RouteId::FlashSale, &rule).await == ClusterDecision::Pass {
            passed += 1;
        }
    }
    assert_eq!(passed, 5, "half of the rate per second");
}

fn leased_rule(replenish_rate: u32, lease_ms: u64) -> ClusterRule {
    ClusterRule {
        resource: "flash-sale-order".into(),
        replenish_rate,
        burst_capacity: replenish_rate * 2,
        requested_tokens: 1,
        lease_ms,
    }
}

/// Spends from the lease until it needs a refill; returns how many requests it served.
fn spend_all(lease: &mut Lease) -> u32 {
    let mut served = 0;
    while lease.take(1, Instant::now()) == Some(ClusterDecision::Pass) {
        served += 1;
    }
    served
}

#[tokio::test(start_paused = true)]
async fn a_lease_grows_while_it_runs_out_early_and_shrinks_to_what_was_used() {
    // 1000 tokens a second cluster-wide, leases of 100 ms: at most 100 tokens per lease.
    let rule = leased_rule(1000, 100);
    let mut lease = Lease::default();
    assert_eq!(lease.take(1, Instant::now()), None, "nothing leased yet");

    // Each lease used up at once asks for twice as many next time, up to 100.
    let mut asked = Vec::new();
    for _ in 0..9 {
        let (wanted, returned) = lease.start_refill(&rule, Instant::now());
        assert_eq!(returned, 0, "every token was spent");
        asked.push(wanted);
        assert_eq!(
            lease.record(Grant::Tokens(wanted), &rule, Instant::now()),
            ClusterDecision::Pass,
            "the request that refilled is served from the grant"
        );
        assert_eq!(spend_all(&mut lease), wanted - 1);
    }
    assert_eq!(asked, [1, 2, 4, 8, 16, 32, 64, 100, 100]);

    // A lease of 100 of which 30 are spent before it expires: the 70 left go back with the
    // next call, which asks for what was used.
    let (wanted, _) = lease.start_refill(&rule, Instant::now());
    assert_eq!(wanted, 100);
    lease.record(Grant::Tokens(wanted), &rule, Instant::now());
    for _ in 0..29 {
        assert_eq!(lease.take(1, Instant::now()), Some(ClusterDecision::Pass));
    }
    assert_eq!(lease.available(Instant::now()), 70);
    advance(Duration::from_millis(100)).await;
    assert_eq!(
        lease.available(Instant::now()),
        0,
        "expired tokens are not spent"
    );
    assert_eq!(lease.take(1, Instant::now()), None);
    assert_eq!(lease.start_refill(&rule, Instant::now()), (30, 70));
}

#[tokio::test(start_paused = true)]
async fn a_refused_lease_is_remembered_until_a_token_could_be_there() {
    let rule = leased_rule(1000, 100);
    let mut lease = Lease::default();
    let _ = lease.start_refill(&rule, Instant::now());
    assert_eq!(
        lease.record(
            Grant::Refused(Duration::from_millis(30)),
            &rule,
            Instant::now()
        ),
        ClusterDecision::Block(Duration::from_millis(30))
    );
    advance(Duration::from_millis(10)).await;
    assert_eq!(
        lease.take(1, Instant::now()),
        Some(ClusterDecision::Block(Duration::from_millis(20))),
        "refused here, without asking Redis"
    );
    advance(Duration::from_millis(20)).await;
    assert_eq!(
        lease.take(1, Instant::now()),
        None,
        "then Redis is asked again"
    );

    // Never for longer than one lease, whatever the bucket's wait.
    let _ = lease.start_refill(&rule, Instant::now());
    lease.record(
        Grant::Refused(Duration::from_secs(5)),
        &rule,
        Instant::now(),
    );
    advance(Duration::from_millis(100)).await;
    assert_eq!(lease.take(1, Instant::now()), None);
}

#[tokio::test(start_paused = true)]
async fn a_lease_of_zero_ms_asks_for_every_request() {
    let rule = leased_rule(1000, 0);
    let mut lease = Lease::default();
    for _ in 0..3 {
        assert_eq!(lease.take(1, Instant::now()), None);
        assert_eq!(lease.start_refill(&rule, Instant::now()), (1, 0));
        assert_eq!(
            lease.record(Grant::Tokens(1), &rule, Instant::now()),
            ClusterDecision::Pass
        );
    }
    let _ = lease.start_refill(&rule, Instant::now());
    lease.record(
        Grant::Refused(Duration::from_millis(30)),
        &rule,
        Instant::now(),
    );
    assert_eq!(
        lease.take(1, Instant::now()),
        None,
        "no refusal is remembered"
    );
}

#[tokio::test(start_paused = true)]
async fn a_sold_out_mark_holds_for_its_ttl_then_one_probe_asks_again() {
    let sold_out = Arc::new(SoldOut::new());
    let activity = ActivityId::new(7).unwrap();
    let ttl = Duration::from_millis(1000);
    assert!(matches!(
        sold_out.check(activity, Instant::now()),
        SoldOutCheck::Open
    ));
    sold_out.mark(activity, ErrorCode::SoldOut, ttl, Instant::now());
    assert!(matches!(
        sold_out.check(activity, Instant::now()),
        SoldOutCheck::Known(ErrorCode::SoldOut)
    ));
    assert!(matches!(
        sold_out.check(ActivityId::new(8).unwrap(), Instant::now()),
        SoldOutCheck::Open
    ));

    advance(ttl).await;
    let SoldOutCheck::Probe(probe) = sold_out.check(activity, Instant::now()) else {
        panic!("the first request after the TTL probes");
    };
    assert!(
        matches!(
            sold_out.check(activity, Instant::now()),
            SoldOutCheck::Known(_)
        ),
        "the others are still answered at once"
    );
    probe.still(ErrorCode::SoldOut, ttl, Instant::now());
    assert!(matches!(
        sold_out.check(activity, Instant::now()),
        SoldOutCheck::Known(_)
    ));

    advance(ttl).await;
    let SoldOutCheck::Probe(probe) = sold_out.check(activity, Instant::now()) else {
        panic!("probe");
    };
    drop(probe); // refused further on: the next request probes
    let SoldOutCheck::Probe(probe) = sold_out.check(activity, Instant::now()) else {
        panic!("probe again");
    };
    probe.open(); // restocked: order-service took the order
    assert!(matches!(
        sold_out.check(activity, Instant::now()),
        SoldOutCheck::Open
    ));
}

#[tokio::test(start_paused = true)]
async fn the_sold_out_short_circuit_answers_before_any_other_rule() {
    let mut rules = no_rules();
    rules.sold_out.enabled = true;
    rules.flow = vec![FlowRule::qps("flash-sale-order", 1.0)];
    let flow = flow_with(rules);
    let activity = ActivityId::new(3);
    flow.sold_out().mark(
        activity.unwrap(),
        ErrorCode::SoldOut,
        Duration::from_secs(1),
        Instant::now(),
    );
    for _ in 0..5 {
        let refused = flow.admit(&request(activity, None)).await.unwrap_err();
        assert_eq!(refused.reason, BlockReason::SoldOut);
        assert_eq!(refused.remembered, Some(ErrorCode::SoldOut));
    }
    // It took none of the QPS budget.
    flow.admit(&request(None, None))
        .await
        .unwrap()
        .finish(false);
}

fn flow_with(rules: Rules) -> Flow {
    let store = Arc::new(RulesStore::fixed(rules));
    Flow::new(
        store,
        Arc::new(ClusterLimiter::new(&ClusterSettings::default())),
        100,
    )
}

fn request(activity: Option<ActivityId>, user: Option<&'static str>) -> FlowRequest<'static> {
    FlowRequest {
        route: RouteId::FlashSale,
        activity,
        user,
        client_ip: None,
    }
}
