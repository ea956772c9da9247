//! Every overlay renders with kustomize v5 without warnings, and every object it renders is
//! valid: built-in kinds strictly (unknown fields are errors) against the Kubernetes 1.30
//! schemas, custom resources strictly against the schemas of their registry packages. Each
//! overlay's full output is an insta snapshot, so every manifest change is a reviewable diff.

use std::path::{Path, PathBuf};
use std::process::Command;

use deploy_tests::manifest::{Object, Overlay};
use deploy_tests::tools;
use serde_json::{Value, json};

/// The Kubernetes release the bundle targets.
const KUBERNETES_VERSION: &str = "1.30.0";

#[test]
fn rendered_overlays_match_their_snapshots() {
    for overlay in Overlay::ALL {
        insta::assert_snapshot!(overlay.name(), &overlay.rendered().yaml);
    }
}

fn kustomizations(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            kustomizations(&path, out);
        } else if path.ends_with("kustomization.yaml") {
            out.push(path);
        }
    }
}

#[test]
fn every_kustomization_uses_current_syntax() {
    let version =
        tools::run_ok(Command::new(tools::require("kubectl")).args(["version", "--client"]))
            .expect("kubectl version --client");
    assert!(
        version.contains("Kustomize Version: v5."),
        "the overlays use kustomize v5 syntax, kubectl says:\n{version}"
    );
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
        kustomizations(&deploy_tests::repo_path(dir), &mut files);
    }
    assert!(
        files.len() >= 15,
        "found only {} kustomizations",
        files.len()
    );
    for file in files {
        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let file = file.display();
        assert!(
            matches!(doc["kind"].as_str(), Some("Kustomization" | "Component")),
            "{file}: states no kind (apiVersion and kind make the file self-describing)"
        );
        for (field, instead) in deprecated {
            assert!(
                doc.get(field).is_none(),
                "{file}: `{field}` is deprecated, use `{instead}`"
            );
        }
    }
    for overlay in Overlay::ALL {
        let warnings = overlay.rendered().warnings.trim();
        assert_eq!(warnings, "", "{}: kustomize warns", overlay.name());
    }
}

/// A Deployment that carries a Rollout's selector and pod template. The template is a core
/// `PodTemplateSpec` that becomes the pods of Kubernetes 1.30, so it is checked against that
/// release's schema like any Deployment's.
fn rollout_template_as_deployment(rollout: &Object) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": format!("rollout-template-of-{}", rollout.name()), "namespace": rollout.namespace()},
        "spec": {"selector": rollout.0["spec"]["selector"], "template": rollout.0["spec"]["template"]}
    })
}

/// Runs `kubernetes-validate --strict` over `documents`; returns the failure, if any.
fn validate_strictly(name: &str, documents: &[Value]) -> Result<(), String> {
    let file = deploy_tests::scratch_dir!(&format!("validate-{name}")).join("objects.yaml");
    // Each document as JSON (which is YAML): serde_yaml writes the string "on" unquoted, and
    // kubernetes-validate's YAML 1.1 reader would take it for a boolean.
    let stream: String = documents
        .iter()
        .map(|doc| format!("---\n{}\n", serde_json::to_string_pretty(doc).unwrap()))
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
        .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
        .count();
    let complaints = ["WARN", "ERROR", "FATAL"];
    let complained = report
        .lines()
        .any(|l| complaints.iter().any(|c| l.starts_with(c)));
    if output.status.success() && !complained && passed == documents.len() {
        Ok(())
    } else {
        Err(format!(
            "{passed} of {} objects passed ({}):\n{report}",
            documents.len(),
            output.status
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
    // The negative control: the same validator and version, one field that does not exist.
    let mut deployment = Overlay::Dev
        .rendered()
        .get("Deployment", "gateway")
        .0
        .clone();
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = json!({});
    let failure = validate_strictly("negative", &[deployment]).expect_err("an unknown field");
    assert!(failure.contains("readinessProbes"), "{failure}");
}

/// Runs `tools/validate-crds.mjs` over `objects`: whether it passed, and its report.
fn validate_custom(objects: &[&Value]) -> (bool, String) {
    let (node, script) = tools::crd_validator();
    let input = serde_json::to_vec(objects).unwrap();
    let output = tools::run_with_input(&node, [&script], &input).expect("running validate-crds");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), report)
}

#[test]
fn custom_resources_pass_their_schemas_strictly() {
    for overlay in Overlay::ALL {
        let custom: Vec<&Value> = overlay
            .rendered()
            .objects
            .iter()
            .filter(|o| o.is_custom())
            .map(|o| &o.0)
            .collect();
        let (passed, report) = validate_custom(&custom);
        let ok = report
            .lines()
            .filter(|line| line.starts_with("ok "))
            .count();
        assert!(
            passed && ok == custom.len(),
            "{}:\n{report}",
            overlay.name()
        );
    }
}

#[test]
fn the_custom_resource_validator_rejects_unknown_fields_and_wrong_types() {
    // The negative controls of the previous test, one per kind of mistake.
    let rendered = Overlay::Production.rendered();
    let rollout = &rendered.get("Rollout", "order-service").0;
    let rule = &rendered.get("PrometheusRule", "flash-sale").0;
    let mut wrong_type = rollout.clone();
    wrong_type["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = json!("ten");
    // `steps` belongs under `canary`, not beside it.
    let mut misplaced = rollout.clone();
    misplaced["spec"]["strategy"]["steps"] = json!([]);
    let mut in_the_template = rollout.clone();
    in_the_template["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = json!({});
    let mut misspelt = rule.clone();
    misspelt["spec"]["groups"][0]["rules"][0]["fro"] = json!("5m");
    let cases = [
        (wrong_type, "setWeight must be integer"),
        (misplaced, "unknown fields /spec/strategy/steps"),
        (in_the_template, "containers/0/readinessProbes"),
        (misspelt, "unknown fields /spec/groups/0/rules/0/fro"),
    ];
    for (object, expected) in &cases {
        let (passed, report) = validate_custom(&[object]);
        assert!(
            !passed && report.contains(expected),
            "want {expected:?}:\n{report}"
        );
    }
}
