//! The seed's own load test, verbatim: `hey -n 100000 -c 1000 -m POST ... '{"userId":"{random}",...}'`.

use std::process::Command;
use std::time::Duration;

use crate::helpers::*;
use flash_sale_common::api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_hey_command_gets_no_5xx() {
    let apps = spawn_apps().await;
    let stores = stores(&apps).await;
    // The seed's procedure: a row in MySQL, then the warm-up.
    sqlx::query("INSERT INTO inventory (activity_id, stock) VALUES (1, 10000);")
        .execute(&stores.db)
        .await
        .unwrap();
    apps.admin()
        .call(reqwest::Method::POST, api::inventory::WARMUP_ALL, None)
        .await
        .unwrap();
    let url = format!("{}{}", apps.order.base_url, api::order::CREATE);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("hey")
            .args(["-n", "100000", "-c", "1000", "-m", "POST"])
            .args(["-H", "Content-Type: application/json"])
            .args([
                "-d",
                r#"{"userId":"{random}","activityId":"1","quantity":1}"#,
            ])
            .arg(url)
            .output()
            .expect("hey is installed (cargo xtask setup)")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success());
    let metrics = apps.order.metrics(&apps.http).await.unwrap();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("flash_sale_orders_total"))
    {
        println!("{line}");
    }
    let codes: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('[') && l.contains("responses"))
        .collect();
    assert!(
        !codes.is_empty(),
        "hey printed a status code distribution:\n{text}"
    );
    assert!(
        codes.iter().all(|l| !l.starts_with("[5")),
        "no 5xx: {codes:?}"
    );
    assert!(
        codes.iter().any(|l| l.starts_with("[202]")),
        "some orders were accepted: {codes:?}"
    );
    stores
        .wait_for_drain(1, Duration::from_secs(120))
        .await
        .unwrap();
    let report = stores.check_invariants(1, 10_000, &[]).await.unwrap();
    println!("{report}");
    assert!(
        report.no_oversell() && report.no_duplicate() && report.conservation(),
        "{report}"
    );
}
