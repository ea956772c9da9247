//! The gateway's cluster-wide bucket on a private Redis (a Redis-only [`Stack`]): two gateways
//! draw from one bucket; when Redis goes away each enforces its share and says so; when Redis is
//! back, the bucket decides again; leased tokens spare Redis calls and never exceed the bucket.
//!
//! A test binary of its own, not a module of `api`: the fallback check reads the process-wide
//! `gateway_cluster_fallback` gauge, which the in-process gateways of the `api` tests would set
//! too. The gateways run in-process because the checks also read their state (connected,
//! replicas seen, in fallback).

use std::time::{Duration, Instant};

use flash_sale_common::api;
use flash_sale_common::configuration::RedisSettings;
use flash_sale_common::redis::Redis;
use flash_sale_tests::apps::{
    JWT_SECRET, RunningApp, gateway_settings, http_client, init_test_tracing,
    spawn_gateway_with_state,
};
use flash_sale_tests::scenario::scripts_run;
use flash_sale_tests::stack::{Server, Stack};
use gateway::configuration::ClusterSettings;
use gateway::flow::cluster::{ClusterDecision, ClusterLimiter, bucket_key};
use gateway::resource::RouteId;
use gateway::rules::{ClusterRule, Rules};
use gateway::state::AppState;
use reqwest::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn redis_stack() -> Stack {
    Stack::start_redis_only()
        .expect("redis-server starts (`cargo xtask setup` installs it when it is missing)")
}

/// A stand-in order-service that accepts every order (202): these tests look at the bucket in
/// front of it, not at what it does. Stops on drop.
struct AcceptingUpstream {
    url: String,
    stop: CancellationToken,
}

impl AcceptingUpstream {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!(
            "http://{}",
            listener.local_addr().expect("the bound address")
        );
        let app = axum::Router::new().fallback(|| async { StatusCode::ACCEPTED });
        let stop = CancellationToken::new();
        let stopped = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
                .expect("the stand-in upstream serves");
        });
        Self { url, stop }
    }
}

impl Drop for AcceptingUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A gateway running in-process, with its state for the checks that look inside it.
struct TestGateway {
    app: RunningApp,
    state: AppState,
}

impl TestGateway {
    async fn spawn(settings: gateway::Settings) -> Self {
        let (app, state) = spawn_gateway_with_state(settings)
            .await
            .expect("the gateway starts");
        Self { app, state }
    }
}

/// Rules with only the cluster rule on, so nothing else refuses a request.
fn only_cluster_rule(rule: ClusterRule) -> Rules {
    Rules {
        flow: vec![],
        param: vec![],
        system: gateway::rules::SystemRule {
            adaptive: false,
            ..Default::default()
        },
        cluster: vec![rule],
        breaker: vec![],
        sold_out: gateway::rules::SoldOutRule {
            enabled: false,
            ttl_ms: 1000,
        },
        admission: Default::default(),
        waiting_room: vec![],
    }
}

/// An HS256 token for `user` that the test gateway accepts, valid for an hour.
fn token(user: i64) -> String {
    let exp = chrono::Utc::now().timestamp() + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": user.to_string(), "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("the token encodes")
}

/// Sends an order creation through the gateway with `user`'s token.
async fn buy(
    http: &reqwest::Client,
    gateway: &TestGateway,
    user: i64,
    activity: i64,
) -> reqwest::Response {
    http.post(format!("{}{}", gateway.app.base_url, api::order::CREATE))
        .bearer_auth(token(user))
        .json(
            &json!({"userId": user.to_string(), "activityId": activity.to_string(), "quantity": 1}),
        )
        .send()
        .await
        .expect("the gateway answers")
}

/// The value of one series (name and labels exactly as exported) in a Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Polls `check` until it holds or `timeout` passes.
async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    init_test_tracing();
    let mut stack = redis_stack();
    let upstream = AcceptingUpstream::start().await;
    // One token a second, ten at most, for the whole cluster.
    let rules = only_cluster_rule(ClusterRule {
        resource: "flash-sale-order".into(),
        replenish_rate: 1,
        burst_capacity: 10,
        requested_tokens: 1,
        lease_ms: 100,
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, toml::to_string(&rules).unwrap()).unwrap();
    let mut s = gateway_settings(&stack, &upstream.url, &upstream.url);
    s.redis.response_timeout_ms = 500;
    s.cluster.heartbeat_ms = 50;
    s.cluster.replicas_hint = 1;
    s.cluster.retry_ms = 100;
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
    let http = http_client();

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
    let mut conn = redis::Client::open(stack.redis_url())
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
    stack.kill(Server::Redis);
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
    let text = a.app.metrics(&http).await.unwrap();
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

    // Redis is back on the same port: the shared bucket decides again.
    stack.restart(Server::Redis).expect("Redis restarts");
    let back = eventually(Duration::from_secs(20), || async {
        let _ = buy(&http, &a, 1, 1).await;
        !a.state.flow.cluster().is_in_fallback()
    })
    .await;
    assert!(back, "leaves the fallback once Redis answers");
    a.app.stop().await.expect("gateway a drains and stops");
    b.app.stop().await.expect("gateway b drains and stops");
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
    let stack = redis_stack();
    let settings = RedisSettings {
        url: flash_sale_common::configuration::Secret::new(stack.redis_url()),
        ..RedisSettings::default()
    };
    let replica = || async {
        ClusterLimiter::with_redis(
            &ClusterSettings::default(),
            Redis::connect(&settings).await.unwrap(),
        )
    };
    let (a, b) = (replica().await, replica().await);
    let mut conn = redis::Client::open(stack.redis_url())
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
    let before = scripts_run(&mut conn).await.unwrap();
    assert_eq!(alternate(&[&a, &b], &roomy, 2000).await, 2000);
    let calls = scripts_run(&mut conn).await.unwrap() - before;
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
