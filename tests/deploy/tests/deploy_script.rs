//! `deploy.sh`: shellcheck clean (with the other scripts of the bundle), the seed's commands,
//! a dry run that renders without a cluster exactly what the real run would apply, and a real
//! run, against a stand-in `kubectl` that records its calls, that applies the overlay with
//! `kubectl apply -k`, creates the Secrets the manifests reference and never passes a secret on
//! a command line. Each overlay's commands address its own namespace; `--images` deploys a
//! release's images by digest; and against a stand-in cluster that refuses to change a Job's
//! template as the API server does, a second release (or a retry after a failed migration)
//! applies cleanly because the finished Job is deleted first.

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
        "k8s/redis/start.sh",
        "k8s/redis/bootstrap.sh",
        "k8s/redis/rejoin.sh",
        "k8s/redis/ready.sh",
        "k8s/redis/alive.sh",
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
    // Waits for what it applied: staging's services are Rollouts, dev's Deployments.
    for wait in [
        "rollout status statefulset/redis-cluster",
        "wait job/redis-cluster-bootstrap",
        "wait job/flash-sale-migrate",
        "wait rollout.argoproj.io/order-service",
    ] {
        assert!(
            made.iter().any(|c| c.starts_with(wait)),
            "all does not `{wait}`"
        );
    }
    ok(&deploy(&["--env", "dev", "all"], &env), "all (dev)");
    let made = calls(&log);
    let waited = made
        .iter()
        .any(|c| c.starts_with("rollout status deployment/order-service"));
    assert!(waited, "dev: {}", made.join("\n"));
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
fn the_help_and_the_dry_run_name_every_secret_a_first_install_creates() {
    // What deploy.sh says it creates is what it creates (the test above): each Secret with its
    // keys, in the help's list and in the dry run's "would create" lines.
    let (help, _) = ok(&deploy(&["help"], &[]), "deploy.sh help");
    let (_, dry_run) = ok(
        &deploy(&["--env", "dev", "--dry-run", "all"], &[]),
        "dry run",
    );
    let would: String = dry_run
        .lines()
        .filter(|l| l.contains("would create secrets"))
        .collect();
    for (name, keys) in EXTERNAL_SECRETS {
        for (text, place) in [(&help, "help"), (&would, "dry run")] {
            let listed = text.contains(&format!("{name} ({}", keys[0]));
            assert!(listed, "the {place} does not name {name}:\n{text}");
            for key in keys {
                assert!(text.contains(key), "the {place} does not name {name}/{key}");
            }
        }
    }
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

/// The value after `--namespace` in a recorded or printed kubectl call.
fn namespace_of(call: &str) -> Option<&str> {
    let mut words = call.split_whitespace();
    words.find(|w| *w == "--namespace" || *w == "-n")?;
    words.next()
}

/// The name of the one Namespace the overlay renders.
fn overlay_namespace(overlay: Overlay) -> &'static str {
    let namespaces: Vec<&str> = overlay
        .rendered()
        .of_kind("Namespace")
        .map(Object::name)
        .collect();
    assert_eq!(namespaces.len(), 1, "{}: {namespaces:?}", overlay.name());
    namespaces[0]
}

#[test]
fn every_command_addresses_the_namespace_its_overlay_renders() {
    // Staging and production never share a namespace: a staging release cannot touch
    // production's Secrets, volumes or Rollouts on a shared cluster.
    assert_eq!(overlay_namespace(Overlay::Production), "flash-sale");
    assert_eq!(overlay_namespace(Overlay::Staging), "flash-sale-staging");
    for overlay in Overlay::ALL {
        let expected = overlay_namespace(overlay);
        let mut seen = 0;
        for command in ["all", "verify", "cleanup"] {
            let (_, stderr) = ok(
                &deploy(&["--env", overlay.name(), "--dry-run", command], &[]),
                command,
            );
            for line in stderr.lines().filter(|l| l.starts_with("+ ")) {
                if let Some(namespace) = namespace_of(line) {
                    assert_eq!(namespace, expected, "{}: {line}", overlay.name());
                    seen += 1;
                }
            }
        }
        assert!(
            seen > 5,
            "{}: only {seen} namespaced commands",
            overlay.name()
        );
    }
    // A real run creates the Secrets in the overlay's namespace too.
    let (kubectl, log) = fake_kubectl(&scratch_dir!("fake-kubectl-staging-secrets"), false);
    ok(
        &deploy(
            &["--env", "staging", "all"],
            &[("KUBECTL", kubectl.as_path())],
        ),
        "all",
    );
    let made = calls(&log);
    let secrets: Vec<&String> = made
        .iter()
        .filter(|c| c.starts_with("create secret"))
        .collect();
    assert_eq!(secrets.len(), EXTERNAL_SECRETS.len(), "{}", made.join("\n"));
    for call in made.iter().filter(|c| namespace_of(c).is_some()) {
        assert_eq!(namespace_of(call), Some("flash-sale-staging"), "{call}");
    }
}

