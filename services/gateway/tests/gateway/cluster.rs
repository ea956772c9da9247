//! The cluster-wide bucket on a private redis-server: two gateways draw from one bucket; when
//! Redis goes away each enforces its share and says so; when Redis is back, the bucket decides
//! again.

use std::time::{Duration, Instant};

use flash_sale_common::configuration::RedisSettings;
use flash_sale_common::redis::Redis;
use gateway::configuration::ClusterSettings;
use gateway::flow::cluster::{ClusterDecision, ClusterLimiter, bucket_key};
use gateway::resource::RouteId;
use gateway::rules::ClusterRule;
use reqwest::StatusCode;

use crate::helpers::{
    TestGateway, TestRedis, TestUpstream, buy, client, eventually, metric, no_rules, settings,
};

async fn count_passed(
    http: &reqwest::Client,
    gateways: &[&TestGateway],
    requests: usize,
) -> (usize, Vec<usize>) {
    let mut per_gateway = vec![0; gateways.len()];
    for i in 0..requests {
        let which = i % gateways.len();
        let status = buy(http, gateways[which], i as i64 + 1, 1).await.status();
        match status {
            StatusCode::ACCEPTED => per_gateway[which] += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    (per_gateway.iter().sum(), per_gateway)
}

#[tokio::test]
async fn two_gateways_share_one_redis_bucket_and_fall_back_to_their_shares_without_it() {
    let mut redis =
        TestRedis::start().expect("redis-server is installed (`cargo xtask setup` installs it)");
    let upstream = TestUpstream::start().await;
    let mut rules = no_rules();
    // One token a second, ten at most, for the whole cluster.
    rules.cluster = vec![ClusterRule {
        resource: "flash-sale-order".into(),
        replenish_rate: 1,
        burst_capacity: 10,
        requested_tokens: 1,
        lease_ms: 100,
    }];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, toml::to_string(&rules).unwrap()).unwrap();
    let mut s = settings();
    s.upstreams.order_service = upstream.url();
    s.redis.url = redis.url();
    s.redis.response_timeout_ms = 500;
    s.cluster.heartbeat_ms = 50;
    s.cluster.replicas_hint = 1;
    s.rules.file = Some(path.to_string_lossy().into_owned());
    let a = TestGateway::spawn(s.clone()).await;
    let b = TestGateway::spawn(s).await;
    let both_see_two = eventually(Duration::from_secs(10), || async {
        [&a, &b].iter().all(|g| {
            g.state.flow.cluster().is_connected() && g.state.flow.cluster().replicas() == 2
        })
    })
    .await;
    assert!(
        both_see_two,
        "both connect and count each other through their heartbeats"
    );
    let http = client();

    // 30 requests alternating between the two: the shared burst of 10, plus what one token a
    // second refilled meanwhile. Two separate buckets would have let 20 through.
    let started = Instant::now();
    let (passed, per_gateway) = count_passed(&http, &[&a, &b], 30).await;
    let refilled = started.elapsed().as_secs() as usize + 1;
    assert!(passed >= 10, "{per_gateway:?}");
    assert!(
        passed <= 10 + refilled,
        "{passed} passed in {:?}: {per_gateway:?}",
        started.elapsed()
    );
    assert!(
        per_gateway.iter().all(|&n| n >= 1),
        "both drew from it: {per_gateway:?}"
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = bucket_key("flash-sale-order");
    assert!(key.contains("{rl:flash-sale-order}"), "hash-tagged: {key}");
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(exists, "the bucket lives in Redis");

    // Redis goes away: each gateway enforces half (two replicas were alive) of the burst. (The
    // bucket's last refusal is remembered for at most lease_ms, 100 ms; past that, the next
    // request asks Redis and finds it gone.)
    redis.stop();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let (passed, _) = count_passed(&http, &[&a], 12).await;
    let refilled = (started.elapsed().as_secs_f64() * 0.5).ceil() as usize;
    assert!(
        (5..=5 + refilled).contains(&passed),
        "{passed} passed on one replica"
    );
    assert!(
        a.state.flow.cluster().is_in_fallback(),
        "it does not fail open silently"
    );
    let text = a.metrics().await;
    assert_eq!(metric(&text, "gateway_cluster_fallback"), Some(1.0));
    assert!(
        metric(
            &text,
            r#"gateway_cluster_fallback_decisions_total{resource="flash-sale-order"}"#
        )
        .is_some_and(|v| v >= 12.0)
    );
    assert!(
        metric(
            &text,
            r#"gateway_flow_blocked_total{resource="flash-sale-order",reason="cluster"}"#
        )
        .is_some_and(|v| v >= 1.0)
    );

    // Redis is back (empty): the shared bucket decides again.
    let _redis = TestRedis::start_on(redis.port).expect("restarts");
    let back = eventually(Duration::from_secs(20), || async {
        let _ = buy(&http, &a, 1, 1).await;
        !a.state.flow.cluster().is_in_fallback()
    })
    .await;
    assert!(back, "leaves the fallback once Redis answers");
    a.stop().await;
    b.stop().await;
}

/// Scripts Redis has run so far (`EVALSHA`, and `EVAL` when a script was not cached yet).
async fn scripts_run(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Requests that passed out of `requests`, alternating between the replicas.
async fn alternate(replicas: &[&ClusterLimiter], rule: &ClusterRule, requests: usize) -> usize {
    let route = RouteId::ALL
        .into_iter()
        .find(|r| r.as_str() == rule.resource)
        .expect("cluster rules name a route");
    let mut passed = 0;
    for i in 0..requests {
        let replica = replicas[i % replicas.len()];
        if replica.acquire(route, rule).await == ClusterDecision::Pass {
            passed += 1;
        }
    }
    passed
}

#[tokio::test]
async fn leased_tokens_spare_redis_calls_and_never_exceed_the_shared_bucket() {
    let redis =
        TestRedis::start().expect("redis-server is installed (`cargo xtask setup` installs it)");
    let settings = RedisSettings {
        url: redis.url(),
        ..RedisSettings::default()
    };
    let replica = || async {
        ClusterLimiter::with_redis(
            &ClusterSettings::default(),
            Redis::connect(&settings).await.unwrap(),
        )
    };
    let (a, b) = (replica().await, replica().await);
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // A bucket that cannot run dry: every request passes, and leases (growing to 1000 tokens/s
    // x 100 ms = 100 tokens) serve them with a small fraction of the calls.
    let roomy = ClusterRule {
        resource: "flash-sale-order".into(),
        replenish_rate: 1000,
        burst_capacity: 100_000,
        requested_tokens: 1,
        lease_ms: 100,
    };
    let before = scripts_run(&mut conn).await;
    assert_eq!(alternate(&[&a, &b], &roomy, 2000).await, 2000);
    let calls = scripts_run(&mut conn).await - before;
    assert!(calls < 2000 / 4, "{calls} Redis calls for 2000 requests");

    // A small bucket run dry by both: no more pass than the bucket held plus what it earned,
    // and no fewer than that less what two leases (100 tokens/s x 100 ms = 10 each) can hold.
    let small = ClusterRule {
        resource: "inventory".into(),
        replenish_rate: 100,
        burst_capacity: 200,
        requested_tokens: 1,
        lease_ms: 100,
    };
    let started = Instant::now();
    let passed = alternate(&[&a, &b], &small, 1000).await;
    let earned = (started.elapsed().as_secs_f64() * 100.0).ceil() as usize;
    assert!(
        (200 - 2 * 10..=200 + earned).contains(&passed),
        "{passed} passed, the bucket earned {earned} meanwhile"
    );
}
