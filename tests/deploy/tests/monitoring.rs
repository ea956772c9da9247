//! The monitoring bundle: the rule file passes `promtool check rules` and its unit tests, every
//! alert is tested firing and silent, the PrometheusRule is generated from the rule file, the
//! dashboard is well formed, every query parses as PromQL and reads only known metrics, no query
//! names a namespace (the rules keep namespaces apart and find the system's by the label the
//! ServiceMonitors put on its targets, the dashboard shows the one its `$namespace` variable
//! picks), and the canary analysis queries and conditions reach the right verdicts on sample
//! data. The alerts' thresholds and the dashboard's panels are pinned by the render snapshots
//! (the PrometheusRule and the dashboard's ConfigMap are part of the staging and production
//! output).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use deploy_tests::manifest::{Overlay, array_at, selector_matches, str_at, to_yaml};
use deploy_tests::{contracts, promql, repo_path, scratch_dir, tools};
use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, LabelModifier};
use promql_parser::util::{ExprVisitor, walk_expr};
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

/// The gateway's flow-control metrics (docs/gateway.md, "Metrics"), which the dashboard's
/// flow-control row reads.
const GATEWAY_FLOW_METRICS: [&str; 4] = [
    "gateway_flow_passed_total",
    "gateway_flow_blocked_total",
    "gateway_flow_in_flight",
    "gateway_circuit_state",
];

/// The gateway's admission metrics (docs/waiting-room.md; docs/gateway.md, "Metrics"), which
/// the dashboard's waiting-room row and the waiting-room alerts read. Not yet in
/// docs/contracts.md's list; once they are, this list can go.
const GATEWAY_ADMISSION_METRICS: [&str; 6] = [
    "gateway_waiting_room_waiting",
    "gateway_waiting_room_admitted_total",
    "gateway_waiting_room_wait_seconds_bucket",
    "gateway_admission_refused_total",
    "gateway_admission_passes_total",
    "gateway_admission_redis_failures_total",
];

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

fn yaml_value(text: &str) -> Value {
    serde_yaml::from_str(text).expect("valid YAML")
}

/// Every alerting rule of the rule file.
fn alerts() -> Vec<Value> {
    let rules = yaml_value(&read(RULES));
    let groups = array_at(&rules, "/groups").iter();
    let rules = groups.flat_map(|group| array_at(group, "/rules")).cloned();
    rules.filter(|rule| rule.get("alert").is_some()).collect()
}

fn promtool(args: &[&str], file: &Path) -> String {
    let mut command = Command::new(tools::require("promtool"));
    command.args(args).arg(file);
    tools::run_ok(&mut command).unwrap_or_else(|e| panic!("{e:#}"))
}

// ------------------------------------------------------------------------------ the rules

#[test]
fn promtool_checks_the_rule_file_and_its_unit_tests_pass() {
    // promtool parses the file strictly: an unknown field is an error, not ignored.
    let report = promtool(&["check", "rules"], &repo_path(RULES));
    let found = format!("SUCCESS: {} rules found", alerts().len());
    assert!(report.contains(&found), "{report}");
    let report = promtool(&["test", "rules"], &repo_path(RULE_TESTS));
    assert!(report.contains("SUCCESS"), "{report}");
}

#[test]
fn every_alert_is_unit_tested_firing_and_silent_and_says_what_it_means() {
    let tests = yaml_value(&read(RULE_TESTS));
    let (mut firing, mut silent) = (BTreeSet::new(), BTreeSet::new());
    let cases = array_at(&tests, "/tests").iter();
    for case in cases.flat_map(|t| array_at(t, "/alert_rule_test")) {
        let name = case["alertname"].as_str().unwrap().to_owned();
        let fires = !array_at(case, "/exp_alerts").is_empty();
        if fires { &mut firing } else { &mut silent }.insert(name);
    }
    let mut names = BTreeSet::new();
    for rule in alerts() {
        let name = rule["alert"].as_str().unwrap().to_owned();
        assert!(firing.contains(&name), "{name} is never tested firing");
        assert!(silent.contains(&name), "{name} is never tested silent");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        let severities = ["info", "warning", "critical"];
        assert!(severities.contains(&severity), "{name}: severity");
        for annotation in ["summary", "description"] {
            let given = rule["annotations"].get(annotation).is_some();
            assert!(given, "{name}: no {annotation}");
        }
        names.insert(name);
    }
    let tested: BTreeSet<String> = firing.union(&silent).cloned().collect();
    assert_eq!(tested, names, "the tests name alerts that do not exist");
}

