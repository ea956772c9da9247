//! Every metric name the monitoring bundle reads is emitted by a running service.
//!
//! The names come from the bundle itself: every alert and recording rule of
//! `monitoring/prometheus/rules.yaml`, every panel query and query variable of
//! `monitoring/grafana/dashboard.json`, and every query of the production AnalysisTemplate. The
//! services are the real order-service, inventory-service and gateway, each in its own process
//! (so each `/metrics` is that service's alone) on a private stack, after a little traffic of every
//! kind the bundle watches: a sale, a sold-out, its short circuits in the service and in the
//! gateway, a warm-up, a reconcile, the consumer's drain, a payment and a cancellation. Names from other exporters are listed
//! one by one below, never by a pattern.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use deploy_tests::{manifest, promql, repo_path};
use flash_sale_tests::apps::{
    ADMIN_TOKEN, JWT_SECRET, gateway_settings, inventory_settings, order_settings,
};
use flash_sale_tests::scenario::Admin;
use flash_sale_tests::stack::{BrokerStorage, Stack};
use serde_json::{Value, json};

use crate::helpers::*;
use flash_sale_common::api;
use flash_sale_common::error::ErrorCode;

const RULES: &str = "monitoring/prometheus/rules.yaml";
const DASHBOARD: &str = "monitoring/grafana/dashboard.json";
const ANALYSIS_TEMPLATE: &str = "kustomize/components/argo-rollouts/analysis-template.yaml";

/// Names the bundle reads that another exporter emits, never one of our services. Listed one by
/// one: a name of ours cannot hide here, a name listed here that a service of ours emits fails
/// the test, and so does a name nobody reads any more.
const OTHER_EXPORTERS: &[(&str, &str)] = &[
    // redis_exporter, the sidecar of every Redis pod (k8s/redis): RedisDown, RedisMemoryHigh,
    // RedisSlowlogGrowing and the dashboard's Redis row.
    ("redis_up", "redis_exporter"),
    ("redis_memory_used_bytes", "redis_exporter"),
    ("redis_memory_max_bytes", "redis_exporter"),
    ("redis_slowlog_last_id", "redis_exporter"),
    ("redis_commands_processed_total", "redis_exporter"),
    // kube-state-metrics: requests and limits (PodCpuHigh, PodMemoryHigh, ProcessMemoryHigh) and
    // the HPAs (HpaAtMaxReplicas, HpaFlapping, the replicas panel).
    ("kube_pod_container_resource_requests", "kube-state-metrics"),
    ("kube_pod_container_resource_limits", "kube-state-metrics"),
    (
        "kube_horizontalpodautoscaler_status_current_replicas",
        "kube-state-metrics",
    ),
    (
        "kube_horizontalpodautoscaler_spec_max_replicas",
        "kube-state-metrics",
    ),
    // cAdvisor, in the kubelet: container CPU and memory.
    ("container_cpu_usage_seconds_total", "cAdvisor (kubelet)"),
    ("container_memory_working_set_bytes", "cAdvisor (kubelet)"),
    // Prometheus itself: whether a scrape succeeded (RedisDown).
    ("up", "Prometheus (scrape health)"),
];

/// Where each metric name is read: name -> the rules, panels and analysis queries reading it.
fn names_read_by_the_bundle() -> BTreeMap<String, BTreeSet<String>> {
    let mut read: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |place: String, expr: &str| {
        let names = promql::metric_names(&grafana_to_promql(expr))
            .unwrap_or_else(|e| panic!("{place}: {e}"));
        for name in names {
            read.entry(name).or_default().insert(place.clone());
        }
    };

    let rules = yaml(RULES);
    let mut recorded = BTreeSet::new();
    for group in rules["groups"].as_array().expect("rule groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            if let Some(alert) = rule["alert"].as_str() {
                add(format!("alert {alert}"), expr);
            } else {
                let record = rule["record"].as_str().expect("a rule alerts or records");
                recorded.insert(record.to_owned());
                add(format!("recording rule {record}"), expr);
            }
        }
    }

    let dashboard: Value = serde_json::from_str(&read_file(DASHBOARD)).expect("dashboard JSON");
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        // Collapsed rows hold their panels.
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                add(format!("panel {title:?}"), expr);
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        // Only query variables hold PromQL (a datasource variable's query is a plugin type).
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .expect("a query variable has a query");
        let place = format!(
            "dashboard variable ${}",
            variable["name"].as_str().unwrap_or("?")
        );
        match query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            // label_values(<selector>, <label>): the selector reads a metric, the label does not.
            Some(args) => {
                if let Some((selector, _label)) = args.rsplit_once(',') {
                    add(place, selector);
                }
            }
            None => add(place, query),
        }
    }

    let template = yaml(ANALYSIS_TEMPLATE);
    for metric in template["spec"]["metrics"]
        .as_array()
        .expect("analysis metrics")
    {
        let query = metric["provider"]["prometheus"]["query"]
            .as_str()
            .expect("a Prometheus query");
        add(
            format!("analysis {}", metric["name"].as_str().unwrap_or("?")),
            query,
        );
    }

    // Series a recording rule makes are Prometheus' own (none today).
    read.retain(|name, _| !recorded.contains(name));
    read
}

