//! The GitLab pipeline (`cicd/.gitlab-ci.yml`), read as GitLab reads it (`extends` merged,
//! `default:` filled in) and its cluster jobs run as a runner would run them, with stand-ins for
//! `nix`, `git` and `kubectl` that record what they are asked:
//!
//! - the first job locks the flake and keeps `flake.lock`; every other job takes that artifact,
//!   marks it for git, and runs nix with `--no-update-lock-file`; `needs:` never lets a job
//!   start before a job of an earlier stage;
//! - the deploy jobs run `deploy.sh` per environment, each with its own kubeconfig variable and
//!   namespace (the one its overlay renders), and nothing else applies manifests;
//! - the promotion jobs run the promotion command against their own environment's Prometheus
//!   (a required variable), waiting for the Rollout's last pause, and the canary path runs in
//!   staging before production can be approved.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deploy_tests::manifest::{Object, Overlay};
use deploy_tests::{repo_path, scratch_dir, tools};
use serde_json::{Map, Value};

/// The pipeline file, parsed.
fn pipeline() -> Value {
    let text = std::fs::read_to_string(repo_path("cicd/.gitlab-ci.yml")).unwrap();
    serde_yaml::from_str(&text).expect("the pipeline is YAML")
}

/// `extends` as GitLab merges it: maps deeply, everything else (arrays included) replaced.
fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge(existing, value)
                    }
                    _ => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}

/// A job or template with its `extends` resolved.
fn resolved(pipeline: &Value, name: &str) -> Value {
    let own = pipeline
        .get(name)
        .unwrap_or_else(|| panic!("no job or template {name}"));
    let parents: Vec<String> = match &own["extends"] {
        Value::Null => vec![],
        Value::String(one) => vec![one.clone()],
        Value::Array(many) => many
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect(),
        other => panic!("{name}: extends {other}"),
    };
    let mut job = Value::Object(Map::new());
    for parent in parents {
        merge(&mut job, &resolved(pipeline, &parent));
    }
    merge(&mut job, own);
    job.as_object_mut().unwrap().remove("extends");
    job
}

/// Keywords `default:` gives every job that does not set them.
const DEFAULTS: [&str; 3] = ["image", "interruptible", "before_script"];

/// Every job (top-level keys with a `stage`, hidden `.templates` excluded), resolved and with
/// the defaults filled in.
fn jobs() -> BTreeMap<String, Value> {
    let pipeline = pipeline();
    let default = &pipeline["default"];
    pipeline
        .as_object()
        .unwrap()
        .keys()
        .filter(|name| !name.starts_with('.') && pipeline[name.as_str()].is_object())
        .filter_map(|name| {
            let mut job = resolved(&pipeline, name);
            job.get("stage")?;
            for key in DEFAULTS {
                if job.get(key).is_none() && !default[key].is_null() {
                    job[key] = default[key].clone();
                }
            }
            Some((name.clone(), job))
        })
        .collect()
}

fn stages() -> Vec<String> {
    pipeline()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// A job's lines: `before_script` then `script`.
fn lines(job: &Value) -> Vec<String> {
    ["before_script", "script"]
        .iter()
        .flat_map(|key| job[key].as_array().cloned().unwrap_or_default())
        .map(|line| line.as_str().unwrap().to_owned())
        .collect()
}

/// A job's `needs`, as (job, whether it takes that job's artifacts).
fn needs(job: &Value) -> Vec<(String, bool)> {
    job["needs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|need| match need {
            Value::String(name) => (name.clone(), true),
            Value::Object(need) => (
                need["job"].as_str().unwrap().to_owned(),
                need.get("artifacts") != Some(&Value::Bool(false)),
            ),
            other => panic!("needs {other}"),
        })
        .collect()
}

