//! The sale's HTML report, rendered by a real browser: a small sale on the private stack, its
//! report written, then opened in headless Chromium. Every chart must have drawn its series (the
//! page's own check, read from the DOM Chromium dumps), and a screenshot is saved under
//! `target/test-artifacts/report/`. The activity report is rendered the same way, from the
//! stores alone and with the figures of a private Prometheus that scraped the sale.

use std::time::{Duration, Instant};

use flash_sale_common::api;
use flash_sale_tests::apps::{ADMIN_TOKEN, gateway_settings, inventory_settings, order_settings};
use flash_sale_tests::browser;
use flash_sale_tests::prometheus::{
    PrometheusApi, PrometheusServer, SCRAPE_INTERVAL, ScrapeTarget,
};
use flash_sale_tests::report::{
    ActivityReport, PROMETHEUS_NO_DATA, Phase, PromChart, PrometheusFigures, RunReport, Sampler,
};
use flash_sale_tests::scenario::{Admin, AnswerKind, LoadProgress, SaleConfig, drive_sale_with};
use flash_sale_tests::stack::{BrokerStorage, Stack};

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

// ------------------------------------------------------------------ the report with Prometheus

/// The activity of the Prometheus test, and what it sells.
const PROM_ACTIVITY: i64 = 13;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_activity_report_reads_the_sale_from_a_private_prometheus() {
    // Missing tools fail the test, saying how to install them; they never skip it.
    flash_sale_tests::prometheus::program().unwrap();
    browser::chromium().expect("the browser test needs Chromium");
    // Each service in its own process, so each `/metrics` is that service's alone, as a pod's.
    let stack = Stack::start(BrokerStorage::Sqlite)
        .await
        .expect("the private stack starts");
    let order = ServiceProcess::spawn(ServiceSettings::Order(order_settings(&stack)))
        .await
        .unwrap();
    let inventory = ServiceProcess::spawn(ServiceSettings::Inventory(inventory_settings(&stack)))
        .await
        .unwrap();
    let mut gateway = gateway_settings(&stack, &order.base_url, &inventory.base_url);
    // The load sends no tokens, as `cargo xtask sale`'s buyers do on a local stack.
    gateway.auth.trust_body_user_id = true;
    let gateway = ServiceProcess::spawn(ServiceSettings::Gateway(gateway))
        .await
        .unwrap();
    let targets: Vec<ScrapeTarget> = [&gateway, &order, &inventory]
        .iter()
        .map(|s| ScrapeTarget {
            service: s.name.to_owned(),
            management_url: s.management_url.clone(),
        })
        .collect();
    let prometheus = PrometheusServer::start(&targets)
        .await
        .expect("a private Prometheus (`cargo xtask setup` installs Debian's prometheus)");

    let http = flash_sale_tests::apps::http_client();
    // The buyers come in waves a scrape apart, so that the sale spans several scrapes and each
    // rate has more than one point: 300 items, 8 waves of 150 buyers (it sells out in the second).
    let (stock, waves, per_wave) = (300, 8, 150);
    Admin::new(http.clone(), &inventory.base_url, ADMIN_TOKEN)
        .create_activity(PROM_ACTIVITY, stock)
        .await
        .unwrap();
    // A few scrapes before the sale: the rates start from a baseline, as they would in a cluster.
    tokio::time::sleep(SCRAPE_INTERVAL * 3).await;
    let mut loads = Vec::new();
    for wave in 0..waves {
        let config = SaleConfig {
            activity: PROM_ACTIVITY,
            stock,
            requests: per_wave,
            concurrency: 10,
            repeat_every: 0,
            first_user: 1 + (wave * per_wave) as i64,
            retry_ms: 20_000,
        };
        loads.push(
            drive_sale_with(
                std::slice::from_ref(&http),
                &gateway.base_url,
                &config,
                &Default::default(),
            )
            .await,
        );
        tokio::time::sleep(SCRAPE_INTERVAL).await;
    }
    let sold: usize = loads.iter().map(|l| l.accepted.len()).sum();
    assert_eq!(sold, stock as usize, "{}", loads[0]);
    let stores = stack_stores(&stack).await;
    stores
        .wait_for_drain(PROM_ACTIVITY, Duration::from_secs(60))
        .await
        .unwrap();
    // What the buyers saw, answer by answer (retried tries included): the gateway answered each.
    let kinds = |kind: AnswerKind| {
        loads
            .iter()
            .flat_map(|l| &l.answers)
            .filter(|a| a.kind == kind)
            .count() as f64
    };
    let answers: usize = loads.iter().map(|l| l.answers.len()).sum();
    let answered = answers as f64 - kinds(AnswerKind::NoAnswer);
    assert_eq!(kinds(AnswerKind::Accepted), stock as f64);

    // Until Prometheus has scraped the end of the sale (counters only grow, so once they reach
    // the totals no later scrape changes them), at most 30 s.
    let api = prometheus.api();
    let route = format!("route=\"{}{{*rest}}\"", api::order::PREFIX);
    let accepted_query = format!(
        "sum(flash_sale_orders_total{{service=\"order-service\",activity=\"{PROM_ACTIVITY}\",outcome=\"accepted\"}})"
    );
    let answers_query = format!("sum(http_requests_total{{service=\"gateway\",{route}}})");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = |series: Vec<flash_sale_tests::prometheus::PromSeries>| {
            series.first().and_then(|s| s.points.first()).map(|p| p.1)
        };
        let accepted = value(api.query(&accepted_query, None).await.unwrap());
        let answers = value(api.query(&answers_query, None).await.unwrap());
        if accepted == Some(stock as f64) && answers == Some(answered) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not reach the sale's totals within 30 s: accepted {accepted:?} of {stock}, \
             gateway answers {answers:?} of {answered}\n{}",
            prometheus.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And a rate window's worth of scrapes after it, so every rate has its points.
    tokio::time::sleep(SCRAPE_INTERVAL * 6).await;

    let mut report = ActivityReport::build(&stores, PROM_ACTIVITY).await.unwrap();
    assert!(report.all_hold(), "{:?}", report.rows());
    report.read_prometheus(&prometheus.base_url).await.unwrap();
    let figures = report.prometheus.as_ref().expect("read above");
    println!("{:#?}", figures.totals);
    assert!(
        figures.empty_charts().is_empty(),
        "Prometheus had data for every chart: {:?}",
        figures.empty_charts()
    );
    // The counters over the range are the sale's own figures, exactly: the last scrape came after
    // the last request.
    let order_outcome = |o: &str| figures.total("order-service: create-order answers", o);
    assert_eq!(order_outcome("accepted"), stock as f64, "orders sold");
    assert_eq!(
        report.invariants.ordered, stock,
        "MySQL sold what Prometheus counted"
    );
    let gateway_status = |s: &str| figures.total("gateway: answers", s);
    assert_eq!(gateway_status("202"), kinds(AnswerKind::Accepted));
    assert_eq!(gateway_status("409"), kinds(AnswerKind::SoldOut));
    assert_eq!(gateway_status("429"), kinds(AnswerKind::Throttled));
    let all_statuses: f64 = figures
        .totals
        .iter()
        .filter(|t| t.figure.starts_with("gateway: answers"))
        .map(|t| t.total)
        .sum();
    assert_eq!(all_statuses, answered, "the gateway answered every try");
    assert!(
        figures.total("gateway: refused", "sold_out") > 0.0,
        "the gateway's sold-out short circuit refused some: {:?}",
        figures.totals
    );
    // Every request of the activity the gateway saw was passed on or refused.
    let refused: f64 = figures
        .totals
        .iter()
        .filter(|t| t.figure.starts_with("gateway: refused"))
        .map(|t| t.total)
        .sum();
    assert_eq!(
        figures.total("gateway: passed", "") + refused,
        answered,
        "{:?}",
        figures.totals
    );

    let dir = browser::artifacts_dir("activity-report-prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("activity.html");
    std::fs::write(&page, report.html()).unwrap();
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let dom = browser::dump_dom(&url).unwrap();
    assert!(
        dom.contains("From Prometheus"),
        "the section is on the page"
    );
    assert!(
        dom.contains("render check: all 6 charts drew their series"),
        "the timeline and the 5 Prometheus charts: {}",
        dom.split("id=\"render-check\"")
            .nth(1)
            .map_or("(no check element)", |t| &t[..t.len().min(400)])
    );
    let shot = dir.join("activity.png");
    browser::screenshot(&url, &shot, (1100, 3200)).unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.len() > 20_000,
        "a page with charts: {} bytes",
        png.len()
    );
    println!("report: {}\nscreenshot: {}", page.display(), shot.display());
}

