use std::time::Duration;

use flash_sale_tests::scenario::{SaleConfig, drive_sale};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_more_buyers_than_stock_keep_every_invariant() {
    let apps = spawn_apps().await;
    let config = SaleConfig {
        activity: 7,
        stock: 2000,
        requests: 20_000,
        concurrency: 200,
        repeat_every: 3,
        first_user: 1,
        retry_ms: 0,
    };
    apps.admin()
        .create_activity(config.activity, config.stock)
        .await
        .unwrap();

    let load = drive_sale(&apps.http, &apps.order.base_url, &config).await;
    println!("{load}");

    assert_eq!(load.transport_errors, 0);
    assert_eq!(load.count_5xx(), 0, "{load}");
    assert_eq!(load.accepted.len(), 2000, "every item sells: {load}");
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(config.activity, Duration::from_secs(60))
        .await
        .unwrap();
    let report = stores
        .check_invariants(config.activity, config.stock, &load.accepted)
        .await
        .unwrap();
    println!("{report}");
    report.ensure().unwrap();
    assert_eq!(report.ordered, 2000);
    assert_eq!(report.unanswered_orders, 0);
}
