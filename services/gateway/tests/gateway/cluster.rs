//! The cluster-wide bucket on a private redis-server: two gateways draw from one bucket; when
//! Redis goes away each enforces its share and says so; when Redis is back, the bucket decides
//! again.

use std::time::{Duration, Instant};

use gateway::flow::cluster::bucket_key;
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

    // Redis goes away: each gateway enforces half (two replicas were alive) of the burst.
    redis.stop();
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
