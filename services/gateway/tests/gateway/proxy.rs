//! The gateway as it runs: on port 0, in front of small upstream apps, over real sockets.

use std::time::Duration;

use gateway::resource::Downstream;
use gateway::rules::{BreakerRule, BreakerStrategy, ParamKind, ParamRule, Rules};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    TestGateway, TestUpstream, buy, client, eventually, metric, settings, token, write_rules,
};

fn rules_file(dir: &tempfile::TempDir, rules: &Rules) -> String {
    let path = dir.path().join("rules.toml");
    write_rules(&path, &toml_of(rules));
    path.to_string_lossy().into_owned()
}

fn toml_of(rules: &Rules) -> String {
    toml::to_string(rules).unwrap()
}

#[tokio::test]
async fn requests_flow_through_pooled_keep_alive_connections_and_show_on_metrics() {
    let upstream = TestUpstream::start().await;
    let mut s = settings();
    s.upstreams.order_service = upstream.url();
    s.upstreams.inventory_service = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    s.rules.file = Some(rules_file(&dir, &crate::helpers::no_rules()));
    let gateway = TestGateway::spawn(s).await;
    let http = client();

    for user in 1..=30 {
        let response = buy(&http, &gateway, user, 1).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let echo: Value = response.json().await.unwrap();
        assert_eq!(echo["headers"]["x-user-id"], user.to_string());
        assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    }
    assert_eq!(upstream.hits(), 30);
    assert!(
        upstream.connections() <= 5,
        "30 sequential requests reuse pooled connections, {} were opened",
        upstream.connections()
    );

    let text = gateway.metrics().await;
    for series in [
        r#"gateway_flow_passed_total{resource="flash-sale-order"}"#,
        r#"gateway_flow_passed_total{resource="activity:1"}"#,
        r#"gateway_flow_in_flight{resource="flash-sale-order"}"#,
        r#"gateway_flow_latency_seconds_count{resource="flash-sale-order"}"#,
    ] {
        assert!(
            metric(&text, series).is_some_and(|v| v >= 1.0 || series.contains("in_flight")),
            "{series}"
        );
    }
    assert!(
        text.contains("http_requests_total{"),
        "the common http metrics"
    );

    let view: Value = reqwest::get(format!("{}/flow", gateway.management))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["rules"]["flow"], json!([]));
    assert_eq!(view["cluster"]["connected"], false, "no Redis in this test");
    assert_eq!(view["in_flight"]["flash-sale-order"], 0);
    gateway.stop().await;
}

#[tokio::test]
async fn a_stopped_upstream_trips_the_breaker_and_the_route_recovers_when_it_returns() {
    let mut upstream = TestUpstream::start().await;
    let mut s = settings();
    s.upstreams.order_service = upstream.url();
    let mut rules = crate::helpers::no_rules();
    rules.breaker = vec![BreakerRule {
        downstream: Downstream::OrderService,
        strategy: BreakerStrategy::ErrorCount,
        threshold: 3.0,
        max_rt_ms: 1000,
        min_requests: 3,
        window_ms: 10_000,
        open_ms: 300,
    }];
    let dir = tempfile::tempdir().unwrap();
    s.rules.file = Some(rules_file(&dir, &rules));
    let gateway = TestGateway::spawn(s).await;
    let http = client();
    let breakers = || {
        gateway
            .state
            .flow
            .rules()
            .current()
            .breakers(Downstream::OrderService)
            .cloned()
            .unwrap()
    };

    assert_eq!(
        buy(&http, &gateway, 1, 1).await.status(),
        StatusCode::ACCEPTED
    );
    upstream.stop().await;

    // Three failures (order-service unreachable), then the circuit is open: fail fast.
    for _ in 0..3 {
        let response = buy(&http, &gateway, 1, 1).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "SERVICE_UNAVAILABLE");
    }
    let response = buy(&http, &gateway, 1, 1).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "CIRCUIT_OPEN");
    assert_eq!(breakers().state() as i32, 1);
    let text = gateway.metrics().await;
    assert!(
        metric(
            &text,
            r#"gateway_circuit_state{downstream="order-service"}"#
        )
        .is_some()
    );
    assert!(
        metric(
            &text,
            r#"gateway_flow_blocked_total{resource="flash-sale-order",reason="circuit_open"}"#
        )
        .is_some_and(|v| v >= 1.0)
    );
    assert!(
        metric(
            &text,
            r#"gateway_flow_errors_total{resource="flash-sale-order"}"#
        )
        .is_some_and(|v| v >= 3.0)
    );

    // Back: after open_ms a probe goes through, succeeds, and the circuit closes.
    upstream.restart().await;
    let recovered = eventually(Duration::from_secs(20), || async {
        buy(&http, &gateway, 1, 1).await.status() == StatusCode::ACCEPTED
    })
    .await;
    assert!(recovered, "the route recovers");
    assert_eq!(breakers().state() as i32, 0);
    gateway.stop().await;
}

