//! `deploy.sh`: shellcheck clean (with the other scripts of the bundle), the seed's commands,
//! a dry run that renders without a cluster exactly what the real run would apply, and a real
//! run, against a stand-in `kubectl` that records its calls, that applies the overlay with
//! `kubectl apply -k` and never passes a secret on a command line.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deploy_tests::manifest::{Object, Overlay, parse_stream};
use deploy_tests::{repo_path, scratch_dir, tools};

/// The layers of deploy.sh and the app.kubernetes.io/component values each applies.
const LAYERS: [(&str, &[&str]); 3] = [
    ("infra", &["platform", "cache", "broker", "database"]),
    (
        "services",
        &["platform", "migration", "backend", "gateway", "canary"],
    ),
    ("monitoring", &["monitoring"]),
];

const SEED_COMMANDS: [&str; 7] = [
    "help",
    "all",
    "infra",
    "services",
    "monitoring",
    "verify",
    "cleanup",
];

/// Runs deploy.sh with `args` and extra environment; no kubeconfig, so nothing can reach a
/// cluster by accident.
fn deploy(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new("bash");
    command.arg(repo_path("deploy.sh")).args(args);
    command
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("FLASH_SALE_ENV");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("running deploy.sh")
}

fn ok(output: &Output, what: &str) -> (String, String) {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    (stdout, stderr)
}

fn ids(objects: &[Object]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| format!("{}/{}", o.api_version(), o.id()))
        .collect()
}

#[test]
fn shellcheck_is_clean() {
    let scripts = [
        "deploy.sh",
        "tests/deploy/install-tools.sh",
        "k8s/redis/bootstrap.sh",
        "k8s/redis/rejoin.sh",
        "k8s/redpanda/create-topic.sh",
    ];
    let mut command = Command::new(tools::require("shellcheck"));
    command.args(["--severity=style", "--external-sources"]);
    for script in scripts {
        command.arg(repo_path(script));
    }
    tools::run_ok(&mut command).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn help_names_every_seed_command() {
    let (stdout, _) = ok(&deploy(&["help"], &[]), "deploy.sh help");
    for command in SEED_COMMANDS {
        assert!(
            stdout.contains(&format!("\n  {command} ")),
            "help does not describe `{command}`:\n{stdout}"
        );
    }
    for option in ["--env", "--dry-run"] {
        assert!(stdout.contains(option), "help does not describe {option}");
    }
}

#[test]
fn mistakes_are_refused() {
    for args in [
        &["frobnicate"][..],
        &["--env", "qa", "--dry-run", "all"],
        &["--bogus", "all"],
        &["infra", "services"],
    ] {
        let output = deploy(args, &[]);
        assert!(!output.status.success(), "deploy.sh {args:?} should fail");
        assert!(
            !output.stderr.is_empty(),
            "deploy.sh {args:?} should say why"
        );
    }
}

#[test]
fn a_dry_run_of_all_renders_the_whole_overlay_without_a_cluster() {
    let _ = tools::require("kubectl");
    for overlay in Overlay::ALL {
        let (stdout, stderr) = ok(
            &deploy(&["--env", overlay.name(), "--dry-run", "all"], &[]),
            "dry run of all",
        );
        let printed = parse_stream(&stdout).unwrap();
        assert_eq!(
            printed,
            overlay.rendered().objects,
            "{}: the dry run prints the rendered overlay",
            overlay.name()
        );
        let apply = format!("+ kubectl apply -k {}", overlay.dir().display());
        assert!(
            stderr.lines().any(|line| line == apply),
            "{}: the dry run shows `{apply}`:\n{stderr}",
            overlay.name()
        );
    }
}

#[test]
fn dry_runs_of_the_layers_select_what_their_label_selectors_select() {
    for overlay in Overlay::ALL {
        let rendered = overlay.rendered();
        let mut covered = BTreeSet::new();
        for (layer, components) in LAYERS {
            let (stdout, stderr) = ok(&deploy(&["-e", overlay.name(), "-n", layer], &[]), layer);
            let printed = parse_stream(&stdout).unwrap();
            let expected: Vec<Object> = rendered
                .objects
                .iter()
                .filter(|o| {
                    o.labels()
                        .get("app.kubernetes.io/component")
                        .is_some_and(|c| components.contains(&c.as_str()))
                })
                .cloned()
                .collect();
            let context = format!("{} {layer}", overlay.name());
            if layer == "monitoring" && overlay == Overlay::Dev {
                assert!(
                    printed.is_empty() && stderr.contains("no monitoring component"),
                    "{context}: {stderr}"
                );
                continue;
            }
            assert_eq!(
                ids(&printed),
                ids(&expected),
                "{context}: the dry run and the selector disagree"
            );
            assert_eq!(
                printed, expected,
                "{context}: objects printed differ from the rendered ones"
            );
            let selector = format!("app.kubernetes.io/component in ({})", components.join(","));
            assert!(
                stderr.contains(&format!(
                    "apply -k {} --selector '{selector}'",
                    overlay.dir().display()
                )),
                "{context}: the real run would apply with `--selector '{selector}'`:\n{stderr}"
            );
            covered.extend(ids(&printed));
        }
        // Nothing in the overlay is left out of every layer.
        assert_eq!(
            covered,
            ids(&rendered.objects),
            "{}: objects no layer applies",
            overlay.name()
        );
    }
}

/// A stand-in for kubectl: records every call, renders for real, answers the rest.
fn fake_kubectl(dir: &Path, secrets_exist: bool) -> (PathBuf, PathBuf) {
    let log = dir.join("calls.log");
    let script = dir.join("kubectl");
    let real = tools::require("kubectl");
    let body = format!(
        r#"#!/usr/bin/env bash
printf '%s\n' "$*" >> '{log}'
case "$1" in
  kustomize) exec '{real}' "$@" ;;
  get)
    if [[ "$2" == secret ]]; then
      if [[ "$*" == *jsonpath* ]]; then printf '%s' "$(printf 'S3cr3tValue' | base64)"; exit 0; fi
      {secret_answer}
    fi
    exit 0 ;;
  *) exit 0 ;;
