//! The gateway as it runs: on port 0, in front of small upstream apps, over real sockets.

use std::time::Duration;

use gateway::Settings;
use gateway::resource::Downstream;
use gateway::rules::{BreakerRule, BreakerStrategy, ParamKind, ParamRule, Rules};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    Behavior, TestGateway, TestUpstream, buy, client, eventually, metric, settings, token,
    write_rules,
};
use flash_sale_common::api;
use flash_sale_common::error::ErrorCode;

fn rules_file(dir: &tempfile::TempDir, rules: &Rules) -> String {
    let path = dir.path().join("rules.toml");
    write_rules(&path, &toml_of(rules));
    path.to_string_lossy().into_owned()
}

fn toml_of(rules: &Rules) -> String {
    toml::to_string(rules).unwrap()
}

/// A gateway without rules in front of `order_service`, with `configure` applied to its
/// settings. Its rule file lives as long as the directory returned with it.
async fn gateway_without_rules(
    order_service: String,
    configure: impl FnOnce(&mut Settings),
) -> (TestGateway, tempfile::TempDir) {
    let mut s = settings();
    s.upstreams.order_service = order_service;
    configure(&mut s);
    let dir = tempfile::tempdir().unwrap();
    s.rules.file = Some(rules_file(&dir, &crate::helpers::no_rules()));
    (TestGateway::spawn(s).await, dir)
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
        assert_eq!(echo["headers"][api::USER_HEADER.as_str()], user.to_string());
        assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    }
    assert_eq!(upstream.hits(), 30);
    assert_eq!(
        upstream.connections(),
        1,
        "30 sequential requests reuse one pooled connection"
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
async fn connections_the_upstream_closed_are_not_used_again() {
    let mut upstream = TestUpstream::start().await;
    let (gateway, _rules) = gateway_without_rules(upstream.url(), |_| {}).await;
    let http = client();

    assert_eq!(
        buy(&http, &gateway, 1, 1).await.status(),
        StatusCode::ACCEPTED
    );

    // The upstream restarts: the pooled connection is closed while nobody uses it. The next
    // request finds that out before sending and goes out on a new connection.
    upstream.stop().await;
    upstream.restart().await;
    assert_eq!(
        buy(&http, &gateway, 2, 1).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(upstream.connections(), 1);
    assert_eq!(upstream.hits(), 2, "each buy reached the upstream once");

    // An answer with `Connection: close` ends its connection: it is not pooled.
    upstream.set(Behavior::CloseAfter);
    assert_eq!(
        buy(&http, &gateway, 3, 1).await.status(),
        StatusCode::ACCEPTED
    );
    upstream.set(Behavior::Echo);
    assert_eq!(
        buy(&http, &gateway, 4, 1).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(upstream.connections(), 2);
    assert_eq!(upstream.hits(), 4);
    gateway.stop().await;
}

#[tokio::test]
async fn the_pool_keeps_at_most_its_idle_limit_and_closes_what_idled_too_long() {
    let upstream = TestUpstream::start().await;
    let (gateway, _rules) = gateway_without_rules(upstream.url(), |s| {
        s.upstreams.pool_max_idle_per_host = 2;
        s.upstreams.pool_idle_timeout_ms = 300;
    })
    .await;
    let http = client();

    // Five at once need five connections; two of them stay.
    upstream.set(Behavior::Slow(Duration::from_millis(100)));
    let buys = (1..=5).map(|user| buy(&http, &gateway, user, 1));
    for response in futures::future::join_all(buys).await {
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    assert_eq!(upstream.connections(), 5);

    // Sequential requests reuse the two kept.
    upstream.set(Behavior::Echo);
    for user in 6..=8 {
        assert_eq!(
            buy(&http, &gateway, user, 1).await.status(),
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(upstream.connections(), 5);

    // Idle longer than the timeout: not used again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        buy(&http, &gateway, 9, 1).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(upstream.connections(), 6);
    gateway.stop().await;
}

/// A request that needs a new connection while the upstream's accept queue is full (its SYN is
/// dropped and would be sent again only after a second) is served by the first connection that
/// comes back.
#[tokio::test]
async fn a_request_waiting_for_a_new_connection_takes_one_that_comes_back_first() {
    let upstream = OneConnectionUpstream::start(Duration::from_millis(600)).await;
    let (gateway, _rules) = gateway_without_rules(format!("http://{}", upstream.address), |s| {
        s.upstreams.connect_timeout_ms = 5_000;
    })
    .await;
    let http = client();

    let (first, second) = tokio::join!(buy(&http, &gateway, 1, 1), async {
        upstream.accepted.notified().await;
        let _fillers = upstream.fill_accept_queue().await;
        buy(&http, &gateway, 2, 1).await
    });
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    gateway.stop().await;
}

/// An upstream that accepts one connection and no more, and answers `202 {}` on it after a
/// delay.
struct OneConnectionUpstream {
    address: std::net::SocketAddr,
    /// Notified once the one connection is accepted.
    accepted: std::sync::Arc<tokio::sync::Notify>,
}

impl OneConnectionUpstream {
    async fn start(delay: Duration) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // A backlog of 0: one connection waiting to be accepted fills the queue.
        let listener = socket.listen(0).unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = accepted.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            notify.notify_one();
            let answer = hyper::service::service_fn(move |_request| async move {
                tokio::time::sleep(delay).await;
                let body = http_body_util::Full::new(axum::body::Bytes::from_static(b"{}"));
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder().status(202).body(body).unwrap(),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), answer)
                .await;
            // The listener stays open, accepting nothing, as long as the test runs.
            drop(listener);
        });
        Self { address, accepted }
    }

    /// Connects until a connection attempt hangs: the accept queue is full, and the next SYN
    /// is dropped. The connections returned keep it full.
    async fn fill_accept_queue(&self) -> Vec<tokio::net::TcpStream> {
        let mut fillers = Vec::new();
        for _ in 0..8 {
            let connecting = tokio::net::TcpStream::connect(self.address);
            match tokio::time::timeout(Duration::from_millis(200), connecting).await {
                Ok(connected) => fillers.push(connected.unwrap()),
                Err(_) => return fillers,
            }
        }
        panic!(
            "the accept queue did not fill up after {} connections",
            fillers.len()
        );
    }
}

#[tokio::test]
async fn an_answer_longer_than_the_limit_is_refused_and_its_connection_dropped() {
    let upstream = TestUpstream::start().await;
    let (gateway, _rules) = gateway_without_rules(upstream.url(), |s| {
        s.upstreams.max_response_bytes = 4096;
    })
    .await;
    let http = client();
    let get = || async {
        http.get(gateway.url(&format!("{}orders/1-abc", api::order::PREFIX)))
            .bearer_auth(token(1))
            .send()
            .await
            .unwrap()
    };

    upstream.set(Behavior::Large(4096));
    let at_limit = get().await;
    assert_eq!(at_limit.status(), StatusCode::OK);
    assert_eq!(at_limit.bytes().await.unwrap().len(), 4096);

    upstream.set(Behavior::Large(64 * 1024));
    let over = get().await;
    assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["code"], ErrorCode::ServiceUnavailable.as_str());
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("answered with more than the gateway passes on"),
        "{body}"
    );
    upstream.set(Behavior::Echo);
    assert_eq!(get().await.status(), StatusCode::OK);
    assert_eq!(upstream.connections(), 2);
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
        assert_eq!(body["code"], ErrorCode::ServiceUnavailable.as_str());
    }
    let response = buy(&http, &gateway, 1, 1).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], ErrorCode::CircuitOpen.as_str());
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