/// An image-refs file as `cicd/push-images.sh` writes it, for release `tag`, every digest
/// `digit` repeated.
fn image_refs(dir: &Path, tag: &str, digit: char, services: &[&str]) -> PathBuf {
    let file = dir.join(format!("image-refs-{tag}"));
    let digest: String = std::iter::repeat_n(digit, 64).collect();
    let text: String = services
        .iter()
        .map(|s| format!("{s} registry.example.com/shop/flash-sale/{s}:{tag}@sha256:{digest}\n"))
        .collect();
    std::fs::write(&file, text).unwrap();
    file
}

const SERVICES: [&str; 3] = ["gateway", "order-service", "inventory-service"];

#[test]
fn images_deploys_a_release_by_digest_and_refuses_an_incomplete_one() {
    let dir = scratch_dir!("images-option");
    let refs = image_refs(&dir, "abc123", '1', &SERVICES);
    let refs_arg = refs.display().to_string();
    for overlay in [Overlay::Staging, Overlay::Production] {
        let args = [
            "--env",
            overlay.name(),
            "--images",
            &refs_arg,
            "--dry-run",
            "all",
        ];
        let (stdout, stderr) = ok(&deploy(&args, &[]), "dry run with --images");
        let printed = parse_stream(&stdout).unwrap();
        // The overlay, with only our images changed.
        assert_eq!(
            ids(&printed),
            ids(&overlay.rendered().objects),
            "{}",
            overlay.name()
        );
        let mut ours = BTreeSet::new();
        for object in &printed {
            for container in object.containers() {
                let image = container["image"].as_str().unwrap();
                assert!(
                    !image.starts_with("flash-sale/"),
                    "{}: {image}",
                    overlay.name()
                );
                if image.contains("/flash-sale/") {
                    ours.insert(image.to_owned());
                }
            }
        }
        let digest: String = std::iter::repeat_n('1', 64).collect();
        let expected: BTreeSet<String> = SERVICES
            .iter()
            .map(|s| format!("registry.example.com/shop/flash-sale/{s}:abc123@sha256:{digest}"))
            .collect();
        assert_eq!(ours, expected, "{}", overlay.name());
        // What it applies is the release kustomization, not the overlay as committed.
        let apply = stderr
            .lines()
            .find(|l| l.starts_with("+ kubectl apply -k "))
            .unwrap_or_else(|| panic!("no apply:\n{stderr}"));
        assert!(!apply.contains("kustomize/overlays"), "{apply}");
    }
    // Production with the release's digests passes the placeholder check a real run makes.
    let (kubectl, log) = fake_kubectl(&dir, true);
    let args = ["--env", "production", "--images", &refs_arg, "services"];
    ok(
        &deploy(&args, &[("KUBECTL", kubectl.as_path())]),
        "production services",
    );
    assert!(calls(&log).iter().any(|c| c.starts_with("apply -k ")));

    let missing = image_refs(&dir, "partial", '2', &SERVICES[..2]);
    let bad = dir.join("bad-refs");
    std::fs::write(
        &bad,
        "gateway registry.example.com/shop/flash-sale/gateway:latest\n",
    )
    .unwrap();
    for (file, says) in [
        (missing, "sets no image for: flash-sale/inventory-service"),
        (bad, "needs a reference by digest"),
        (dir.join("absent"), "cannot read"),
    ] {
        let file = file.display().to_string();
        let output = deploy(
            &["--env", "staging", "--images", &file, "--dry-run", "all"],
            &[],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(says),
            "{file}: {stderr}"
        );
    }
}

