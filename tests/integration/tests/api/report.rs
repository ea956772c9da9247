//! The sale's HTML report, rendered by a real browser: a small sale on the private stack, its
//! report written, then opened in headless Chromium. Every chart must have drawn its series (the
//! page's own check, read from the DOM Chromium dumps), and a screenshot is saved under
//! `target/test-artifacts/report/`.

use std::time::{Duration, Instant};

use flash_sale_tests::browser;
use flash_sale_tests::report::{ActivityReport, Phase, RunReport, Sampler};
use flash_sale_tests::scenario::{LoadProgress, SaleConfig, drive_sale_with};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_of_a_real_sale_renders_in_a_browser_with_every_chart_drawn() {
    browser::chromium().expect("the browser test needs Chromium");
    let apps = spawn_apps().await;
    let config = SaleConfig {
        activity: 11,
        stock: 300,
        requests: 6000,
        concurrency: 50,
        repeat_every: 3,
        first_user: 1,
        retry_ms: 0,
    };
    apps.admin()
        .create_activity(config.activity, config.stock)
        .await
        .unwrap();
    let stores = stores(&apps).await;
    let origin = Instant::now();
    let sampler = Sampler::start(stores.clone(), config.activity, origin);
    // Let the sampler see the stock before the sale.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let progress = std::sync::Arc::new(LoadProgress::default());
    let sale_start = origin.elapsed();
    let load = drive_sale_with(
        std::slice::from_ref(&apps.http),
        &apps.order.base_url,
        &config,
        &progress,
    )
    .await;
    let sale_end = origin.elapsed();
    assert_eq!(load.accepted.len(), 300, "{load}");
    assert_eq!(
        progress
            .buyers_done
            .load(std::sync::atomic::Ordering::Relaxed),
        config.requests,
        "the progress counted every buyer"
    );
    assert!(progress.latency_quantile_ms(0.99) >= load.latency_ms[1]);
    stores
        .wait_for_drain(config.activity, Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (samples, failed_samples) = sampler.stop().await;
    let end = origin.elapsed();
    let invariants = stores
        .check_invariants(config.activity, config.stock, &load.accepted)
        .await
        .unwrap();
    invariants.ensure().unwrap();
    assert!(samples.len() >= 4, "{} samples", samples.len());
    assert_eq!(
        samples.first().unwrap().stock,
        300,
        "sampled before the sale"
    );
    assert_eq!(
        samples.last().unwrap().orders,
        300,
        "sampled after the drain"
    );

    let report = RunReport {
        title: "flash-sale report: browser test".into(),
        settings: vec![("requests".into(), config.requests.to_string())],
        phases: vec![
            Phase {
                name: "before".into(),
                start: Duration::ZERO,
                end: sale_start,
            },
            Phase {
                name: "sale".into(),
                start: sale_start,
                end: sale_end,
            },
            Phase {
                name: "drain".into(),
                start: sale_end,
                end,
            },
        ],
        loads: vec![("The sale".into(), &load)],
        samples,
        failed_samples,
        invariants: &invariants,
        origin,
        notes: Vec::new(),
    };
    let dir = browser::artifacts_dir("report");
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("report.html");
    std::fs::write(&page, report.html()).unwrap();
    let url = format!("file://{}", page.canonicalize().unwrap().display());

    let dom = browser::dump_dom(&url).unwrap();
    assert!(
        dom.contains("render check: all 5 charts drew their series"),
        "the page's check, in the browser: {}",
        dom.split("id=\"render-check\"")
            .nth(1)
            .map_or("(no check element)", |t| &t[..t.len().min(300)])
    );
    assert!(dom.contains("Every invariant checked holds"));
    let shot = dir.join("report.png");
    browser::screenshot(&url, &shot, (1100, 3000)).unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        png.len() > 20_000,
        "a page with charts, not a blank one: {} bytes",
        png.len()
    );
    println!("report: {}\nscreenshot: {}", page.display(), shot.display());
}

