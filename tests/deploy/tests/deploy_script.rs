//! `deploy.sh`: shellcheck clean (with the other scripts of the bundle), the seed's commands,
//! a dry run that renders without a cluster exactly what the real run would apply, and a real
//! run, against a stand-in `kubectl` that records its calls, that applies the overlay with
//! `kubectl apply -k`, creates the Secrets the manifests reference and never passes a secret on
//! a command line.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deploy_tests::manifest::{EXTERNAL_SECRETS, Object, Overlay, parse_stream};
use deploy_tests::{repo_path, scratch_dir, tools};

/// The layers of deploy.sh and the app.kubernetes.io/component values each applies.
const LAYERS: [(&str, &str); 3] = [
    ("infra", "platform,cache,broker,database"),
    ("services", "platform,migration,backend,gateway,canary"),
    ("monitoring", "monitoring"),
];

/// Runs deploy.sh with `args` and extra environment; no kubeconfig, so nothing can reach a
/// cluster by accident.
fn deploy(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new("bash");
    command.arg(repo_path("deploy.sh")).args(args);
    command
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("FLASH_SALE_ENV");
    command.envs(env.iter().copied());
    command.output().expect("running deploy.sh")
}

/// The stdout and stderr of a run that must succeed.
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
    let mut command = Command::new(tools::require("shellcheck"));
    command.args(["--severity=style", "--external-sources"]);
    for script in [
        "deploy.sh",
        "tests/deploy/install-tools.sh",
        "k8s/redis/bootstrap.sh",
        "k8s/redis/rejoin.sh",
        "k8s/redis/ready.sh",
        "k8s/redpanda/create-topic.sh",
    ] {
        command.arg(repo_path(script));
    }
    tools::run_ok(&mut command).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn help_names_every_seed_command_and_mistakes_are_refused() {
    let (stdout, _) = ok(&deploy(&["help"], &[]), "deploy.sh help");
    for command in [
        "help",
        "all",
        "infra",
        "services",
        "monitoring",
        "verify",
        "cleanup",
    ] {
        let described = stdout.contains(&format!("\n  {command} "));
        assert!(described, "help does not describe `{command}`:\n{stdout}");
    }
    for option in ["--env", "--dry-run"] {
        assert!(stdout.contains(option), "help does not describe {option}");
    }
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
    for overlay in Overlay::ALL {
        let args = ["--env", overlay.name(), "--dry-run", "all"];
        let (stdout, stderr) = ok(&deploy(&args, &[]), "dry run of all");
        let printed = parse_stream(&stdout).unwrap();
        assert!(
            printed == overlay.rendered().objects,
            "{}: not the overlay",
            overlay.name()
        );
        let apply = format!("+ kubectl apply -k {}", overlay.dir().display());
        let shown = stderr.lines().any(|line| line == apply);
        assert!(
            shown,
            "{}: the dry run shows no `{apply}`:\n{stderr}",
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
            let context = format!("{} {layer}", overlay.name());
            let (stdout, stderr) = ok(&deploy(&["-e", overlay.name(), "-n", layer], &[]), layer);
            let printed = parse_stream(&stdout).unwrap();
            if layer == "monitoring" && overlay == Overlay::Dev {
                let said = stderr.contains("no monitoring component");
                assert!(printed.is_empty() && said, "{context}: {stderr}");
                continue;
            }
            let selected = |o: &&Object| {
                let component = o.labels().get("app.kubernetes.io/component").cloned();
                component.is_some_and(|c| components.split(',').any(|w| w == c))
            };
            let expected: Vec<Object> = rendered.objects.iter().filter(selected).cloned().collect();
            assert_eq!(
                ids(&printed),
                ids(&expected),
                "{context}: the dry run and the selector"
            );
            assert!(
                printed == expected,
                "{context}: objects printed differ from the rendered"
            );
            let selector = format!("--selector 'app.kubernetes.io/component in ({components})'");
            let apply = format!("apply -k {} {selector}", overlay.dir().display());
            assert!(
                stderr.contains(&apply),
                "{context}: the real run would `{apply}`:\n{stderr}"
            );
            covered.extend(ids(&printed));
        }
        // Nothing in the overlay is left out of every layer.
        let all = ids(&rendered.objects);
        assert_eq!(covered, all, "{}: objects no layer applies", overlay.name());
    }
}

