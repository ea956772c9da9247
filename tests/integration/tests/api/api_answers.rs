//! Snapshots of every API answer and error body, ids and times redacted.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use flash_sale_common::api;

async fn answer(res: reqwest::Response) -> Value {
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = res.json().await.unwrap_or(Value::Null);
    json!({"status": status, "retryAfter": retry_after, "body": body})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_the_order_and_admin_apis() {
    let apps = spawn_apps().await;
    let http = &apps.http;
    let inv = &apps.inventory.base_url;
    let ord = &apps.order.base_url;
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(flash_sale_tests::apps::ADMIN_TOKEN);
    let mut answers = serde_json::Map::new();
    let mut record = |name: &str, v: Value| {
        answers.insert(name.to_owned(), v);
    };

    record(
        "admin without token",
        answer(
            http.get(format!("{inv}{}", api::inventory::ACTIVITIES))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "admin with a wrong token",
        answer(
            http.get(format!("{inv}{}", api::inventory::ACTIVITIES))
                .bearer_auth("nope")
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    let body = json!({"activityId": "1", "name": "phones", "stock": 2, "startTime": "2026-01-01T00:00:00Z"});
    record(
        "create activity",
        answer(
            admin(http.post(format!("{inv}{}", api::inventory::ACTIVITIES)))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "create activity again",
        answer(
            admin(http.post(format!("{inv}{}", api::inventory::ACTIVITIES)))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "create activity with a bad window",
        answer(
            admin(http.post(format!("{inv}{}", api::inventory::ACTIVITIES)))
                .json(&json!({"activityId": 2, "stock": 1, "startTime": "2026-01-02T00:00:00Z", "endTime": "2026-01-01T00:00:00Z"}))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "create activity with negative stock",
        answer(
            admin(http.post(format!("{inv}{}", api::inventory::ACTIVITIES)))
                .json(&json!({"activityId": 2, "stock": -1}))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "get unknown activity",
        answer(
            admin(http.get(format!("{inv}{}", api::inventory::activity(99, ""))))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "get activity with a bad id",
        answer(
            admin(http.get(format!("{inv}{}", api::inventory::activity("x", ""))))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );

    let buy = |user: &str| {
        http.post(format!("{ord}{}", api::order::CREATE))
            .json(&json!({"userId": user, "activityId": "1", "quantity": 1}))
    };
    let created = answer(buy("42").send().await.unwrap()).await;
    let order_no = created["body"]["orderNo"].as_str().unwrap().to_owned();
    record("create order", created);
    record(
        "create order twice",
        answer(buy("42").send().await.unwrap()).await,
    );
    record(
        "create order with userId as a number",
        answer(
            http.post(format!("{ord}{}", api::order::CREATE))
                .json(&json!({"userId": 43, "activityId": 1, "quantity": 1}))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "create order when sold out",
        answer(buy("44").send().await.unwrap()).await,
    );

    let stores = stores(&apps).await;
    stores
        .wait_for_drain(1, Duration::from_secs(20))
        .await
        .unwrap();
    record(
        "get order",
        answer(
            http.get(format!("{ord}{}", api::order::one(&order_no)))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "get order of another user",
        answer(
            http.get(format!("{ord}{}", api::order::one(&order_no)))
                .header(api::USER_HEADER, "7")
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "get unknown order",
        answer(
            http.get(format!(
                "{ord}{}",
                api::order::one("1-0123456789abcdef0123456789abcdef")
            ))
            .send()
            .await
            .unwrap(),
        )
        .await,
    );
    record(
        "get order with a bad number",
        answer(
            http.get(format!("{ord}{}", api::order::one("nope")))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "list my orders",
        answer(
            http.get(format!("{ord}{}", api::order::MINE))
                .header(api::USER_HEADER, "42")
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "list orders without a user",
        answer(
            http.get(format!("{ord}{}", api::order::MINE))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    let cancel = |user: &str| {
        http.post(format!("{ord}{}", api::order::cancel(&order_no)))
            .header(api::USER_HEADER, user)
    };
    record(
        "cancel another user's order",
        answer(cancel("7").send().await.unwrap()).await,
    );
    record(
        "cancel with a body that is not JSON",
        answer(cancel("42").body("{").send().await.unwrap()).await,
    );
    record(
        "cancel order",
        answer(cancel("42").send().await.unwrap()).await,
    );
    record(
        "cancel order twice",
        answer(cancel("42").send().await.unwrap()).await,
    );
    let callback = |signature: &str| {
        http.post(format!("{ord}{}", api::order::PAYMENT_CALLBACK))
            .header(flash_sale_common::payment::TIMESTAMP_HEADER, "1700000000")
            .header(flash_sale_common::payment::SIGNATURE_HEADER, signature)
            .body(format!(
                r#"{{"paymentId":"p1","orderNo":"{order_no}","amountCents":0,"quantity":1}}"#
            ))
    };
    record(
        "payment callback with a forged signature",
        answer(callback("v1=00").send().await.unwrap()).await,
    );
    record(
        "payment callback without a signature",
        answer(callback("").send().await.unwrap()).await,
    );
    record(
        "get activity after the sale",
        answer(
            admin(http.get(format!("{inv}{}", api::inventory::activity(1, ""))))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "reconcile",
        answer(
            admin(http.post(format!("{inv}{}", api::inventory::RECONCILE)))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "restock zero",
        answer(
            admin(http.post(format!("{inv}{}", api::inventory::activity(1, "restock"))))
                .json(&json!({"quantity": 0}))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    record(
        "unknown route",
        answer(http.get(format!("{ord}/api/nope")).send().await.unwrap()).await,
    );
    record(
        "wrong method",
        answer(
            http.get(format!("{ord}{}", api::order::CREATE))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );

    insta::assert_json_snapshot!("api_answers", answers, {
        ".*.body.orderNo" => "[orderNo]",
        ".*.body[].startTime" => "[time]",
        ".*.body.startTime" => "[time]",
        ".*.body.reservedAt" => "[time]",
        ".*.body.createdAt" => "[time]",
        ".*.body.payDeadline" => "[time]",
        // null while the order is open: only a time is redacted
        ".*.body.closedAt" => insta::dynamic_redaction(|value, _| {
            if value.as_str().is_some() { "[time]".into() } else { value }
        }),
        ".*.body.orders[].orderNo" => "[orderNo]",
        ".*.body.orders[].reservedAt" => "[time]",
        ".*.body.orders[].createdAt" => "[time]",
        ".*.body.orders[].payDeadline" => "[time]",
        ".*.body.message" => insta::dynamic_redaction(|value, _| {
            // Order numbers inside messages are random.
            let text = value.as_str().unwrap_or_default();
            let redacted: String = text
                .split(' ')
                .map(|w| if w.len() > 30 && w.contains('-') { "[orderNo]" } else { w })
                .collect::<Vec<_>>()
                .join(" ");
            redacted
        }),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_on_the_management_port() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 5).await.unwrap();
    assert_eq!(create_order(&apps, 1, 1).await.0, 202);
    for app in [&apps.order, &apps.inventory] {
        for path in ["/health/live", "/health/ready"] {
            let res = apps
                .http
                .get(format!("{}{path}", app.management_url))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status().as_u16(), 200, "{path}");
        }
    }
    let metrics = apps.order.metrics(&apps.http).await.unwrap();
    for name in [
        "flash_sale_orders_total{activity=\"1\",outcome=\"accepted\"}",
        "http_requests_total{",
        "http_request_duration_seconds_bucket{",
        "flash_sale_kafka_publish_duration_seconds_bucket",
        "flash_sale_redis_script_duration_seconds_bucket{script=\"reserve\"",
        "process_resident_memory_bytes",
        "tokio_workers",
    ] {
        assert!(metrics.contains(name), "missing {name} in:\n{metrics}");
    }
}
