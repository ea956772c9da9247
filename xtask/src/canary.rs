//! `cargo xtask canary promote`: the production canary's verdict, then promote or abort it.
//!
//! For a Rollout whose canary is running, the command asks Prometheus (its HTTP API,
//! `/api/v1/query`) for the canary's and the stable's request count, success rate (the non-5xx
//! share of `http_requests_total`) and P99 (`histogram_quantile(0.99, ...)` over
//! `http_request_duration_seconds_bucket`), prints them side by side with the thresholds, and
//! decides:
//!
//! - **promote** when the canary meets every threshold: `kubectl argo rollouts promote`;
//! - **abort** when it misses one: `kubectl argo rollouts abort` (the rollout scales the canary
//!   away), and the command fails;
//! - **inconclusive** when the canary served too few requests to judge: nothing is changed and
//!   the command fails, so a human looks.
//!
//! Canary and stable pods are told apart as in the production overlay: the ServiceMonitor copies
//! the pod label `rollouts-pod-template-hash` onto every series (Prometheus spells it
//! [`HASH_LABEL`]) next to `service`, and the AnalysisTemplate selects the canary by that label.
//! The two hashes come from the Rollout's status (`status.currentPodHash` is the canary,
//! `status.stableRS` the stable) unless `--canary-hash` and `--stable-hash` give them. The
//! default thresholds are the AnalysisTemplate's (the seed's targets).
//!
//! The integration suite (`tests/integration/tests/api/canary.rs`) compiles this file too and
//! runs it against a real Prometheus scraping real services, with a stand-in kubectl; so this
//! module uses nothing from the rest of xtask.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

/// The label holding the pod-template hash on every series of our services: the ServiceMonitor's
/// `podTargetLabels: [rollouts-pod-template-hash]`, as Prometheus spells label names.
pub(crate) const HASH_LABEL: &str = "rollouts_pod_template_hash";

/// Where the production overlay's AnalysisTemplate finds Prometheus.
const DEFAULT_PROMETHEUS_URL: &str = "http://prometheus-operated.monitoring.svc:9090";
/// The Rollout that ends on a manual gate.
const DEFAULT_ROLLOUT: &str = "order-service";
const DEFAULT_NAMESPACE: &str = "flash-sale";

/// What a canary must meet to be promoted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Thresholds {
    /// Lowest passing success rate (AnalysisTemplate: `result[0] >= 0.99`).
    pub(crate) min_success_rate: f64,
    /// P99 must be below this many seconds (AnalysisTemplate: `result[0] < 0.5`).
    pub(crate) max_p99_seconds: f64,
    /// Fewer canary requests than this in the window cannot be judged.
    pub(crate) min_requests: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_success_rate: 0.99,
            max_p99_seconds: 0.5,
            min_requests: 100.0,
        }
    }
}

/// The command's settings, from flags with environment fallbacks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Options {
    pub(crate) prometheus_url: String,
    pub(crate) rollout: String,
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) kubectl: String,
    /// Both hashes, or `None` to read them from the Rollout.
    pub(crate) hashes: Option<Hashes>,
    pub(crate) window: String,
    pub(crate) thresholds: Thresholds,
    pub(crate) dry_run: bool,
}

/// The pod-template hashes of the canary and the stable ReplicaSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hashes {
    pub(crate) canary: String,
    pub(crate) stable: String,
}

/// One side's numbers over the window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Measurement {
    /// Requests answered (`increase` of `http_requests_total`); 0 without series.
    pub(crate) requests: f64,
    /// The non-5xx share; `None` without requests.
    pub(crate) success_rate: Option<f64>,
    /// P99 in seconds; `None` without requests.
    pub(crate) p99_seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Promote,
    Abort,
    Inconclusive,
}

