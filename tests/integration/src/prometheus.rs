//! Prometheus for the tests and the activity report: [`PrometheusServer`] runs a private
//! Debian `prometheus` on a free 127.0.0.1 port, scraping given targets every second, its TSDB
//! in a temporary directory, killed (by its own pid) on drop; [`PrometheusApi`] is the small
//! client of the HTTP API (`/api/v1/query`, `/api/v1/query_range`, `/api/v1/targets`) that the
//! activity report and the tests read it with.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::stack::{find_program, free_port};

/// The program, from Debian's `prometheus` package.
pub const PROGRAM: &str = "prometheus";

/// The `prometheus` program, or an error saying to run `cargo xtask setup`.
pub fn program() -> anyhow::Result<PathBuf> {
    find_program(PROGRAM).with_context(|| {
        format!(
            "`{PROGRAM}` is not installed; `cargo xtask setup` installs it (Debian's prometheus package)"
        )
    })
}

/// How often the private server scrapes its targets.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// One `/metrics` endpoint to scrape.
#[derive(Debug, Clone)]
pub struct ScrapeTarget {
    /// The `service` label every series of the target gets: the same label the monitoring
    /// bundle's ServiceMonitors give (`gateway`, `order-service`, `inventory-service`), so the
    /// report's queries read a private server and a cluster's alike.
    pub service: String,
    /// `http://host:port` of the management listener; `/metrics` is scraped.
    pub management_url: String,
}

/// A private Prometheus server, stopped on drop.
pub struct PrometheusServer {
    pub base_url: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Starts the server and waits (at most 30 s) until `/-/ready` says it is ready. Without
    /// `prometheus` installed, the error says to run `cargo xtask setup`.
    pub async fn start(targets: &[ScrapeTarget]) -> anyhow::Result<Self> {
        let program = program()?;
        let dir = tempfile::Builder::new()
            .prefix("flash-sale-prometheus-")
            .tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_text(targets)?)?;
        // The port was free a moment ago; another process may take it first, and then this
        // server exits at once and the next try takes another port.
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            let log = dir.path().join(format!("prometheus-{port}.log"));
            let mut child = Command::new(&program)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log)?)
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .with_context(|| format!("starting {}", program.display()))?;
            let base_url = format!("http://127.0.0.1:{port}");
            match wait_ready(&base_url, &mut child, &log, targets.len()).await {
                Ok(()) => {
                    return Ok(Self {
                        base_url,
                        child,
                        log,
                        _dir: dir,
                    });
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("three tries failed"))
    }

    /// What the server logged (at `warn`).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn api(&self) -> PrometheusApi {
        PrometheusApi::new(&self.base_url)
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the child answers `/-/ready` and has scraped each of its `targets` once with
/// success (at most 30 s; its discovery takes about 5 s); a child that exits fails at once.
async fn wait_ready(
    base_url: &str,
    child: &mut Child,
    log: &Path,
    targets: usize,
) -> anyhow::Result<()> {
    let http = crate::apps::http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "prometheus exited with {status} before it was ready:\n{}",
                log_text()
            );
        }
        // Only this child's answer counts: it is alive and says it is Prometheus.
        if let Ok(res) = http.get(format!("{base_url}/-/ready")).send().await
            && res.status().is_success()
            && res.text().await.is_ok_and(|t| t.contains("Prometheus"))
        {
            let up = PrometheusApi::new(base_url).targets_up().await;
            if up.is_ok_and(|n| n >= targets) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "prometheus was not ready, or had not scraped its {targets} targets, at {base_url} within 30 s:\n{}",
                log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The configuration file: one job per target, scraped every [`SCRAPE_INTERVAL`].
fn config_text(targets: &[ScrapeTarget]) -> anyhow::Result<String> {
    let secs = SCRAPE_INTERVAL.as_secs();
    let mut text = format!(
        "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\nscrape_configs:\n"
    );
    for target in targets {
        let address = target
            .management_url
            .strip_prefix("http://")
            .with_context(|| format!("not an http:// URL: {}", target.management_url))?
            .trim_end_matches('/');
        // JSON strings are YAML strings: no quoting rules to get wrong.
        let _ = write!(
            text,
            "  - job_name: {job}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{address}]\n        labels: {{service: {job}}}\n",
            job = Value::from(target.service.as_str()),
            address = Value::from(address),
        );
    }
    Ok(text)
}

/// One series of an answer: its labels and its points (unix seconds, value).
#[derive(Debug, Clone, Default)]
pub struct PromSeries {
    pub labels: serde_json::Map<String, Value>,
    pub points: Vec<(f64, f64)>,
}

impl PromSeries {
    /// A label's value, `""` when the series has none.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

/// The HTTP API of one Prometheus. Every error names the URL: one that cannot be reached, an
/// HTTP error, and a query Prometheus refuses (with its `errorType` and `error`).
#[derive(Clone)]
pub struct PrometheusApi {
    base_url: String,
    http: reqwest::Client,
}

impl PrometheusApi {
    pub fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            http: crate::apps::http_client(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn get(&self, path: &str, params: &[(&str, String)]) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base_url);
        let res = self
            .http
            .get(&url)
            .query(params)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("Prometheus at {} cannot be reached", self.base_url))?;
        let status = res.status();
        let text = res
            .text()
            .await
            .with_context(|| format!("reading Prometheus' answer from {url}"))?;
        let mut body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let query = params
            .iter()
            .find(|(k, _)| *k == "query")
            .map_or(String::new(), |(_, q)| format!(" to {q}"));
        if body["status"] != "success" {
            let detail = match (body["errorType"].as_str(), body["error"].as_str()) {
                (Some(kind), Some(error)) => format!("{kind}: {error}"),
                _ => text.chars().take(200).collect(),
            };
            bail!(
                "Prometheus at {} answered {status}{query}: {detail}",
                self.base_url
            );
        }
        Ok(body["data"].take())
    }

    /// An instant query at `time` (unix seconds; now if `None`).
    pub async fn query(&self, expr: &str, time: Option<f64>) -> anyhow::Result<Vec<PromSeries>> {
        let mut params = vec![("query", expr.to_owned())];
        if let Some(t) = time {
            params.push(("time", format!("{t:.3}")));
        }
        parse_result(&self.get("/api/v1/query", &params).await?)
    }

    /// A range query from `start` to `end` (unix seconds) every `step`.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: Duration,
    ) -> anyhow::Result<Vec<PromSeries>> {
        let params = [
            ("query", expr.to_owned()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", format!("{:.3}", step.as_secs_f64())),
        ];
        parse_result(&self.get("/api/v1/query_range", &params).await?)
    }

    /// How many active targets the last scrape found up.
    pub async fn targets_up(&self) -> anyhow::Result<usize> {
        let data = self
            .get("/api/v1/targets", &[("state", "active".to_owned())])
            .await?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["health"] == "up")
            .count())
    }

    /// The longest scrape interval among the active targets (`None`: no target says).
    pub async fn scrape_interval(&self) -> anyhow::Result<Option<Duration>> {
        let data = self
            .get("/api/v1/targets", &[("state", "active".to_owned())])
            .await?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| parse_duration(t["scrapeInterval"].as_str()?))
            .max())
    }
}

