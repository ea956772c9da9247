//! The monitoring bundle: the rule file passes `promtool check rules` and its unit tests, every
//! seed alert is there and tested firing and silent, the PrometheusRule is generated from the
//! rule file, the dashboard is well formed and has the seed's panels and the gateway's flow
//! control, every query is valid PromQL reading known metrics, and the canary analysis queries
//! and conditions reach the right verdicts on sample data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use deploy_tests::crds::{self, RuleGroups};
use deploy_tests::manifest::{Overlay, to_yaml};
use deploy_tests::{contracts, promql, repo_path, scratch_dir, tools};
use serde_json::{Value, json};

const RULES: &str = "monitoring/prometheus/rules.yaml";
const RULE_TESTS: &str = "monitoring/prometheus/rules_test.yaml";
const PROMETHEUS_RULE: &str = "monitoring/prometheus/prometheus-rule.yaml";
const DASHBOARD: &str = "monitoring/grafana/dashboard.json";

/// Metrics the bundle reads that no service of ours emits: redis_exporter, kube-state-metrics,
/// the kubelet's cAdvisor, and Prometheus itself.
const EXTERNAL_METRICS: [&str; 12] = [
    "redis_up",
    "redis_memory_used_bytes",
    "redis_memory_max_bytes",
    "redis_slowlog_last_id",
    "redis_commands_processed_total",
    "kube_pod_container_resource_requests",
    "kube_pod_container_resource_limits",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
    "up",
];

/// The gateway's flow-control metrics, named by the gateway issue; docs/contracts.md will list
/// them once docs/gateway.md lands.
const GATEWAY_FLOW_METRICS: [&str; 4] = [
    "gateway_flow_passed_total",
    "gateway_flow_blocked_total",
    "gateway_flow_in_flight",
    "gateway_circuit_state",
];

/// Every alert the seed lists, as named here, with the threshold the seed gives it.
const SEED_ALERTS: [(&str, &str); 17] = [
    // business
    ("FlashSaleStockLow", "< 100"),
    ("FlashSaleOrderSuccessRateLow", "< 0.95"),
    ("FlashSaleOrderQueueBacklog", "> 10000"),
    // not the seed's: an accepted order not in MySQL after 2 minutes (issue 13, docs/drills.md)
    ("FlashSaleOrderStranded", "> 120"),
    ("RedisDown", "== 0"),
    ("RedisMemoryHigh", "> 0.9"),
    ("RedisSlowlogGrowing", "> 10"),
    // performance
    ("FlashSaleHighLatencyP99", "> 0.5"),
    ("FlashSaleHighErrorRate", "> 0.05"),
    ("FlashSaleQpsSurge", "> 10000"),
    ("PodCpuHigh", "> 0.9"),
    ("PodMemoryHigh", "> 0.9"),
    // the seed's JVM alerts, as the Rust runtime's
    ("ProcessMemoryHigh", "> 0.85"),
    ("TokioRuntimeSaturated", "> 0.9"),
    ("TokioGlobalQueueBacklog", "> 100"),
    // autoscaling
    ("HpaAtMaxReplicas", ">="),
    ("HpaFlapping", "[15m]) > 5"),
];

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

fn yaml_value(text: &str) -> Value {
    serde_yaml::from_str(text).expect("valid YAML")
}

fn rule_groups() -> RuleGroups {
    crds::round_trip(&yaml_value(&read(RULES))).expect("rules.yaml matches the rule-file model")
}

fn alerts() -> Vec<crds::Rule> {
    rule_groups()
        .groups
        .into_iter()
        .flat_map(|g| g.rules)
        .filter(|r| r.alert.is_some())
        .collect()
}

fn promtool(args: &[&str], file: &Path) -> String {
    let mut command = Command::new(tools::require("promtool"));
    command.args(args).arg(file);
    tools::run_ok(&mut command).unwrap_or_else(|e| panic!("{e:#}"))
}

// ------------------------------------------------------------------------------ the rules