#[tokio::test]
async fn a_prometheus_that_cannot_be_reached_fails_the_report_naming_its_url() {
    // A port this test opened and closed again: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let now = chrono::Utc::now().timestamp();
    let err = PrometheusFigures::read(&PrometheusApi::new(&url), 1, now - 60, now)
        .await
        .expect_err("nothing listens there");
    let message = format!("{err:#}");
    assert!(
        message.contains(&format!("Prometheus at {url} cannot be reached")),
        "{message}"
    );
}

#[tokio::test]
async fn a_prometheus_that_answers_an_error_fails_the_report_with_its_error() {
    // A stand-in that refuses every query as Prometheus does.
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "status": "error", "errorType": "unavailable", "error": "the TSDB is starting"
            })),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let now = chrono::Utc::now().timestamp();
    let err = PrometheusFigures::read(&PrometheusApi::new(&url), 1, now - 60, now)
        .await
        .expect_err("every query is refused");
    server.abort();
    let message = format!("{err:#}");
    assert!(
        message.contains(&format!("Prometheus at {url} answered 503"))
            && message.contains("unavailable: the TSDB is starting"),
        "{message}"
    );
}

/// A report with the given Prometheus charts (no stores needed), as the browser renders it.
fn render_with_prometheus(charts: Vec<PromChart>, name: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let report = ActivityReport {
        activity: 1,
        bucket_secs: 1,
        timeline: vec![[0, 0, 0], [2, 0, 0], [0, 1, 0]],
        first_order: None,
        revenue_cents: 0,
        invariants: flash_sale_tests::scenario::InvariantReport::default(),
        repair: None,
        first_order_at: Some(now - 10),
        last_order_at: Some(now),
        prometheus: Some(PrometheusFigures {
            url: "http://prometheus.example".into(),
            start: (now - 40) as f64,
            end: now as f64,
            step: Duration::from_secs(1),
            window: Duration::from_secs(4),
            charts,
            totals: Vec::new(),
        }),
    };
    let dir = browser::artifacts_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("activity.html");
    std::fs::write(&page, report.html()).unwrap();
    browser::dump_dom(&format!(
        "file://{}",
        page.canonicalize().unwrap().display()
    ))
    .unwrap()
}

#[test]
fn some_empty_prometheus_charts_pass_the_pages_check_but_all_empty_fail_it() {
    let now = chrono::Utc::now().timestamp() as f64;
    let empty = |title: &str| PromChart {
        title: title.into(),
        unit: "x",
        lines: Vec::new(),
    };
    let drawn = PromChart {
        title: "drawn".into(),
        unit: "x",
        lines: vec![("a".into(), vec![(now - 5.0, 1.0), (now - 4.0, 2.0)])],
    };
    let dom = render_with_prometheus(vec![drawn, empty("lag")], "activity-report-some-empty");
    assert!(
        dom.contains("render check: 2 of 3 charts drew their series; no data for: lag"),
        "{dom}"
    );
    assert!(dom.contains(PROMETHEUS_NO_DATA), "the empty chart says so");
    let dom = render_with_prometheus(
        vec![empty("rates"), empty("lag")],
        "activity-report-all-empty",
    );
    assert!(
        dom.contains("render check failed: every Prometheus chart is empty (rates; lag)"),
        "{dom}"
    );
}
