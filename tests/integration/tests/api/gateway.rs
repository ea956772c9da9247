//! Through the real gateway, in front of the real order-service, Redis, broker and MariaDB.

use std::time::Duration;

use flash_sale_tests::apps::{JWT_SECRET, gateway_settings, spawn_gateway};
use flash_sale_tests::scenario::{SaleConfig, drive_sale};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::helpers::*;

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
    };
    let load = drive_sale(&apps.http, &gateway.base_url, &config).await;
    println!("{load}");
    assert_eq!(load.transport_errors, 0);
    assert!(!load.accepted.is_empty(), "{load}");
    let unexpected: Vec<_> = load
        .outcomes
        .keys()
        .filter(|k| {
            ![
                "202 ACCEPTED",
                "409 SOLD_OUT",
                "409 ALREADY_PURCHASED",
                "429 RATE_LIMITED",
            ]
            .contains(&k.as_str())
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
            .post(format!("{}/api/flash-sale/order/create", gateway.base_url))
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
        (401, Some("UNAUTHORIZED"))
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
        (403, Some("FORBIDDEN")),
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
            "{}/api/flash-sale/order/{order_no}",
            gateway.base_url
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
            "{}/api/flash-sale/order/{order_no}",
            gateway.base_url
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
