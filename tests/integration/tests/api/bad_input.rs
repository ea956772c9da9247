use serde_json::{Value, json};

use crate::helpers::*;
use flash_sale_common::api;
use flash_sale_common::error::ErrorCode;

/// Every bad input gets a 4xx JSON error in the common shape, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_a_clear_4xx_and_change_nothing() {
    let apps = spawn_apps().await;
    let admin = apps.admin();
    admin.create_activity(1, 10).await.unwrap();
    let hour = chrono::Duration::hours(1);
    let now = chrono::Utc::now();
    for (id, start, end) in [
        (2, now + hour, now + hour * 2),
        (3, now - hour * 2, now - hour),
    ] {
        admin
            .call(
                reqwest::Method::POST,
                api::inventory::ACTIVITIES,
                Some(json!({"activityId": id, "stock": 10, "startTime": start, "endTime": end})),
            )
            .await
            .unwrap();
    }
    let stores = stores(&apps).await;
    let before: Vec<i64> = [
        stores.redis_stock(1).await.unwrap(),
        stores.redis_stock(2).await.unwrap(),
        stores.redis_stock(3).await.unwrap(),
    ]
    .to_vec();

    let json_ct = "application/json";
    let huge = format!(
        r#"{{"userId":"1","activityId":"1","quantity":1,"pad":"{}"}}"#,
        "x".repeat(8192)
    );
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "malformed JSON",
            json_ct,
            r#"{"userId": "1", "activityId": "1""#.into(),
        ),
        ("empty body", json_ct, String::new()),
        ("body is an array", json_ct, "[1, 2]".into()),
        (
            "activityId is a boolean",
            json_ct,
            r#"{"userId":"1","activityId":true,"quantity":1}"#.into(),
        ),
        (
            "activityId missing",
            json_ct,
            r#"{"userId":"1","quantity":1}"#.into(),
        ),
        (
            "userId is a list",
            json_ct,
            r#"{"userId":[1],"activityId":"1","quantity":1}"#.into(),
        ),
        (
            "userId negative",
            json_ct,
            r#"{"userId":"-5","activityId":"1","quantity":1}"#.into(),
        ),
        (
            "userId not digits",
            json_ct,
            r#"{"userId":"abc","activityId":"1","quantity":1}"#.into(),
        ),
        (
            "quantity zero",
            json_ct,
            r#"{"userId":"1","activityId":"1","quantity":0}"#.into(),
        ),
        (
            "quantity negative",
            json_ct,
            r#"{"userId":"1","activityId":"1","quantity":-1}"#.into(),
        ),
        (
            "quantity above the limit",
            json_ct,
            r#"{"userId":"1","activityId":"1","quantity":6}"#.into(),
        ),
        (
            "quantity huge",
            json_ct,
            r#"{"userId":"1","activityId":"1","quantity":1e30}"#.into(),
        ),
        (
            "quantity fractional",
            json_ct,
            r#"{"userId":"1","activityId":"1","quantity":1.5}"#.into(),
        ),
        (
            "unknown activity",
            json_ct,
            r#"{"userId":"1","activityId":"999","quantity":1}"#.into(),
        ),
        (
            "sale not started",
            json_ct,
            r#"{"userId":"1","activityId":"2","quantity":1}"#.into(),
        ),
        (
            "sale ended",
            json_ct,
            r#"{"userId":"1","activityId":"3","quantity":1}"#.into(),
        ),
        ("oversized body", json_ct, huge),
        (
            "wrong content type",
            "text/plain",
            r#"{"userId":"1","activityId":"1","quantity":1}"#.into(),
        ),
        // Two parsers could disagree on which is the buyer: refused, not "the last one wins".
        (
            "userId twice",
            json_ct,
            r#"{"userId":"1","activityId":"1","quantity":1,"userId":"2"}"#.into(),
        ),
        (
            "a key twice inside a field",
            json_ct,
            r#"{"userId":"1","activityId":"1","quantity":1,"meta":{"a":1,"a":2}}"#.into(),
        ),
    ];
    let mut answers = Vec::new();
    for (case, content_type, body) in &cases {
        let (status, body) = create_order_raw(&apps, content_type, body).await;
        assert!((400..500).contains(&status), "{case}: {status} {body}");
        assert!(
            body["code"].is_string() && body["message"].is_string(),
            "{case}: {body}"
        );
        answers.push(json!({"case": case, "status": status, "body": body}));
    }
    // A message that names the opening time changes every run.
    insta::assert_json_snapshot!("bad_inputs", answers, {
        "[14].body.message" => "[opening time]",
    });

    let after: Vec<i64> = [
        stores.redis_stock(1).await.unwrap(),
        stores.redis_stock(2).await.unwrap(),
        stores.redis_stock(3).await.unwrap(),
    ]
    .to_vec();
    assert_eq!(before, after, "no stock moved");
    for activity in 1..=3 {
        assert_eq!(stores.pending(activity).await.unwrap(), 0, "no reservation");
    }
    assert_eq!(stores.order_count(1).await.unwrap(), 0, "no order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_behind_the_gateway_cannot_buy_as_someone_else() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 10).await.unwrap();
    let res = apps
        .http
        .post(format!("{}{}", apps.order.base_url, api::order::CREATE))
        .header(api::USER_HEADER, "7")
        .json(&json!({"userId": "8", "activityId": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 403);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], ErrorCode::Forbidden.as_str());
    assert_eq!(stores(&apps).await.redis_stock(1).await.unwrap(), 10);
}