impl Verdict {
    /// The `kubectl argo rollouts` action the verdict calls for.
    fn action(self) -> Option<&'static str> {
        match self {
            Verdict::Promote => Some("promote"),
            Verdict::Abort => Some("abort"),
            Verdict::Inconclusive => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    pub(crate) verdict: Verdict,
    /// Why: every check for a promotion, the failed ones for an abort, what is missing otherwise.
    pub(crate) reasons: Vec<String>,
}

/// The verdict on a canary's numbers: a pure function, as Argo Rollouts judges a measurement
/// (a failed condition wins; no data is neither success nor failure), with one addition: a canary
/// that served fewer than `min_requests` requests is not judged at all.
pub(crate) fn decide(canary: &Measurement, thresholds: &Thresholds) -> Decision {
    if canary.requests.is_nan() || canary.requests < thresholds.min_requests {
        return Decision {
            verdict: Verdict::Inconclusive,
            reasons: vec![format!(
                "the canary served {} requests in the window, fewer than the {} needed to judge it",
                count(canary.requests),
                count(thresholds.min_requests)
            )],
        };
    }
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    let mut missing = Vec::new();
    match canary.success_rate {
        Some(rate) if rate >= thresholds.min_success_rate => passed.push(format!(
            "success rate {} >= {}",
            percent(rate),
            percent(thresholds.min_success_rate)
        )),
        Some(rate) => failed.push(format!(
            "success rate {} < {}",
            percent(rate),
            percent(thresholds.min_success_rate)
        )),
        None => missing.push("no success rate".to_owned()),
    }
    match canary.p99_seconds {
        Some(p99) if p99 < thresholds.max_p99_seconds => passed.push(format!(
            "P99 {} < {}",
            millis(p99),
            millis(thresholds.max_p99_seconds)
        )),
        Some(p99) => failed.push(format!(
            "P99 {} >= {}",
            millis(p99),
            millis(thresholds.max_p99_seconds)
        )),
        None => missing.push("no P99 (no latency buckets)".to_owned()),
    }
    if !failed.is_empty() {
        Decision {
            verdict: Verdict::Abort,
            reasons: failed,
        }
    } else if !missing.is_empty() {
        Decision {
            verdict: Verdict::Inconclusive,
            reasons: missing,
        }
    } else {
        Decision {
            verdict: Verdict::Promote,
            reasons: passed,
        }
    }
}

/// What one run found and did.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) options: Options,
    pub(crate) hashes: Hashes,
    pub(crate) canary: Measurement,
    pub(crate) stable: Measurement,
    pub(crate) decision: Decision,
    /// The kubectl command the verdict calls for (run unless `--dry-run`).
    pub(crate) command: Option<Vec<String>>,
}

/// `cargo xtask canary <subcommand>`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Compares a running canary with the stable version in Prometheus, prints the comparison
    /// and the verdict, then promotes (`kubectl argo rollouts promote`) or aborts (`kubectl argo
    /// rollouts abort`) the Rollout. Exits non-zero unless the canary was promoted.
    Promote(PromoteArgs),
}

pub(crate) fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Promote(args) => {
            let options = options(args, &|name| std::env::var(name).ok())?;
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(promote(&options))?;
            verdict_status(&outcome)
        }
    }
}

/// The command's exit: success only for a promotion.
pub(crate) fn verdict_status(outcome: &Outcome) -> anyhow::Result<()> {
    let reasons = outcome.decision.reasons.join("; ");
    let dry = if outcome.options.dry_run {
        " (dry run: nothing was changed)"
    } else {
        ""
    };
    match outcome.decision.verdict {
        Verdict::Promote => Ok(()),
        Verdict::Abort => bail!("the canary failed its analysis and is aborted{dry}: {reasons}"),
        Verdict::Inconclusive => bail!(
            "the canary cannot be judged yet, nothing was changed: {reasons}; wait for traffic \
             or promote or abort it by hand"
        ),
    }
}

