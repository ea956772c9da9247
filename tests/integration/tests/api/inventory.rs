use std::time::Duration;

use flash_sale_common::domain::{ActivityId, OrderNo, Quantity, UserId};
use flash_sale_common::redis::{Redis, ReservationState};
use flash_sale_tests::apps::{TestApps, http_client, inventory_settings, order_settings};
use flash_sale_tests::stack::{BrokerStorage, Stack};
use serde_json::{Value, json};

use crate::helpers::*;
use flash_sale_common::api;
use flash_sale_common::error::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_insert_then_warm_up_makes_activity_1_sellable() {
    let apps = spawn_apps().await;
    let stores = stores(&apps).await;
    sqlx::query("INSERT INTO inventory (activity_id, stock) VALUES (1, 10000);")
        .execute(&stores.db)
        .await
        .unwrap();
    let (status, body) = create_order(&apps, 1, 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some(ErrorCode::ActivityNotFound.as_str())),
        "not warmed up yet"
    );

    let warmed = apps
        .admin()
        .call(reqwest::Method::POST, api::inventory::WARMUP_ALL, None)
        .await
        .unwrap();
    assert_eq!(warmed, json!([{"activityId": "1", "outcome": "loaded"}]));
    let (status, body) = create_order(&apps, 1, 1).await;
    assert_eq!(status, 202, "{body}");
    let activity = apps.admin().activity(1).await.unwrap();
    assert_eq!(activity["totalStock"], 10000);
    assert_eq!(activity["redis"]["stock"], 9999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_up_never_overwrites_a_sale_in_progress() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 10).await.unwrap();
    for user in 1..=3 {
        assert_eq!(create_order(&apps, user, 1).await.0, 202);
    }
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(1, Duration::from_secs(20))
        .await
        .unwrap();
    // Someone edits MySQL by hand mid-sale; a warm-up must not reset Redis' counters from it.
    sqlx::query("UPDATE inventory SET stock = 10, end_time = UTC_TIMESTAMP(3) - INTERVAL 1 SECOND WHERE activity_id = 1")
        .execute(&stores.db)
        .await
        .unwrap();
    let outcome = apps
        .admin()
        .call(
            reqwest::Method::POST,
            &api::inventory::activity(1, "warmup"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(outcome["outcome"], "kept");
    assert_eq!(
        stores.redis_stock(1).await.unwrap(),
        7,
        "counters untouched"
    );
    let (status, body) = create_order(&apps, 4, 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some(ErrorCode::SaleEnded.as_str())),
        "the new window applies"
    );
}

/// A pod that reserved and died before publishing leaves a reservation nobody was told yes
/// about: the reconciler releases it after the deadline. An acknowledged one it leaves alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_releases_only_unacknowledged_reservations() {
    let stack = Stack::start(BrokerStorage::Sqlite).await.unwrap();
    let mut inv = inventory_settings(&stack);
    inv.inventory.reservation_deadline_secs = 1;
    let apps = TestApps {
        order: flash_sale_tests::apps::spawn_order_service(order_settings(&stack))
            .await
            .unwrap(),
        inventory: flash_sale_tests::apps::spawn_inventory_service(inv)
            .await
            .unwrap(),
        http: http_client(),
        stack,
    };
    apps.admin().create_activity(1, 10).await.unwrap();
    let redis = Redis::connect(&order_settings(&apps.stack).redis)
        .await
        .unwrap();
    let activity = ActivityId::new(1).unwrap();
    let one = Quantity::new(1).unwrap();
    let orphan = OrderNo::generate(activity);
    let acked = OrderNo::generate(activity);
    redis
        .reserve(activity, UserId::new(100).unwrap(), one, &orphan)
        .await
        .unwrap();
    redis
        .reserve(activity, UserId::new(101).unwrap(), one, &acked)
        .await
        .unwrap();
    redis
        .transition(
            activity,
            &[&acked],
            &[ReservationState::Reserved],
            ReservationState::Acked,
        )
        .await
        .unwrap();
    let stores = stores(&apps).await;
    assert_eq!(stores.redis_stock(1).await.unwrap(), 8);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reports = apps.admin().reconcile().await.unwrap();
    let report = &reports[0];
    assert_eq!(report["released"], 1, "{report}");
    assert_eq!(report["stuck"], 1, "{report}");
    assert_eq!(
        stores.redis_stock(1).await.unwrap(),
        9,
        "the orphan's stock is back"
    );
    assert_eq!(
        create_order(&apps, 100, 1).await.0,
        202,
        "its user may buy again"
    );
    let (status, body) = create_order(&apps, 101, 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some(ErrorCode::AlreadyPurchased.as_str()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_exported_and_repaired_once_it_holds_still() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 10).await.unwrap();
    assert_eq!(create_order(&apps, 1, 1).await.0, 202);
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(1, Duration::from_secs(20))
        .await
        .unwrap();
    let first = apps.admin().reconcile().await.unwrap();
    assert_eq!(first[0]["drift"], 0, "{first}");

    // Five units appear in MySQL behind Redis' back.
    sqlx::query("UPDATE inventory SET stock = stock + 5 WHERE activity_id = 1")
        .execute(&stores.db)
        .await
        .unwrap();
    let mut repaired = Vec::new();
    for _ in 0..3 {
        let r = apps.admin().reconcile().await.unwrap();
        assert_eq!(r[0]["drift"], 5, "{r}");
        repaired.push(r[0]["repaired"].as_bool().unwrap());
    }
    assert_eq!(
        repaired,
        [false, false, true],
        "repaired on the third identical reading"
    );
    assert_eq!(stores.redis_stock(1).await.unwrap(), 14);
    let metrics = apps.inventory.metrics(&apps.http).await.unwrap();
    assert!(
        metrics.contains("flash_sale_stock_drift{activity=\"1\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flash_sale_drift_repairs_total{activity=\"1\"} 1"),
        "{metrics}"
    );
    let after = apps.admin().reconcile().await.unwrap();
    assert_eq!(after[0]["drift"], 0, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sold_out_is_answered_without_redis_and_a_restock_reopens_the_sale() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 1).await.unwrap();
    assert_eq!(create_order(&apps, 1, 1).await.0, 202);
    assert_eq!(
        create_order(&apps, 2, 1).await.1["code"],
        ErrorCode::SoldOut.as_str()
    );

    let stores = stores(&apps).await;
    let script_calls = || async {
        let mut conn = stores.redis.clone();
        flash_sale_tests::scenario::scripts_run(&mut conn)
            .await
            .unwrap()
    };
    let before = script_calls().await;
    for user in 3..53 {
        assert_eq!(
            create_order(&apps, user, 1).await.1["code"],
            ErrorCode::SoldOut.as_str()
        );
    }
    assert_eq!(
        script_calls().await,
        before,
        "no Redis call while this pod knows it is sold out"
    );

    let restocked: Value = apps
        .admin()
        .call(
            reqwest::Method::POST,
            &api::inventory::activity(1, "restock"),
            Some(json!({"quantity": 2})),
        )
        .await
        .unwrap();
    assert_eq!(restocked["totalStock"], 3);
    assert_eq!(restocked["redis"]["stock"], 2);
    tokio::time::sleep(Duration::from_millis(1100)).await; // order.sold_out_ttl_ms
    assert_eq!(
        create_order(&apps, 60, 1).await.0,
        202,
        "restocked stock sells again"
    );
    stores
        .wait_for_drain(1, Duration::from_secs(20))
        .await
        .unwrap();
    let report = stores.check_invariants(1, 3, &[]).await.unwrap();
    assert!(report.conservation() && report.no_oversell(), "{report}");
}