#[test]
fn promtool_checks_the_rule_file() {
    let report = promtool(&["check", "rules"], &repo_path(RULES));
    assert!(
        report.contains(&format!("SUCCESS: {} rules found", alerts().len())),
        "{report}"
    );
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let report = promtool(&["test", "rules"], &repo_path(RULE_TESTS));
    assert!(report.contains("SUCCESS"), "{report}");
}

#[test]
fn every_seed_alert_is_there_with_the_seeds_threshold() {
    let found: BTreeMap<String, crds::Rule> = alerts()
        .into_iter()
        .map(|r| (r.alert.clone().unwrap(), r))
        .collect();
    let wanted: BTreeSet<&str> = SEED_ALERTS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        found.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        wanted
    );
    for (name, threshold) in SEED_ALERTS {
        let rule = &found[name];
        let expr = rule.expr.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            expr.contains(threshold),
            "{name}: {threshold:?} not in {expr}"
        );
        let labels = rule.labels.clone().unwrap_or_default();
        assert!(
            ["info", "warning", "critical"].contains(
                &labels
                    .get("severity")
                    .map(String::as_str)
                    .unwrap_or_default()
            ),
            "{name}: severity"
        );
        let annotations = rule.annotations.clone().unwrap_or_default();
        assert!(
            annotations.contains_key("summary") && annotations.contains_key("description"),
            "{name}: annotations"
        );
    }
}

#[test]
fn every_alert_is_unit_tested_firing_and_silent() {
    let tests = yaml_value(&read(RULE_TESTS));
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for test in tests["tests"].as_array().expect("tests") {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_owned();
            if case["exp_alerts"]
                .as_array()
                .is_some_and(|alerts| !alerts.is_empty())
            {
                firing.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    let names: BTreeSet<String> = alerts().into_iter().filter_map(|r| r.alert).collect();
    for name in &names {
        assert!(firing.contains(name), "{name} is never tested firing");
        assert!(silent.contains(name), "{name} is never tested silent");
    }
    assert!(
        firing.union(&silent).all(|name| names.contains(name)),
        "a test names an alert that does not exist"
    );
}

/// The PrometheusRule as generated from rules.yaml.
fn generated_prometheus_rule() -> Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "flash-sale",
            "labels": {"app.kubernetes.io/name": "flash-sale-rules"}
        },
        "spec": yaml_value(&read(RULES)),
    })
}

#[test]
fn the_prometheus_rule_is_generated_from_the_rule_file() {
    let expected = generated_prometheus_rule();
    let path = repo_path(PROMETHEUS_RULE);
    let current = std::fs::read_to_string(&path)
        .map(|text| yaml_value(&text))
        .unwrap_or(Value::Null);
    if current != expected {
        if std::env::var_os("DEPLOY_TESTS_BLESS").is_some() {
            let header = "# GENERATED from rules.yaml by `DEPLOY_TESTS_BLESS=1 cargo test -p deploy-tests --test monitoring`.\n\
                          # Do not edit: change rules.yaml (and rules_test.yaml), then regenerate.\n";
            std::fs::write(&path, format!("{header}{}", to_yaml(&expected))).unwrap();
        } else {
            panic!(
                "{PROMETHEUS_RULE} is not rules.yaml wrapped in a PrometheusRule; regenerate it with\n  \
                 DEPLOY_TESTS_BLESS=1 cargo test -p deploy-tests --test monitoring"
            );
        }
    }
    // And the overlays with monitoring ship exactly it.
    for overlay in [Overlay::Staging, Overlay::Production] {
        let rule = overlay.rendered().get("PrometheusRule", "flash-sale");
        assert_eq!(
            rule.pointer("/spec"),
            expected.get("spec"),
            "{}",
            overlay.name()
        );
    }
}

// ------------------------------------------------------------------------------ dashboard

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("dashboard.json is JSON")
}

/// Every panel, rows included, with the row it sits under (by position).
fn panels(dashboard: &Value) -> Vec<(String, &Value)> {
    let mut row = String::new();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            row = panel["title"].as_str().unwrap_or_default().to_owned();
        }
        out.push((row.clone(), panel));
    }
    out
}