/// A stand-in for kubectl in `dir`: records every call, renders for real, answers the rest.
/// Returns the script and its log of calls.
fn fake_kubectl(dir: &Path, secrets_exist: bool) -> (PathBuf, PathBuf) {
    let (script, log) = (dir.join("kubectl"), dir.join("calls.log"));
    let body = format!(
        r#"#!/usr/bin/env bash
printf '%s\n' "$*" >> '{log}'
case "$1" in
  kustomize) exec '{real}' "$@" ;;
  get)
    if [[ "$2" == secret ]]; then
      if [[ "$*" == *jsonpath* ]]; then printf '%s' "$(printf 'S3cr3tValue' | base64)"; exit 0; fi
      exit {secret_status}
    fi
    exit 0 ;;
  *) exit 0 ;;
esac
"#,
        log = log.display(),
        real = tools::require("kubectl").display(),
        secret_status = if secrets_exist { 0 } else { 1 },
    );
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, log)
}

/// The calls the stand-in kubectl recorded since the last time; the log starts afresh.
fn calls(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    std::fs::remove_file(log).ok();
    text.lines().map(str::to_owned).collect()
}

#[test]
fn a_real_run_applies_each_layer_with_kubectl_apply_k() {
    let (kubectl, log) = fake_kubectl(&scratch_dir!("fake-kubectl"), true);
    let env = [("KUBECTL", kubectl.as_path())];
    let overlay = Overlay::Staging.dir();
    for (layer, components) in LAYERS {
        ok(&deploy(&["--env", "staging", layer], &env), layer);
        let made = calls(&log);
        let apply = format!(
            "apply -k {} --selector app.kubernetes.io/component in ({components})",
            overlay.display()
        );
        assert!(
            made.contains(&apply),
            "{layer}: no `{apply}` among\n{}",
            made.join("\n")
        );
        let created = made.iter().any(|c| c.starts_with("create secret"));
        assert!(!created, "{layer}: secrets exist, none is created");
    }
    ok(&deploy(&["--env", "staging", "all"], &env), "all");
    let made = calls(&log);
    let apply = format!("apply -k {}", overlay.display());
    assert!(made.contains(&apply), "all: {}", made.join("\n"));
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
fn first_installs_create_the_referenced_secrets_without_showing_them() {
    let (kubectl, log) = fake_kubectl(&scratch_dir!("fake-kubectl-no-secrets"), false);
    ok(
        &deploy(&["--env", "dev", "all"], &[("KUBECTL", kubectl.as_path())]),
        "all",
    );
    let mut created = BTreeMap::new();
    for call in calls(&log)
        .into_iter()
        .filter(|c| c.starts_with("create secret generic"))
    {
        // Values travel in files only; a literal would show in `ps` and in shell history.
        let words: Vec<&str> = call.split_whitespace().collect();
        let sources = words.iter().filter(|w| w.starts_with("--from-"));
        let keys: BTreeSet<String> = sources
            .map(|w| {
                w.strip_prefix("--from-file=")
                    .unwrap_or_else(|| panic!("{call}"))
            })
            .map(|w| w.split('=').next().unwrap().to_owned())
            .collect();
        assert!(
            !call.contains("S3cr3tValue"),
            "a secret value on the command line: {call}"
        );
        created.insert(words[3].to_owned(), keys);
    }
    // Exactly the Secrets, and keys, that the manifests reference.
    let referenced: BTreeMap<String, BTreeSet<String>> = EXTERNAL_SECRETS
        .iter()
        .map(|(name, keys)| {
            (
                name.to_string(),
                keys.iter().map(|k| k.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(created, referenced);
}

#[test]
fn production_refuses_placeholder_digests_but_still_renders() {
    let (kubectl, log) = fake_kubectl(&scratch_dir!("fake-kubectl-production"), true);
    let output = deploy(
        &["--env", "production", "services"],
        &[("KUBECTL", kubectl.as_path())],
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("placeholder image digests"));
    let applied = calls(&log).iter().any(|c| c.starts_with("apply"));
    assert!(!applied, "nothing may be applied");
    let dry_run = deploy(&["--env", "production", "--dry-run", "services"], &[]);
    ok(&dry_run, "a dry run of production");
}

#[test]
fn verify_and_cleanup_dry_runs_only_print() {
    for command in ["verify", "cleanup"] {
        let (_, stderr) = ok(&deploy(&["--dry-run", command], &[]), command);
        let printed = stderr.lines().any(|l| l.starts_with("+ kubectl "));
        assert!(printed, "{command}: {stderr}");
        if command == "cleanup" {
            let delete = format!("+ kubectl delete -k {}", Overlay::Dev.dir().display());
            assert!(stderr.contains(&delete), "{stderr}");
        }
    }
}
