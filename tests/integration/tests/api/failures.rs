use std::time::Duration;

use flash_sale_common::configuration::Secret;
use flash_sale_common::domain::ActivityId;
use flash_sale_common::redis::{ActivityKeys, Redis};
use flash_sale_tests::apps::{TestApps, order_settings, spawn_order_service};
use flash_sale_tests::scenario::{SaleConfig, drive_sale};
use flash_sale_tests::stack::Server;
use order_service::consumer::OrderConsumer;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;
use flash_sale_common::error::ErrorCode;

async fn users_holding(apps: &TestApps, activity: i64) -> i64 {
    let mut conn = stores(apps).await.redis;
    redis::cmd("SCARD")
        .arg(ActivityKeys::new(ActivityId::new(activity).unwrap()).users)
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_undoes_the_reservation_and_answers_503() {
    let mut apps = spawn_apps().await;
    apps.admin().create_activity(1, 10).await.unwrap();
    let (status, _) = create_order(&apps, 1, 1).await;
    assert_eq!(
        status, 202,
        "the broker is up: the first order goes through"
    );
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(1, Duration::from_secs(20))
        .await
        .unwrap();

    apps.stack.kill(Server::Broker);
    let (status, body) = create_order(&apps, 2, 1).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], ErrorCode::ServiceUnavailable.as_str());

    assert_eq!(
        stores.pending(1).await.unwrap(),
        0,
        "the reservation was undone"
    );
    assert_eq!(
        stores.redis_stock(1).await.unwrap(),
        9,
        "only the first order holds stock"
    );
    assert_eq!(
        users_holding(&apps, 1).await,
        1,
        "user 2 was forgotten and may retry"
    );

    // Nothing else holds stock: no reservation is left for the reconciler, and no tombstone-less
    // message can become an order later (the release left a tombstone for it).
    let mut conn = stores.redis.clone();
    let tombstones: i64 = redis::cmd("ZCARD")
        .arg(ActivityKeys::new(ActivityId::new(1).unwrap()).released)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(tombstones, 1, "the undone reservation left a tombstone");
    let report = stores.check_invariants(1, 10, &[]).await.unwrap();
    assert_eq!(report.ordered, 1);
    assert!(report.conservation(), "{report}");
    // Bringing the broker back under a running order-service is the crash drill's part
    // (`cargo xtask drill --part broker`, docs/drills.md).
}

/// The consumer stores a batch in MySQL and is dropped before committing its offsets (the point
/// a crash would hit; the SIGKILL itself is `cargo xtask drill`'s): the next consumer gets the
/// same messages again and creates nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stored_but_never_committed_is_redelivered_and_duplicates_nothing() {
    let stack =
        flash_sale_tests::stack::Stack::start(flash_sale_tests::stack::BrokerStorage::Sqlite)
            .await
            .unwrap();
    // An order-service without its consumer: accepted orders wait in the topic.
    let mut settings = order_settings(&stack);
    settings.consumer.enabled = false;
    let order = spawn_order_service(settings.clone()).await.unwrap();
    let inventory = flash_sale_tests::apps::spawn_inventory_service(
        flash_sale_tests::apps::inventory_settings(&stack),
    )
    .await
    .unwrap();
    let apps = TestApps {
        order,
        inventory,
        http: flash_sale_tests::apps::http_client(),
        stack,
    };
    apps.admin().create_activity(1, 300).await.unwrap();
    let config = SaleConfig {
        activity: 1,
        stock: 300,
        requests: 300,
        concurrency: 20,
        repeat_every: 0,
        first_user: 1,
        retry_ms: 0,
    };
    let load = drive_sale(&apps.http, &apps.order.base_url, &config).await;
    assert_eq!(load.accepted.len(), 300, "{load}");

    let db = flash_sale_common::db::pool(&settings.database).unwrap();
    let redis = Redis::connect(&settings.redis).await.unwrap();
    let mut consumer_settings = settings.consumer.clone();
    consumer_settings.batch_size = 100;
    consumer_settings.batch_linger_ms = 500;

    // First consumer: reads a batch, stores it, is dropped before the offset commit.
    let first = OrderConsumer::new(
        &settings.kafka,
        consumer_settings.clone(),
        db.clone(),
        redis.clone(),
    )
    .unwrap();
    let token = CancellationToken::new();
    let batch = first.next_batch(&token).await.expect("a batch");
    assert!(!batch.events.is_empty());
    let stored = first.store(&batch).await.unwrap();
    assert_eq!(stored.created, batch.events.len());
    drop(first);
    let stores = stores(&apps).await;
    let after_drop = stores.order_count(1).await.unwrap();
    assert_eq!(after_drop as usize, batch.events.len());

    // Second consumer in the same group: everything is redelivered from the last commit.
    let second = OrderConsumer::new(&settings.kafka, consumer_settings, db, redis).unwrap();
    drain_with(second, &stores, 1).await;

    let report = stores
        .check_invariants(1, 300, &load.accepted)
        .await
        .unwrap();
    println!("{report}");
    report.ensure().unwrap();
    assert_eq!(report.orders, 300, "each accepted order exactly once");
}