/// Forwarded with the caller's identity; an answer over the limit and a slow upstream refused in
/// the common shape; an upstream that is gone refused as unreachable.
#[tokio::test]
async fn the_client_forwards_and_every_failure_has_its_answer() {
    let mut upstream = TestUpstream::start().await;
    let (gateway, _rules) = gateway_without_rules(upstream.url(), |s| {
        s.upstreams.max_response_bytes = 4096;
        s.routes.flash_sale.timeout_ms = 300;
    })
    .await;
    let http = client();
    let get = || async {
        http.get(gateway.url(&format!("{}orders/1-abc", api::order::PREFIX)))
            .bearer_auth(token(7))
            .send()
            .await
            .unwrap()
    };
    let code = |body: Value| body["code"].as_str().and_then(ErrorCode::parse);

    let echoed: Value = get().await.json().await.unwrap();
    assert_eq!(echoed["headers"][api::USER_HEADER.as_str()], "7");
    upstream.set(Behavior::Large(64 * 1024));
    let over = get().await;
    assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        over.text()
            .await
            .unwrap()
            .contains("more than the gateway passes on")
    );
    upstream.set(Behavior::Slow(Duration::from_secs(2)));
    let slow = get().await;
    assert_eq!(slow.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        code(slow.json().await.unwrap()),
        Some(ErrorCode::UpstreamTimeout)
    );
    upstream.stop().await;
    let gone = get().await;
    assert_eq!(gone.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        code(gone.json().await.unwrap()),
        Some(ErrorCode::ServiceUnavailable)
    );
    gateway.stop().await;
}