fn panel_exprs(panel: &Value) -> Vec<String> {
    panel["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect()
}

/// A dashboard query as Prometheus would get it from Grafana.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$activity", ".*")
}

#[test]
fn the_dashboard_is_well_formed() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "flash-sale");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(variables.contains(&"datasource"), "a datasource variable");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for (_, panel) in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(panel["id"].as_i64().expect("panel id")),
            "duplicate panel id in {title}"
        );
        let grid = &panel["gridPos"];
        let (x, y, w, h) = (
            grid["x"].as_i64().unwrap(),
            grid["y"].as_i64().unwrap(),
            grid["w"].as_i64().unwrap(),
            grid["h"].as_i64().unwrap(),
        );
        assert!(
            x >= 0 && w > 0 && x + w <= 24,
            "{title}: outside the 24 columns"
        );
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{title}: datasource"
            );
            assert!(!panel_exprs(panel).is_empty(), "{title}: no query");
            assert!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{title}: no description"
            );
        }
    }
}

#[test]
fn the_dashboard_shows_the_seeds_panels_and_the_gateways_flow_control() {
    let dashboard = dashboard();
    let mut read_by_row: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (row, panel) in panels(&dashboard) {
        for expr in panel_exprs(panel) {
            read_by_row
                .entry(row.clone())
                .or_default()
                .extend(promql::metric_names(&as_promql(&expr)));
        }
    }
    let everywhere: BTreeSet<&String> = read_by_row.values().flatten().collect();
    // The seed's panels: orders, stock, P99, 5xx, Redis QPS and memory, queue backlog, the
    // runtime (JVM heap and GC in the seed), replicas, CPU and memory.
    for metric in [
        "flash_sale_orders_total",
        "flash_sale_stock_available",
        "http_request_duration_seconds_bucket",
        "http_requests_total",
        "redis_commands_processed_total",
        "redis_memory_used_bytes",
        "flash_sale_consumer_lag",
        "process_resident_memory_bytes",
        "tokio_busy_ratio",
        "kube_horizontalpodautoscaler_status_current_replicas",
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
    ] {
        assert!(
            everywhere.contains(&metric.to_owned()),
            "no panel reads {metric}"
        );
    }
    let flow = read_by_row
        .get("Gateway flow control")
        .expect("a Gateway flow control row");
    for metric in GATEWAY_FLOW_METRICS {
        assert!(
            flow.contains(metric),
            "the flow-control row does not read {metric}"
        );
    }
}

// ------------------------------------------------------------------- every query, checked

/// The canary analysis queries with their arguments filled in.
fn analysis_queries(
    args: &BTreeMap<&str, &str>,
) -> BTreeMap<String, (String, crds::AnalysisMetric)> {
    let template: crds::AnalysisTemplate = crds::round_trip(
        &Overlay::Production
            .rendered()
            .get("AnalysisTemplate", "flash-sale-canary")
            .0,
    )
    .unwrap();
    template
        .spec
        .metrics
        .into_iter()
        .map(|metric| {
            let mut query = metric.provider.prometheus.query.clone();
            for (name, value) in args {
                query = query.replace(&format!("{{{{args.{name}}}}}"), value);
            }
            assert!(
                !query.contains("{{"),
                "{}: an argument is left in {query}",
                metric.name
            );
            (metric.name.clone(), (query, metric))
        })
        .collect()
}

/// Every PromQL expression the bundle holds: rules, dashboard, canary analysis.
fn every_query() -> Vec<(String, String)> {
    let mut queries: Vec<(String, String)> = alerts()
        .into_iter()
        .map(|rule| (format!("alert {}", rule.alert.unwrap()), rule.expr))
        .collect();
    for (_, panel) in panels(&dashboard()) {
        for expr in panel_exprs(panel) {
            queries.push((
                format!("panel {}", panel["title"].as_str().unwrap_or_default()),
                as_promql(&expr),
            ));
        }
    }
    let args = BTreeMap::from([("service", "order-service"), ("canary-hash", "5d8f7c9b6")]);
    for (name, (query, _)) in analysis_queries(&args) {
        queries.push((format!("analysis {name}"), query));
    }
    queries
}

