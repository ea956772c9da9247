//! Every overlay renders with kustomize v5, and every object it renders is valid: built-in
//! kinds strictly (unknown fields are errors) against the Kubernetes 1.30 schemas, custom
//! resources against the schemas of their registry packages and against the typed models.
//! Each overlay's full output is an insta snapshot, so every manifest change is a reviewable
//! diff.

use std::collections::BTreeSet;
use std::process::Command;

use deploy_tests::crds;
use deploy_tests::manifest::{Object, Overlay, to_yaml};
use deploy_tests::tools;
use serde_json::{Value, json};

/// The Kubernetes release the bundle targets.
const KUBERNETES_VERSION: &str = "1.30.0";

#[test]
fn kubectl_carries_kustomize_v5() {
    let version =
        tools::run_ok(Command::new(tools::require("kubectl")).args(["version", "--client"]))
            .expect("kubectl version --client");
    assert!(
        version.contains("Kustomize Version: v5."),
        "the overlays use kustomize v5 syntax, kubectl says:\n{version}"
    );
}

#[test]
fn every_overlay_renders() {
    for overlay in Overlay::ALL {
        let rendered = overlay.rendered();
        assert!(
            rendered.objects.len() > 40,
            "{} renders only {} objects",
            overlay.name(),
            rendered.objects.len()
        );
        let ids: Vec<String> = rendered
            .objects
            .iter()
            .map(|o| format!("{}/{}", o.api_version(), o.id()))
            .collect();
        let unique: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "{} renders an object twice",
            overlay.name()
        );
    }
}

#[test]
fn every_kustomization_uses_current_syntax() {
    // Fields kustomize v5 deprecates, with what replaces them.
    let deprecated = [
        ("patchesStrategicMerge", "patches"),
        ("patchesJson6902", "patches"),
        ("commonLabels", "labels"),
        ("vars", "replacements"),
        ("bases", "resources"),
        ("imageTags", "images"),
    ];
    let mut files = Vec::new();
    for dir in ["k8s", "kustomize", "monitoring"] {
        collect_kustomizations(&deploy_tests::repo_path(dir), &mut files);
    }
    assert!(
        files.len() >= 15,
        "found only {} kustomization files",
        files.len()
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        let kind = doc["kind"].as_str().unwrap_or_default();
        assert!(
            matches!(kind, "Kustomization" | "Component"),
            "{}: states no kind (apiVersion and kind make the file self-describing)",
            file.display()
        );
        for (field, instead) in deprecated {
            assert!(
                doc.get(field).is_none(),
                "{}: `{field}` is deprecated, use `{instead}`",
                file.display()
            );
        }
    }
    for overlay in Overlay::ALL {
        assert_eq!(
            overlay.rendered().warnings.trim(),
            "",
            "{}: kustomize warns",
            overlay.name()
        );
    }
}

fn collect_kustomizations(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_kustomizations(&path, out);
        } else if path
            .file_name()
            .is_some_and(|name| name == "kustomization.yaml")
        {
            out.push(path);
        }
    }
}

/// A Deployment that carries a Rollout's selector and pod template, so that the template (a core
/// `PodTemplateSpec`) is validated by the Kubernetes schema like any Deployment's.
fn rollout_template_as_deployment(rollout: &Object) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": format!("rollout-template-of-{}", rollout.name()), "namespace": rollout.namespace()},
        "spec": {
            "selector": rollout.pointer("/spec/selector").cloned().unwrap_or(Value::Null),
            "template": rollout.pointer("/spec/template").cloned().unwrap_or(Value::Null),
        }
    })
}

/// Runs `kubernetes-validate --strict` over `documents`; returns its report, or the failure.
fn validate_strictly(name: &str, documents: &[Value]) -> Result<String, String> {
    let dir = deploy_tests::scratch_dir!(&format!("validate-{name}"));
    let file = dir.join("objects.yaml");
    let stream: String = documents
        .iter()
        .map(|doc| format!("---\n{}", to_yaml(doc)))
        .collect();
    std::fs::write(&file, stream).expect("writing the objects");
    let output = Command::new(tools::kubernetes_validate())
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("running kubernetes-validate");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let passed = report
        .lines()
        .filter(|line| line.starts_with("INFO") && line.contains(" passed "))
        .count();
    let complaints: Vec<&str> = report
        .lines()
        .filter(|line| {
            line.starts_with("WARN") || line.starts_with("ERROR") || line.starts_with("FATAL")
        })
        .collect();
    if output.status.success() && complaints.is_empty() && passed == documents.len() {
        Ok(report)
    } else {
        Err(format!(
            "{passed} of {} objects passed ({}):\n{}",
            documents.len(),
            output.status,
            if complaints.is_empty() {
                report.clone()
            } else {
                complaints.join("\n")
            }
        ))
    }
}