/// The jobs `name` waits for itself: its `needs`, or without that key (as GitLab orders such
/// a job) every job of the earlier stages.
fn direct_needs(jobs: &BTreeMap<String, Value>, name: &str) -> Vec<String> {
    let job = &jobs[name];
    if job.get("needs").is_some() {
        return needs(job).into_iter().map(|(need, _)| need).collect();
    }
    let stages = stages();
    let stage = |job: &Value| stages.iter().position(|s| job["stage"] == s.as_str());
    jobs.iter()
        .filter(|(_, other)| stage(other) < stage(job))
        .map(|(other, _)| other.clone())
        .collect()
}

/// Every job `name` waits for, directly or through the jobs it waits for.
fn all_needs(jobs: &BTreeMap<String, Value>, name: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut todo = vec![name.to_owned()];
    while let Some(next) = todo.pop() {
        for need in direct_needs(jobs, &next) {
            if found.insert(need.clone()) {
                todo.push(need);
            }
        }
    }
    found
}

/// The name of the one Namespace an overlay renders.
fn overlay_namespace(overlay: Overlay) -> String {
    let names: Vec<&str> = overlay
        .rendered()
        .of_kind("Namespace")
        .map(Object::name)
        .collect();
    assert_eq!(names.len(), 1, "{}: {names:?}", overlay.name());
    names[0].to_owned()
}

#[test]
fn the_first_job_locks_the_flake_and_every_later_job_builds_from_that_lock() {
    let jobs = jobs();
    let stages = stages();
    let lock = &jobs["lock"];
    assert_eq!(lock["stage"].as_str(), Some(stages[0].as_str()));
    assert_eq!(
        lines(lock),
        ["nix flake lock", "nix flake metadata --no-update-lock-file"]
    );
    let kept: Vec<&str> = lock["artifacts"]["paths"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(kept, ["flake.lock"], "the lock is the job's artifact");
    assert!(needs(lock).is_empty(), "the lock comes first");

    let flags = pipeline()["variables"]["NIX_FLAGS"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(flags.contains("--no-update-lock-file"), "{flags}");
    for (name, job) in jobs.iter().filter(|(name, _)| *name != "lock") {
        assert!(
            needs(job).contains(&("lock".to_owned(), true)),
            "{name} takes the lock as an artifact: {:?}",
            needs(job)
        );
        let lines = lines(job);
        let nix: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("nix "))
            .collect();
        assert!(!nix.is_empty(), "{name} runs nix");
        let marked = lines
            .iter()
            .position(|l| l == "git add --intent-to-add flake.lock");
        assert!(
            marked.is_some_and(|m| m < nix[0]),
            "{name}: the untracked lock is invisible to the flake until git knows it: {lines:?}"
        );
        for i in nix {
            let words: Vec<&str> = lines[i].split_whitespace().collect();
            assert!(words.contains(&"$NIX_FLAGS"), "{name}: {}", lines[i]);
        }
    }
}

#[test]
fn needs_never_let_a_job_start_before_the_earlier_stages() {
    let jobs = jobs();
    let stages = stages();
    let stage = |job: &Value| {
        let name = job["stage"].as_str().unwrap();
        stages.iter().position(|s| s == name).unwrap()
    };
    for (name, job) in &jobs {
        let waits_for = all_needs(&jobs, name);
        for need in &waits_for {
            assert!(
                jobs.contains_key(need),
                "{name} needs {need}, which is no job"
            );
            assert!(
                stage(&jobs[need]) <= stage(job),
                "{name} needs the later {need}"
            );
        }
        // `needs:` overrides stage order: a job must wait for every job of the stages before
        // its own, or it would run beside them.
        for (earlier, other) in &jobs {
            if stage(other) < stage(job) {
                assert!(
                    waits_for.contains(earlier),
                    "{name} does not wait for {earlier}"
                );
            }
        }
    }
}

#[test]
fn the_canary_runs_in_staging_before_production_can_be_approved() {
    let jobs = jobs();
    let production = &jobs["deploy-production"];
    let manual = production["rules"]
        .as_array()
        .unwrap()
        .iter()
        .all(|rule| rule["when"] == "manual");
    assert!(manual, "production waits for an approval");
    assert_eq!(production["allow_failure"], Value::Bool(false));
    let before = all_needs(&jobs, "deploy-production");
    for job in ["deploy-staging", "promote-staging", "smoke-test"] {
        assert!(before.contains(job), "production comes after {job}");
    }
    assert!(all_needs(&jobs, "promote-staging").contains("deploy-staging"));
    assert!(all_needs(&jobs, "promote").contains("deploy-production"));
    // Jobs that change a cluster are never interrupted halfway, one at a time per environment.
    for name in [
        "deploy-staging",
        "promote-staging",
        "deploy-production",
        "promote",
    ] {
        let job = &jobs[name];
        assert_eq!(job["interruptible"], Value::Bool(false), "{name}");
        let environment = job["environment"]["name"].as_str().unwrap();
        assert_eq!(job["resource_group"].as_str(), Some(environment), "{name}");
    }
}

/// A Rollout's canary steps with the pause durations blanked, and those durations in seconds.
fn canary_shape(rollout: &Object) -> (Vec<Value>, Vec<u64>) {
    let mut steps = rollout.0["spec"]["strategy"]["canary"]["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no canary steps", rollout.name()))
        .clone();
    let mut pauses = Vec::new();
    for step in &mut steps {
        if let Some(duration) = step.pointer_mut("/pause/duration") {
            pauses.push(seconds(duration.as_str().unwrap()));
            *duration = Value::Null;
        }
    }
    (steps, pauses)
}

