//! The canary promotion command (`cargo xtask canary promote`, `xtask/src/canary.rs`, compiled
//! in here as it is) against a real Prometheus (Debian's) scraping real order-services.
//!
//! Three order-services run on one private stack, each in its own process (so each `/metrics`
//! is its own), scraped every second by a private Prometheus that labels them as the production
//! ServiceMonitor does (`service` and the pod-template hash): the stable version, a healthy
//! canary, and a broken canary whose Redis is gone (every order answers 503). The command must
//! promote the healthy one, abort the broken one, call neither before any traffic, and run
//! exactly the right `kubectl argo rollouts` command, recorded by a stand-in kubectl (there is no
//! cluster) that answers with a Rollout paused at its last, manual pause step (the only place the
//! command acts; its unit tests cover the refusals).

#[path = "../../../../xtask/src/canary.rs"]
mod command;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use command::{HASH_LABEL, Hashes, Options, Outcome, Thresholds, Verdict};
use deploy_tests::{manifest, repo_path};
use flash_sale_tests::apps::{
    ADMIN_TOKEN, http_client, inventory_settings, order_settings, spawn_inventory_service,
};
use flash_sale_tests::scenario::Admin;
use flash_sale_tests::stack::{BrokerStorage, Stack, find_program, free_port};
use serde_json::{Value, json};

use crate::helpers::*;

const SERVICE: &str = "order-service";
const NAMESPACE: &str = "flash-sale";
/// Pod-template hashes, as Argo Rollouts names ReplicaSets.
const STABLE: &str = "6d5f8b7c9";
const HEALTHY_CANARY: &str = "7c9d4b8f6";
const BROKEN_CANARY: &str = "5b8f7d6c4";