/// A vector or matrix result as series; a sample that is no finite number (`NaN` of a quantile
/// over no requests, `+Inf`) is left out.
fn parse_result(data: &Value) -> anyhow::Result<Vec<PromSeries>> {
    let kind = data["resultType"].as_str().unwrap_or("");
    let results = data["result"]
        .as_array()
        .with_context(|| format!("Prometheus answered no result list: {data}"))?;
    let point = |p: &Value| -> Option<(f64, f64)> {
        let t = p.get(0)?.as_f64()?;
        let v: f64 = p.get(1)?.as_str()?.parse().ok()?;
        v.is_finite().then_some((t, v))
    };
    results
        .iter()
        .map(|r| {
            let labels = r["metric"].as_object().cloned().unwrap_or_default();
            let points = match kind {
                "vector" => point(&r["value"]).into_iter().collect(),
                "matrix" => r["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(point)
                    .collect(),
                other => {
                    bail!("Prometheus answered a {other:?} result; expected a vector or a matrix")
                }
            };
            Ok(PromSeries { labels, points })
        })
        .collect()
}

/// A Prometheus duration (`15s`, `1m`, `1m30s`, `500ms`).
fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit] {
            "ms" => {
                total += Duration::from_millis(n);
                rest = &rest[unit..];
                continue;
            }
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 604_800,
            "y" => 31_536_000,
            _ => return None,
        };
        total += Duration::from_secs(n * secs);
        rest = &rest[unit..];
    }
    (!total.is_zero()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_prometheus_writes_them() {
        assert_eq!(parse_duration("15s"), Some(Duration::from_secs(15)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1x"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn the_config_gives_each_target_its_service_label() {
        let text = config_text(&[ScrapeTarget {
            service: "gateway".into(),
            management_url: "http://127.0.0.1:4000".into(),
        }])
        .unwrap();
        assert!(text.contains("job_name: \"gateway\""), "{text}");
        assert!(text.contains("targets: [\"127.0.0.1:4000\"]"), "{text}");
        assert!(text.contains("labels: {service: \"gateway\"}"), "{text}");
    }

    #[test]
    fn non_finite_samples_are_left_out() {
        let data = serde_json::json!({"resultType": "matrix", "result": [
            {"metric": {"status": "202"}, "values": [[1.0, "2"], [2.0, "NaN"], [3.0, "+Inf"], [4.0, "5"]]}
        ]});
        let series = parse_result(&data).unwrap();
        assert_eq!(series[0].points, [(1.0, 2.0), (4.0, 5.0)]);
        assert_eq!(series[0].label("status"), "202");
    }
}
