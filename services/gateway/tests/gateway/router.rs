//! The router in process (`oneshot`), in front of a small upstream app: identity, headers,
//! body limit, and the JSON error of everything the gateway refuses (insta snapshots).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use flash_sale_common::domain::ActivityId;
use gateway::configuration::{ClusterSettings, JwtAlgorithm};
use gateway::flow::RulesStore;
use gateway::flow::cluster::ClusterLimiter;
use gateway::rules::{
    BreakerRule, BreakerStrategy, FlowRule, ParamKind, ParamRule, Rules, SystemRule,
};
use gateway::state::AppState;
use gateway::{Settings, routes};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::helpers::{
    Behavior, CREATE, RS256_OTHER_PRIVATE, RS256_PRIVATE, RS256_PUBLIC, SECRET, TestUpstream,
    hs256, no_rules, now_secs, rs256, settings, token,
};
use flash_sale_common::api;
use flash_sale_common::api::{REQUEST_ID_HEADER, USER_HEADER};
use flash_sale_common::error::ErrorCode;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

fn gateway_app(settings: &Settings, rules: Rules) -> (Router, AppState) {
    let store = Arc::new(RulesStore::fixed(rules));
    let cluster = Arc::new(ClusterLimiter::new(&ClusterSettings::default()));
    let state = AppState::with_parts(settings, store, cluster).unwrap();
    (routes::router(state.clone()), state)
}