#[test]
fn every_query_is_valid_promql() {
    let queries = every_query();
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(index, (_, expr))| json!({"record": format!("bundle:query_{index}"), "expr": expr}))
        .collect();
    let dir = scratch_dir!("every-query");
    let file = dir.join("queries.yaml");
    std::fs::write(
        &file,
        to_yaml(&json!({"groups": [{"name": "bundle", "rules": rules}]})),
    )
    .unwrap();
    let report = promtool(&["check", "rules"], &file);
    assert!(
        report.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{report}"
    );
}

#[test]
fn every_metric_read_is_emitted_by_a_service_or_a_known_exporter() {
    let contract = contracts::metrics();
    let known: BTreeSet<&str> = contract
        .iter()
        .map(String::as_str)
        .chain(EXTERNAL_METRICS)
        .chain(GATEWAY_FLOW_METRICS)
        .collect();
    for (context, expr) in every_query() {
        for metric in promql::metric_names(&expr) {
            assert!(
                known.contains(metric.as_str()),
                "{context} reads {metric}: not in docs/contracts.md nor a known exporter"
            );
        }
    }
}

// ------------------------------------------------------------------- the canary's verdicts

/// What Argo Rollouts makes of one measurement, following its `EvaluateResult`: the failure
/// condition wins, then the success condition; with both set and neither true, Inconclusive.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Successful,
    Failed,
    Inconclusive,
}

/// Evaluates the subset of Argo's expression language the template uses: clauses joined by
/// `&&`, each `isNaN(result[0])`, `!isNaN(result[0])` or `result[0] <op> <number>`.
fn condition_holds(condition: &str, result: f64) -> bool {
    condition
        .split("&&")
        .map(str::trim)
        .all(|clause| match clause {
            "isNaN(result[0])" => result.is_nan(),
            "!isNaN(result[0])" => !result.is_nan(),
            _ => {
                let rest = clause
                    .strip_prefix("result[0]")
                    .unwrap_or_else(|| panic!("unsupported clause {clause:?}"))
                    .trim();
                let (op, number) = [">=", "<=", "==", ">", "<"]
                    .iter()
                    .find_map(|op| rest.strip_prefix(op).map(|n| (*op, n.trim())))
                    .unwrap_or_else(|| panic!("unsupported clause {clause:?}"));
                let number: f64 = number.parse().unwrap();
                match op {
                    ">=" => result >= number,
                    "<=" => result <= number,
                    "==" => result == number,
                    ">" => result > number,
                    "<" => result < number,
                    _ => unreachable!(),
                }
            }
        })
}

fn verdict(metric: &crds::AnalysisMetric, result: f64) -> Verdict {
    let success = metric
        .success_condition
        .as_deref()
        .is_none_or(|c| condition_holds(c, result));
    let failure = metric
        .failure_condition
        .as_deref()
        .is_some_and(|c| condition_holds(c, result));
    if failure {
        Verdict::Failed
    } else if success {
        Verdict::Successful
    } else {
        Verdict::Inconclusive
    }
}

fn series(name: &str, labels: &str, values: &str) -> Value {
    json!({"series": format!("{name}{{{labels}}}"), "values": values})
}