/// `cargo xtask canary promote`'s flags. Those that name where things are fall back to the
/// environment (`PROMETHEUS_URL`, `ROLLOUT`, `NAMESPACE`, `KUBECTL`), then to the production
/// overlay's values.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct PromoteArgs {
    /// The Rollout (env ROLLOUT; default order-service).
    #[arg(long)]
    rollout: Option<String>,
    /// Its namespace (env NAMESPACE; default flash-sale).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// The `service` label of its series (default: the Rollout's name).
    #[arg(long)]
    service: Option<String>,
    /// Prometheus (env PROMETHEUS_URL; default the AnalysisTemplate's,
    /// http://prometheus-operated.monitoring.svc:9090).
    #[arg(long)]
    prometheus_url: Option<String>,
    /// kubectl with the Argo Rollouts plugin (env KUBECTL; default kubectl).
    #[arg(long)]
    kubectl: Option<String>,
    /// The canary's pod-template hash; with --stable-hash, or neither (default: read from the
    /// Rollout's status with kubectl).
    #[arg(long)]
    canary_hash: Option<String>,
    /// The stable version's pod-template hash; with --canary-hash.
    #[arg(long)]
    stable_hash: Option<String>,
    /// How far back to look, a Prometheus duration (default 2m, as the AnalysisTemplate).
    #[arg(long, default_value = "2m")]
    window: String,
    /// Lowest passing non-5xx share.
    #[arg(long, default_value_t = Thresholds::default().min_success_rate)]
    min_success_rate: f64,
    /// P99 must stay below this many seconds.
    #[arg(long = "max-p99", default_value_t = Thresholds::default().max_p99_seconds)]
    max_p99_seconds: f64,
    /// Fewer canary requests in the window: inconclusive.
    #[arg(long, default_value_t = Thresholds::default().min_requests)]
    min_requests: f64,
    /// Print the verdict and the kubectl command, change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Checks the flags, filling in from `env` (the environment) what they leave out.
pub(crate) fn options(
    args: PromoteArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Options> {
    let or_env = |flag: Option<String>, name: &str, default: &str| {
        flag.or_else(|| env(name).filter(|v| !v.trim().is_empty()))
            .unwrap_or_else(|| default.to_owned())
    };
    let prometheus_url = or_env(
        args.prometheus_url,
        "PROMETHEUS_URL",
        DEFAULT_PROMETHEUS_URL,
    );
    let rollout = or_env(args.rollout, "ROLLOUT", DEFAULT_ROLLOUT);
    let namespace = or_env(args.namespace, "NAMESPACE", DEFAULT_NAMESPACE);
    let kubectl = or_env(args.kubectl, "KUBECTL", "kubectl");
    let (service, canary_hash, stable_hash) = (args.service, args.canary_hash, args.stable_hash);
    let (window, dry_run) = (args.window, args.dry_run);
    let thresholds = Thresholds {
        min_success_rate: args.min_success_rate,
        max_p99_seconds: args.max_p99_seconds,
        min_requests: args.min_requests,
    };
    ensure!(
        thresholds.min_success_rate.is_finite()
            && thresholds.max_p99_seconds.is_finite()
            && thresholds.min_requests.is_finite(),
        "the thresholds are finite numbers"
    );
    ensure!(
        (0.0..=1.0).contains(&thresholds.min_success_rate),
        "--min-success-rate is a share between 0 and 1"
    );
    ensure!(
        thresholds.max_p99_seconds > 0.0,
        "--max-p99 is a positive number of seconds"
    );
    ensure!(
        thresholds.min_requests >= 0.0,
        "--min-requests cannot be negative"
    );
    ensure!(
        window.starts_with(|c: char| c.is_ascii_digit())
            && window.chars().all(|c| c.is_ascii_alphanumeric()),
        "--window is a Prometheus duration such as 2m or 90s, not {window:?}"
    );
    let hashes = match (canary_hash, stable_hash) {
        (Some(canary), Some(stable)) => {
            ensure!(
                canary != stable,
                "the canary and the stable hash are the same ({canary})"
            );
            Some(Hashes { canary, stable })
        }
        (None, None) => None,
        _ => bail!("--canary-hash and --stable-hash go together (or neither: read the Rollout)"),
    };
    ensure!(!rollout.is_empty(), "--rollout is empty");
    Ok(Options {
        service: service.unwrap_or_else(|| rollout.clone()),
        prometheus_url: prometheus_url.trim_end_matches('/').to_owned(),
        rollout,
        namespace,
        kubectl,
        hashes,
        window,
        thresholds,
        dry_run,
    })
}

/// Measures both sides, decides, prints the comparison and the verdict, then runs the kubectl
/// command the verdict calls for (unless `--dry-run`).
pub(crate) async fn promote(options: &Options) -> anyhow::Result<Outcome> {
    let hashes = match &options.hashes {
        Some(hashes) => hashes.clone(),
        None => rollout_hashes(&read_rollout(options).await?)
            .with_context(|| format!("rollout {}", options.rollout))?,
    };
    let prometheus = Prometheus::new(&options.prometheus_url)?;
    let canary = prometheus
        .measure(&options.service, &hashes.canary, &options.window)
        .await
        .context("measuring the canary")?;
    let stable = prometheus
        .measure(&options.service, &hashes.stable, &options.window)
        .await
        .context("measuring the stable version")?;
    let decision = decide(&canary, &options.thresholds);
    let command = decision
        .verdict
        .action()
        .map(|action| argo_command(options, action));
    let outcome = Outcome {
        options: options.clone(),
        hashes,
        canary,
        stable,
        decision,
        command,
    };
    println!("{outcome}");
    if let Some(command) = &outcome.command {
        if options.dry_run {
            println!("dry run, not running: {}", command.join(" "));
        } else {
            println!("+ {}", command.join(" "));
            kubectl(options, &command[1..]).await?;
        }
    }
    Ok(outcome)
}

/// `kubectl argo rollouts <action> <rollout> -n <namespace>`, the program first.
fn argo_command(options: &Options, action: &str) -> Vec<String> {
    [
        options.kubectl.as_str(),
        "argo",
        "rollouts",
        action,
        &options.rollout,
        "-n",
        &options.namespace,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs kubectl with `args`, passing its output on.
async fn kubectl(options: &Options, args: &[String]) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(&options.kubectl)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", options.kubectl))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{} {} failed with {}: {}{}",
            options.kubectl,
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            stdout.trim()
        );
    }
    print!("{stdout}");
    Ok(())
}