#[tokio::test]
async fn the_running_gateway_reloads_its_rule_file_and_keeps_the_last_good_one() {
    let upstream = TestUpstream::start().await;
    let mut s = settings();
    s.upstreams.order_service = upstream.url();
    s.rules.poll_interval_ms = 20;
    let dir = tempfile::tempdir().unwrap();
    let path = rules_file(&dir, &crate::helpers::no_rules());
    s.rules.file = Some(path.clone());
    let gateway = TestGateway::spawn(s).await;
    let http = client();
    for user in 1..=5 {
        assert_eq!(
            buy(&http, &gateway, user, 1).await.status(),
            StatusCode::ACCEPTED
        );
    }

    // One order per user per minute.
    let mut rules = crate::helpers::no_rules();
    rules.param = vec![ParamRule {
        resource: "flash-sale-order".into(),
        param: ParamKind::User,
        count: 1,
        window_secs: 60,
        burst: 0,
        overrides: Default::default(),
        max_keys: 1000,
    }];
    write_rules(std::path::Path::new(&path), &toml_of(&rules));
    let limited = eventually(Duration::from_secs(10), || async {
        buy(&http, &gateway, 7, 1).await.status() == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
    assert!(limited, "the new rule is in force without a restart");

    tokio::time::sleep(Duration::from_millis(50)).await;
    write_rules(
        std::path::Path::new(&path),
        "[[param]]\nresource = \"flash-sale-order\"\nparam = \"everyone\"\n",
    );
    let rejected = eventually(Duration::from_secs(10), || async {
        metric(
            &gateway.metrics().await,
            "gateway_rules_reload_failures_total",
        )
        .is_some_and(|v| v >= 1.0)
    })
    .await;
    assert!(rejected, "the bad file is counted");
    assert_eq!(
        buy(&http, &gateway, 7, 1).await.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the last good rules stay in force"
    );
    assert_eq!(
        buy(&http, &gateway, 8, 1).await.status(),
        StatusCode::ACCEPTED
    );
    gateway.stop().await;
}

#[tokio::test]
async fn behind_one_trusted_proxy_the_client_is_the_last_forwarded_address() {
    let upstream = TestUpstream::start().await;
    let mut s = settings();
    s.upstreams.order_service = upstream.url();
    s.proxy.trusted_proxy_hops = 1;
    let mut rules = crate::helpers::no_rules();
    rules.param = vec![ParamRule {
        resource: "flash-sale-order".into(),
        param: ParamKind::ClientIp,
        count: 1,
        window_secs: 60,
        burst: 0,
        overrides: Default::default(),
        max_keys: 1000,
    }];
    let dir = tempfile::tempdir().unwrap();
    s.rules.file = Some(rules_file(&dir, &rules));
    let gateway = TestGateway::spawn(s).await;
    let http = client();
    let send = |forwarded: &'static str, user: i64| {
        http.post(gateway.url(crate::helpers::CREATE))
            .bearer_auth(token(user))
            .header("x-forwarded-for", forwarded)
            .json(&json!({"activityId": 1}))
            .send()
    };
    let first = send("203.0.113.9", 1).await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let echo: Value = first.json().await.unwrap();
    assert_eq!(echo["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(
        send("203.0.113.9", 2).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // What a client writes left of the proxy's entry is not trusted.
    assert_eq!(
        send("198.51.100.1, 203.0.113.9", 3).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send("198.51.100.7", 4).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    gateway.stop().await;
}