/// order-service's tasks are aborted (dropped mid-flight, in this process: not a crash, whose
/// drill is `cargo xtask drill --part order-service`) while the consumer drains a backlog; a
/// fresh one takes over and every accepted order ends up in MySQL exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_service_aborted_mid_drain_loses_and_duplicates_nothing() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 1500).await.unwrap();
    let config = SaleConfig {
        activity: 1,
        stock: 1500,
        requests: 3000,
        concurrency: 100,
        repeat_every: 3,
        first_user: 1,
        retry_ms: 0,
    };
    let load = drive_sale(&apps.http, &apps.order.base_url, &config).await;
    assert_eq!(load.count_5xx(), 0, "{load}");
    let TestApps {
        order,
        inventory,
        http,
        stack,
    } = apps;
    order.abort();
    let stores = stack_stores(&stack).await;
    let in_mysql = stores.order_count(1).await.unwrap();
    println!(
        "{in_mysql} of {} orders in MySQL when order-service was aborted",
        load.accepted.len()
    );

    let mut settings = order_settings(&stack);
    settings.database.url = Secret::new(stack.database_url());
    let order = spawn_order_service(settings).await.unwrap();
    stores
        .wait_for_drain(1, Duration::from_secs(90))
        .await
        .unwrap();
    let report = stores
        .check_invariants(1, 1500, &load.accepted)
        .await
        .unwrap();
    println!("{report}");
    report.ensure().unwrap();
    drop((order, inventory, http, stack));
}

/// A drain (what SIGTERM starts) in the middle of a sale: requests in flight get their answer,
/// the producer flushes, the consumer commits, and every 2xx ends in MySQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_mid_sale_answers_in_flight_requests_and_loses_nothing() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 1000).await.unwrap();
    let config = SaleConfig {
        activity: 1,
        stock: 1000,
        requests: 4000,
        concurrency: 50,
        repeat_every: 0,
        first_user: 1,
        retry_ms: 0,
    };
    let TestApps {
        order,
        inventory,
        http,
        stack,
    } = apps;
    let load = {
        let (http, url, config) = (http.clone(), order.base_url.clone(), config.clone());
        tokio::spawn(async move { drive_sale(&http, &url, &config).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    order.stop().await.expect("the drain completes cleanly");
    let load = load.await.unwrap();
    println!("{load}");
    assert_eq!(
        load.count_5xx(),
        0,
        "a draining pod answers what it accepted: {load}"
    );
    assert!(!load.accepted.is_empty());

    // A new pod's consumer takes over whatever the old one had not stored.
    let order = spawn_order_service(order_settings(&stack)).await.unwrap();
    let stores = stack_stores(&stack).await;
    stores
        .wait_for_drain(1, Duration::from_secs(60))
        .await
        .unwrap();
    let report = stores
        .check_invariants(1, 1000, &load.accepted)
        .await
        .unwrap();
    println!("{report}");
    report.ensure().unwrap();
    drop((order, inventory, http, stack));
}

/// A buyer who hangs up while Redis still runs their reservation: order-service finishes what it
/// started, so the order is created rather than its stock held until the reconciler's deadline
/// (the reconciler is off in these tests: a reservation left behind stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_who_hangs_up_mid_reservation_still_gets_the_order() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 10).await.unwrap();
    // A first order loads the scripts: the second's reserve is then one call, not a retry
    // after NOSCRIPT that a dropped future would never send.
    let (status, body) = create_order(&apps, 1, 1).await;
    assert_eq!(status, 202, "{body}");
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(1, Duration::from_secs(20))
        .await
        .unwrap();
    let mut conn = stores.redis.clone();
    // Writes wait for a second: the reserve script sits in Redis' queue, within order-service's
    // 3 s answer timeout, while the buyer gives up after 300 ms.
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1000)
        .arg("WRITE")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let body = serde_json::json!({"userId": "7", "activityId": "1", "quantity": 1});
    let hung_up = apps
        .http
        .post(format!(
            "{}{}",
            apps.order.base_url,
            flash_sale_common::api::order::CREATE
        ))
        .json(&body)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(
        hung_up.as_ref().is_err_and(reqwest::Error::is_timeout),
        "the buyer hung up before the answer: {hung_up:?}"
    );
    // The pause ends; Redis runs the reservation (and the checks' own scripts wait no more).
    tokio::time::sleep(Duration::from_millis(1200)).await;

    stores
        .wait_for_drain(1, Duration::from_secs(20))
        .await
        .expect("no reservation is left behind");
    assert_eq!(
        stores.order_count(1).await.unwrap(),
        2,
        "the order of the buyer who hung up is in MySQL"
    );
    let report = stores.check_invariants(1, 10, &[]).await.unwrap();
    assert_eq!(report.ordered, 2);
    assert!(report.conservation(), "{report}");
    let (status, body) = create_order(&apps, 7, 1).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], ErrorCode::AlreadyPurchased.as_str());
}