fn read_file(relative: &str) -> String {
    let path = repo_path(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(relative: &str) -> Value {
    let mut objects = manifest::parse_stream(&read_file(relative)).expect("the YAML parses");
    assert_eq!(objects.len(), 1, "{relative} holds one document");
    objects.remove(0).0
}

/// A dashboard query as Grafana hands it to Prometheus (its interval variables filled in).
fn grafana_to_promql(expr: &str) -> String {
    ["$__rate_interval", "$__interval", "$__range"]
        .iter()
        .fold(expr.to_owned(), |e, var| e.replace(var, "1m"))
}

/// The sample names of a Prometheus text exposition (a histogram's `_bucket`, `_sum`, `_count`).
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

fn token(user: &str) -> String {
    let claims = json!({"sub": user, "exp": chrono::Utc::now().timestamp() + 600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("a token encodes")
}

/// Buys one item of activity 1 at `base_url` (order-service or gateway, with a token for the
/// gateway); returns the status and the error code, if any.
async fn buy(http: &reqwest::Client, base_url: &str, user: u32, bearer: bool) -> (u16, String) {
    let mut req = http
        .post(format!("{base_url}{}", api::order::CREATE))
        .json(&json!({"userId": user.to_string(), "activityId": "1", "quantity": 1}));
    if bearer {
        req = req.bearer_auth(token(&user.to_string()));
    }
    let res = req.send().await.expect("the service answers");
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

/// Joins `activity`'s waiting room as `user` (with their token) and polls until admitted; the
/// pass. The gateway may still be connecting to Redis: a 503 is tried again.
async fn queue_for_a_pass(
    http: &reqwest::Client,
    gateway: &str,
    activity: i64,
    user: &str,
) -> String {
    let url = format!("{gateway}/api/admission/{activity}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ticket: Option<String> = None;
    loop {
        assert!(Instant::now() < deadline, "never admitted");
        let request = match &ticket {
            None => http.post(&url),
            Some(t) => http.get(&url).header("x-queue-ticket", t),
        };
        let res = request.bearer_auth(token(user)).send().await.unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        match (status, body["state"].as_str()) {
            (200, Some("admitted")) => return body["pass"].as_str().unwrap().to_owned(),
            (200, Some("waiting")) => {
                if ticket.is_none() {
                    ticket = body["ticket"].as_str().map(str::to_owned);
                }
            }
            (503, _) => {}
            other => panic!("{other:?}: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_monitoring_reads_is_emitted_by_a_running_service() {
    let read = names_read_by_the_bundle();
    // The extraction itself works: the bundle's core names are found, from all three sources.
    for name in [
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "flash_sale_orders_total",
        "gateway_flow_blocked_total",
        "flash_sale_stock_available",
    ] {
        assert!(
            read.contains_key(name),
            "{name} not found in the bundle: {read:?}"
        );
    }
    assert!(
        read["flash_sale_stock_available"].contains("dashboard variable $activity"),
        "{read:?}"
    );
    assert!(
        read["http_requests_total"].contains("analysis success-rate"),
        "{read:?}"
    );
    let external: BTreeMap<&str, &str> = OTHER_EXPORTERS.iter().copied().collect();
    let stale: Vec<&&str> = external
        .keys()
        .filter(|n| !read.contains_key(**n))
        .collect();
    assert!(
        stale.is_empty(),
        "listed as another exporter's but read nowhere any more: {stale:?}"
    );

    // The services, each in its own process, on one private stack.
    let stack = Stack::start(BrokerStorage::Sqlite)
        .await
        .expect("the private stack starts");
    let order = ServiceProcess::spawn(ServiceSettings::Order(order_settings(&stack)))
        .await
        .unwrap();
    let inventory = ServiceProcess::spawn(ServiceSettings::Inventory(inventory_settings(&stack)))
        .await
        .unwrap();
    // The deployed rules, with a waiting room in front of activity 2.
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rules_dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        format!(
            "{}\n[[waiting_room]]\nactivity = 2\nrate = 50\nburst = 0\n",
            read_file("services/gateway/rules.example.toml")
        ),
    )
    .unwrap();
    let mut settings = gateway_settings(&stack, &order.base_url, &inventory.base_url);
    settings.rules.file = Some(rules.display().to_string());
    let gateway = ServiceProcess::spawn(ServiceSettings::Gateway(settings))
        .await
        .unwrap();
    let http = flash_sale_tests::apps::http_client();
    let admin = Admin::new(http.clone(), &inventory.base_url, ADMIN_TOKEN);

    // A sale of two items: one bought directly, one through the gateway; then sold out, twice at
    // each (the second time each answers from its short circuit); a warm-up and a reconcile.
    admin.create_activity(1, 2).await.unwrap();
    assert_eq!(buy(&http, &order.base_url, 1, false).await.0, 202);
    assert_eq!(buy(&http, &gateway.base_url, 2, true).await.0, 202);
    for user in [3, 4] {
        assert_eq!(
            buy(&http, &order.base_url, user, false).await,
            (409, ErrorCode::SoldOut.as_str().to_owned())
        );
    }
    for user in [5, 6] {
        assert_eq!(
            buy(&http, &gateway.base_url, user, true).await,
            (409, ErrorCode::SoldOut.as_str().to_owned())
        );
    }
    // A buyer queues in activity 2's room, is admitted and buys with the pass.
    admin.create_activity(2, 5).await.unwrap();
    let pass = queue_for_a_pass(&http, &gateway.base_url, 2, "8").await;
    let bought = http
        .post(format!("{}{}", gateway.base_url, api::order::CREATE))
        .bearer_auth(token("8"))
        .header("x-purchase-pass", pass)
        .json(&json!({"activityId": "2", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bought.status().as_u16(), 202);
    admin
        .call(reqwest::Method::POST, api::inventory::WARMUP_ALL, None)
        .await
        .unwrap();
    admin.reconcile().await.unwrap();
    let stores = stack_stores(&stack).await;
    stores
        .wait_for_drain(1, Duration::from_secs(30))
        .await
        .unwrap();

    // After the sale, through the gateway: the provider pays user 1's order (its callback needs
    // no token), user 2 cancels theirs (with their token), and the stock comes back.
    let orders: Vec<(String, i64)> = sqlx::query_as(
        "SELECT order_no, user_id FROM orders WHERE activity_id = 1 ORDER BY user_id",
    )
    .fetch_all(stores.db())
    .await
    .unwrap();
    let simulator = flash_sale_tests::payments::PaymentSimulator::new(
        http.clone(),
        &gateway.base_url,
        flash_sale_tests::apps::PAYMENT_SECRET,
    );
    let paid = simulator
        .pay(&orders[0].0, 0, 1, "pay-metrics")
        .await
        .unwrap();
    assert!(
        matches!(paid, flash_sale_tests::payments::Confirmation::Paid(_)),
        "{paid:?}"
    );
    let cancelled = http
        .post(format!(
            "{}{}",
            gateway.base_url,
            api::order::cancel(&orders[1].0)
        ))
        .bearer_auth(token("2"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status().as_u16(), 200);
    stores
        .wait_for_drain(1, Duration::from_secs(30))
        .await
        .unwrap();

    // Scrape until every name is there (gauges such as the consumer lag and the tokio busy ratio
    // appear on their own schedule), at most 30 s.
    let services = [&order, &inventory, &gateway];
    let deadline = Instant::now() + Duration::from_secs(30);
    let (emitted, missing) = loop {
        let mut emitted: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for service in services {
            let text = service.metrics(&http).await.unwrap();
            for name in sample_names(&text) {
                emitted.entry(name).or_default().insert(service.name);
            }
        }
        let missing: Vec<&String> = read
            .keys()
            .filter(|name| !emitted.contains_key(*name) && !external.contains_key(name.as_str()))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (emitted, missing);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    for (name, places) in &read {
        let by = match (emitted.get(name), external.get(name.as_str())) {
            (Some(services), _) => services.iter().copied().collect::<Vec<_>>().join(", "),
            (None, Some(exporter)) => format!("({exporter})"),
            (None, None) => "MISSING".to_owned(),
        };
        println!("{name:<55} {by:<45} read by {}", places.len());
    }
    let ours_listed_as_external: Vec<(&&str, &BTreeSet<&str>)> = external
        .keys()
        .filter_map(|name| emitted.get(*name).map(|services| (name, services)))
        .collect();
    assert!(
        ours_listed_as_external.is_empty(),
        "emitted by our services, yet listed as another exporter's: {ours_listed_as_external:?}"
    );
    let report: Vec<String> = missing
        .iter()
        .map(|name| format!("{name} (read by {:?})", read[*name]))
        .collect();
    assert!(
        report.is_empty(),
        "read by the monitoring bundle but emitted by no service:\n{}\n\nlogs:\n{}",
        report.join("\n"),
        services
            .iter()
            .map(|s| format!("--- {}\n{}", s.name, s.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn sample_names_include_histogram_series_and_skip_comments() {
    let text = "# HELP a_seconds x\n# TYPE a_seconds histogram\na_seconds_bucket{le=\"0.1\"} 1\na_seconds_sum 0.05\na_seconds_count 1\nup_total 3\n\n";
    let names: Vec<String> = sample_names(text).into_iter().collect();
    assert_eq!(
        names,
        [
            "a_seconds_bucket",
            "a_seconds_count",
            "a_seconds_sum",
            "up_total"
        ]
    );
}