#[test]
fn staging_runs_the_production_canary_with_shorter_pauses() {
    let (staging, production) = (Overlay::Staging.rendered(), Overlay::Production.rendered());
    assert_eq!(
        staging.of_kind("Deployment").count(),
        0,
        "staging keeps a Deployment"
    );
    let rollouts: Vec<&Object> = production.of_kind("Rollout").collect();
    assert_eq!(rollouts.len(), 3);
    for rollout in rollouts {
        let name = rollout.name();
        let (steps, pauses) = canary_shape(staging.get("Rollout", name));
        let (production_steps, production_pauses) = canary_shape(rollout);
        assert_eq!(
            steps, production_steps,
            "{name}: the same weights, analyses and gate"
        );
        for (ours, theirs) in pauses.iter().zip(&production_pauses) {
            assert!(
                *ours > 0 && ours <= theirs,
                "{name}: {pauses:?} vs {production_pauses:?}"
            );
        }
        let (ours, theirs) = (
            pauses.iter().sum::<u64>(),
            production_pauses.iter().sum::<u64>(),
        );
        assert!(
            ours < theirs,
            "{name}: staging pauses {ours} s, production {theirs} s"
        );
    }
    // order-service ends on the manual gate the staging promotion job waits for.
    let (steps, _) = canary_shape(staging.get("Rollout", "order-service"));
    assert_eq!(steps.last(), Some(&serde_json::json!({"pause": {}})));
    // And its analysis reads staging's own pods: every ServiceMonitor watches the overlay's
    // namespace, in every overlay that has them.
    for overlay in Overlay::ALL {
        let namespace = overlay_namespace(overlay);
        for monitor in overlay.rendered().of_kind("ServiceMonitor") {
            assert_eq!(
                monitor.0["spec"]["namespaceSelector"]["matchNames"],
                serde_json::json!([namespace]),
                "{}: {}",
                overlay.name(),
                monitor.name()
            );
        }
    }
}

#[test]
fn only_deploy_sh_applies_manifests() {
    assert!(
        !repo_path("cicd/deploy-overlay.sh").exists(),
        "the pipeline's own deploy script is gone: deploy.sh is the one deploy path"
    );
    let jobs = jobs();
    let mut deploying = BTreeMap::new();
    for (name, job) in &jobs {
        for line in lines(job) {
            for forbidden in [
                "kubectl apply",
                "kustomize edit",
                "kustomize build",
                "deploy-overlay",
            ] {
                assert!(!line.contains(forbidden), "{name}: {line}");
            }
            if line.contains("deploy.sh") {
                deploying.insert(name.clone(), line);
            }
        }
    }
    assert_eq!(
        deploying.keys().map(String::as_str).collect::<Vec<_>>(),
        ["deploy-production", "deploy-staging"],
        "{deploying:?}"
    );
}

