//! The metric names a PromQL expression reads, from its syntax tree as the `promql-parser`
//! crate (a port of Prometheus's own parser) builds it: an expression that does not parse is an
//! error, and labels, functions, keywords and literals are never mistaken for metrics.

use std::collections::BTreeSet;

use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};

/// Collects the metric name of every selector it visits.
struct MetricNames(BTreeSet<String>);

impl ExprVisitor for MetricNames {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let selector = match expr {
            Expr::VectorSelector(selector) => selector,
            Expr::MatrixSelector(matrix) => &matrix.vs,
            _ => return Ok(true),
        };
        // `{__name__=~"..."}` reads metrics no name check could vouch for.
        let name = selector.name.clone();
        let name = name.ok_or_else(|| format!("a selector without a metric name: {selector}"))?;
        self.0.insert(name);
        Ok(true)
    }
}

/// Parses `expr` and returns the metric names it reads.
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let ast = parser::parse(expr)?;
    let mut names = MetricNames(BTreeSet::new());
    walk_expr(&mut names, &ast)?;
    Ok(names.0)
}

#[cfg(test)]
mod tests {
    use super::metric_names;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).unwrap().into_iter().collect()
    }

    #[test]
    fn finds_the_metrics_of_both_sides_and_nothing_else() {
        let expr = r#"histogram_quantile(0.99, sum by (service, le) (rate(http_request_duration_seconds_bucket{status=~"5..", route="/a{b}"}[5m]))) > 0.5"#;
        assert_eq!(names(expr), ["http_request_duration_seconds_bucket"]);
        let expr = r#"max by (pod) (process_resident_memory_bytes) / on (namespace, pod) group_left () sum by (pod) (kube_pod_container_resource_limits{resource="memory"} offset 1m) > 0.85 or vector(NaN)"#;
        let both = [
            "kube_pod_container_resource_limits",
            "process_resident_memory_bytes",
        ];
        assert_eq!(names(expr), both);
    }

    #[test]
    fn an_invalid_expression_is_an_error() {
        assert!(metric_names("sum(rate(http_requests_total[5m])").is_err());
        assert!(
            metric_names("rate(http_requests_total)").is_err(),
            "rate of an instant vector"
        );
        assert!(metric_names(r#"{__name__=~"http_.*"}"#).is_err());
    }
}