async fn read_rollout(options: &Options) -> anyhow::Result<Value> {
    let output = tokio::process::Command::new(&options.kubectl)
        .args(["get", "rollouts.argoproj.io", &options.rollout])
        .args(["-n", &options.namespace, "-o", "json"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", options.kubectl))?;
    ensure!(
        output.status.success(),
        "{} get rollouts.argoproj.io {} -n {} failed with {}: {}",
        options.kubectl,
        options.rollout,
        options.namespace,
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    serde_json::from_slice(&output.stdout).context("kubectl printed no JSON Rollout")
}

/// The canary's and the stable's hashes from a Rollout: `status.currentPodHash` (the newest
/// pod template, the canary while a rollout runs) and `status.stableRS`.
pub(crate) fn rollout_hashes(rollout: &Value) -> anyhow::Result<Hashes> {
    let status = &rollout["status"];
    ensure!(
        status["abort"] != Value::Bool(true),
        "the rollout is aborted already: {}",
        status["message"].as_str().unwrap_or("no message")
    );
    let field = |name: &str| {
        status[name]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .with_context(|| format!("the Rollout's status has no {name}"))
    };
    let (canary, stable) = (field("currentPodHash")?, field("stableRS")?);
    ensure!(
        canary != stable,
        "no canary is running: the newest pod template ({canary}) is the stable one"
    );
    Ok(Hashes { canary, stable })
}

/// The Prometheus HTTP API.
struct Prometheus {
    http: reqwest::Client,
    query_url: String,
}

impl Prometheus {
    fn new(base_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            query_url: format!("{base_url}/api/v1/query"),
        })
    }

    /// Requests, success rate and P99 of the pods of `service` with pod-template `hash`.
    async fn measure(
        &self,
        service: &str,
        hash: &str,
        window: &str,
    ) -> anyhow::Result<Measurement> {
        let [requests, ok, p99] = queries(service, hash, window);
        let requests = self.scalar(&requests).await?.unwrap_or(0.0);
        if requests <= 0.0 {
            return Ok(Measurement::default());
        }
        // No non-5xx series at all is a canary that never answered well: 0, not "no data".
        let ok = self.scalar(&ok).await?.unwrap_or(0.0);
        Ok(Measurement {
            requests,
            success_rate: Some((ok / requests).clamp(0.0, 1.0)),
            p99_seconds: self.scalar(&p99).await?,
        })
    }

    /// The value of a query that yields at most one sample; `None` for no sample or NaN.
    async fn scalar(&self, query: &str) -> anyhow::Result<Option<f64>> {
        let url = reqwest::Url::parse_with_params(&self.query_url, [("query", query)])
            .with_context(|| format!("Prometheus URL {}", self.query_url))?;
        let response = self
            .http
            .get(url)
            .send()
            .await
            .with_context(|| format!("asking {}", self.query_url))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("{} answered {status} without JSON", self.query_url))?;
        parse_scalar(&body).with_context(|| format!("query {query}"))
    }
}