#[test]
fn the_prometheus_rule_is_generated_from_the_rule_file() {
    let expected = json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "flash-sale", "labels": {"app.kubernetes.io/name": "flash-sale-rules"}},
        "spec": yaml_value(&read(RULES)),
    });
    let path = repo_path(PROMETHEUS_RULE);
    let current = std::fs::read_to_string(&path).map(|text| yaml_value(&text));
    let current = current.unwrap_or(Value::Null);
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
        let shipped = rule.pointer("/spec") == expected.get("spec");
        assert!(shipped, "{}: another PrometheusRule", overlay.name());
    }
}

// ------------------------------------------------------------------------------ dashboard

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("dashboard.json is JSON")
}

fn panel_exprs(panel: &Value) -> impl Iterator<Item = &str> {
    let targets = array_at(panel, "/targets").iter();
    targets.filter_map(|t| t["expr"].as_str())
}

/// A dashboard query as Prometheus would get it from Grafana.
fn as_promql(expr: &str) -> String {
    let expr = expr.replace("$__rate_interval", "1m");
    expr.replace("$activity", ".*")
}

#[test]
fn the_dashboard_is_well_formed() {
    let dashboard = dashboard();
    let mut variables = array_at(&dashboard, "/templating/list").iter();
    let datasource = variables.any(|v| v["name"] == "datasource");
    assert!(datasource, "a datasource variable");
    let (mut ids, mut cells) = (BTreeSet::new(), BTreeSet::new());
    for panel in array_at(&dashboard, "/panels") {
        let title = panel["title"].as_str().unwrap_or_default();
        let unique = ids.insert(panel["id"].as_i64().expect("panel id"));
        assert!(unique, "duplicate panel id in {title}");
        let grid = |key: &str| panel["gridPos"][key].as_i64().unwrap();
        let (x, y, w, h) = (grid("x"), grid("y"), grid("w"), grid("h"));
        let inside = x >= 0 && w > 0 && x + w <= 24;
        assert!(inside, "{title}: outside the 24 columns");
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "{title} overlaps another panel");
        }
        if panel["type"] != "row" {
            let datasource = &panel["datasource"]["uid"];
            assert_eq!(datasource, "${datasource}", "{title}: datasource");
            assert!(panel_exprs(panel).next().is_some(), "{title}: no query");
            let described = panel["description"].as_str().is_some_and(|d| !d.is_empty());
            assert!(described, "{title}: no description");
        }
    }
}

// ------------------------------------------------------- found by a default kube-prometheus-stack

/// The Helm release name of a default `helm install kube-prometheus-stack
/// prometheus-community/kube-prometheus-stack`: its Prometheus selects ServiceMonitors and
/// PrometheusRules by `release: <release name>` (`serviceMonitorSelectorNilUsesHelmValues`,
/// `ruleSelectorNilUsesHelmValues`, both true by default). `monitoring/kustomization.yaml` sets
/// it; docs/kubernetes.md says how to change it.
const PROMETHEUS_RELEASE: &str = "kube-prometheus-stack";