/// What a stand-in recorded: one line per call, `<tool>|<decoded kubeconfig>|<PROMETHEUS_URL>|
/// <arguments>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    tool: String,
    kubeconfig: String,
    prometheus_url: String,
    args: String,
}

/// Writes the stand-ins for `nix`, `git` and `kubectl` into `bin`. `nix develop ... --command X`
/// runs X (so deploy.sh really runs), any other nix command only records; kubectl renders for
/// real and answers the rest as a cluster with every Secret and no Job would.
fn stand_ins(bin: &Path, log: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    let record = format!(
        r#"printf '%s|%s|%s|%s\n' "$(basename "$0")" "$(cat "${{KUBECONFIG:-/nonexistent}}" 2>/dev/null || true)" "${{PROMETHEUS_URL:-}}" "$*" >> '{log}'"#,
        log = log.display()
    );
    let nix = format!(
        r#"#!/usr/bin/env bash
set -euo pipefail
{record}
if [[ "$1" == develop ]]; then
  while (($# > 0)) && [[ "$1" != --command ]]; do shift; done
  shift
  exec "$@"
fi
"#
    );
    let git = format!("#!/usr/bin/env bash\n{record}\n");
    let kubectl = format!(
        r#"#!/usr/bin/env bash
{record}
case "$1" in
  kustomize) exec '{real}' "$@" ;;
  get)
    if [[ "$2" == secret && "$*" == *jsonpath* ]]; then printf '%s' "$(printf 'S3cr3tValue' | base64)"; fi ;;
esac
exit 0
"#,
        real = tools::require("kubectl").display()
    );
    for (name, body) in [("nix", nix), ("git", git), ("kubectl", kubectl)] {
        let path = bin.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn recorded(log: &Path) -> Vec<Call> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    std::fs::remove_file(log).ok();
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(4, '|');
            let mut next = || parts.next().unwrap_or_default().to_owned();
            Call {
                tool: next(),
                kubeconfig: next(),
                prometheus_url: next(),
                args: next(),
            }
        })
        .collect()
}

/// A single-quoted shell word.
fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// A checkout of the parts of the repository the cluster jobs read, with the images job's
/// artifact, in a scratch directory: the jobs write there (`.kubeconfig`), never in the
/// repository.
fn checkout(name: &str) -> PathBuf {
    let dir = scratch_dir!(name);
    let project = dir.join("project");
    std::fs::create_dir_all(project.join("kustomize")).unwrap();
    for part in [
        "deploy.sh",
        "k8s",
        "monitoring",
        "cicd",
        "kustomize/overlays",
        "kustomize/components",
    ] {
        let target = project.join(part);
        let status = Command::new("cp")
            .arg("-R")
            .arg(repo_path(part))
            .arg(&target)
            .status()
            .unwrap();
        assert!(status.success(), "copying {part}");
    }
    let digest: String = std::iter::repeat_n('4', 64).collect();
    let refs: String = ["gateway", "order-service", "inventory-service"]
        .iter()
        .map(|s| format!("{s} registry.example.com/shop/flash-sale/{s}:c0ffee@sha256:{digest}\n"))
        .collect();
    std::fs::write(project.join("image-refs"), refs).unwrap();
    dir
}