/// A stand-in for a cluster in `dir`, as far as deploy.sh's Job handling goes: it renders for
/// real, remembers every Job it applied (its images stand for its pod template) and, as the API
/// server does, refuses to apply a Job whose template changed ("field is immutable"). Jobs finish
/// at once: Complete, or Failed for the Job named by FAKE_FAILING_JOB. `get job -o jsonpath`
/// answers as deploy.sh's JOB_STATES template prints (name, then its true condition types),
/// `delete job NAME...` forgets, `wait job/NAME --for=condition=complete` fails for a failed
/// Job. Every call is recorded; Secrets exist; everything else succeeds.
fn fake_cluster(dir: &Path) -> (PathBuf, PathBuf) {
    let (script, log, jobs) = (dir.join("kubectl"), dir.join("calls.log"), dir.join("jobs"));
    std::fs::create_dir_all(&jobs).unwrap();
    let body = format!(
        r#"#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "$*" >> '{log}'
jobs='{jobs}'
real='{real}'
case "$1" in
  kustomize) exec "$real" "$@" ;;
  apply)
    [[ "$2" == -k ]] || {{ echo "stand-in: apply -k only" >&2; exit 2; }}
    selector=""
    [[ "${{4:-}}" == --selector ]] && selector="$5"
    rendered="$("$real" kustomize "$3")"
    # Each Job the selector picks: its name and its images, one line.
    while read -r name images; do
      [[ -n "$name" ]] || continue
      if [[ -f "$jobs/$name" ]]; then
        if [[ "$(cut -d' ' -f1 "$jobs/$name")" != "$images" ]]; then
          echo "The Job \"$name\" is invalid: spec.template: Invalid value: ...: field is immutable" >&2
          exit 1
        fi
      else
        outcome=Complete
        [[ "$name" == "${{FAKE_FAILING_JOB:-}}" ]] && outcome=Failed
        echo "$images $outcome" > "$jobs/$name"
      fi
    done < <(awk -v selector="$selector" '
      function flush() {{
        if (kind == "Job" && (selector == "" || index(selector, "=" component) || index(selector, "(" component ",") || index(selector, "," component ",") || index(selector, "," component ")") || index(selector, "(" component ")")))
          print name, images
        kind = ""; name = ""; images = ""; component = ""; meta = 0
      }}
      /^---$/ {{ flush(); next }}
      /^kind: / {{ kind = $2 }}
      /^metadata:/ {{ meta = 1; next }}
      meta && /^[^ ]/ {{ meta = 0 }}
      meta && /^  name: / {{ name = $2 }}
      meta && /^    app\.kubernetes\.io\/component: / {{ component = $2 }}
      $1 == "image:" || $1 == "-" && $2 == "image:" {{ images = images $NF "," }}
      END {{ flush() }}
    ' <<<"$rendered")
    ;;
  get)
    if [[ "$2" == job ]]; then
      for file in "$jobs"/*; do
        [[ -e "$file" ]] || continue
        echo "$(basename "$file") $(cut -d' ' -f2 "$file")"
      done
    elif [[ "$2" == secret && "$*" == *jsonpath* ]]; then
      printf '%s' "$(printf 'S3cr3tValue' | base64)"
    fi
    ;;
  delete)
    if [[ "$2" == job ]]; then
      shift 2
      while (($# > 0)); do
        case "$1" in
          --namespace | --selector | --field-selector) shift 2 ;;
          -*) shift ;;
          *) rm -f "$jobs/$1"; shift ;;
        esac
      done
    fi
    ;;
  wait)
    if [[ "$2" == job/* ]]; then
      state="$(cut -d' ' -f2 "$jobs/${{2#job/}}")"
      [[ "$state" == Complete ]] || {{ echo "error: ${{2#job/}} is $state" >&2; exit 1; }}
    fi
    ;;
esac
exit 0
"#,
        log = log.display(),
        jobs = jobs.display(),
        real = tools::require("kubectl").display(),
    );
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, log)
}

/// The images the stand-in cluster holds for Job `name`, and whether it completed.
fn cluster_job(dir: &Path, name: &str) -> Option<(String, String)> {
    let text = std::fs::read_to_string(dir.join("jobs").join(name)).ok()?;
    let (images, state) = text.trim().split_once(' ')?;
    Some((images.to_owned(), state.to_owned()))
}

/// Where, among `calls`, the first call starting with `prefix` and containing `word` is.
fn position(calls: &[String], prefix: &str, word: &str) -> Option<usize> {
    calls
        .iter()
        .position(|c| c.starts_with(prefix) && c.split_whitespace().any(|w| w == word))
}

#[test]
fn a_second_release_replaces_the_finished_migration_job_and_applies_cleanly() {
    let dir = scratch_dir!("fake-cluster-second-release");
    let (kubectl, log) = fake_cluster(&dir);
    let env = [("KUBECTL", kubectl.as_path())];
    let release = |tag: &str, digit: char| {
        let refs = image_refs(&dir, tag, digit, &SERVICES)
            .display()
            .to_string();
        deploy(&["--env", "staging", "--images", &refs, "all"], &env)
    };
    // The migration runs the inventory-service image.
    let migrate_image = |tag: &str, digit: char| {
        let digest: String = std::iter::repeat_n(digit, 64).collect();
        format!("registry.example.com/shop/flash-sale/inventory-service:{tag}@sha256:{digest},")
    };

    ok(&release("r1", '1'), "the first release");
    let first = calls(&log);
    assert_eq!(position(&first, "delete job", "flash-sale-migrate"), None);
    let (images, state) = cluster_job(&dir, "flash-sale-migrate").expect("the Job was applied");
    assert_eq!(images, migrate_image("r1", '1'));
    assert_eq!(state, "Complete");

    // The second release: the finished Job goes first, then the apply creates it anew.
    ok(&release("r2", '2'), "the second release");
    let second = calls(&log);
    let deleted = position(&second, "delete job", "flash-sale-migrate");
    // The whole overlay (the platform layer alone, which holds no Job, goes first).
    let applied = second
        .iter()
        .position(|c| c.starts_with("apply -k") && !c.contains("--selector"));
    assert!(
        deleted.is_some() && deleted < applied,
        "the Job is deleted before the apply:\n{}",
        second.join("\n")
    );
    let (images, _) = cluster_job(&dir, "flash-sale-migrate").unwrap();
    assert_eq!(images, migrate_image("r2", '2'));
    let waited = position(&second, "wait", "job/flash-sale-migrate");
    assert!(waited > applied, "and the new migration is waited for");

    // The same release again (a retried pipeline job) applies cleanly too.
    ok(&release("r2", '2'), "the same release again");

    // The control: applying a changed template over the Job, with no delete first, is refused
    // by the stand-in as by the API server, so the runs above passed because of the delete.
    let output = Command::new(&kubectl)
        .args(["apply", "-k"])
        .arg(Overlay::Staging.dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("field is immutable"),
        "{stderr}"
    );
}

#[test]
fn a_failed_migration_job_is_replaced_by_the_next_attempt() {
    let dir = scratch_dir!("fake-cluster-failed-migration");
    let (kubectl, log) = fake_cluster(&dir);
    let refs = image_refs(&dir, "r1", '1', &SERVICES).display().to_string();
    let args = ["--env", "staging", "--images", &refs, "all"];
    let failing = [
        ("KUBECTL", kubectl.as_path()),
        ("FAKE_FAILING_JOB", Path::new("flash-sale-migrate")),
    ];
    let output = deploy(&args, &failing);
    assert!(
        !output.status.success(),
        "a failed migration fails the deploy"
    );
    let (_, state) = cluster_job(&dir, "flash-sale-migrate").unwrap();
    assert_eq!(state, "Failed");
    calls(&log);

    // The fixed release: the failed Job is deleted like a completed one.
    let refs = image_refs(&dir, "r2", '2', &SERVICES).display().to_string();
    let args = ["--env", "staging", "--images", &refs, "all"];
    ok(
        &deploy(&args, &[("KUBECTL", kubectl.as_path())]),
        "the next attempt",
    );
    let made = calls(&log);
    let deleted = position(&made, "delete job", "flash-sale-migrate");
    assert!(deleted.is_some(), "{}", made.join("\n"));
    let (_, state) = cluster_job(&dir, "flash-sale-migrate").unwrap();
    assert_eq!(state, "Complete");
}