esac
"#,
        log = log.display(),
        real = real.display(),
        secret_answer = if secrets_exist { "exit 0" } else { "exit 1" },
    );
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, log)
}

fn calls(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_real_run_applies_each_layer_with_kubectl_apply_k() {
    let dir = scratch_dir!("fake-kubectl");
    let (kubectl, log) = fake_kubectl(&dir, true);
    let kubectl = kubectl.to_string_lossy().into_owned();
    let overlay = Overlay::Staging.dir();
    let mut expected = BTreeMap::new();
    for (layer, components) in LAYERS {
        expected.insert(
            layer,
            format!(
                "apply -k {} --selector app.kubernetes.io/component in ({})",
                overlay.display(),
                components.join(",")
            ),
        );
    }
    for (layer, _) in LAYERS {
        std::fs::remove_file(&log).ok();
        ok(
            &deploy(&["--env", "staging", layer], &[("KUBECTL", &kubectl)]),
            layer,
        );
        let made = calls(&log);
        assert!(
            made.contains(&expected[layer]),
            "{layer}: no `{}` among\n{}",
            expected[layer],
            made.join("\n")
        );
        assert!(
            !made.iter().any(|c| c.starts_with("create secret")),
            "{layer}: secrets exist, none is created"
        );
    }
    std::fs::remove_file(&log).ok();
    ok(
        &deploy(&["--env", "staging", "all"], &[("KUBECTL", &kubectl)]),
        "all",
    );
    let made = calls(&log);
    assert!(
        made.contains(&format!("apply -k {}", overlay.display())),
        "all: {}",
        made.join("\n")
    );
    // Waits for what it applied.
    for wait in [
        "rollout status statefulset/redis-cluster",
        "wait job/redis-cluster-bootstrap",
        "wait job/flash-sale-migrate",
        "rollout status deployment/order-service",
    ] {
        assert!(
            made.iter().any(|c| c.starts_with(wait)),
            "all does not `{wait}`"
        );
    }
}

#[test]
fn first_installs_create_the_secrets_without_showing_them() {
    let dir = scratch_dir!("fake-kubectl-no-secrets");
    let (kubectl, log) = fake_kubectl(&dir, false);
    ok(
        &deploy(
            &["--env", "dev", "all"],
            &[("KUBECTL", &kubectl.to_string_lossy())],
        ),
        "all",
    );
    let created: Vec<String> = calls(&log)
        .into_iter()
        .filter(|c| c.starts_with("create secret generic"))
        .collect();
    let names: BTreeSet<&str> = created
        .iter()
        .filter_map(|c| c.split_whitespace().nth(3))
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "mysql-secret",
            "flash-sale-db",
            "inventory-admin",
            "gateway-auth"
        ])
    );
    for call in &created {
        // Values travel in files only; a literal would show in `ps` and in shell history.
        assert!(!call.contains("--from-literal"), "{call}");
        assert!(
            call.split_whitespace()
                .filter(|w| w.starts_with("--from-"))
                .all(|w| w.starts_with("--from-file=")),
            "{call}"
        );
        assert!(
            !call.contains("S3cr3tValue"),
            "a secret value on the command line: {call}"
        );
    }
}

#[test]
fn production_refuses_placeholder_digests_but_still_renders() {
    let dir = scratch_dir!("fake-kubectl-production");
    let (kubectl, log) = fake_kubectl(&dir, true);
    let output = deploy(
        &["--env", "production", "services"],
        &[("KUBECTL", &kubectl.to_string_lossy())],
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("placeholder image digests"));
    assert!(
        !calls(&log).iter().any(|c| c.starts_with("apply")),
        "nothing may be applied"
    );
    ok(
        &deploy(&["--env", "production", "--dry-run", "services"], &[]),
        "a dry run of production",
    );
}

#[test]
fn verify_and_cleanup_dry_runs_only_print() {
    for command in ["verify", "cleanup"] {
        let (_, stderr) = ok(&deploy(&["--dry-run", command], &[]), command);
        assert!(
            stderr.lines().any(|l| l.starts_with("+ kubectl ")),
            "{command}: {stderr}"
        );
    }
    let (_, stderr) = ok(&deploy(&["--dry-run", "cleanup"], &[]), "cleanup");
    assert!(
        stderr.contains(&format!(
            "+ kubectl delete -k {}",
            Overlay::Dev.dir().display()
        )),
        "{stderr}"
    );
}