#[test]
fn prometheus_and_grafana_of_a_default_kube_prometheus_stack_pick_the_monitoring_up() {
    for overlay in [Overlay::Staging, Overlay::Production] {
        let rendered = overlay.rendered();
        let context = overlay.name();
        let selected: Vec<_> = rendered
            .objects
            .iter()
            .filter(|o| matches!(o.kind(), "ServiceMonitor" | "PrometheusRule"))
            .collect();
        assert!(
            selected.len() >= 2,
            "{context}: ServiceMonitors and a PrometheusRule"
        );
        for object in selected {
            let release = object.labels().get("release").cloned();
            let id = object.id();
            assert_eq!(
                release.as_deref(),
                Some(PROMETHEUS_RELEASE),
                "{context}: {id}"
            );
        }
        // Grafana's dashboard sidecar, as kube-prometheus-stack configures it: ConfigMaps
        // labelled grafana_dashboard="1", in every namespace (`searchNamespace: ALL`).
        let dashboards: Vec<_> = rendered
            .of_kind("ConfigMap")
            .filter(|c| c.labels().get("grafana_dashboard").map(String::as_str) == Some("1"))
            .collect();
        assert_eq!(dashboards.len(), 1, "{context}: one dashboard ConfigMap");
        let dashboard = dashboards[0];
        assert_eq!(dashboard.name(), "flash-sale-dashboard", "{context}");
        let json = dashboard
            .pointer("/data/flash-sale.json")
            .and_then(Value::as_str);
        assert_eq!(
            json.map(str::trim),
            Some(read(DASHBOARD).trim()),
            "{context}"
        );
    }
}

// ------------------------------------------------------------------- every query, checked

/// The canary analysis metrics with their queries' arguments filled in, by name.
fn analysis_metrics(args: &[(&str, &str)]) -> BTreeMap<String, (String, Value)> {
    let rendered = Overlay::Production.rendered();
    let template = rendered.get("AnalysisTemplate", "flash-sale-canary");
    let metrics = array_at(&template.0, "/spec/metrics").iter();
    let filled = metrics.map(|metric| {
        let query = metric["provider"]["prometheus"]["query"].as_str();
        let mut query = query.unwrap().to_owned();
        for (name, value) in args {
            query = query.replace(&format!("{{{{args.{name}}}}}"), value);
        }
        let name = metric["name"].as_str().unwrap().to_owned();
        assert!(!query.contains("{{"), "{name}: an argument is left");
        (name, (query, metric.clone()))
    });
    filled.collect()
}

/// Every PromQL expression the bundle holds, with where it comes from: rules, dashboard, canary
/// analysis.
fn every_query() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for rule in alerts() {
        let expr = rule["expr"].as_str().unwrap().to_owned();
        queries.push((format!("alert {}", rule["alert"]), expr));
    }
    for panel in array_at(&dashboard(), "/panels") {
        for expr in panel_exprs(panel) {
            queries.push((format!("panel {}", panel["title"]), as_promql(expr)));
        }
    }
    let args = [("service", "order-service"), ("canary-hash", "5d8f7c9b6")];
    for (name, (query, _)) in analysis_metrics(&args) {
        queries.push((format!("analysis {name}"), query));
    }
    queries
}

#[test]
fn every_query_parses_and_reads_only_metrics_a_service_or_a_known_exporter_emits() {
    let contract = contracts::metrics();
    let ours = contract.iter().map(String::as_str);
    let known: BTreeSet<&str> = ours
        .chain(EXTERNAL_METRICS)
        .chain(GATEWAY_FLOW_METRICS)
        .chain(GATEWAY_ADMISSION_METRICS)
        .collect();
    for (context, expr) in every_query() {
        let metrics = promql::metric_names(&expr);
        let metrics = metrics.unwrap_or_else(|e| panic!("{context}: {e}\n{expr}"));
        assert!(!metrics.is_empty(), "{context} reads no metric");
        for metric in metrics {
            let known = known.contains(metric.as_str());
            assert!(
                known,
                "{context} reads {metric}: not in the contract nor an exporter's"
            );
        }
    }
}

// ------------------------------------------------------------------- every namespace

/// The label the ServiceMonitors copy from the Services (`targetLabels`), as Prometheus names
/// it; `up{app_kubernetes_io_part_of="flash-sale"}` marks the namespaces that run the system.
const PART_OF_LABEL: &str = "app_kubernetes_io_part_of";

/// Metrics that describe every pod of the cluster, not only ours.
fn cluster_wide(metric: &str) -> bool {
    metric.starts_with("container_") || metric.starts_with("kube_")
}

/// A label matcher: label, operator (`=`, `!=`, `=~`, `!~`), value.
type Matcher = (String, String, String);