fn settings_for(upstream: &TestUpstream) -> Settings {
    let mut s = settings();
    s.upstreams.order_service = upstream.url();
    s.upstreams.inventory_service = upstream.url();
    s
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

fn order(bearer: Option<&str>, body: Value) -> Request<Body> {
    let mut builder = Request::post(CREATE).header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = bearer {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

fn seed_body(user: &str) -> Value {
    json!({"userId": user, "activityId": "1", "quantity": 1})
}

#[tokio::test]
async fn a_valid_token_becomes_x_user_id_and_a_forged_header_is_dropped() {
    let upstream = TestUpstream::start().await;
    let (app, _) = gateway_app(&settings_for(&upstream), no_rules());
    let mut request = order(Some(&token(42)), seed_body("42"));
    request
        .headers_mut()
        .insert(USER_HEADER, "7".parse().unwrap());
    request
        .headers_mut()
        .insert(REQUEST_ID_HEADER, "req-123".parse().unwrap());
    let answer = send(&app, request).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    let seen = &answer.body["headers"];
    assert_eq!(
        seen[USER_HEADER.as_str()],
        "42",
        "the token's subject, not the client's header"
    );
    assert_eq!(
        seen[REQUEST_ID_HEADER.as_str()],
        "req-123",
        "the request id is passed on"
    );
    assert_eq!(
        answer.headers[&REQUEST_ID_HEADER], "req-123",
        "and returned"
    );
    assert_eq!(
        answer.body["body"],
        seed_body("42").to_string(),
        "the body is passed unchanged"
    );
    assert_eq!(answer.body["uri"], CREATE);

    // Without a request id, the gateway makes one and passes it on.
    let answer = send(&app, order(Some(&token(42)), seed_body("42"))).await;
    let generated = answer.headers[&REQUEST_ID_HEADER].to_str().unwrap();
    assert!(!generated.is_empty());
    assert_eq!(
        answer.body["headers"][REQUEST_ID_HEADER.as_str()],
        generated
    );
}

#[tokio::test]
async fn missing_expired_and_forged_tokens_are_refused_with_401() {
    let upstream = TestUpstream::start().await;
    let (app, _) = gateway_app(&settings_for(&upstream), no_rules());

    let missing = send(&app, order(None, seed_body("42"))).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.headers[header::WWW_AUTHENTICATE], "Bearer");
    insta::assert_json_snapshot!("unauthorized_missing_token", missing.body);

    let expired = hs256(json!({"sub": "42", "exp": now_secs() - 600}), SECRET);
    let expired = send(&app, order(Some(&expired), seed_body("42"))).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    insta::assert_json_snapshot!("unauthorized_expired_token", expired.body);

    let forged = hs256(
        json!({"sub": "42", "exp": now_secs() + 600}),
        "another-secret-of-at-least-32-bytes!",
    );
    let forged = send(&app, order(Some(&forged), seed_body("42"))).await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    insta::assert_json_snapshot!("unauthorized_forged_token", forged.body);

    // A tampered payload (another user) with the original signature.
    let genuine = token(42);
    let parts: Vec<&str> = genuine.split('.').collect();
    let other = hs256(json!({"sub": "43", "exp": now_secs() + 600}), SECRET);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    assert_eq!(
        send(&app, order(Some(&tampered), seed_body("43")))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // `alg: none`, no exp, a subject that is not a user id, not a Bearer header.
    let unsigned = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(r#"{"sub":"42","exp":9999999999}"#)
    );
    let no_exp = hs256(json!({"sub": "42"}), SECRET);
    let not_a_user = hs256(json!({"sub": "alice", "exp": now_secs() + 600}), SECRET);
    for bad in [unsigned, no_exp, not_a_user] {
        let answer = send(&app, order(Some(&bad), seed_body("42"))).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(answer.body["code"], ErrorCode::Unauthorized.as_str());
    }
    let basic = Request::post(CREATE)
        .header(header::AUTHORIZATION, "Basic YWxhZGRpbjpvcGVuc2VzYW1l")
        .body(Body::from(seed_body("42").to_string()))
        .unwrap();
    assert_eq!(send(&app, basic).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(upstream.hits(), 0, "nothing reached order-service");
}

fn b64(text: &str) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn rs256_tokens_are_verified_with_the_public_key_only() {
    let upstream = TestUpstream::start().await;
    let mut s = settings_for(&upstream);
    s.auth.algorithm = JwtAlgorithm::RS256;
    s.auth.rs256_public_key = RS256_PUBLIC.into();
    s.auth.issuer = Some("flash-sale-auth".into());
    let (app, _) = gateway_app(&s, no_rules());
    let claims = json!({"sub": "9", "exp": now_secs() + 600, "iss": "flash-sale-auth"});

    let answer = send(
        &app,
        order(Some(&rs256(claims.clone(), RS256_PRIVATE)), seed_body("9")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(answer.body["headers"][USER_HEADER.as_str()], "9");

    for (what, bad) in [
        (
            "signed by another key",
            rs256(claims.clone(), RS256_OTHER_PRIVATE),
        ),
        (
            "HS256 with the public key as secret",
            hs256(claims.clone(), RS256_PUBLIC),
        ),
        (
            "another issuer",
            rs256(
                json!({"sub": "9", "exp": now_secs() + 600, "iss": "elsewhere"}),
                RS256_PRIVATE,
            ),
        ),
    ] {
        let answer = send(&app, order(Some(&bad), seed_body("9"))).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{what}");
    }
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn the_development_mode_lets_the_seeds_hey_request_through_untouched() {
    let upstream = TestUpstream::start().await;
    let mut s = settings_for(&upstream);
    s.auth.trust_body_user_id = true;
    s.auth.hs256_secret = Default::default();
    let (app, _) = gateway_app(&s, no_rules());
    let mut request = order(None, seed_body("{random}"));
    request
        .headers_mut()
        .insert(USER_HEADER, "7".parse().unwrap());
    let answer = send(&app, request).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert!(
        answer.body["headers"].get(USER_HEADER.as_str()).is_none(),
        "a client's x-user-id never passes"
    );
    assert_eq!(answer.body["body"], seed_body("{random}").to_string());
    // A token that is presented is still checked (here: there is no key to check it with).
    let answer = send(&app, order(Some(&token(1)), seed_body("1"))).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_per_user_limit_keys_on_the_body_user_in_development_mode() {
    let upstream = TestUpstream::start().await;
    let mut s = settings_for(&upstream);
    s.auth.trust_body_user_id = true;
    let mut rules = no_rules();
    rules.param = vec![ParamRule {
        resource: "flash-sale-order".into(),
        param: ParamKind::User,
        count: 1,
        window_secs: 60,
        burst: 0,
        overrides: Default::default(),
        max_keys: 100,
    }];
    let (app, _) = gateway_app(&s, rules);
    assert_eq!(
        send(&app, order(None, seed_body("5"))).await.status,
        StatusCode::ACCEPTED
    );
    let limited = send(&app, order(None, seed_body("5"))).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers["x-gateway-blocked"], "param_user");
    assert!(limited.headers.contains_key(header::RETRY_AFTER));
    insta::assert_json_snapshot!("rate_limited_user", limited.body);
    assert_eq!(
        send(&app, order(None, seed_body("6"))).await.status,
        StatusCode::ACCEPTED
    );
    // The seed's placeholder is a different user every time: not keyed.
    for _ in 0..3 {
        assert_eq!(
            send(&app, order(None, seed_body("{random}"))).await.status,
            StatusCode::ACCEPTED
        );
    }
}

/// A key twice would let two parsers name two buyers (the gateway's per-user limit keyed on one,
/// order-service selling to the other): refused here, never forwarded.
#[tokio::test]
async fn a_body_with_a_key_twice_is_refused_before_any_limit_or_upstream() {
    let upstream = TestUpstream::start().await;
    let mut s = settings_for(&upstream);
    s.auth.trust_body_user_id = true;
    let (app, _) = gateway_app(&s, no_rules());
    for body in [
        r#"{"userId":"5","activityId":"1","quantity":1,"userId":"6"}"#,
        r#"{"userId":"5","activityId":"1","activityId":"2"}"#,
        r#"[{"userId":"5","activityId":"1"}]"#,
    ] {
        let request = Request::post(CREATE)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        let answer = send(&app, request).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            answer.body["code"],
            ErrorCode::InvalidArgument.as_str(),
            "{body}"
        );
    }
    assert_eq!(upstream.hits(), 0, "nothing was forwarded");
    // The same buyer's well-formed body still passes.
    let answer = send(&app, order(None, seed_body("5"))).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn the_inventory_route_passes_the_admin_bearer_token_through() {
    let upstream = TestUpstream::start().await;
    let (app, _) = gateway_app(&settings_for(&upstream), no_rules());
    let request = Request::get(format!("{}?verbose=1", api::inventory::activity(1, "")))
        .header(header::AUTHORIZATION, "Bearer admin-token")
        .header(header::CONNECTION, "keep-alive, x-hop")
        .header("x-hop", "1")
        .body(Body::empty())
        .unwrap();
    let answer = send(&app, request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.body["uri"],
        format!("{}?verbose=1", api::inventory::activity(1, ""))
    );
    assert_eq!(
        answer.body["headers"]["authorization"],
        "Bearer admin-token"
    );
    assert!(
        answer.body["headers"].get("x-hop").is_none(),
        "hop-by-hop headers stay here"
    );
}

#[tokio::test]
async fn what_the_gateway_refuses_is_answered_in_the_common_error_shape() {
    let upstream = TestUpstream::start().await;
    let mut s = settings_for(&upstream);
    s.proxy.body_limit_bytes = 64;
    let (app, _) = gateway_app(&s, no_rules());

    // Without a declared length, the body is read up to the limit and refused past it.
    let big = json!({"userId": "1", "activityId": "1", "padding": "x".repeat(100)});
    let too_large = send(&app, order(Some(&token(1)), big.clone())).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    insta::assert_json_snapshot!("payload_too_large", too_large.body);
    // With a declared length, before reading it.
    let mut declared = order(Some(&token(1)), big);
    declared
        .headers_mut()
        .insert(header::CONTENT_LENGTH, "1000000".parse().unwrap());
    assert_eq!(
        send(&app, declared).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    let unknown = send(
        &app,
        Request::get("/api/elsewhere").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    insta::assert_json_snapshot!("not_found", unknown.body);
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn upstream_failures_are_answered_in_the_common_error_shape() {
    let mut upstream = TestUpstream::start().await;
    let mut s = settings_for(&upstream);
    s.routes.flash_sale.timeout_ms = 100;
    let (app, _) = gateway_app(&s, no_rules());

    upstream.set(Behavior::Slow(Duration::from_secs(2)));
    let timeout = send(&app, order(Some(&token(1)), seed_body("1"))).await;
    assert_eq!(timeout.status, StatusCode::GATEWAY_TIMEOUT);
    insta::assert_json_snapshot!("upstream_timeout", timeout.body);

    upstream.stop().await;
    let unreachable = send(&app, order(Some(&token(1)), seed_body("1"))).await;
    assert_eq!(unreachable.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unreachable.headers[header::RETRY_AFTER], "1");
    insta::assert_json_snapshot!("upstream_unreachable", unreachable.body);
}

#[tokio::test]
async fn flow_refusals_carry_retry_after_and_name_their_reason() {
    let upstream = TestUpstream::start().await;
    let mut rules = no_rules();
    rules.flow = vec![FlowRule::qps("flash-sale-order", 1.0)];
    let (app, _) = gateway_app(&settings_for(&upstream), rules);
    assert_eq!(
        send(&app, order(Some(&token(1)), seed_body("1")))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    let limited = send(&app, order(Some(&token(1)), seed_body("1"))).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers[header::RETRY_AFTER], "1");
    assert_eq!(limited.headers["x-gateway-blocked"], "qps");
    insta::assert_json_snapshot!("rate_limited_route", limited.body);

    // A breaker that opens on the first error.
    let mut rules = no_rules();
    rules.breaker = vec![BreakerRule {
        downstream: gateway::resource::Downstream::OrderService,
        strategy: BreakerStrategy::ErrorCount,
        threshold: 1.0,
        max_rt_ms: 1000,
        min_requests: 1,
        window_ms: 10_000,
        open_ms: 30_000,
    }];
    let (app, _) = gateway_app(&settings_for(&upstream), rules);
    upstream.set(Behavior::Fail);
    assert_eq!(
        send(&app, order(Some(&token(1)), seed_body("1")))
            .await
            .status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the upstream's own answer passes through"
    );
    let open = send(&app, order(Some(&token(1)), seed_body("1"))).await;
    assert_eq!(open.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(open.headers[header::RETRY_AFTER], "30");
    assert_eq!(open.headers["x-gateway-blocked"], "circuit_open");
    insta::assert_json_snapshot!("circuit_open", open.body);

    // Shedding: a CPU ceiling with nothing allowed in flight.
    let mut rules = no_rules();
    rules.system = SystemRule {
        adaptive: false,
        min_in_flight: 0,
        max_cpu: Some(0.5),
        ..SystemRule::default()
    };
    let (app, state) = gateway_app(&settings_for(&upstream), rules);
    state.flow.system().set_cpu(0.9);
    let shed = send(&app, order(Some(&token(1)), seed_body("1"))).await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers["x-gateway-blocked"], "cpu");
    assert!(shed.headers.contains_key(header::RETRY_AFTER));
    insta::assert_json_snapshot!("overloaded", shed.body);
}

#[tokio::test]
async fn a_sold_out_answer_is_learned_and_then_given_without_a_downstream_call() {
    let upstream = TestUpstream::start().await;
    let mut rules = no_rules();
    rules.sold_out.enabled = true;
    rules.sold_out.ttl_ms = 60_000;
    let (app, state) = gateway_app(&settings_for(&upstream), rules);

    // A two-item order refused SOLD_OUT does not mean nothing is left: not learned.
    upstream.set(Behavior::SoldOut);
    let two = json!({"userId": "1", "activityId": "1", "quantity": 2});
    assert_eq!(
        send(&app, order(Some(&token(1)), two)).await.status,
        StatusCode::CONFLICT
    );
    assert!(
        !state
            .flow
            .sold_out()
            .is_marked(ActivityId::new(1).unwrap(), tokio::time::Instant::now())
    );

    let first = send(&app, order(Some(&token(1)), seed_body("1"))).await;
    assert_eq!(first.status, StatusCode::CONFLICT);
    assert_eq!(first.body["code"], ErrorCode::SoldOut.as_str());
    let hits = upstream.hits();
    for user in 2..12 {
        let answer = send(
            &app,
            order(Some(&token(user)), seed_body(&user.to_string())),
        )
        .await;
        assert_eq!(answer.status, StatusCode::CONFLICT);
        assert_eq!(
            answer.body, first.body,
            "the same answer order-service gives"
        );
        assert_eq!(answer.headers["x-gateway-blocked"], "sold_out");
    }
    assert_eq!(upstream.hits(), hits, "no downstream call");
    // Answered before the token check: that an activity is sold out is no secret, and the
    // refusal stays free of cryptography.
    let anonymous = send(&app, order(None, seed_body("5"))).await;
    assert_eq!(anonymous.status, StatusCode::CONFLICT);
    assert_eq!(anonymous.body, first.body);
    let short_circuit = send(&app, order(Some(&token(99)), seed_body("99"))).await;
    insta::assert_json_snapshot!("sold_out", short_circuit.body);

    // A buyer's cancel through the gateway gives stock back: the activity reopens at once.
    upstream.set(Behavior::Echo);
    let cancel = Request::post(api::order::cancel("1-0123456789abcdef0123456789abcdef"))
        .header(header::AUTHORIZATION, format!("Bearer {}", token(3)))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"userId":"3"}"#))
        .unwrap();
    assert!(send(&app, cancel).await.status.is_success());
    assert!(
        !state
            .flow
            .sold_out()
            .is_marked(ActivityId::new(1).unwrap(), tokio::time::Instant::now()),
        "a cancel lifts the mark"
    );
    upstream.set(Behavior::SoldOut);
    let again = send(&app, order(Some(&token(1)), seed_body("1"))).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "learned again");

    // Another activity is not affected; a restock through the gateway reopens this one.
    upstream.set(Behavior::Echo);
    let other = json!({"userId": "1", "activityId": "2", "quantity": 1});
    assert_eq!(
        send(&app, order(Some(&token(1)), other)).await.status,
        StatusCode::ACCEPTED
    );
    let restock = Request::post(api::inventory::activity(1, "restock"))
        .header(header::AUTHORIZATION, "Bearer admin")
        .body(Body::from(r#"{"quantity":10}"#))
        .unwrap();
    assert_eq!(send(&app, restock).await.status, StatusCode::OK);
    assert_eq!(
        send(&app, order(Some(&token(1)), seed_body("1")))
            .await
            .status,
        StatusCode::ACCEPTED
    );
}
