//! The metric names a PromQL expression reads.
//!
//! Not a parser (promtool checks the syntax); a scanner good enough for the expressions of this
//! bundle: it drops string literals, label matchers in braces, the label lists of `by`,
//! `without`, `on`, `ignoring`, `group_left` and `group_right`, function names (an identifier
//! followed by `(`), aggregation operators (also when `by (...)` comes between them and their
//! argument), keywords and numbers. What is left is a metric name.

use std::collections::BTreeSet;

const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "NaN",
    "Inf",
    "nan",
    "inf",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names `expr` reads.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_next_parens = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i = skip_string(&chars, i);
            }
            '{' => {
                i = skip_until(&chars, i, '}');
            }
            '[' => {
                i = skip_until(&chars, i, ']');
            }
            '(' if skip_next_parens => {
                skip_next_parens = false;
                i = skip_until(&chars, i, ')');
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
                if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                    skip_next_parens = next == Some('(');
                } else if next == Some('(') || KEYWORDS.contains(&word.as_str()) {
                    // A function call or a keyword.
                } else {
                    names.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (5m, 1e3, 0.99).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    i
}

fn skip_until(chars: &[char], start: usize, close: char) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i),
            c if c == close => return i + 1,
            _ => i += 1,
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::metric_names;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).into_iter().collect()
    }

    #[test]
    fn finds_metrics_and_skips_functions_labels_and_keywords() {
        let expr = r#"histogram_quantile(0.99, sum by (service, le) (rate(http_request_duration_seconds_bucket{status=~"5..", route="/a{b}"}[5m]))) > 0.5"#;
        assert_eq!(names(expr), ["http_request_duration_seconds_bucket"]);
    }

    #[test]
    fn finds_both_sides_of_a_join() {
        let expr = "max by (pod) (process_resident_memory_bytes) / on (namespace, pod) group_left () sum by (pod) (kube_pod_container_resource_limits{resource=\"memory\"}) > 0.85 or vector(NaN)";
        assert_eq!(
            names(expr),
            [
                "kube_pod_container_resource_limits",
                "process_resident_memory_bytes"
            ]
        );
    }

    #[test]
    fn bare_selectors_and_offsets() {
        assert_eq!(
            names("up{service=\"redis-cluster\"} == 0 or redis_up == 0"),
            ["redis_up", "up"]
        );
        assert_eq!(
            names("delta(redis_slowlog_last_id[5m] offset 1m) > 10"),
            ["redis_slowlog_last_id"]
        );
    }
}