/// The three queries for one side: requests in the window, non-5xx requests in the window, and
/// P99, selected by `service` and the pod-template hash as the AnalysisTemplate selects them.
pub(crate) fn queries(service: &str, hash: &str, window: &str) -> [String; 3] {
    let selector = format!(
        "service=\"{}\", {HASH_LABEL}=\"{}\"",
        escape(service),
        escape(hash)
    );
    [
        format!("sum(increase(http_requests_total{{{selector}}}[{window}]))"),
        format!("sum(increase(http_requests_total{{{selector}, status!~\"5..\"}}[{window}]))"),
        format!(
            "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{{{selector}}}[{window}])))"
        ),
    ]
}

/// A PromQL double-quoted string's content.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The single value of an instant-query answer: `None` for an empty vector or NaN.
pub(crate) fn parse_scalar(body: &Value) -> anyhow::Result<Option<f64>> {
    if body["status"] != "success" {
        bail!(
            "Prometheus answered {}: {} {}",
            body["status"],
            body["errorType"].as_str().unwrap_or_default(),
            body["error"].as_str().unwrap_or_default()
        );
    }
    let data = &body["data"];
    let value = match data["resultType"].as_str() {
        Some("vector") => {
            let result = data["result"].as_array().context("no result array")?;
            match result.as_slice() {
                [] => return Ok(None),
                [sample] => &sample["value"],
                more => bail!("{} series where one was expected", more.len()),
            }
        }
        Some("scalar") => &data["result"],
        other => bail!("unexpected result type {other:?}"),
    };
    let text = value[1].as_str().context("a sample without a value")?;
    let number: f64 = text
        .parse()
        .with_context(|| format!("sample value {text:?}"))?;
    Ok(Some(number).filter(|n| !n.is_nan()))
}

fn count(n: f64) -> String {
    format!("{n:.0}")
}

fn percent(share: f64) -> String {
    format!("{:.2} %", share * 100.0)
}

fn millis(seconds: f64) -> String {
    format!("{:.1} ms", seconds * 1000.0)
}