/// The project's CI/CD variables for a run: one kubeconfig and one Prometheus per environment.
fn project_variables() -> Vec<(&'static str, String)> {
    let base64 = |text: &str| {
        let output =
            tools::run_with_input(Path::new("base64"), ["-w0"], text.as_bytes()).expect("base64");
        String::from_utf8(output.stdout).unwrap()
    };
    vec![
        ("KUBECONFIG_STAGING", base64("the staging kubeconfig")),
        ("KUBECONFIG_PRODUCTION", base64("the production kubeconfig")),
        (
            "PROMETHEUS_URL_STAGING",
            "https://prometheus.staging.example.com".to_owned(),
        ),
        (
            "PROMETHEUS_URL_PRODUCTION",
            "https://prometheus.example.com".to_owned(),
        ),
    ]
}

/// Runs job `name`'s before_script and script in `dir`'s checkout as a runner does (one bash,
/// `set -eo pipefail`, the pipeline's and the job's variables exported, the project's
/// `variables` given), with the stand-ins first on PATH. Returns the output and the calls.
fn run_job(dir: &Path, name: &str, variables: &[(&str, String)]) -> (Output, Vec<Call>) {
    let (project, bin, log) = (dir.join("project"), dir.join("bin"), dir.join("calls.log"));
    stand_ins(&bin, &log);
    let jobs = jobs();
    let job = &jobs[name];
    let mut script = String::from("set -eo pipefail\n");
    let mut export = |key: &str, value: &Value| {
        let value = value.as_str().unwrap_or_else(|| panic!("{key}: {value}"));
        script.push_str(&format!("export {key}={}\n", quoted(value)));
    };
    for (key, value) in pipeline()["variables"].as_object().unwrap() {
        export(key, value);
    }
    for (key, value) in job["variables"].as_object().into_iter().flatten() {
        export(key, value);
    }
    let environment = job["environment"]["name"].as_str().unwrap_or_default();
    script.push_str(&format!(
        "export CI_ENVIRONMENT_NAME={}\n",
        quoted(environment)
    ));
    script.push_str(&format!("cd {}\n", quoted(&project.display().to_string())));
    for line in lines(job) {
        script.push_str(&line);
        script.push('\n');
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir)
        .env("TMPDIR", std::env::temp_dir())
        .env("CI_PROJECT_DIR", &project)
        .envs(variables.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("running bash");
    (output, recorded(&log))
}

fn succeeded(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
}

/// The value after `--namespace` in a kubectl call.
fn namespace_of(args: &str) -> Option<&str> {
    let mut words = args.split_whitespace();
    words.find(|w| *w == "--namespace" || *w == "-n")?;
    words.next()
}

#[test]
fn each_deploy_job_runs_deploy_sh_with_its_own_credentials_and_namespace() {
    let mut seen = BTreeMap::new();
    for (job, overlay, kubeconfig) in [
        ("deploy-staging", Overlay::Staging, "the staging kubeconfig"),
        (
            "deploy-production",
            Overlay::Production,
            "the production kubeconfig",
        ),
    ] {
        let dir = checkout(&format!("pipeline-{job}"));
        let (output, calls) = run_job(&dir, job, &project_variables());
        succeeded(&output, job);
        let command = format!(
            "develop --print-build-logs --no-update-lock-file .#deploy --command bash deploy.sh \
             --env {} --images image-refs all",
            overlay.name()
        );
        let nix: Vec<&Call> = calls.iter().filter(|c| c.tool == "nix").collect();
        assert_eq!(nix.len(), 1, "{job}: {nix:?}");
        assert_eq!(nix[0].args, command, "{job}");
        assert!(
            calls
                .iter()
                .any(|c| c.tool == "git" && c.args == "add --intent-to-add flake.lock"),
            "{job}: {calls:?}"
        );
        let kubectl: Vec<&Call> = calls.iter().filter(|c| c.tool == "kubectl").collect();
        assert!(
            kubectl.iter().any(|c| c.args.starts_with("apply -k ")),
            "{job}: deploy.sh applied nothing: {kubectl:?}"
        );
        let namespace = overlay_namespace(overlay);
        for call in &kubectl {
            assert_eq!(call.kubeconfig, kubeconfig, "{job}: {}", call.args);
            if let Some(used) = namespace_of(&call.args) {
                assert_eq!(used, namespace, "{job}: {}", call.args);
            }
        }
        // deploy.sh's safeguards ran: Secrets, CRDs, the finished Jobs, the waits.
        for step in [
            "get secret mysql-secret",
            "get crd rollouts.argoproj.io",
            "get job ",
            "wait job/flash-sale-migrate",
        ] {
            assert!(
                kubectl.iter().any(|c| c.args.starts_with(step)),
                "{job} does not `{step}`"
            );
        }
        seen.insert(job, (namespace, kubeconfig));
    }
    assert_ne!(seen["deploy-staging"], seen["deploy-production"]);
    assert_ne!(seen["deploy-staging"].0, seen["deploy-production"].0);
}

#[test]
fn a_deploy_job_without_its_kubeconfig_stops_before_any_cluster_call() {
    let dir = checkout("pipeline-no-kubeconfig");
    let variables: Vec<(&str, String)> = project_variables()
        .into_iter()
        .filter(|(key, _)| *key != "KUBECONFIG_PRODUCTION")
        .collect();
    let (output, calls) = run_job(&dir, "deploy-production", &variables);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("KUBECONFIG_PRODUCTION"), "{stderr}");
    assert!(
        calls.iter().all(|c| c.tool == "git"),
        "nothing ran: {calls:?}"
    );
}