/// Sample traffic for one pod template hash of order-service: `ok` and `errors` requests a
/// minute, and latency buckets filled as `buckets` (le, cumulative count a minute).
fn traffic(hash: &str, ok: u32, errors: u32, buckets: &[(&str, u32)]) -> Vec<Value> {
    let base = format!(
        r#"service="order-service", rollouts_pod_template_hash="{hash}", route="/api/flash-sale/order/create", method="POST""#
    );
    let mut out = vec![
        series(
            "http_requests_total",
            &format!(r#"{base}, status="202""#),
            &format!("0+{ok}x10"),
        ),
        series(
            "http_requests_total",
            &format!(r#"{base}, status="503""#),
            &format!("0+{errors}x10"),
        ),
    ];
    for (le, count) in buckets {
        out.push(series(
            "http_request_duration_seconds_bucket",
            &format!(r#"{base}, status="202", le="{le}""#),
            &format!("0+{count}x10"),
        ));
    }
    out
}

#[test]
fn the_canary_analysis_promotes_a_good_canary_aborts_a_bad_one_and_waits_on_no_data() {
    let fast = [
        ("0.1", 90),
        ("0.25", 100),
        ("0.5", 100),
        ("1", 100),
        ("+Inf", 100),
    ];
    let slow = [
        ("0.1", 10),
        ("0.25", 20),
        ("0.5", 90),
        ("1", 100),
        ("+Inf", 100),
    ];
    // The stable pods misbehave on purpose: the analysis must look at the canary only.
    let mut input = traffic("stable0", 500, 500, &slow);
    input.extend(traffic("good1", 597, 3, &fast));
    input.extend(traffic("bad2", 540, 60, &slow));
    // A canary that answers nothing but (fast) 5xx: it has no non-5xx series at all, which a
    // success-rate query built on the non-5xx series turns into NaN (inconclusive, not failed).
    let dead = r#"service="order-service", rollouts_pod_template_hash="dead4", route="/api/flash-sale/order/create", method="POST", status="503""#;
    input.push(series("http_requests_total", dead, "0+600x10"));
    for (le, count) in &fast {
        input.push(series(
            "http_request_duration_seconds_bucket",
            &format!(r#"{dead}, le="{le}""#),
            &format!("0+{count}x10"),
        ));
    }
    // (canary hash, expected success rate, expected P99, expected verdict)
    let cases = [
        ("good1", 0.995, 0.235, Verdict::Successful),
        ("bad2", 0.9, 0.95, Verdict::Failed),
        ("dead4", 0.0, 0.235, Verdict::Failed),
        ("absent3", f64::NAN, f64::NAN, Verdict::Inconclusive),
    ];
    let mut expr_tests = Vec::new();
    let mut metrics = BTreeMap::new();
    for (hash, success_rate, p99, _) in &cases {
        let queries = analysis_queries(&BTreeMap::from([
            ("service", "order-service"),
            ("canary-hash", *hash),
        ]));
        for (name, expected) in [("success-rate", success_rate), ("p99-latency", p99)] {
            let (query, metric) = &queries[name];
            // promtool compares samples exactly, and rates carry rounding errors: the check is
            // made in PromQL instead, 1 when the value is the expected one (or NaN when NaN is
            // expected, NaN being the one value unequal to itself).
            let check = if expected.is_nan() {
                format!("({query}) != bool ({query})")
            } else {
                format!("abs(({query}) - {expected}) < bool 1e-9")
            };
            expr_tests.push(json!({"expr": check, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 1}]}));
            metrics.insert(name, metric.clone());
        }
    }
    let file = scratch_dir!("canary-analysis").join("analysis_test.yaml");
    let test = json!({
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input, "promql_expr_test": expr_tests}]
    });
    std::fs::write(&file, to_yaml(&test)).unwrap();
    let report = promtool(&["test", "rules"], &file);
    assert!(report.contains("SUCCESS"), "{report}");
    // promtool confirmed the values; now the template's conditions decide.
    for (hash, success_rate, p99, expected) in cases {
        let verdicts = [
            verdict(&metrics["success-rate"], success_rate),
            verdict(&metrics["p99-latency"], p99),
        ];
        // Argo fails the analysis run when any metric fails; otherwise any inconclusive
        // metric makes it inconclusive.
        let overall = if verdicts.contains(&Verdict::Failed) {
            Verdict::Failed
        } else if verdicts.contains(&Verdict::Inconclusive) {
            Verdict::Inconclusive
        } else {
            Verdict::Successful
        };
        assert_eq!(
            overall, expected,
            "canary {hash}: {verdicts:?}, expected {expected:?}"
        );
    }
    // Each metric can fail on its own: a canary with no errors but slow answers is aborted.
    assert_eq!(verdict(&metrics["success-rate"], 1.0), Verdict::Successful);
    assert_eq!(verdict(&metrics["p99-latency"], 0.5), Verdict::Failed);
}