impl fmt::Display for Outcome {
    /// The comparison table and the verdict.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let t = &o.thresholds;
        writeln!(
            f,
            "canary analysis of rollout {} (namespace {}, service {}), last {}, from {}",
            o.rollout, o.namespace, o.service, o.window, o.prometheus_url
        )?;
        let or_dash = |v: Option<f64>, show: fn(f64) -> String| v.map_or("-".to_owned(), show);
        let rows = [
            (
                "",
                format!("canary {}", self.hashes.canary),
                format!("stable {}", self.hashes.stable),
                "threshold (canary)".to_owned(),
            ),
            (
                "requests",
                count(self.canary.requests),
                count(self.stable.requests),
                format!(">= {}", count(t.min_requests)),
            ),
            (
                "success rate",
                or_dash(self.canary.success_rate, percent),
                or_dash(self.stable.success_rate, percent),
                format!(">= {}", percent(t.min_success_rate)),
            ),
            (
                "P99 latency",
                or_dash(self.canary.p99_seconds, millis),
                or_dash(self.stable.p99_seconds, millis),
                format!("< {}", millis(t.max_p99_seconds)),
            ),
        ];
        for (name, canary, stable, threshold) in rows {
            writeln!(f, "  {name:<14}{canary:>20}{stable:>20}   {threshold}")?;
        }
        let verdict = match self.decision.verdict {
            Verdict::Promote => "PROMOTE",
            Verdict::Abort => "ABORT",
            Verdict::Inconclusive => "INCONCLUSIVE",
        };
        writeln!(f, "verdict: {verdict}")?;
        for reason in &self.decision.reasons {
            writeln!(f, "  - {reason}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(requests: f64, success_rate: f64, p99_seconds: f64) -> Measurement {
        Measurement {
            requests,
            success_rate: Some(success_rate),
            p99_seconds: Some(p99_seconds),
        }
    }

    fn verdict(canary: Measurement) -> Verdict {
        decide(&canary, &Thresholds::default()).verdict
    }

    #[test]
    fn a_canary_meeting_the_analysis_templates_targets_is_promoted() {
        assert_eq!(verdict(measured(500.0, 1.0, 0.004)), Verdict::Promote);
        // The template's bounds: success >= 0.99 passes, P99 < 0.5 passes.
        assert_eq!(verdict(measured(500.0, 0.99, 0.499)), Verdict::Promote);
    }

    #[test]
    fn a_canary_missing_a_target_is_aborted_with_the_reason() {
        let decision = decide(&measured(500.0, 0.9899, 0.01), &Thresholds::default());
        assert_eq!(decision.verdict, Verdict::Abort);
        assert_eq!(decision.reasons, ["success rate 98.99 % < 99.00 %"]);
        let decision = decide(&measured(500.0, 1.0, 0.5), &Thresholds::default());
        assert_eq!(decision.verdict, Verdict::Abort);
        assert_eq!(decision.reasons, ["P99 500.0 ms >= 500.0 ms"]);
        let both = decide(&measured(500.0, 0.0, 3.0), &Thresholds::default());
        assert_eq!(both.reasons.len(), 2, "{both:?}");
    }

    #[test]
    fn too_little_traffic_is_inconclusive_whatever_the_numbers() {
        assert_eq!(verdict(Measurement::default()), Verdict::Inconclusive);
        assert_eq!(verdict(measured(99.0, 0.0, 9.0)), Verdict::Inconclusive);
        assert_eq!(
            verdict(measured(f64::NAN, 1.0, 0.01)),
            Verdict::Inconclusive
        );
        assert_eq!(verdict(measured(100.0, 1.0, 0.01)), Verdict::Promote);
    }

    #[test]
    fn a_failure_wins_over_missing_data_and_missing_data_blocks_a_promotion() {
        let no_p99 = |success_rate| Measurement {
            requests: 500.0,
            success_rate: Some(success_rate),
            p99_seconds: None,
        };
        assert_eq!(verdict(no_p99(0.5)), Verdict::Abort);
        assert_eq!(verdict(no_p99(1.0)), Verdict::Inconclusive);
    }

    #[test]
    fn thresholds_are_flags() {
        let strict = Thresholds {
            min_success_rate: 0.999,
            max_p99_seconds: 0.01,
            min_requests: 10.0,
        };
        assert_eq!(
            decide(&measured(20.0, 0.995, 0.004), &strict).verdict,
            Verdict::Abort
        );
        assert_eq!(
            decide(&measured(20.0, 1.0, 0.004), &strict).verdict,
            Verdict::Promote
        );
    }

    /// Parses `list` as `cargo xtask canary promote` would, then checks it.
    fn parse_options(
        list: &[&str],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Options> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Promote {
            #[command(flatten)]
            args: PromoteArgs,
        }
        let parsed =
            Promote::try_parse_from(std::iter::once("promote").chain(list.iter().copied()))?;
        options(parsed.args, env)
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_match_the_production_overlay() {
        let o = parse_options(&[], &no_env).unwrap();
        assert_eq!(o.prometheus_url, DEFAULT_PROMETHEUS_URL);
        assert_eq!(
            (o.rollout.as_str(), o.namespace.as_str(), o.service.as_str()),
            ("order-service", "flash-sale", "order-service")
        );
        assert_eq!(o.kubectl, "kubectl");
        assert_eq!(o.window, "2m");
        assert_eq!(o.thresholds, Thresholds::default());
        assert_eq!(o.hashes, None);
        assert!(!o.dry_run);
    }

    #[test]
    fn the_environment_fills_in_and_flags_win() {
        let env = |name: &str| {
            Some(match name {
                "PROMETHEUS_URL" => "http://prom:9090/".to_owned(),
                "ROLLOUT" => "gateway".to_owned(),
                "NAMESPACE" => "shop".to_owned(),
                "KUBECTL" => "/opt/kubectl".to_owned(),
                _ => return None,
            })
        };
        let o = parse_options(&[], &env).unwrap();
        assert_eq!(o.prometheus_url, "http://prom:9090");
        assert_eq!(
            (o.rollout.as_str(), o.service.as_str()),
            ("gateway", "gateway")
        );
        assert_eq!(
            (o.namespace.as_str(), o.kubectl.as_str()),
            ("shop", "/opt/kubectl")
        );
        let o = parse_options(
            &[
                "--rollout",
                "inventory-service",
                "-n",
                "other",
                "--kubectl=/bin/k",
                "--prometheus-url",
                "http://127.0.0.1:1",
                "--service",
                "svc",
                "--canary-hash",
                "abc",
                "--stable-hash",
                "def",
                "--window",
                "90s",
                "--min-success-rate",
                "0.95",
                "--max-p99=0.25",
                "--min-requests",
                "10",
                "--dry-run",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(o.rollout, "inventory-service");
        assert_eq!(o.namespace, "other");
        assert_eq!(o.kubectl, "/bin/k");
        assert_eq!(o.prometheus_url, "http://127.0.0.1:1");
        assert_eq!(o.service, "svc");
        assert_eq!(
            o.hashes,
            Some(Hashes {
                canary: "abc".into(),
                stable: "def".into()
            })
        );
        assert_eq!(o.window, "90s");
        assert_eq!(
            o.thresholds,
            Thresholds {
                min_success_rate: 0.95,
                max_p99_seconds: 0.25,
                min_requests: 10.0
            }
        );
        assert!(o.dry_run);
    }

    #[test]
    fn bad_options_are_refused() {
        for bad in [
            &["--bogus"][..],
            &["--window"],
            &["--window", "2m) or vector(1"],
            &["--min-success-rate", "99"],
            &["--max-p99", "0"],
            &["--max-p99", "NaN"],
            &["--min-requests", "many"],
            &["--canary-hash", "abc"],
            &["--canary-hash", "abc", "--stable-hash", "abc"],
            &["--dry-run=yes"],
        ] {
            assert!(parse_options(bad, &no_env).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_rollout_status_names_both_hashes() {
        let rollout =
            serde_json::json!({"status": {"currentPodHash": "7c9d4b8f6", "stableRS": "6d5f8b7c9"}});
        assert_eq!(
            rollout_hashes(&rollout).unwrap(),
            Hashes {
                canary: "7c9d4b8f6".into(),
                stable: "6d5f8b7c9".into()
            }
        );
        let settled =
            serde_json::json!({"status": {"currentPodHash": "6d5f8b7c9", "stableRS": "6d5f8b7c9"}});
        assert!(rollout_hashes(&settled).is_err(), "no canary running");
        let aborted =
            serde_json::json!({"status": {"abort": true, "currentPodHash": "a", "stableRS": "b"}});
        assert!(rollout_hashes(&aborted).is_err());
        assert!(rollout_hashes(&serde_json::json!({"status": {}})).is_err());
    }

    #[test]
    fn queries_select_by_service_and_pod_template_hash() {
        let [requests, ok, p99] = queries("order-service", "7c9d4b8f6", "2m");
        let selector = r#"service="order-service", rollouts_pod_template_hash="7c9d4b8f6""#;
        assert_eq!(
            requests,
            format!("sum(increase(http_requests_total{{{selector}}}[2m]))")
        );
        assert!(ok.contains(&format!("{selector}, status!~\"5..\"")), "{ok}");
        assert!(
            p99.starts_with(
                "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{"
            ),
            "{p99}"
        );
        let [tricky, ..] = queries("a\"b", "c\\d", "1m");
        assert!(tricky.contains(r#"service="a\"b""#), "{tricky}");
        assert!(tricky.contains(r#"="c\\d""#), "{tricky}");
    }

    #[test]
    fn prometheus_answers_are_read_strictly() {
        let vector = |v: &str| serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.5, v]}]}});
        assert_eq!(parse_scalar(&vector("0.995")).unwrap(), Some(0.995));
        assert_eq!(parse_scalar(&vector("NaN")).unwrap(), None);
        let empty = serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": []}});
        assert_eq!(parse_scalar(&empty).unwrap(), None);
        let error =
            serde_json::json!({"status": "error", "errorType": "bad_data", "error": "parse error"});
        assert!(parse_scalar(&error).is_err());
        let two = serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"a": "1"}, "value": [1, "1"]}, {"metric": {"a": "2"}, "value": [1, "2"]}]}});
        assert!(parse_scalar(&two).is_err());
    }
}