#[test]
fn a_chart_without_data_fails_the_pages_check() {
    // The check must be able to fail: the same page with no answers and no samples.
    let invariants = flash_sale_tests::scenario::InvariantReport::default();
    let origin = Instant::now();
    let report = RunReport {
        title: "empty".into(),
        settings: Vec::new(),
        phases: vec![Phase {
            name: "nothing".into(),
            start: Duration::ZERO,
            end: Duration::from_secs(2),
        }],
        loads: Vec::new(),
        samples: Vec::new(),
        failed_samples: 0,
        invariants: &invariants,
        origin,
        notes: Vec::new(),
    };
    let dir = browser::artifacts_dir("report-empty");
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("report.html");
    std::fs::write(&page, report.html()).unwrap();
    let dom = browser::dump_dom(&format!(
        "file://{}",
        page.canonicalize().unwrap().display()
    ))
    .unwrap();
    assert!(dom.contains("render check failed"), "{dom}");
    assert!(dom.contains("Stock left in Redis (0 of 0 lines)"), "{dom}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_activitys_report_counts_from_mysql_and_finds_redis_drift() {
    let apps = spawn_apps().await;
    let (activity, stock, price) = (12, 200, 500);
    apps.admin()
        .create_activity_with(
            activity,
            stock,
            serde_json::json!({"priceCents": price, "payTimeoutSecs": 600}),
        )
        .await
        .unwrap();
    let config = SaleConfig {
        activity,
        stock,
        requests: 1000,
        concurrency: 40,
        repeat_every: 0,
        first_user: 1,
        retry_ms: 0,
    };
    let load = drive_sale_with(
        std::slice::from_ref(&apps.http),
        &apps.order.base_url,
        &config,
        &Default::default(),
    )
    .await;
    assert_eq!(load.accepted.len(), 200, "{load}");
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(activity, Duration::from_secs(60))
        .await
        .unwrap();
    // Seven in ten pay, one cancels (its stock goes back), two stay unpaid.
    let simulator = flash_sale_tests::payments::PaymentSimulator::new(
        apps.http.clone(),
        &apps.order.base_url,
        flash_sale_tests::apps::PAYMENT_SECRET,
    );
    let after = flash_sale_tests::scenario::after_the_sale(
        &apps.http,
        &apps.order.base_url,
        &simulator,
        price,
        &load.accepted,
    )
    .await
    .unwrap();
    stores
        .wait_for_drain(activity, Duration::from_secs(60))
        .await
        .unwrap();

    let report = ActivityReport::build(&stores, activity).await.unwrap();
    let r = &report.invariants;
    assert!(report.all_hold(), "{:?}", report.rows());
    assert_eq!(report.drift(), 0);
    assert_eq!(r.paid, after.paid);
    assert_eq!(r.cancelled, after.cancelled);
    assert_eq!(
        r.ordered,
        (200 - after.cancelled) as i64,
        "sold: the live orders"
    );
    assert_eq!(report.revenue_cents, after.paid as i64 * price);
    assert_eq!(r.initial_stock, 200, "MySQL's stock + live orders");
    assert_eq!(
        report.bucket_secs, 1,
        "a sale of seconds is timed by the second"
    );
    let created: i64 = report.timeline.iter().map(|b| b[0]).sum();
    let paid: i64 = report.timeline.iter().map(|b| b[1]).sum();
    let closed: i64 = report.timeline.iter().map(|b| b[2]).sum();
    assert_eq!(
        (created, paid, closed),
        (200, after.paid as i64, after.cancelled as i64)
    );
    let lost = report
        .rows()
        .into_iter()
        .find(|(name, _, _)| *name == "2 no lost order")
        .unwrap();
    assert_eq!(lost.1, None, "not checkable after the fact, and said so");

    let dir = browser::artifacts_dir("activity-report");
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("activity.html");
    std::fs::write(&page, report.html()).unwrap();
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let dom = browser::dump_dom(&url).unwrap();
    assert!(
        dom.contains("render check: all 1 charts drew their series"),
        "{dom}"
    );
    browser::screenshot(&url, &dir.join("activity.png"), (1100, 1400)).unwrap();

    // Redis loses 5 items behind the services' back: the report finds the drift.
    let mut redis = stores.redis.clone();
    let key = flash_sale_common::redis::ActivityKeys::new(
        flash_sale_common::domain::ActivityId::new(activity).unwrap(),
    )
    .stock;
    let _: i64 = redis::cmd("DECRBY")
        .arg(key)
        .arg(5)
        .query_async(&mut redis)
        .await
        .unwrap();
    let drifted = ActivityReport::build(&stores, activity).await.unwrap();
    assert_eq!(drifted.drift(), -5);
    assert!(!drifted.all_hold(), "drift breaks conservation");
}