/// A selector: the metric and its matchers.
type Selector = (String, Vec<Matcher>);

/// What a query selects and how it aggregates, read from its syntax tree.
#[derive(Default)]
struct Shape {
    /// Each selector: the metric and its `label op value` matchers.
    selectors: Vec<Selector>,
    /// Each aggregation: its operator, and whether it keeps the `namespace` label.
    aggregations: Vec<(String, bool)>,
    /// Each `and on (namespace)`: the selectors of its right-hand side.
    namespace_joins: Vec<Vec<Selector>>,
}

fn selector_of(expr: &Expr) -> Option<Selector> {
    let selector = match expr {
        Expr::VectorSelector(selector) => selector,
        Expr::MatrixSelector(matrix) => &matrix.vs,
        _ => return None,
    };
    let matchers = selector.matchers.matchers.iter().map(|m| {
        let op = match &m.op {
            MatchOp::Equal => "=",
            MatchOp::NotEqual => "!=",
            MatchOp::Re(_) => "=~",
            MatchOp::NotRe(_) => "!~",
        };
        (m.name.clone(), op.to_owned(), m.value.clone())
    });
    Some((
        selector.name.clone().unwrap_or_default(),
        matchers.collect(),
    ))
}

/// Collects the selectors below an expression.
struct Selectors(Vec<Selector>);

impl ExprVisitor for Selectors {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        self.0.extend(selector_of(expr));
        Ok(true)
    }
}

fn selectors(expr: &Expr) -> Vec<Selector> {
    let mut found = Selectors(Vec::new());
    walk_expr(&mut found, expr).unwrap();
    found.0
}

impl ExprVisitor for Shape {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        self.selectors.extend(selector_of(expr));
        match expr {
            Expr::Aggregate(aggregate) => {
                let keeps = match &aggregate.modifier {
                    Some(LabelModifier::Include(labels)) => {
                        labels.labels.iter().any(|l| l == "namespace")
                    }
                    Some(LabelModifier::Exclude(labels)) => {
                        !labels.labels.iter().any(|l| l == "namespace")
                    }
                    None => false,
                };
                self.aggregations.push((aggregate.op.to_string(), keeps));
            }
            Expr::Binary(binary) if binary.op.to_string() == "and" => {
                let matching = binary.modifier.as_ref().and_then(|m| m.matching.as_ref());
                let on_namespace = matches!(matching, Some(LabelModifier::Include(labels))
                    if labels.labels == ["namespace"]);
                if on_namespace {
                    self.namespace_joins.push(selectors(&binary.rhs));
                }
            }
            _ => {}
        }
        Ok(true)
    }
}

fn shape(expr: &str) -> Shape {
    let ast = parser::parse(expr).unwrap_or_else(|e| panic!("{e}: {expr}"));
    let mut shape = Shape::default();
    walk_expr(&mut shape, &ast).unwrap();
    shape
}

/// Whether a selector is `up{app_kubernetes_io_part_of="flash-sale"}`: our scrape targets.
fn selects_our_targets((metric, matchers): &Selector) -> bool {
    let ours = (
        PART_OF_LABEL.to_owned(),
        "=".to_owned(),
        "flash-sale".to_owned(),
    );
    metric == "up" && matchers.contains(&ours)
}

#[test]
fn no_rule_names_a_namespace_and_each_judges_every_namespace_apart() {
    for rule in alerts() {
        let name = rule["alert"].as_str().unwrap();
        let shape = shape(rule["expr"].as_str().unwrap());
        // Staging's namespace is as good as production's.
        for (metric, matchers) in &shape.selectors {
            let named = matchers.iter().any(|(label, _, _)| label == "namespace");
            assert!(!named, "{name}: {metric} selects a namespace");
        }
        // One namespace's numbers never mix with another's: every sum, maximum and ratio is
        // taken per namespace, and the alert carries it.
        for (op, keeps) in &shape.aggregations {
            assert!(keeps, "{name}: `{op}` drops the namespace");
        }
        // cAdvisor and kube-state-metrics describe the whole cluster: the alert keeps the
        // namespaces that run the system.
        let reads_cluster = shape.selectors.iter().any(|(m, _)| cluster_wide(m));
        if reads_cluster {
            let joined = shape
                .namespace_joins
                .iter()
                .any(|rhs| rhs.iter().any(selects_our_targets));
            assert!(
                joined,
                "{name}: reads every namespace's pods without `and on (namespace)` our targets"
            );
        }
    }
}

