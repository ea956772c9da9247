//! Through the real gateway, in front of the real order-service, Redis, broker and MariaDB.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flash_sale_tests::apps::{
    ADMIN_TOKEN, JWT_SECRET, gateway_settings, http_client, inventory_settings, local,
    order_settings, spawn_gateway, spawn_inventory_service,
};
use flash_sale_tests::scenario::{Admin, SaleConfig, drive_sale};
use flash_sale_tests::stack::{BrokerStorage, Stack, free_port};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::helpers::*;
use flash_sale_common::api;
use flash_sale_common::error::ErrorCode;

fn token(sub: &str, expires_in_secs: i64, secret: &str) -> String {
    let exp = chrono::Utc::now().timestamp() + expires_in_secs;
    encode(
        &Header::default(),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_through_the_gateway_keeps_every_invariant() {
    let apps = spawn_apps().await;
    let mut settings =
        gateway_settings(&apps.stack, &apps.order.base_url, &apps.inventory.base_url);
    settings.auth.trust_body_user_id = true; // the seed's load test: ids in the body
    let gateway = spawn_gateway(settings).await.unwrap();
    apps.admin().create_activity(1, 2000).await.unwrap();
    let config = SaleConfig {
        activity: 1,
        stock: 2000,
        requests: 12_000,
        concurrency: 200,
        repeat_every: 3,
        first_user: 1,
        retry_ms: 0,
    };
    let load = drive_sale(&apps.http, &gateway.base_url, &config).await;
    println!("{load}");
    assert_eq!(load.transport_errors, 0);
    assert!(!load.accepted.is_empty(), "{load}");
    let unexpected: Vec<_> = load
        .outcomes
        .keys()
        .filter(|k| {
            // "409 SOLD_OUT (gateway: sold_out)": the gateway's own refusals name their rule
            let answer = k.split(" (gateway: ").next().unwrap_or_default();
            ![
                "202 ACCEPTED",
                "409 SOLD_OUT",
                "409 ALREADY_PURCHASED",
                "429 RATE_LIMITED",
            ]
            .contains(&answer)
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "only sales, refusals and flow control: {load}"
    );
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(1, Duration::from_secs(60))
        .await
        .unwrap();
    let report = stores
        .check_invariants(1, 2000, &load.accepted)
        .await
        .unwrap();
    println!("{report}");
    report.ensure().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_buys_as_the_token_says_and_refuses_forged_or_expired_tokens() {
    let apps = spawn_apps().await;
    let gateway = spawn_gateway(gateway_settings(
        &apps.stack,
        &apps.order.base_url,
        &apps.inventory.base_url,
    ))
    .await
    .unwrap();
    apps.admin().create_activity(1, 10).await.unwrap();
    let buy = |bearer: Option<String>, body: Value| {
        let mut req = apps
            .http
            .post(format!("{}{}", gateway.base_url, api::order::CREATE))
            .json(&body);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let body = json!({"activityId": "1", "quantity": 1});

    let (status, answer) = buy(None, body.clone()).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (401, Some(ErrorCode::Unauthorized.as_str()))
    );
    let forged = token("7", 600, "another-secret-of-at-least-32-bytes-long");
    assert_eq!(buy(Some(forged), body.clone()).await.0, 401, "forged");
    let expired = token("7", -600, JWT_SECRET);
    assert_eq!(buy(Some(expired), body.clone()).await.0, 401, "expired");

    let (status, answer) = buy(Some(token("7", 600, JWT_SECRET)), body.clone()).await;
    assert_eq!(status, 202, "{answer}");
    let order_no = answer["orderNo"].as_str().unwrap().to_owned();
    let (status, answer) = buy(
        Some(token("8", 600, JWT_SECRET)),
        json!({"userId": "7", "activityId": "1"}),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (403, Some(ErrorCode::Forbidden.as_str())),
        "cannot buy as user 7"
    );

    let stores = stores(&apps).await;
    stores
        .wait_for_drain(1, Duration::from_secs(20))
        .await
        .unwrap();
    let mine = apps
        .http
        .get(format!(
            "{}{}",
            gateway.base_url,
            api::order::one(&order_no)
        ))
        .bearer_auth(token("7", 600, JWT_SECRET))
        .send()
        .await
        .unwrap();
    let mine: Value = mine.json().await.unwrap();
    assert_eq!(
        (mine["status"].as_str(), mine["userId"].as_str()),
        (Some("CREATED"), Some("7"))
    );
    let theirs = apps
        .http
        .get(format!(
            "{}{}",
            gateway.base_url,
            api::order::one(&order_no)
        ))
        .bearer_auth(token("8", 600, JWT_SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(
        theirs.status().as_u16(),
        404,
        "another buyer's order is not shown"
    );
    assert_eq!(stores.order_count(1).await.unwrap(), 1);
}

/// Writes a rule file into `dir` and returns its path, for `settings.rules.file`.
fn rule_file(dir: &tempfile::TempDir, toml: &str) -> String {
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, toml).expect("the rule file is written");
    path.to_string_lossy().into_owned()
}

/// The value of one series (name and labels exactly as exported) in a Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Buys one item of activity 1 for `user` through a gateway in development mode (the body's
/// `userId` is the buyer).
async fn buy(http: &reqwest::Client, gateway: &ServiceProcess, user: i64) -> reqwest::Response {
    http.post(format!("{}{}", gateway.base_url, api::order::CREATE))
        .json(&json!({"userId": user.to_string(), "activityId": "1", "quantity": 1}))
        .send()
        .await
        .expect("the gateway answers")
}

/// Two gateway processes on one Redis draw from one cluster-wide bucket: with a burst of 10 and
/// one token a second, 30 buys alternating between them let 10 through (plus what refilled
/// meanwhile), not the 20 two separate buckets would; both draw from it, every refusal shows on
/// the refusing gateway's own `/metrics`, no decision was taken without Redis, and every buy let
/// through is a real order in MySQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_share_one_cluster_bucket() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 1000).await.unwrap();
    // Only the cluster rule: one token a second, ten at most, for the whole cluster.
    let dir = tempfile::tempdir().unwrap();
    let rules = rule_file(
        &dir,
        r#"
flow = []
param = []
breaker = []

[system]
adaptive = false

[sold_out]
enabled = false

[[cluster]]
resource = "flash-sale-order"
replenish_rate = 1
burst_capacity = 10
"#,
    );
    let mut settings =
        gateway_settings(&apps.stack, &apps.order.base_url, &apps.inventory.base_url);
    settings.auth.trust_body_user_id = true;
    settings.rules.file = Some(rules);
    settings.cluster.heartbeat_ms = 100;
    // Generous on a loaded test machine: a Redis call that times out is decided locally.
    settings.redis.response_timeout_ms = 1000;
    let gateways = [
        ServiceProcess::spawn(ServiceSettings::Gateway(settings.clone()))
            .await
            .unwrap(),
        ServiceProcess::spawn(ServiceSettings::Gateway(settings))
            .await
            .unwrap(),
    ];
    let http = &apps.http;

    // Each counts the other through the heartbeats in Redis.
    let deadline = Instant::now() + Duration::from_secs(20);
    for gateway in &gateways {
        loop {
            let text = gateway.metrics(http).await.unwrap();
            if metric(&text, "gateway_cluster_replicas") == Some(2.0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "both gateways count two replicas:\n{text}\n{}",
                gateway.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let started = Instant::now();
    let (mut passed, mut refused) = ([0_usize; 2], [0_usize; 2]);
    let mut accepted = Vec::new();
    for user in 1..=30_i64 {
        let which = user as usize % 2;
        let response = buy(http, &gateways[which], user).await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match (status, body["code"].as_str().and_then(ErrorCode::parse)) {
            (202, _) => {
                passed[which] += 1;
                let order_no = body["orderNo"].as_str().expect("an order number");
                accepted.push((order_no.to_owned(), user));
            }
            (429, Some(ErrorCode::RateLimited)) => refused[which] += 1,
            _ => panic!("user {user}: only sales and cluster refusals, got {status} {body}"),
        }
    }
    let elapsed = started.elapsed();
    let total: usize = passed.iter().sum();
    let refilled = elapsed.as_secs() as usize + 1;
    println!("passed {passed:?}, refused {refused:?} in {elapsed:?}");
    assert!(total >= 10, "the burst of 10 passes: {passed:?}");
    assert!(
        total <= 10 + refilled,
        "one bucket: {total} passed in {elapsed:?} ({passed:?}); two would have let 20 through"
    );
    assert!(
        passed.iter().all(|&n| n >= 1),
        "both drew from it: {passed:?}"
    );

    for (which, gateway) in gateways.iter().enumerate() {
        let text = gateway.metrics(http).await.unwrap();
        assert_eq!(
            metric(
                &text,
                r#"gateway_flow_blocked_total{resource="flash-sale-order",reason="cluster"}"#
            )
            .unwrap_or(0.0),
            refused[which] as f64,
            "gateway {which} counts its own cluster refusals"
        );
        assert_eq!(
            metric(
                &text,
                r#"gateway_cluster_fallback_decisions_total{resource="flash-sale-order"}"#
            )
            .unwrap_or(0.0),
            0.0,
            "gateway {which}: every decision was the shared bucket's\n{}",
            gateway.log_text()
        );
    }

    // Every buy let through is an order.
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(1, Duration::from_secs(30))
        .await
        .unwrap();
    let report = stores.check_invariants(1, 1000, &accepted).await.unwrap();
    println!("{report}");
    report.ensure().unwrap();
    assert_eq!(report.orders, total, "{report}");
}

/// A real order-service process is killed behind a real gateway process: buys answer 503
/// SERVICE_UNAVAILABLE until the `error_count` breaker opens, then 503 CIRCUIT_OPEN with
/// Retry-After at once, without an upstream call (no further error is counted) and
/// `gateway_circuit_state` 1. A new order-service on the same port is found by the half-open
/// probe: a buy is accepted again, the circuit is closed (0), and the route serves as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_order_service_trips_the_breaker_and_the_route_recovers() {
    let stack = Stack::start(BrokerStorage::Sqlite)
        .await
        .expect("the private stack starts");
    let inventory = spawn_inventory_service(inventory_settings(&stack))
        .await
        .unwrap();
    let http = http_client();
    Admin::new(http.clone(), &inventory.base_url, ADMIN_TOKEN)
        .create_activity(1, 1000)
        .await
        .unwrap();
    // A fixed port, so the restarted order-service is found where the old one was.
    let mut order = order_settings(&stack);
    order.server = local(free_port().unwrap());
    let order_service = ServiceProcess::spawn(ServiceSettings::Order(order.clone()))
        .await
        .unwrap();
    // Only the breaker: open after three failures within 10 s, for 2 s.
    let dir = tempfile::tempdir().unwrap();
    let rules = rule_file(
        &dir,
        r#"
flow = []
param = []
cluster = []

[system]
adaptive = false

[sold_out]
enabled = false

[[breaker]]
downstream = "order-service"
strategy = "error_count"
threshold = 3.0
min_requests = 3
window_ms = 10000
open_ms = 2000
"#,
    );
    let mut settings = gateway_settings(&stack, &order_service.base_url, &inventory.base_url);
    settings.auth.trust_body_user_id = true;
    settings.rules.file = Some(rules);
    let gateway = ServiceProcess::spawn(ServiceSettings::Gateway(settings))
        .await
        .unwrap();
    let mut users = 1..;
    let mut next_user = || users.next().unwrap();
    let circuit_state = r#"gateway_circuit_state{downstream="order-service"}"#;

    let response = buy(&http, &gateway, next_user()).await;
    assert_eq!(response.status().as_u16(), 202, "order-service is up");

    drop(order_service);
    // Unreachable until three failures open the breaker (more only if the test was so slow that
    // the breaker's 2 s ran out and a probe failed too); then the gateway answers by itself.
    let mut unreachable = 0;
    let circuit_open = loop {
        let response = buy(&http, &gateway, next_user()).await;
        assert_eq!(response.status().as_u16(), 503);
        let headers = response.headers().clone();
        let body: Value = response.json().await.unwrap();
        match body["code"].as_str().and_then(ErrorCode::parse) {
            Some(ErrorCode::ServiceUnavailable) => unreachable += 1,
            Some(ErrorCode::CircuitOpen) => break headers,
            _ => panic!("unexpected answer {body}"),
        }
        assert!(unreachable <= 10, "the breaker never opened");
    };
    assert!(unreachable >= 3, "{unreachable} failures opened it");
    let retry_after: u64 = circuit_open["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    assert_eq!(circuit_open["x-gateway-blocked"], "circuit_open");
    let text = gateway.metrics(&http).await.unwrap();
    assert_eq!(metric(&text, circuit_state), Some(1.0), "open");
    assert_eq!(
        metric(
            &text,
            r#"gateway_flow_blocked_total{resource="flash-sale-order",reason="circuit_open"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"gateway_flow_errors_total{resource="flash-sale-order"}"#
        ),
        Some(f64::from(unreachable)),
        "the fail-fast answer made no upstream call"
    );
    assert!(
        gateway.log_text().contains("circuit opened"),
        "the transition is logged:\n{}",
        gateway.log_text()
    );

    // order-service is back on its port: once the breaker's open time has passed, the next buy
    // is the probe, and it is accepted.
    let _order_service = ServiceProcess::spawn(ServiceSettings::Order(order))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let response = buy(&http, &gateway, next_user()).await;
        let status = response.status().as_u16();
        if status == 202 {
            break;
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        *answers
            .entry(format!("{status} {}", body["code"].as_str().unwrap_or("?")))
            .or_default() += 1;
        assert!(
            Instant::now() < deadline,
            "the route did not recover within 30 s: {answers:?}\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{unreachable} unreachable before the breaker opened; until the probe was accepted: {answers:?}"
    );
    let text = gateway.metrics(&http).await.unwrap();
    assert_eq!(metric(&text, circuit_state), Some(0.0), "closed again");
    let response = buy(&http, &gateway, next_user()).await;
    assert_eq!(
        response.status().as_u16(),
        202,
        "the route serves as before"
    );
}