/// Seconds in a GitLab or promotion-command duration such as `2h`, `90m`.
fn seconds(text: &str) -> u64 {
    let (number, unit) = text.split_at(text.len() - 1);
    let number: u64 = number.parse().unwrap_or_else(|_| panic!("{text}"));
    number
        * match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => panic!("{text}"),
        }
}

#[test]
fn each_promotion_job_judges_its_own_environment_through_its_own_prometheus() {
    let jobs = jobs();
    for (job, deploy, overlay, kubeconfig, prometheus) in [
        (
            "promote-staging",
            "deploy-staging",
            Overlay::Staging,
            "the staging kubeconfig",
            "https://prometheus.staging.example.com",
        ),
        (
            "promote",
            "deploy-production",
            Overlay::Production,
            "the production kubeconfig",
            "https://prometheus.example.com",
        ),
    ] {
        assert_eq!(
            jobs[job]["environment"], jobs[deploy]["environment"],
            "{job} acts where {deploy} deployed"
        );
        let dir = checkout(&format!("pipeline-{job}"));
        let (output, calls) = run_job(&dir, job, &project_variables());
        succeeded(&output, job);
        let nix: Vec<&Call> = calls.iter().filter(|c| c.tool == "nix").collect();
        assert_eq!(nix.len(), 1, "{job}: {nix:?}");
        let namespace = overlay_namespace(overlay);
        assert_eq!(
            nix[0].args,
            format!(
                "run --print-build-logs --no-update-lock-file .#promote -- --rollout \
                 order-service --namespace {namespace} --wait 90m"
            ),
            "{job}"
        );
        assert_eq!(nix[0].kubeconfig, kubeconfig, "{job}");
        assert_eq!(nix[0].prometheus_url, prometheus, "{job}");
        // The job outlives the command's wait.
        let timeout = jobs[job]["timeout"].as_str().unwrap();
        assert!(
            seconds(timeout) > seconds("90m"),
            "{job}: timeout {timeout}"
        );

        // Without its Prometheus the job says which variable is missing and runs nothing.
        let variable = format!("PROMETHEUS_URL_{}", overlay.name().to_uppercase());
        let without: Vec<(&str, String)> = project_variables()
            .into_iter()
            .filter(|(key, _)| *key != variable)
            .collect();
        let (output, calls) = run_job(&dir, job, &without);
        assert!(!output.status.success(), "{job} without {variable}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&variable), "{job}: {stderr}");
        assert!(calls.iter().all(|c| c.tool != "nix"), "{job}: {calls:?}");
    }
}