#[test]
fn built_in_objects_pass_strict_schema_validation_for_kubernetes_1_30() {
    for overlay in Overlay::ALL {
        let rendered = overlay.rendered();
        let mut documents: Vec<Value> = rendered
            .objects
            .iter()
            .filter(|object| !object.is_custom())
            .map(|object| object.0.clone())
            .collect();
        documents.extend(
            rendered
                .of_kind("Rollout")
                .map(rollout_template_as_deployment),
        );
        if let Err(failure) = validate_strictly(overlay.name(), &documents) {
            panic!("{}: strict validation failed: {failure}", overlay.name());
        }
    }
}

#[test]
fn strict_validation_does_reject_an_unknown_field() {
    // The negative control: the same validator, the same version, one field that does not exist.
    let mut deployment = Overlay::Staging
        .rendered()
        .get("Deployment", "gateway")
        .0
        .clone();
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = json!({});
    let failure =
        validate_strictly("negative", &[deployment]).expect_err("an unknown field must fail");
    assert!(failure.contains("readinessProbes"), "{failure}");
}

#[test]
fn custom_resources_match_their_typed_models() {
    let expected: [(Overlay, &[&str]); 3] = [
        (Overlay::Dev, &[]),
        (Overlay::Staging, &["PrometheusRule", "ServiceMonitor"]),
        (
            Overlay::Production,
            &[
                "AnalysisTemplate",
                "PrometheusRule",
                "Rollout",
                "ServiceMonitor",
            ],
        ),
    ];
    for (overlay, kinds) in expected {
        let custom: Vec<&Object> = overlay
            .rendered()
            .objects
            .iter()
            .filter(|o| o.is_custom())
            .collect();
        let found: BTreeSet<&str> = custom.iter().map(|o| o.kind()).collect();
        assert_eq!(
            found,
            kinds.iter().copied().collect(),
            "custom kinds of {}",
            overlay.name()
        );
        for object in custom {
            if let Err(error) = crds::check_custom_resource(&object.0) {
                panic!("{} {}: {error:#}", overlay.name(), object.id());
            }
        }
    }
}

#[test]
fn custom_resources_pass_their_registry_schemas() {
    let (node, script) = tools::crd_validator();
    for overlay in [Overlay::Staging, Overlay::Production] {
        let custom: Vec<&Value> = overlay
            .rendered()
            .objects
            .iter()
            .filter(|o| o.is_custom())
            .map(|o| &o.0)
            .collect();
        let input = serde_json::to_vec(&custom).unwrap();
        let output =
            tools::run_with_input(&node, [&script], &input).expect("running validate-crds.mjs");
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}: {}\n{report}{}",
            overlay.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            report
                .lines()
                .filter(|line| line.starts_with("ok "))
                .count(),
            custom.len(),
            "{report}"
        );
    }
}

#[test]
fn registry_schemas_do_reject_a_wrong_type() {
    // The negative control of the previous test.
    let (node, script) = tools::crd_validator();
    let mut rollout = Overlay::Production
        .rendered()
        .get("Rollout", "order-service")
        .0
        .clone();
    rollout["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = json!("ten");
    let input = serde_json::to_vec(&[rollout]).unwrap();
    let output =
        tools::run_with_input(&node, [&script], &input).expect("running validate-crds.mjs");
    assert!(!output.status.success(), "a string weight must fail");
    assert!(String::from_utf8_lossy(&output.stdout).contains("setWeight"));
}

#[test]
fn rendered_overlays_match_their_snapshots() {
    for overlay in Overlay::ALL {
        insta::assert_snapshot!(overlay.name(), &overlay.rendered().yaml);
    }
}
