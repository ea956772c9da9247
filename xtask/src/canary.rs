//! `cargo xtask canary promote`: a canary's verdict against its stable version, then promote or
//! abort it.
//!
//! **The gate first.** The command acts only on a Rollout paused at its *last* pause step, a
//! manual one (`pause: {}`, order-service's gate before 100 %). It reads the Rollout (`kubectl
//! get rollouts.argoproj.io -o json`: `spec.strategy.canary.steps`, `status.currentStepIndex`,
//! `status.pauseConditions`) and refuses, with the reason and a non-zero exit, anything else:
//! `kubectl argo rollouts promote` clears the pause conditions of a paused rollout (ending a
//! timed pause early) and moves a running one to its next step (skipping an analysis in
//! progress), so promoting anywhere but at that last manual pause skips part of the canary. See
//! [`gate`]. `--wait DURATION` waits (polling the Rollout) until the rollout reaches the gate,
//! failing at once if it never can (aborted, paused for an inconclusive analysis, no manual gate).
//!
//! **The verdict.** The command asks Prometheus (its HTTP API, `/api/v1/query`) for the canary's
//! and the stable's request count, success rate (the non-5xx share of `http_requests_total`) and
//! P99 (`histogram_quantile(0.99, ...)` over `http_request_duration_seconds_bucket`), prints them
//! side by side with the thresholds, and decides ([`decide`]):
//!
//! - **promote** when the canary meets the absolute bounds (the AnalysisTemplate's: success at
//!   least 99 %, P99 under 500 ms) *and* is not worse than the stable version beside it by more
//!   than the margins (error ratio at most 0.5 points above the stable's; P99 at most 1.5 times
//!   the stable's plus 25 ms, the histogram's resolution at low latencies): `kubectl argo
//!   rollouts promote`;
//! - **abort** when it misses one: `kubectl argo rollouts abort` (the rollout scales the canary
//!   away), and the command fails;
//! - **inconclusive** when either side served too few requests to judge, or a number is missing:
//!   nothing is changed and the command fails, so a human looks.
//!
//! Canary and stable pods are told apart as in the Argo Rollouts component: the ServiceMonitor
//! copies the pod label `rollouts-pod-template-hash` onto every series (Prometheus spells it
//! [`HASH_LABEL`]) next to `service`, and the AnalysisTemplate selects the canary by that label.
//! The two hashes come from the Rollout's status (`status.currentPodHash` is the canary,
//! `status.stableRS` the stable) unless `--canary-hash` and `--stable-hash` give them.
//!
//! **Prometheus** is a required setting (`--prometheus-url` or `PROMETHEUS_URL`), with no
//! default: the command runs where the pipeline's runner runs, outside the cluster, where the
//! AnalysisTemplate's in-cluster address does not resolve.
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

/// The Rollout that ends on a manual gate.
const DEFAULT_ROLLOUT: &str = "order-service";
/// The production overlay's namespace (staging's is flash-sale-staging).
const DEFAULT_NAMESPACE: &str = "flash-sale";
/// How often `--wait` reads the Rollout.
const WAIT_INTERVAL: Duration = Duration::from_secs(15);
/// The pause condition Argo Rollouts sets while a canary pause step holds the rollout.
const CANARY_PAUSE_STEP: &str = "CanaryPauseStep";

/// What a canary must meet to be promoted: absolute bounds, and margins against the stable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Thresholds {
    /// Lowest passing success rate (AnalysisTemplate: `result[0] >= 0.99`).
    pub(crate) min_success_rate: f64,
    /// P99 must be below this many seconds (AnalysisTemplate: `result[0] < 0.5`).
    pub(crate) max_p99_seconds: f64,
    /// Fewer requests than this in the window, on either side, cannot be judged.
    pub(crate) min_requests: f64,
    /// The canary's error ratio (1 - success rate) may exceed the stable's by at most this share.
    pub(crate) max_error_ratio_increase: f64,
    /// The canary's P99 may exceed the stable's by at most this fraction of it...
    pub(crate) max_p99_increase: f64,
    /// ...plus this many seconds, for the histogram's bucket resolution at low latencies.
    pub(crate) p99_slack_seconds: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_success_rate: 0.99,
            max_p99_seconds: 0.5,
            min_requests: 100.0,
            max_error_ratio_increase: 0.005,
            max_p99_increase: 0.5,
            p99_slack_seconds: 0.025,
        }
    }
}