#[test]
fn the_dashboard_shows_the_namespace_its_variable_picks_and_lists_ours() {
    let dashboard = dashboard();
    let variables = array_at(&dashboard, "/templating/list");
    let variable = |name: &str| variables.iter().find(|v| v["name"] == name);
    let namespace = variable("namespace").expect("a namespace variable");
    let query = namespace["query"]["query"].as_str().unwrap_or_default();
    let (inner, label) = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .and_then(|q| q.rsplit_once(','))
        .unwrap_or_else(|| panic!("namespace variable: {query}"));
    assert_eq!(label.trim(), "namespace");
    let listed = shape(inner);
    assert!(
        listed.selectors.iter().all(selects_our_targets),
        "the namespace variable lists other namespaces: {query}"
    );
    assert_eq!(namespace["multi"], false, "one environment at a time");
    assert_eq!(namespace["includeAll"], false, "one environment at a time");
    // The other variables list the values of the picked namespace.
    for other in variables
        .iter()
        .filter(|v| v["type"] == "query" && v["name"] != "namespace")
    {
        let query = other["query"]["query"].as_str().unwrap_or_default();
        assert!(
            query.contains("namespace=\"$namespace\""),
            "variable {}: {query}",
            other["name"]
        );
    }
    // Every selector of every panel is limited to it.
    let wanted = (
        "namespace".to_owned(),
        "=".to_owned(),
        "$namespace".to_owned(),
    );
    for panel in array_at(&dashboard, "/panels") {
        for expr in panel_exprs(panel) {
            for (metric, matchers) in shape(&as_promql(expr)).selectors {
                assert!(
                    matchers.contains(&wanted),
                    "panel {}: {metric} is not limited to $namespace",
                    panel["title"]
                );
            }
        }
    }
}

