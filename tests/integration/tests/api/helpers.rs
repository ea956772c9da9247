use flash_sale_tests::apps::TestApps;
use flash_sale_tests::scenario::Stores;
use flash_sale_tests::stack::{BrokerStorage, Stack};
use serde_json::Value;

/// A private stack with both services on it.
pub(crate) async fn spawn_apps() -> TestApps {
    let stack = Stack::start(BrokerStorage::Sqlite)
        .await
        .expect("the private stack starts");
    TestApps::spawn(stack).await.expect("the services start")
}

pub(crate) async fn stores(apps: &TestApps) -> Stores {
    stack_stores(&apps.stack).await
}

pub(crate) async fn stack_stores(stack: &Stack) -> Stores {
    Stores::connect(&stack.database_url(), &stack.redis_url())
        .await
        .expect("the stores answer")
}

/// POSTs a create-order body (raw text, so malformed bodies can be sent) and returns status and
/// JSON body.
pub(crate) async fn create_order_raw(
    apps: &TestApps,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let res = apps
        .http
        .post(format!(
            "{}/api/flash-sale/order/create",
            apps.order.base_url
        ))
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .expect("order-service answers");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn create_order(apps: &TestApps, user: i64, activity: i64) -> (u16, Value) {
    let body = serde_json::json!({"userId": user.to_string(), "activityId": activity.to_string(), "quantity": 1});
    create_order_raw(apps, "application/json", &body.to_string()).await
}