/// How Prometheus spells a Kubernetes label name it copies onto series (the operator's
/// `podTargetLabels`): every character outside `[a-zA-Z0-9_]` becomes `_`.
fn prometheus_label(kubernetes_label: &str) -> String {
    kubernetes_label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn yaml_documents(relative: &str) -> Vec<Value> {
    let path = repo_path(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    manifest::parse_stream(&text)
        .expect("the YAML parses")
        .into_iter()
        .map(|object| object.0)
        .collect()
}

#[test]
fn the_command_tells_canary_from_stable_by_the_label_the_bundle_uses() {
    let monitors = yaml_documents("monitoring/prometheus/servicemonitors.yaml");
    let services = monitors
        .iter()
        .find(|m| m["metadata"]["name"] == "flash-sale-services")
        .expect("the services' ServiceMonitor");
    let copied: Vec<String> = services["spec"]["podTargetLabels"]
        .as_array()
        .expect("podTargetLabels")
        .iter()
        .map(|l| prometheus_label(l.as_str().unwrap()))
        .collect();
    assert_eq!(copied, [HASH_LABEL], "the ServiceMonitor copies the hash");

    let template = &yaml_documents("kustomize/components/argo-rollouts/analysis-template.yaml")[0];
    for metric in template["spec"]["metrics"].as_array().unwrap() {
        let query = metric["provider"]["prometheus"]["query"].as_str().unwrap();
        for matcher in [
            r#"service="{{args.service}}""#.to_owned(),
            format!(r#"{HASH_LABEL}="{{{{args.canary-hash}}}}""#),
        ] {
            assert!(query.contains(&matcher), "{query} selects by {matcher}");
        }
    }
    // The command's own queries select the same way.
    for query in command::queries(SERVICE, HEALTHY_CANARY, "2m") {
        assert!(
            query.contains(&format!(
                r#"service="{SERVICE}", {HASH_LABEL}="{HEALTHY_CANARY}""#
            )),
            "{query}"
        );
    }
}

/// A private Prometheus on a free 127.0.0.1 port, its TSDB in a temporary directory; killed
/// (by its pid) on drop.
struct Prometheus {
    url: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes each target's management port every second, labelled `service` and
    /// [`HASH_LABEL`] as the ServiceMonitor labels a pod's series.
    async fn start(targets: &[(&str, &ServiceProcess)]) -> anyhow::Result<Self> {
        let program = find_program("prometheus")
            .context("`prometheus` is not installed (apt-get install prometheus)")?;
        let dir = tempfile::Builder::new()
            .prefix("flash-sale-prometheus-")
            .tempdir()?;
        let static_configs: Vec<Value> = targets
            .iter()
            .map(|(hash, process)| {
                json!({
                    "targets": [process.management_url.trim_start_matches("http://")],
                    "labels": {"service": SERVICE, HASH_LABEL: hash},
                })
            })
            .collect();
        // JSON is YAML.
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{
                "job_name": "flash-sale-services",
                "metrics_path": "/metrics",
                "static_configs": static_configs,
            }],
        });
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config.to_string())?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(program)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let mut prometheus = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            dir,
        };
        let http = http_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("{}/-/ready", prometheus.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(prometheus);
            }
            if let Some(status) = prometheus.child.try_wait()? {
                bail!(
                    "prometheus exited with {status}:\n{}",
                    prometheus.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus was not ready within 30 s:\n{}",
                    prometheus.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query's result vector.
    async fn query(&self, http: &reqwest::Client, query: &str) -> anyhow::Result<Vec<Value>> {
        let body: Value = http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(body["status"] == "success", "{query}: {body}");
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits (at most `within`) until `query`'s single value reaches `at_least`.
    async fn wait_for(
        &self,
        http: &reqwest::Client,
        query: &str,
        at_least: f64,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let value = self
                .query(http, query)
                .await?
                .first()
                .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok());
            if value.is_some_and(|v| v >= at_least) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{query} = {value:?}, not {at_least} within {within:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A redis-server of its own, for the canary that is going to lose it; killed (by its pid) on
/// [`PrivateRedis::kill`] or drop.
struct PrivateRedis {
    url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    async fn start() -> anyhow::Result<Self> {
        let program = find_program("redis-server").context("redis-server is not installed")?;
        let dir = tempfile::Builder::new()
            .prefix("flash-sale-canary-redis-")
            .tempdir()?;
        let port = free_port()?;
        let child = Command::new(program)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let redis = Self {
            url: format!("redis://127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(redis)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The production order-service steps as the Rollout's spec holds them: four raises, each after
/// a timed pause and an analysis, then the manual gate (index 12).
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

/// A stand-in for kubectl: records every call in `calls.log`, answers `get` for the Rollout
/// with `rollout.json` (the production steps, and `rollout_status`) and `argo rollouts
/// promote|abort` as the plugin would, and fails on anything else.
struct StandInKubectl {
    program: PathBuf,
    dir: tempfile::TempDir,
}

impl StandInKubectl {
    fn new(rollout_status: &Value) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("flash-sale-kubectl-")
            .tempdir()
            .unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(
            path("rollout.json"),
            json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
                   "metadata": {"name": SERVICE, "namespace": NAMESPACE},
                   "spec": {"strategy": {"canary": {"steps": order_service_steps()}}},
                   "status": rollout_status})
            .to_string(),
        )
        .unwrap();
        let script = format!(
            r#"#!/bin/sh
printf '%s\n' "$*" >> '{calls}'
case "$*" in
  "get rollouts.argoproj.io {SERVICE} -n {NAMESPACE} -o json") cat '{rollout}' ;;
  "argo rollouts promote {SERVICE} -n {NAMESPACE}") echo "rollout '{SERVICE}' promoted" ;;
  "argo rollouts abort {SERVICE} -n {NAMESPACE}") echo "rollout '{SERVICE}' aborted" ;;
  *) echo "unexpected kubectl call: $*" >&2; exit 1 ;;
esac
"#,
            calls = path("calls.log"),
            rollout = path("rollout.json"),
        );
        let program = dir.path().join("kubectl");
        std::fs::write(&program, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { program, dir }
    }

    /// The calls so far, and forgets them.
    fn take_calls(&self) -> Vec<String> {
        let log = self.dir.path().join("calls.log");
        let calls = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        calls.lines().map(str::to_owned).collect()
    }

    fn path(&self) -> &Path {
        &self.program
    }
}

/// Orders sent at one order-service for `duration`, `workers` at a time, paced; returns how many
/// were answered with each status.
async fn drive(
    http: &reqwest::Client,
    base_url: &str,
    first_user: u64,
    workers: usize,
    duration: Duration,
) -> BTreeMap<u16, u64> {
    let next_user = Arc::new(AtomicU64::new(first_user));
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..workers)
        .map(|_| {
            let (http, next_user) = (http.clone(), next_user.clone());
            let url = format!("{base_url}/api/flash-sale/order/create");
            tokio::spawn(async move {
                let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
                while Instant::now() < deadline {
                    let user = next_user.fetch_add(1, Ordering::Relaxed);
                    let res = http
                        .post(&url)
                        .json(
                            &json!({"userId": user.to_string(), "activityId": "1", "quantity": 1}),
                        )
                        .send()
                        .await;
                    if let Ok(res) = res {
                        *statuses.entry(res.status().as_u16()).or_default() += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                statuses
            })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    for worker in workers {
        for (status, n) in worker.await.expect("a load worker does not panic") {
            *statuses.entry(status).or_default() += n;
        }
    }
    statuses
}

fn options(prometheus: &Prometheus, kubectl: &StandInKubectl, hashes: Option<Hashes>) -> Options {
    Options {
        prometheus_url: prometheus.url.clone(),
        rollout: SERVICE.to_owned(),
        namespace: NAMESPACE.to_owned(),
        service: SERVICE.to_owned(),
        kubectl: kubectl.path().display().to_string(),
        hashes,
        window: "2m".to_owned(),
        thresholds: Thresholds::default(),
        dry_run: false,
    }
}

fn hashes(canary: &str, stable: &str) -> Option<Hashes> {
    Some(Hashes {
        canary: canary.to_owned(),
        stable: stable.to_owned(),
    })
}

/// `cargo xtask canary promote ARGS` as the binary runs it, on a thread of its own (it starts
/// its own runtime); `Err` is a non-zero exit.
async fn run_cli(args: Vec<String>) -> anyhow::Result<()> {
    #[derive(clap::Parser)]
    struct Canary {
        #[command(subcommand)]
        command: command::Command,
    }
    let line = ["canary".to_owned(), "promote".to_owned()]
        .into_iter()
        .chain(args);
    let Canary { command } = clap::Parser::try_parse_from(line)?;
    tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || command::run(command))
            .join()
            .expect("the command does not panic")
    })
    .await
    .expect("the command's thread is joined")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promotion_command_promotes_a_healthy_canary_and_aborts_a_broken_one() {
    flash_sale_tests::apps::init_test_tracing();
    let stack = Stack::start(BrokerStorage::Sqlite)
        .await
        .expect("the private stack starts");
    let inventory = spawn_inventory_service(inventory_settings(&stack))
        .await
        .unwrap();
    let http = http_client();
    Admin::new(http.clone(), &inventory.base_url, ADMIN_TOKEN)
        .create_activity(1, 1_000_000)
        .await
        .unwrap();

    let stable = ServiceProcess::spawn(ServiceSettings::Order(order_settings(&stack)))
        .await
        .unwrap();
    let healthy = ServiceProcess::spawn(ServiceSettings::Order(order_settings(&stack)))
        .await
        .unwrap();
    // The broken canary: its Redis is gone once it has started (as if it pointed at the wrong
    // one), so every order answers 503. It gives up on Redis after 200 ms instead of 3 s, so that
    // it answers enough orders in a short test to be judged.
    let mut lost_redis = PrivateRedis::start().await.unwrap();
    let mut settings = order_settings(&stack);
    settings.redis.url = flash_sale_common::configuration::Secret::new(lost_redis.url.clone());
    settings.redis.response_timeout_ms = 200;
    settings.consumer.enabled = false;
    let broken = ServiceProcess::spawn(ServiceSettings::Order(settings))
        .await
        .unwrap();
    lost_redis.kill();

    let prometheus = Prometheus::start(&[
        (STABLE, &stable),
        (HEALTHY_CANARY, &healthy),
        (BROKEN_CANARY, &broken),
    ])
    .await
    .unwrap();
    prometheus
        .wait_for(
            &http,
            "sum(up{job=\"flash-sale-services\"})",
            3.0,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    // Paused at its last pause step, the manual gate, by that step.
    let kubectl = StandInKubectl::new(&json!({
        "phase": "Paused",
        "currentPodHash": HEALTHY_CANARY,
        "stableRS": STABLE,
        "currentStepIndex": 12,
        "controllerPause": true,
        "pauseConditions": [{"reason": "CanaryPauseStep", "startTime": "2025-01-01T00:00:00Z"}],
    }));

    // Before any traffic: nothing to judge, nothing changed. The hashes come from the Rollout.
    let outcome = command::promote(&options(&prometheus, &kubectl, None))
        .await
        .unwrap();
    assert_eq!(outcome.decision.verdict, Verdict::Inconclusive, "{outcome}");
    assert_eq!(outcome.canary.requests, 0.0, "{outcome}");
    assert_eq!(
        kubectl.take_calls(),
        [format!(
            "get rollouts.argoproj.io {SERVICE} -n {NAMESPACE} -o json"
        )],
        "only the Rollout is read"
    );

    // Eight seconds of orders at each, scraped every second.
    let period = Duration::from_secs(8);
    let (to_stable, to_healthy, to_broken) = tokio::join!(
        drive(&http, &stable.base_url, 1_000_000, 2, period),
        drive(&http, &healthy.base_url, 2_000_000, 2, period),
        drive(&http, &broken.base_url, 3_000_000, 8, period),
    );
    println!("stable {to_stable:?}, healthy canary {to_healthy:?}, broken canary {to_broken:?}");
    assert_eq!(
        to_stable.keys().collect::<Vec<_>>(),
        [&202],
        "{to_stable:?}"
    );
    assert_eq!(
        to_healthy.keys().collect::<Vec<_>>(),
        [&202],
        "{to_healthy:?}"
    );
    assert_eq!(
        to_broken.keys().collect::<Vec<_>>(),
        [&503],
        "{to_broken:?}"
    );
    // Until Prometheus has scraped every answer.
    for (hash, sent) in [
        (STABLE, &to_stable),
        (HEALTHY_CANARY, &to_healthy),
        (BROKEN_CANARY, &to_broken),
    ] {
        let answered: u64 = sent.values().sum();
        prometheus
            .wait_for(
                &http,
                &format!(r#"sum(http_requests_total{{{HASH_LABEL}="{hash}"}})"#),
                answered as f64,
                Duration::from_secs(30),
            )
            .await
            .unwrap();
    }
    let answered = |sent: &BTreeMap<u16, u64>| sent.values().sum::<u64>() as f64;
    let close_to = |measured: f64, sent: f64| measured >= sent * 0.5 && measured <= sent * 1.5;

    // The healthy canary (hashes from the Rollout's status): promoted.
    let outcome = command::promote(&options(&prometheus, &kubectl, None))
        .await
        .unwrap();
    assert_eq!(outcome.decision.verdict, Verdict::Promote, "{outcome}");
    assert_measured(
        &outcome,
        answered(&to_healthy),
        answered(&to_stable),
        close_to,
    );
    assert_eq!(outcome.canary.success_rate, Some(1.0), "{outcome}");
    assert_eq!(outcome.stable.success_rate, Some(1.0), "{outcome}");
    assert!(
        outcome.canary.p99_seconds.is_some_and(|p| p < 0.5),
        "{outcome}"
    );
    assert_eq!(
        kubectl.take_calls(),
        [
            format!("get rollouts.argoproj.io {SERVICE} -n {NAMESPACE} -o json"),
            format!("argo rollouts promote {SERVICE} -n {NAMESPACE}"),
        ]
    );

    // The broken canary (hashes given; the Rollout is still read for its step): aborted, while
    // the stable beside it is healthy.
    let outcome = command::promote(&options(
        &prometheus,
        &kubectl,
        hashes(BROKEN_CANARY, STABLE),
    ))
    .await
    .unwrap();
    assert_eq!(outcome.decision.verdict, Verdict::Abort, "{outcome}");
    assert_measured(
        &outcome,
        answered(&to_broken),
        answered(&to_stable),
        close_to,
    );
    assert_eq!(outcome.canary.success_rate, Some(0.0), "{outcome}");
    assert_eq!(outcome.stable.success_rate, Some(1.0), "{outcome}");
    assert!(
        outcome.decision.reasons[0].starts_with("success rate 0.00 % < 99.00 %"),
        "{outcome}"
    );
    assert_eq!(
        kubectl.take_calls(),
        [
            format!("get rollouts.argoproj.io {SERVICE} -n {NAMESPACE} -o json"),
            format!("argo rollouts abort {SERVICE} -n {NAMESPACE}"),
        ]
    );

    // The command line, as `nix run .#promote` runs it: a dry run prints and changes nothing;
    // only a promotion exits 0.
    let cli = |canary: &str| {
        [
            "--dry-run",
            "--prometheus-url",
            &prometheus.url,
            "--kubectl",
            &kubectl.path().display().to_string(),
            "--rollout",
            SERVICE,
            "-n",
            NAMESPACE,
            "--canary-hash",
            canary,
            "--stable-hash",
            STABLE,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    run_cli(cli(HEALTHY_CANARY)).await.unwrap();
    let refused = run_cli(cli(BROKEN_CANARY)).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("failed its analysis"),
        "{refused:#}"
    );
    assert_eq!(
        kubectl.take_calls(),
        Vec::<String>::new(),
        "a dry run runs nothing"
    );
    // A stricter threshold turns the healthy canary's promotion into an abort.
    let mut strict = options(&prometheus, &kubectl, hashes(HEALTHY_CANARY, STABLE));
    strict.thresholds.max_p99_seconds = 0.001;
    strict.dry_run = true;
    let outcome = command::promote(&strict).await.unwrap();
    assert_eq!(outcome.decision.verdict, Verdict::Abort, "{outcome}");
    assert!(command::verdict_status(&outcome).is_err());
    assert_eq!(
        kubectl.take_calls(),
        Vec::<String>::new(),
        "a dry run runs nothing"
    );

    drop(prometheus);
    drop((stable, healthy, broken));
    inventory.stop().await.unwrap();
}

/// The request counts Prometheus reports are those the test sent (give or take what `increase`
/// extrapolates at the edges of a series).
fn assert_measured(
    outcome: &Outcome,
    canary_sent: f64,
    stable_sent: f64,
    close_to: impl Fn(f64, f64) -> bool,
) {
    assert!(
        close_to(outcome.canary.requests, canary_sent),
        "canary: {} measured, {canary_sent} sent\n{outcome}",
        outcome.canary.requests
    );
    assert!(
        close_to(outcome.stable.requests, stable_sent),
        "stable: {} measured, {stable_sent} sent\n{outcome}",
        outcome.stable.requests
    );
}