impl Thresholds {
    /// The highest canary P99 the comparison passes, given the stable's.
    fn p99_limit(&self, stable_p99: f64) -> f64 {
        stable_p99 * (1.0 + self.max_p99_increase) + self.p99_slack_seconds
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

/// The checks of one decision, sorted by outcome.
#[derive(Default)]
struct Checks {
    passed: Vec<String>,
    failed: Vec<String>,
    missing: Vec<String>,
}

/// The verdict on the canary's numbers next to the stable's: a pure function, as Argo Rollouts
/// judges a measurement (a failed condition wins; no data is neither success nor failure), with
/// two additions: a side that served fewer than `min_requests` requests is not judged at all, and
/// the canary must also hold its own against the stable version measured over the same window.
/// Failed absolute bounds come first among the reasons, then failed comparisons.
pub(crate) fn decide(
    canary: &Measurement,
    stable: &Measurement,
    thresholds: &Thresholds,
) -> Decision {
    for (side, measured) in [("canary", canary), ("stable version", stable)] {
        if measured.requests.is_nan() || measured.requests < thresholds.min_requests {
            return Decision {
                verdict: Verdict::Inconclusive,
                reasons: vec![format!(
                    "the {side} served {} requests in the window, fewer than the {} needed to judge it",
                    count(measured.requests),
                    count(thresholds.min_requests)
                )],
            };
        }
    }
    let t = thresholds;
    let mut checks = Checks::default();
    match canary.success_rate {
        Some(rate) if rate >= t.min_success_rate => checks.passed.push(format!(
            "success rate {} >= {}",
            percent(rate),
            percent(t.min_success_rate)
        )),
        Some(rate) => checks.failed.push(format!(
            "success rate {} < {}",
            percent(rate),
            percent(t.min_success_rate)
        )),
        None => checks.missing.push("no success rate".to_owned()),
    }
    match canary.p99_seconds {
        Some(p99) if p99 < t.max_p99_seconds => checks.passed.push(format!(
            "P99 {} < {}",
            millis(p99),
            millis(t.max_p99_seconds)
        )),
        Some(p99) => checks.failed.push(format!(
            "P99 {} >= {}",
            millis(p99),
            millis(t.max_p99_seconds)
        )),
        None => checks
            .missing
            .push("no P99 (no latency buckets)".to_owned()),
    }
    compare(canary, stable, t, &mut checks);
    let Checks {
        passed,
        failed,
        missing,
    } = checks;
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

/// The canary against the stable: error ratio and P99 within the margins.
fn compare(canary: &Measurement, stable: &Measurement, t: &Thresholds, checks: &mut Checks) {
    match (canary.success_rate, stable.success_rate) {
        (Some(canary), Some(stable)) => {
            let (canary_errors, stable_errors) = (1.0 - canary, 1.0 - stable);
            let limit = stable_errors + t.max_error_ratio_increase;
            // A hair of tolerance, so that shares printed equal compare equal.
            let text = format!(
                "error ratio {} vs the stable's {} (at most {} more)",
                percent(canary_errors),
                percent(stable_errors),
                points(t.max_error_ratio_increase)
            );
            if canary_errors <= limit + 1e-12 {
                checks.passed.push(text);
            } else {
                checks.failed.push(text);
            }
        }
        (Some(_), None) => checks
            .missing
            .push("no success rate of the stable version to compare with".to_owned()),
        (None, _) => {}
    }
    match (canary.p99_seconds, stable.p99_seconds) {
        (Some(canary), Some(stable)) => {
            let limit = t.p99_limit(stable);
            let text = format!(
                "P99 {} vs the stable's {} (at most {})",
                millis(canary),
                millis(stable),
                millis(limit)
            );
            if canary <= limit {
                checks.passed.push(text);
            } else {
                checks.failed.push(text);
            }
        }
        (Some(_), None) => checks
            .missing
            .push("no P99 of the stable version to compare with".to_owned()),
        (None, _) => {}
    }
}

/// Where a Rollout stands with respect to a promotion by this command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Paused by its last pause step, a manual one: promoting releases exactly that pause.
    Open,
    /// On its way there (or the controller has not caught up yet): waiting may open the gate.
    NotYet(String),
    /// A promotion would skip part of the canary, or there is nothing to promote: no waiting
    /// helps, a human decides.
    Closed(String),
}

/// One canary step, as a person would name it.
fn describe_step(step: &Value) -> String {
    if let Some(weight) = step.get("setWeight") {
        format!("setWeight {weight}")
    } else if let Some(pause) = step.get("pause") {
        match &pause["duration"] {
            Value::Null => "pause until promoted".to_owned(),
            Value::String(duration) => format!("pause {duration}"),
            duration => format!("pause {duration}s"),
        }
    } else if step.get("analysis").is_some() {
        "analysis".to_owned()
    } else {
        step.as_object()
            .and_then(|s| s.keys().next().cloned())
            .unwrap_or_else(|| "an empty step".to_owned())
    }
}

/// Whether `kubectl argo rollouts promote` on this Rollout (as `kubectl get -o json` prints it)
/// would do only what the manual gate is there for. That is the case only when:
///
/// - it is not aborted, nor paused by hand (`spec.paused`), nor paused for anything but its
///   canary pause step (an inconclusive analysis pauses it with `InconclusiveAnalysisRun`);
/// - its last pause step is a manual one (no `duration`): promoting a timed pause ends it early;
/// - the controller has seen its latest spec, and a canary is running (the newest pod template
///   is not the stable one);
/// - `status.currentStepIndex` is that last pause step, and `status.pauseConditions` holds the
///   `CanaryPauseStep` condition: the controller paused it there. At an earlier step, or while
///   an analysis runs (no pause condition), promote would end a pause early or skip a step.
pub(crate) fn gate(rollout: &Value) -> Gate {
    let (spec, status) = (&rollout["spec"], &rollout["status"]);
    if status["abort"] == Value::Bool(true) {
        return Gate::Closed(format!(
            "it is aborted: {}",
            status["message"].as_str().unwrap_or("no message")
        ));
    }
    let steps = match spec["strategy"]["canary"]["steps"].as_array() {
        Some(steps) if !steps.is_empty() => steps,
        _ => return Gate::Closed("it has no canary steps (spec.strategy.canary.steps)".to_owned()),
    };
    let Some(last_pause) = steps.iter().rposition(|step| step.get("pause").is_some()) else {
        return Gate::Closed("its canary has no pause step, so no manual gate".to_owned());
    };
    let step_name = |index: usize| {
        format!(
            "step {} of {} ({})",
            index + 1,
            steps.len(),
            steps
                .get(index)
                .map_or_else(|| "the end".to_owned(), describe_step)
        )
    };
    if !steps[last_pause]["pause"]["duration"].is_null() {
        return Gate::Closed(format!(
            "its last pause, {}, is timed: it ends on its own, and a promotion would end it early",
            step_name(last_pause)
        ));
    }
    if let Some(generation) = rollout["metadata"]["generation"].as_i64() {
        // Argo Rollouts writes observedGeneration as a string.
        let observed = match &status["observedGeneration"] {
            Value::String(text) => text.parse::<i64>().ok(),
            other => other.as_i64(),
        };
        if observed != Some(generation) {
            return Gate::NotYet(format!(
                "the controller has not seen its latest spec yet (generation {generation}, \
                 observed {})",
                status["observedGeneration"]
            ));
        }
    }
    if spec["paused"] == Value::Bool(true) {
        return Gate::Closed(
            "it was paused by hand (spec.paused): whoever paused it resumes it".to_owned(),
        );
    }
    let reasons: Vec<&str> = status["pauseConditions"]
        .as_array()
        .map(|conditions| {
            conditions
                .iter()
                .filter_map(|c| c["reason"].as_str())
                .collect()
        })
        .unwrap_or_default();
    if let Some(other) = reasons.iter().find(|r| **r != CANARY_PAUSE_STEP) {
        return Gate::Closed(format!(
            "it is paused for {other}, not by its pause step: a human must look (kubectl argo \
             rollouts get rollout)"
        ));
    }
    let (canary, stable) = (
        status["currentPodHash"].as_str(),
        status["stableRS"].as_str(),
    );
    if canary.is_some() && canary == stable {
        return Gate::Closed(format!(
            "no canary is running: the newest pod template ({}) is the stable one",
            canary.unwrap_or_default()
        ));
    }
    let Some(current) = status["currentStepIndex"].as_u64() else {
        return Gate::NotYet("it has no current step yet (status.currentStepIndex)".to_owned());
    };
    let current = usize::try_from(current).unwrap_or(usize::MAX);
    let paused_by_step = reasons.contains(&CANARY_PAUSE_STEP);
    if current < last_pause {
        Gate::NotYet(format!(
            "it is at {}{}; its last pause is {}",
            step_name(current),
            if paused_by_step { ", paused" } else { "" },
            step_name(last_pause)
        ))
    } else if current > last_pause {
        Gate::Closed(format!(
            "it is at {}, past its last pause: it was promoted already",
            step_name(current)
        ))
    } else if paused_by_step {
        Gate::Open
    } else if status["controllerPause"] == Value::Bool(true) {
        Gate::Closed(format!(
            "its last pause, {}, was released already: it is being promoted",
            step_name(last_pause)
        ))
    } else {
        Gate::NotYet(format!(
            "it reached {}, and the controller has not paused it yet",
            step_name(last_pause)
        ))
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
    /// Whether the Rollout was read and found at its gate (a dry run with both hashes given
    /// reads nothing).
    pub(crate) gate_checked: bool,
}

/// `cargo xtask canary <subcommand>`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Compares a canary paused at its last (manual) pause step with the stable version in
    /// Prometheus, prints the comparison and the verdict, then promotes (`kubectl argo rollouts
    /// promote`) or aborts (`kubectl argo rollouts abort`) the Rollout. Refuses a Rollout that
    /// is anywhere else. Exits non-zero unless the canary was promoted.
    Promote(Box<PromoteArgs>),
}

pub(crate) fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Promote(args) => {
            let wait = args.wait.as_deref().map(parse_wait).transpose()?;
            let options = options(*args, &|name| std::env::var(name).ok())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let outcome = runtime.block_on(async {
                if let Some(limit) = wait {
                    wait_for_gate(|| read_rollout(&options), limit, WAIT_INTERVAL)
                        .await
                        .with_context(|| refusal(&options))?;
                }
                promote(&options).await
            })?;
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
/// environment (`PROMETHEUS_URL`, `ROLLOUT`, `NAMESPACE`, `KUBECTL`), then (all but Prometheus,
/// which has no default) to the production overlay's values.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct PromoteArgs {
    /// The Rollout (env ROLLOUT; default order-service).
    #[arg(long)]
    rollout: Option<String>,
    /// Its namespace (env NAMESPACE; default flash-sale, production's).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// The `service` label of its series (default: the Rollout's name).
    #[arg(long)]
    service: Option<String>,
    /// Prometheus as this machine reaches it (env PROMETHEUS_URL; required: the
    /// AnalysisTemplate's in-cluster address does not resolve outside the cluster).
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
    /// Lowest passing non-5xx share of the canary.
    #[arg(long, default_value_t = Thresholds::default().min_success_rate)]
    min_success_rate: f64,
    /// The canary's P99 must stay below this many seconds.
    #[arg(long = "max-p99", default_value_t = Thresholds::default().max_p99_seconds)]
    max_p99_seconds: f64,
    /// Fewer requests in the window, on either side: inconclusive.
    #[arg(long, default_value_t = Thresholds::default().min_requests)]
    min_requests: f64,
    /// How much higher than the stable's the canary's error ratio may be (a share: 0.005 is
    /// half a percentage point).
    #[arg(long, default_value_t = Thresholds::default().max_error_ratio_increase)]
    max_error_ratio_increase: f64,
    /// How much higher than the stable's the canary's P99 may be, as a fraction of it (0.5:
    /// half again)...
    #[arg(long, default_value_t = Thresholds::default().max_p99_increase)]
    max_p99_increase: f64,
    /// ...plus this many seconds (the histogram's resolution at low latencies).
    #[arg(long = "p99-slack", default_value_t = Thresholds::default().p99_slack_seconds)]
    p99_slack_seconds: f64,
    /// Wait up to this long (e.g. 90m, 600s, 2h) for the Rollout to reach its last pause step,
    /// reading it every 15 s, instead of refusing at once; fails at once if it never can.
    #[arg(long)]
    wait: Option<String>,
    /// Print the verdict and the kubectl command, change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Checks the flags, filling in from `env` (the environment) what they leave out.
pub(crate) fn options(
    args: PromoteArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Options> {
    let given = |flag: Option<String>, name: &str| {
        flag.filter(|v| !v.trim().is_empty())
            .or_else(|| env(name).filter(|v| !v.trim().is_empty()))
    };
    let prometheus_url = given(args.prometheus_url, "PROMETHEUS_URL").context(
        "no Prometheus address: give --prometheus-url or set PROMETHEUS_URL to the Prometheus \
         this machine reaches (from outside the cluster: an Ingress, or `kubectl port-forward` \
         to http://127.0.0.1:9090; the pipeline sets it from PROMETHEUS_URL_STAGING or \
         PROMETHEUS_URL_PRODUCTION)",
    )?;
    let parsed = reqwest::Url::parse(prometheus_url.trim())
        .with_context(|| format!("the Prometheus address {prometheus_url:?} is not a URL"))?;
    ensure!(
        matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some(),
        "the Prometheus address {prometheus_url:?} is not an http(s) URL"
    );
    let rollout = given(args.rollout, "ROLLOUT").unwrap_or_else(|| DEFAULT_ROLLOUT.to_owned());
    let namespace =
        given(args.namespace, "NAMESPACE").unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let kubectl = given(args.kubectl, "KUBECTL").unwrap_or_else(|| "kubectl".to_owned());
    let (service, canary_hash, stable_hash) = (args.service, args.canary_hash, args.stable_hash);
    let (window, dry_run) = (args.window, args.dry_run);
    let thresholds = Thresholds {
        min_success_rate: args.min_success_rate,
        max_p99_seconds: args.max_p99_seconds,
        min_requests: args.min_requests,
        max_error_ratio_increase: args.max_error_ratio_increase,
        max_p99_increase: args.max_p99_increase,
        p99_slack_seconds: args.p99_slack_seconds,
    };
    let t = &thresholds;
    ensure!(
        [
            t.min_success_rate,
            t.max_p99_seconds,
            t.min_requests,
            t.max_error_ratio_increase,
            t.max_p99_increase,
            t.p99_slack_seconds
        ]
        .iter()
        .all(|n| n.is_finite()),
        "the thresholds are finite numbers"
    );
    ensure!(
        (0.0..=1.0).contains(&t.min_success_rate),
        "--min-success-rate is a share between 0 and 1"
    );
    ensure!(
        t.max_p99_seconds > 0.0,
        "--max-p99 is a positive number of seconds"
    );
    ensure!(t.min_requests >= 0.0, "--min-requests cannot be negative");
    ensure!(
        (0.0..=1.0).contains(&t.max_error_ratio_increase),
        "--max-error-ratio-increase is a share between 0 and 1"
    );
    ensure!(
        t.max_p99_increase >= 0.0 && t.p99_slack_seconds >= 0.0,
        "--max-p99-increase and --p99-slack cannot be negative"
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
        prometheus_url: prometheus_url.trim().trim_end_matches('/').to_owned(),
        rollout,
        namespace,
        kubectl,
        hashes,
        window,
        thresholds,
        dry_run,
    })
}

/// `--wait`'s duration: a whole number of seconds, minutes or hours (`600s`, `90m`, `2h`).
pub(crate) fn parse_wait(text: &str) -> anyhow::Result<Duration> {
    let bad = || format!("--wait is a duration up to 24h such as 90m, 600s or 2h, not {text:?}");
    ensure!(text.is_ascii(), bad());
    let unit_at = text.len().checked_sub(1).with_context(bad)?;
    let (number, unit) = text.split_at(unit_at);
    let number: u64 = number.parse().ok().with_context(bad)?;
    let seconds = match unit {
        "s" => number,
        "m" => number.checked_mul(60).with_context(bad)?,
        "h" => number.checked_mul(3600).with_context(bad)?,
        _ => bail!(bad()),
    };
    ensure!(seconds > 0 && seconds <= 24 * 3600, bad());
    Ok(Duration::from_secs(seconds))
}

/// Reads the Rollout (with `read`) every `interval` until its [`gate`] opens; fails at once when
/// the gate is closed, and when it has not opened within `limit`.
pub(crate) async fn wait_for_gate<F, R>(
    mut read: F,
    limit: Duration,
    interval: Duration,
) -> anyhow::Result<()>
where
    F: FnMut() -> R,
    R: Future<Output = anyhow::Result<Value>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut said = String::new();
    loop {
        match gate(&read().await?) {
            Gate::Open => return Ok(()),
            Gate::Closed(why) => bail!("{why}"),
            Gate::NotYet(why) => {
                if tokio::time::Instant::now() + interval > deadline {
                    bail!(
                        "it did not reach its last pause step within {}s: {why}",
                        limit.as_secs()
                    );
                }
                if why != said {
                    println!("waiting: {why}");
                    said = why;
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// The first words of every refusal.
fn refusal(options: &Options) -> String {
    format!(
        "refusing to promote rollout {} (namespace {}): the command acts only on a rollout paused \
         at its last, manual pause step",
        options.rollout, options.namespace
    )
}

/// Checks the gate (reading the Rollout unless a dry run has both hashes), measures both sides,
/// decides, prints the comparison and the verdict, then runs the kubectl command the verdict
/// calls for (unless `--dry-run`). A Rollout that is not at its gate is an error: nothing is
/// measured and nothing is changed.
pub(crate) async fn promote(options: &Options) -> anyhow::Result<Outcome> {
    let rollout = if options.hashes.is_none() || !options.dry_run {
        Some(read_rollout(options).await?)
    } else {
        None
    };
    if let Some(rollout) = &rollout {
        match gate(rollout) {
            Gate::Open => {}
            Gate::NotYet(why) => bail!(
                "{}: {why}; run it again once it is there, or with --wait",
                refusal(options)
            ),
            Gate::Closed(why) => bail!("{}: {why}", refusal(options)),
        }
    }
    let hashes = match (&options.hashes, &rollout) {
        (Some(hashes), _) => hashes.clone(),
        (None, Some(rollout)) => {
            rollout_hashes(rollout).with_context(|| format!("rollout {}", options.rollout))?
        }
        (None, None) => unreachable!("the Rollout is read whenever the hashes are not given"),
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
    let decision = decide(&canary, &stable, &options.thresholds);
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
        gate_checked: rollout.is_some(),
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

/// A share as percentage points: 0.005 is "0.50 points".
fn points(share: f64) -> String {
    format!("{:.2} points", share * 100.0)
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
                "bound (canary)".to_owned(),
                "against the stable".to_owned(),
            ),
            (
                "requests",
                count(self.canary.requests),
                count(self.stable.requests),
                format!(">= {}", count(t.min_requests)),
                format!(">= {} too", count(t.min_requests)),
            ),
            (
                "success rate",
                or_dash(self.canary.success_rate, percent),
                or_dash(self.stable.success_rate, percent),
                format!(">= {}", percent(t.min_success_rate)),
                format!(
                    "error ratio at most {} higher",
                    points(t.max_error_ratio_increase)
                ),
            ),
            (
                "P99 latency",
                or_dash(self.canary.p99_seconds, millis),
                or_dash(self.stable.p99_seconds, millis),
                format!("< {}", millis(t.max_p99_seconds)),
                format!(
                    "at most {:.2} x stable + {}",
                    1.0 + t.max_p99_increase,
                    millis(t.p99_slack_seconds)
                ),
            ),
        ];
        for (name, canary, stable, bound, against) in rows {
            writeln!(
                f,
                "  {name:<14}{canary:>20}{stable:>20}   {bound:<16}{against}"
            )?;
        }
        if !self.gate_checked {
            writeln!(
                f,
                "(dry run with both hashes given: the rollout's step was not checked)"
            )?;
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
    use serde_json::json;

    fn measured(requests: f64, success_rate: f64, p99_seconds: f64) -> Measurement {
        Measurement {
            requests,
            success_rate: Some(success_rate),
            p99_seconds: Some(p99_seconds),
        }
    }

    /// A healthy stable version: plenty of traffic, no errors, 10 ms.
    fn healthy_stable() -> Measurement {
        measured(5000.0, 1.0, 0.010)
    }

    fn verdict(canary: Measurement) -> Verdict {
        decide(&canary, &healthy_stable(), &Thresholds::default()).verdict
    }

    #[test]
    fn a_canary_meeting_the_bounds_and_matching_the_stable_is_promoted() {
        assert_eq!(verdict(measured(500.0, 1.0, 0.004)), Verdict::Promote);
        // Within the margins: 0.4 points more errors than the stable's 0, P99 at 1.5 x 10 ms +
        // 25 ms = 40 ms exactly.
        assert_eq!(verdict(measured(500.0, 0.996, 0.040)), Verdict::Promote);
        let decision = decide(
            &measured(500.0, 1.0, 0.004),
            &healthy_stable(),
            &Thresholds::default(),
        );
        assert_eq!(
            decision.reasons,
            [
                "success rate 100.00 % >= 99.00 %",
                "P99 4.0 ms < 500.0 ms",
                "error ratio 0.00 % vs the stable's 0.00 % (at most 0.50 points more)",
                "P99 4.0 ms vs the stable's 10.0 ms (at most 40.0 ms)",
            ]
        );
    }

    #[test]
    fn a_canary_missing_an_absolute_bound_is_aborted_with_the_reason_first() {
        let decision = decide(
            &measured(500.0, 0.9899, 0.01),
            &measured(5000.0, 0.985, 0.01),
            &Thresholds::default(),
        );
        // Not worse than this (bad) stable, but under the bound: aborted all the same.
        assert_eq!(decision.verdict, Verdict::Abort);
        assert_eq!(decision.reasons, ["success rate 98.99 % < 99.00 %"]);
        let decision = decide(
            &measured(500.0, 1.0, 0.5),
            &measured(5000.0, 1.0, 0.45),
            &Thresholds::default(),
        );
        assert_eq!(decision.verdict, Verdict::Abort);
        assert_eq!(decision.reasons, ["P99 500.0 ms >= 500.0 ms"]);
        let both = decide(
            &measured(500.0, 0.0, 3.0),
            &healthy_stable(),
            &Thresholds::default(),
        );
        assert_eq!(both.verdict, Verdict::Abort);
        assert!(
            both.reasons[0].starts_with("success rate 0.00 % < 99.00 %"),
            "{both:?}"
        );
        assert_eq!(
            both.reasons.len(),
            4,
            "both bounds and both comparisons: {both:?}"
        );
    }

    #[test]
    fn a_canary_within_the_bounds_but_worse_than_the_stable_is_aborted() {
        // 99.2 % success passes the 99 % bound, but the stable beside it answers every request:
        // 0.8 points more errors than the stable, over the 0.5-point margin.
        let decision = decide(
            &measured(2000.0, 0.992, 0.012),
            &healthy_stable(),
            &Thresholds::default(),
        );
        assert_eq!(decision.verdict, Verdict::Abort, "{decision:?}");
        assert_eq!(
            decision.reasons,
            ["error ratio 0.80 % vs the stable's 0.00 % (at most 0.50 points more)"]
        );
        // 300 ms passes the 500 ms bound, but the stable answers in 10 ms: at most 40 ms.
        let decision = decide(
            &measured(2000.0, 1.0, 0.300),
            &healthy_stable(),
            &Thresholds::default(),
        );
        assert_eq!(decision.verdict, Verdict::Abort, "{decision:?}");
        assert_eq!(
            decision.reasons,
            ["P99 300.0 ms vs the stable's 10.0 ms (at most 40.0 ms)"]
        );
        // Just over the P99 margin fails; a slow stable moves the limit with it.
        assert_eq!(verdict(measured(500.0, 1.0, 0.0401)), Verdict::Abort);
        let slow_stable = measured(5000.0, 1.0, 0.200);
        assert_eq!(
            decide(
                &measured(500.0, 1.0, 0.300),
                &slow_stable,
                &Thresholds::default()
            )
            .verdict,
            Verdict::Promote,
            "300 ms <= 1.5 x 200 ms + 25 ms"
        );
        // The stable's own errors raise the allowance by as much.
        let flaky_stable = measured(5000.0, 0.994, 0.010);
        assert_eq!(
            decide(
                &measured(2000.0, 0.992, 0.012),
                &flaky_stable,
                &Thresholds::default()
            )
            .verdict,
            Verdict::Promote,
            "0.8 % errors <= 0.6 % + 0.5 points"
        );
    }

    #[test]
    fn too_little_traffic_on_either_side_is_inconclusive_whatever_the_numbers() {
        assert_eq!(verdict(Measurement::default()), Verdict::Inconclusive);
        assert_eq!(verdict(measured(99.0, 0.0, 9.0)), Verdict::Inconclusive);
        assert_eq!(
            verdict(measured(f64::NAN, 1.0, 0.01)),
            Verdict::Inconclusive
        );
        assert_eq!(verdict(measured(100.0, 1.0, 0.01)), Verdict::Promote);
        // A canary that cannot be compared is not judged either.
        let quiet_stable = decide(
            &measured(500.0, 0.0, 9.0),
            &measured(10.0, 1.0, 0.01),
            &Thresholds::default(),
        );
        assert_eq!(quiet_stable.verdict, Verdict::Inconclusive);
        assert_eq!(
            quiet_stable.reasons,
            [
                "the stable version served 10 requests in the window, fewer than the 100 needed to judge it"
            ]
        );
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
        // No P99 on the stable side: nothing to compare the canary's with.
        let decision = decide(
            &measured(500.0, 1.0, 0.01),
            &no_p99(1.0),
            &Thresholds::default(),
        );
        assert_eq!(decision.verdict, Verdict::Inconclusive);
        assert_eq!(
            decision.reasons,
            ["no P99 of the stable version to compare with"]
        );
    }

    #[test]
    fn thresholds_are_flags() {
        let strict = Thresholds {
            min_success_rate: 0.999,
            max_p99_seconds: 0.01,
            min_requests: 10.0,
            max_error_ratio_increase: 0.0,
            max_p99_increase: 0.0,
            p99_slack_seconds: 0.0,
        };
        let stable = measured(20.0, 1.0, 0.004);
        assert_eq!(
            decide(&measured(20.0, 0.995, 0.004), &stable, &strict).verdict,
            Verdict::Abort
        );
        assert_eq!(
            decide(&measured(20.0, 1.0, 0.004), &stable, &strict).verdict,
            Verdict::Promote
        );
        assert_eq!(
            decide(&measured(20.0, 1.0, 0.005), &stable, &strict).verdict,
            Verdict::Abort,
            "no margin: any P99 above the stable's fails"
        );
    }

    /// Parses `list` as `cargo xtask canary promote` would, then checks it.
    fn parse_options(
        list: &[&str],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Options> {
        options(parse_args(list)?, env)
    }

    fn parse_args(list: &[&str]) -> anyhow::Result<PromoteArgs> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Promote {
            #[command(flatten)]
            args: PromoteArgs,
        }
        let parsed =
            Promote::try_parse_from(std::iter::once("promote").chain(list.iter().copied()))?;
        Ok(parsed.args)
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn only_prometheus(name: &str) -> Option<String> {
        (name == "PROMETHEUS_URL").then(|| "http://127.0.0.1:9090".to_owned())
    }

    #[test]
    fn prometheus_is_required_and_has_no_in_cluster_default() {
        let error = parse_options(&[], &no_env).unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("--prometheus-url"), "{message}");
        assert!(message.contains("PROMETHEUS_URL"), "{message}");
        // An empty variable (an unset CI/CD variable expands to nothing) is no address either.
        let empty = |name: &str| (name == "PROMETHEUS_URL").then(String::new);
        assert!(parse_options(&[], &empty).is_err());
        assert!(parse_options(&["--prometheus-url", ""], &no_env).is_err());
        for bad in ["prometheus:9090", "ftp://prom", "not a url"] {
            assert!(
                parse_options(&["--prometheus-url", bad], &no_env).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn defaults_match_the_production_overlay() {
        let o = parse_options(&[], &only_prometheus).unwrap();
        assert_eq!(o.prometheus_url, "http://127.0.0.1:9090");
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
                "--max-error-ratio-increase",
                "0.01",
                "--max-p99-increase",
                "0.2",
                "--p99-slack",
                "0.005",
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
                min_requests: 10.0,
                max_error_ratio_increase: 0.01,
                max_p99_increase: 0.2,
                p99_slack_seconds: 0.005,
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
            &["--max-error-ratio-increase", "2"],
            &["--max-p99-increase", "-1"],
            &["--p99-slack", "inf"],
            &["--canary-hash", "abc"],
            &["--canary-hash", "abc", "--stable-hash", "abc"],
            &["--dry-run=yes"],
        ] {
            assert!(parse_options(bad, &only_prometheus).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wait_takes_seconds_minutes_or_hours() {
        assert_eq!(parse_wait("600s").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_wait("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_wait("2h").unwrap(), Duration::from_secs(7200));
        for bad in [
            "",
            "m",
            "0m",
            "10",
            "1.5h",
            "-5m",
            "5d",
            "5µ",
            "25h",
            "99999999999999999999h",
        ] {
            assert!(parse_wait(bad).is_err(), "{bad:?}");
        }
        let args = parse_args(&["--wait", "90m"]).unwrap();
        assert_eq!(args.wait.as_deref(), Some("90m"));
    }

    #[test]
    fn the_rollout_status_names_both_hashes() {
        let rollout = json!({"status": {"currentPodHash": "7c9d4b8f6", "stableRS": "6d5f8b7c9"}});
        assert_eq!(
            rollout_hashes(&rollout).unwrap(),
            Hashes {
                canary: "7c9d4b8f6".into(),
                stable: "6d5f8b7c9".into()
            }
        );
        let settled = json!({"status": {"currentPodHash": "6d5f8b7c9", "stableRS": "6d5f8b7c9"}});
        assert!(rollout_hashes(&settled).is_err(), "no canary running");
        let aborted = json!({"status": {"abort": true, "currentPodHash": "a", "stableRS": "b"}});
        assert!(rollout_hashes(&aborted).is_err());
        assert!(rollout_hashes(&json!({"status": {}})).is_err());
    }

    // ------------------------------------------------------------------------------ the gate

    /// The production overlay's order-service steps: four raises, each after a timed pause and
    /// an analysis, then the manual gate (step 13 of 13, index 12).
    fn order_service_steps() -> Value {
        let analysis = json!({"analysis": {"templates": [{"templateName": "flash-sale-canary"}]}});
        let mut steps = Vec::new();
        for weight in [10, 25, 50, 75] {
            steps.push(json!({"setWeight": weight}));
            steps.push(json!({"pause": {"duration": "5m"}}));
            steps.push(analysis.clone());
        }
        steps.push(json!({"pause": {}}));
        Value::Array(steps)
    }

    /// A Rollout as `kubectl get -o json` prints it, at step `index`, with these pause
    /// condition reasons.
    fn rollout_at(index: u64, pause_reasons: &[&str]) -> Value {
        let conditions: Vec<Value> = pause_reasons
            .iter()
            .map(|reason| json!({"reason": reason, "startTime": "2025-01-01T00:00:00Z"}))
            .collect();
        json!({
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": "order-service", "namespace": "flash-sale", "generation": 7},
            "spec": {"strategy": {"canary": {"steps": order_service_steps()}}},
            "status": {
                "observedGeneration": "7",
                "currentPodHash": "7c9d4b8f6",
                "stableRS": "6d5f8b7c9",
                "currentStepIndex": index,
                "pauseConditions": conditions,
                "controllerPause": !pause_reasons.is_empty(),
                "phase": if pause_reasons.is_empty() { "Progressing" } else { "Paused" },
            },
        })
    }

    fn closed(rollout: &Value) -> String {
        match gate(rollout) {
            Gate::Closed(why) => why,
            other => panic!("expected a closed gate, got {other:?}"),
        }
    }

    fn not_yet(rollout: &Value) -> String {
        match gate(rollout) {
            Gate::NotYet(why) => why,
            other => panic!("expected to wait, got {other:?}"),
        }
    }

    #[test]
    fn the_gate_opens_only_at_the_last_pause_paused_by_that_step() {
        assert_eq!(gate(&rollout_at(12, &[CANARY_PAUSE_STEP])), Gate::Open);
    }

    #[test]
    fn the_gate_refuses_a_rollout_that_is_not_paused() {
        // At the last pause step, but the controller has not paused it yet.
        let why = not_yet(&rollout_at(12, &[]));
        assert!(why.contains("not paused it yet"), "{why}");
        // Running the last analysis (step 12): promote would skip it.
        let why = not_yet(&rollout_at(11, &[]));
        assert_eq!(
            why,
            "it is at step 12 of 13 (analysis); its last pause is step 13 of 13 (pause until promoted)"
        );
        // Its last pause released already (promoted by someone): nothing left to do.
        let mut released = rollout_at(12, &[]);
        released["status"]["controllerPause"] = json!(true);
        assert!(closed(&released).contains("released already"));
    }

    #[test]
    fn the_gate_refuses_a_rollout_paused_at_a_middle_step() {
        // Paused by the timed pause at 25 %: promote would end those 5 minutes early.
        let why = not_yet(&rollout_at(4, &[CANARY_PAUSE_STEP]));
        assert_eq!(
            why,
            "it is at step 5 of 13 (pause 5m), paused; its last pause is step 13 of 13 (pause until promoted)"
        );
        for index in 0..12 {
            for reasons in [&[][..], &[CANARY_PAUSE_STEP]] {
                assert_ne!(
                    gate(&rollout_at(index, reasons)),
                    Gate::Open,
                    "step {index}"
                );
            }
        }
        // Past the gate: promoted already.
        assert!(closed(&rollout_at(13, &[])).contains("past its last pause"));
    }

    #[test]
    fn the_gate_refuses_an_aborted_rollout_and_other_pauses() {
        let mut aborted = rollout_at(12, &[CANARY_PAUSE_STEP]);
        aborted["status"]["abort"] = json!(true);
        aborted["status"]["message"] = json!("RolloutAborted: metric success-rate failed");
        assert_eq!(
            closed(&aborted),
            "it is aborted: RolloutAborted: metric success-rate failed"
        );
        // An inconclusive analysis pauses it for a human, whatever the step.
        let inconclusive = rollout_at(12, &[CANARY_PAUSE_STEP, "InconclusiveAnalysisRun"]);
        assert!(closed(&inconclusive).contains("InconclusiveAnalysisRun"));
        assert!(closed(&rollout_at(5, &["InconclusiveAnalysisRun"])).contains("a human"));
        // Paused by hand.
        let mut by_hand = rollout_at(12, &[CANARY_PAUSE_STEP]);
        by_hand["spec"]["paused"] = json!(true);
        assert!(closed(&by_hand).contains("spec.paused"));
    }

    #[test]
    fn the_gate_needs_a_manual_last_pause_and_a_canary() {
        // gateway and inventory-service end on an analysis after a timed pause: they progress on
        // their own, and a promotion would only cut a pause short.
        let mut timed = rollout_at(4, &[CANARY_PAUSE_STEP]);
        timed["spec"]["strategy"]["canary"]["steps"] = json!([
            {"setWeight": 20}, {"pause": {"duration": "2m"}}, {"analysis": {}},
            {"setWeight": 50}, {"pause": {"duration": "2m"}}, {"analysis": {}},
        ]);
        assert_eq!(
            closed(&timed),
            "its last pause, step 5 of 6 (pause 2m), is timed: it ends on its own, and a promotion would end it early"
        );
        let mut no_steps = rollout_at(0, &[]);
        no_steps["spec"] = json!({"strategy": {"canary": {}}});
        assert!(closed(&no_steps).contains("no canary steps"));
        let mut no_pause = rollout_at(0, &[]);
        no_pause["spec"]["strategy"]["canary"]["steps"] = json!([{"setWeight": 50}]);
        assert!(closed(&no_pause).contains("no pause step"));
        let mut settled = rollout_at(12, &[CANARY_PAUSE_STEP]);
        settled["status"]["currentPodHash"] = json!("6d5f8b7c9");
        assert!(closed(&settled).contains("no canary is running"));
    }

    #[test]
    fn the_gate_waits_for_the_controller_to_see_the_latest_spec() {
        let mut stale = rollout_at(12, &[CANARY_PAUSE_STEP]);
        stale["metadata"]["generation"] = json!(8);
        assert!(not_yet(&stale).contains("generation 8"));
        let mut numeric = rollout_at(12, &[CANARY_PAUSE_STEP]);
        numeric["status"]["observedGeneration"] = json!(7);
        assert_eq!(gate(&numeric), Gate::Open);
        let mut no_step = rollout_at(0, &[]);
        no_step["status"]
            .as_object_mut()
            .unwrap()
            .remove("currentStepIndex");
        assert!(not_yet(&no_step).contains("no current step"));
    }

    /// Runs [`wait_for_gate`] over `states`, read one per poll (the last one repeated).
    fn wait_over(states: Vec<Value>, polls_allowed: u32) -> (anyhow::Result<()>, usize) {
        let reads = std::cell::Cell::new(0usize);
        let interval = Duration::from_millis(1);
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(wait_for_gate(
                || {
                    let index = reads.get().min(states.len() - 1);
                    reads.set(reads.get() + 1);
                    std::future::ready(Ok(states[index].clone()))
                },
                interval * polls_allowed,
                interval,
            ));
        (result, reads.get())
    }

    #[test]
    fn waiting_follows_the_rollout_to_its_gate_and_stops_at_a_closed_one() {
        let (result, reads) = wait_over(
            vec![
                rollout_at(4, &[CANARY_PAUSE_STEP]),
                rollout_at(5, &[]),
                rollout_at(12, &[]),
                rollout_at(12, &[CANARY_PAUSE_STEP]),
            ],
            1000,
        );
        result.unwrap();
        assert_eq!(reads, 4, "stops reading once the gate opens");

        let mut aborted = rollout_at(7, &[]);
        aborted["status"]["abort"] = json!(true);
        let (result, reads) = wait_over(vec![rollout_at(4, &[]), aborted], 1000);
        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains("aborted"), "{error}");
        assert_eq!(reads, 2, "an aborted rollout ends the wait at once");

        let (result, reads) = wait_over(vec![rollout_at(4, &[CANARY_PAUSE_STEP])], 5);
        let error = format!("{:#}", result.unwrap_err());
        assert!(
            error.contains("did not reach its last pause step"),
            "{error}"
        );
        assert!((1..=6).contains(&reads), "{reads} reads within the limit");
    }

    /// A stand-in kubectl in a fresh directory: answers `get` with `rollout`, records every call.
    fn stand_in_kubectl(name: &str, rollout: &Value) -> (std::path::PathBuf, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("xtask-canary-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (program, calls, json) = (
            dir.join("kubectl"),
            dir.join("calls"),
            dir.join("rollout.json"),
        );
        std::fs::write(&json, rollout.to_string()).unwrap();
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\ncase \"$1\" in get) cat '{}' ;; esac\n",
            calls.display(),
            json.display()
        );
        std::fs::write(&program, script).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        (program, calls)
    }

    #[test]
    fn promote_refuses_a_rollout_not_at_its_gate_before_measuring_or_changing_anything() {
        let mut aborted = rollout_at(12, &[CANARY_PAUSE_STEP]);
        aborted["status"]["abort"] = json!(true);
        let given = Some(Hashes {
            canary: "7c9d4b8f6".into(),
            stable: "6d5f8b7c9".into(),
        });
        for (name, rollout, hashes, says) in [
            (
                "middle",
                rollout_at(4, &[CANARY_PAUSE_STEP]),
                None,
                "step 5 of 13 (pause 5m)",
            ),
            (
                "analysis",
                rollout_at(11, &[]),
                given.clone(),
                "step 12 of 13 (analysis)",
            ),
            ("aborted", aborted, given, "it is aborted"),
        ] {
            let (kubectl, calls) = stand_in_kubectl(name, &rollout);
            let options = Options {
                // Nothing listens there: the command must not get as far as asking.
                prometheus_url: "http://127.0.0.1:1".to_owned(),
                rollout: "order-service".to_owned(),
                namespace: "flash-sale".to_owned(),
                service: "order-service".to_owned(),
                kubectl: kubectl.display().to_string(),
                hashes,
                window: "2m".to_owned(),
                thresholds: Thresholds::default(),
                dry_run: false,
            };
            let error = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(promote(&options))
                .expect_err("refused");
            let message = format!("{error:#}");
            assert!(
                message.starts_with("refusing to promote rollout order-service"),
                "{message}"
            );
            assert!(message.contains(says), "{name}: {message}");
            assert_eq!(
                std::fs::read_to_string(&calls).unwrap(),
                "get rollouts.argoproj.io order-service -n flash-sale -o json\n",
                "{name}: only the Rollout is read"
            );
            let _ = std::fs::remove_dir_all(kubectl.parent().unwrap());
        }
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
        let vector = |v: &str| json!({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.5, v]}]}});
        assert_eq!(parse_scalar(&vector("0.995")).unwrap(), Some(0.995));
        assert_eq!(parse_scalar(&vector("NaN")).unwrap(), None);
        let empty = json!({"status": "success", "data": {"resultType": "vector", "result": []}});
        assert_eq!(parse_scalar(&empty).unwrap(), None);
        let error = json!({"status": "error", "errorType": "bad_data", "error": "parse error"});
        assert!(parse_scalar(&error).is_err());
        let two = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"a": "1"}, "value": [1, "1"]}, {"metric": {"a": "2"}, "value": [1, "2"]}]}});
        assert!(parse_scalar(&two).is_err());
    }
}