#[test]
fn every_target_we_scrape_is_labelled_part_of_flash_sale() {
    for overlay in [Overlay::Staging, Overlay::Production] {
        let rendered = overlay.rendered();
        let context = overlay.name();
        for monitor in rendered.of_kind("ServiceMonitor") {
            let copied = array_at(&monitor.0, "/spec/targetLabels").iter();
            let copied: Vec<String> = copied
                .filter_map(Value::as_str)
                .map(|l| l.replace(['.', '/', '-'], "_"))
                .collect();
            let id = monitor.id();
            assert!(
                copied.iter().any(|l| l == PART_OF_LABEL),
                "{context}: {id} does not copy app.kubernetes.io/part-of"
            );
            let namespaces = array_at(&monitor.0, "/spec/namespaceSelector/matchNames");
            let services: Vec<_> = rendered
                .of_kind("Service")
                .filter(|s| selector_matches(&monitor.0["spec"]["selector"], &s.labels()))
                .filter(|s| namespaces.iter().any(|n| n.as_str() == s.namespace()))
                .collect();
            assert!(!services.is_empty(), "{context}: {id} scrapes no Service");
            for service in services {
                let part_of = str_at(&service.0, "/metadata/labels/app.kubernetes.io~1part-of");
                assert_eq!(part_of, Some("flash-sale"), "{context}: {}", service.id());
            }
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
    let mut clauses = condition.split("&&").map(str::trim);
    clauses.all(|clause| match clause {
        "isNaN(result[0])" => result.is_nan(),
        "!isNaN(result[0])" => !result.is_nan(),
        _ => {
            let rest = clause.strip_prefix("result[0]").unwrap_or_default().trim();
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
                _ => result < number,
            }
        }
    })
}

fn verdict(metric: &Value, result: f64) -> Verdict {
    let condition = |key: &str| metric[key].as_str().map(|c| condition_holds(c, result));
    if condition("failureCondition").unwrap_or(false) {
        Verdict::Failed
    } else if condition("successCondition").unwrap_or(true) {
        Verdict::Successful
    } else {
        Verdict::Inconclusive
    }
}

fn series(name: &str, labels: &str, values: &str) -> Value {
    json!({"series": format!("{name}{{{labels}}}"), "values": values})
}

/// The latency buckets of the sample traffic, and two ways to fill them (cumulative counts a
/// minute).
const LE: [&str; 5] = ["0.1", "0.25", "0.5", "1", "+Inf"];
const FAST: [u32; 5] = [90, 100, 100, 100, 100];
const SLOW: [u32; 5] = [10, 20, 90, 100, 100];

/// Sample traffic for one pod template hash of a service: requests a minute by status, and the
/// latency buckets of the first status.
fn traffic(service: &str, hash: &str, statuses: &[(&str, u32)], buckets: [u32; 5]) -> Vec<Value> {
    let route = r#"route="/api/flash-sale/order/create", method="POST""#;
    let base = format!(r#"service="{service}", rollouts_pod_template_hash="{hash}", {route}"#);
    let mut out = Vec::new();
    for (status, rate) in statuses {
        let labels = format!(r#"{base}, status="{status}""#);
        out.push(series(
            "http_requests_total",
            &labels,
            &format!("0+{rate}x10"),
        ));
    }
    for (le, count) in LE.iter().zip(buckets) {
        let labels = format!(r#"{base}, status="{}", le="{le}""#, statuses[0].0);
        let values = format!("0+{count}x10");
        out.push(series(
            "http_request_duration_seconds_bucket",
            &labels,
            &values,
        ));
    }
    out
}

#[test]
fn the_canary_analysis_promotes_a_good_canary_aborts_a_bad_one_and_waits_on_no_data() {
    // The queries select the canary's pods by the label the ServiceMonitor copies from them.
    let rendered = Overlay::Production.rendered();
    let monitor = rendered.get("ServiceMonitor", "flash-sale-services");
    let copied = array_at(&monitor.0, "/spec/podTargetLabels").iter();
    let mut copied = copied.map(|l| l.as_str().unwrap().replace(['-', '.', '/'], "_"));
    let copies = copied.any(|label| label == "rollouts_pod_template_hash");
    assert!(
        copies,
        "the ServiceMonitor does not copy the pod template hash"
    );

    let mixed = |service, hash, ok, errors, buckets| {
        traffic(service, hash, &[("202", ok), ("503", errors)], buckets)
    };
    // The stable pods, and another service's pods of the same hash, misbehave on purpose: the
    // analysis must look at the canary of its own service only.
    let mut input = mixed("order-service", "stable0", 500, 500, SLOW);
    input.extend(mixed("gateway", "good1", 0, 600, SLOW));
    input.extend(mixed("order-service", "good1", 597, 3, FAST));
    input.extend(mixed("order-service", "bad2", 540, 60, SLOW));
    // A canary that answers nothing but (fast) 5xx: it has no non-5xx series at all.
    input.extend(self::traffic(
        "order-service",
        "dead4",
        &[("503", 600)],
        FAST,
    ));
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
        let queries = analysis_metrics(&[("service", "order-service"), ("canary-hash", hash)]);
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
        let success_rate = verdict(&metrics["success-rate"], success_rate);
        let verdicts = [success_rate, verdict(&metrics["p99-latency"], p99)];
        // Argo fails the analysis run when any metric fails; otherwise any inconclusive
        // metric makes it inconclusive.
        let overall = [Verdict::Failed, Verdict::Inconclusive]
            .into_iter()
            .find(|v| verdicts.contains(v))
            .unwrap_or(Verdict::Successful);
        assert_eq!(overall, expected, "canary {hash}: {verdicts:?}");
    }
    // Each metric can fail on its own: a canary with no errors but slow answers is aborted.
    assert_eq!(verdict(&metrics["success-rate"], 1.0), Verdict::Successful);
    assert_eq!(verdict(&metrics["p99-latency"], 0.5), Verdict::Failed);
}
