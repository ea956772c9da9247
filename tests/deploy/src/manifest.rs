//! Rendering the overlays and reading the objects they hold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::tools;

/// Secrets the manifests reference, with their keys, but never contain: deploy.sh (or an
/// operator) creates them.
pub const EXTERNAL_SECRETS: [(&str, &[&str]); 7] = [
    ("mysql-secret", &["root-password", "app-password"]),
    ("redis-auth", &["password"]),
    ("flash-sale-db", &["url"]),
    ("inventory-admin", &["token"]),
    ("gateway-auth", &["hs256-secret"]),
    ("gateway-admission", &["secret"]),
    ("payment-provider", &["callback-secret"]),
];

/// The environments `kustomize/overlays/` renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Overlay {
    Dev,
    Staging,
    Production,
}

impl Overlay {
    pub const ALL: [Overlay; 3] = [Overlay::Dev, Overlay::Staging, Overlay::Production];

    pub fn name(self) -> &'static str {
        match self {
            Overlay::Dev => "dev",
            Overlay::Staging => "staging",
            Overlay::Production => "production",
        }
    }

    pub fn dir(self) -> PathBuf {
        crate::repo_path(&format!("kustomize/overlays/{}", self.name()))
    }

    /// The overlay as `kubectl kustomize` renders it, rendered once per test process.
    pub fn rendered(self) -> &'static Rendered {
        static CACHE: [OnceLock<Rendered>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        CACHE[self as usize].get_or_init(|| {
            Rendered::from_dir(&self.dir())
                .unwrap_or_else(|error| panic!("rendering {}: {error:#}", self.name()))
        })
    }
}

/// The output of `kubectl kustomize`: the YAML stream, the objects parsed from it, and what
/// kustomize printed on stderr (deprecation warnings, for one).
#[derive(Debug)]
pub struct Rendered {
    pub yaml: String,
    pub objects: Vec<Object>,
    pub warnings: String,
}

impl Rendered {
    pub fn from_dir(dir: &Path) -> Result<Rendered> {
        let mut command = Command::new(tools::require("kubectl"));
        let output = command.arg("kustomize").arg(dir).output();
        let output = output.with_context(|| format!("kubectl kustomize {}", dir.display()))?;
        tools::check(&command, &output)?;
        let yaml = String::from_utf8(output.stdout)?;
        let objects = parse_stream(&yaml)?;
        let warnings = String::from_utf8_lossy(&output.stderr).into_owned();
        Ok(Rendered {
            yaml,
            objects,
            warnings,
        })
    }

    /// Objects of one kind.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Object> + 'a {
        self.objects
            .iter()
            .filter(move |object| object.kind() == kind)
    }

    /// The object of a kind and name; panics when there is none.
    pub fn get(&self, kind: &str, name: &str) -> &Object {
        let found = self
            .objects
            .iter()
            .find(|o| o.kind() == kind && o.name() == name);
        found.unwrap_or_else(|| panic!("no {kind}/{name} in the rendered output"))
    }

    /// Long-running workloads: Deployments, StatefulSets, Rollouts.
    pub fn workloads(&self) -> impl Iterator<Item = &Object> {
        self.objects
            .iter()
            .filter(|object| object.is_long_running())
    }

    /// Everything that runs pods: the workloads and the Jobs.
    pub fn pod_owners(&self) -> impl Iterator<Item = &Object> {
        self.objects
            .iter()
            .filter(|object| object.pod_template().is_some())
    }
}

/// Parses a multi-document YAML stream; empty documents are skipped.
pub fn parse_stream(yaml: &str) -> Result<Vec<Object>> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = Value::deserialize(document)
            .with_context(|| format!("YAML document {index} does not parse"))?;
        match value {
            Value::Null => {}
            Value::Object(_) => objects.push(Object(value)),
            other => bail!("YAML document {index} is not an object: {other}"),
        }
    }
    Ok(objects)
}

/// One Kubernetes object, as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Object(pub Value);

impl Object {
    fn str_at(&self, pointer: &str) -> &str {
        str_at(&self.0, pointer).unwrap_or_default()
    }

    pub fn api_version(&self) -> &str {
        self.str_at("/apiVersion")
    }

    pub fn kind(&self) -> &str {
        self.str_at("/kind")
    }

    pub fn name(&self) -> &str {
        self.str_at("/metadata/name")
    }

    pub fn namespace(&self) -> Option<&str> {
        str_at(&self.0, "/metadata/namespace")
    }

    /// `Kind/name`, for messages.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        string_map(self.0.pointer("/metadata/labels"))
    }

    pub fn pointer(&self, pointer: &str) -> Option<&Value> {
        self.0.pointer(pointer)
    }

    /// A custom resource: one whose schema no Kubernetes release carries.
    pub fn is_custom(&self) -> bool {
        let group = self.api_version().split_once('/').map(|(group, _)| group);
        matches!(group, Some("argoproj.io" | "monitoring.coreos.com"))
    }

    pub fn is_long_running(&self) -> bool {
        matches!(self.kind(), "Deployment" | "StatefulSet" | "Rollout")
    }

    /// The pod template of anything that runs pods.
    pub fn pod_template(&self) -> Option<&Value> {
        match self.kind() {
            "Deployment" | "StatefulSet" | "Rollout" | "Job" | "DaemonSet" | "ReplicaSet" => {
                self.0.pointer("/spec/template")
            }
            "CronJob" => self.0.pointer("/spec/jobTemplate/spec/template"),
            _ => None,
        }
    }

    pub fn pod_spec(&self) -> Option<&Value> {
        self.pod_template()?.get("spec")
    }

    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        string_map(
            self.pod_template()
                .and_then(|t| t.pointer("/metadata/labels")),
        )
    }

    /// Every container of the pod template, init containers included.
    pub fn containers(&self) -> Vec<&Value> {
        let spec = self.pod_spec().unwrap_or(&Value::Null);
        let lists = [
            array_at(spec, "/initContainers"),
            array_at(spec, "/containers"),
        ];
        lists.into_iter().flatten().collect()
    }
}

/// A JSON object of strings as a map (absent or not an object: empty).
pub fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    let entries = value.and_then(Value::as_object).into_iter().flatten();
    entries
        .map(|(key, value)| (key.clone(), value.as_str().unwrap_or_default().into()))
        .collect()
}

/// Whether a Kubernetes label selector (`matchLabels`, `matchExpressions`) selects `labels`.
/// An empty selector selects everything, as in a NetworkPolicy's `podSelector: {}`.
pub fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let wanted = string_map(selector.get("matchLabels"));
    let expressions = array_at(selector, "/matchExpressions");
    wanted
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
        && expressions.iter().all(|expression| {
            let actual = labels.get(str_at(expression, "/key").unwrap_or_default());
            let values = array_at(expression, "/values");
            let listed = actual.is_some_and(|a| values.iter().any(|v| v == a.as_str()));
            match str_at(expression, "/operator") {
                Some("In") => listed,
                Some("NotIn") => !listed,
                Some("Exists") => actual.is_some(),
                Some("DoesNotExist") => actual.is_none(),
                other => panic!("unknown selector operator {other:?}"),
            }
        })
}

/// The string at a JSON pointer.
pub fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// The integer at a JSON pointer.
pub fn int_at(value: &Value, pointer: &str) -> Option<i64> {
    value.pointer(pointer).and_then(Value::as_i64)
}

/// The array at a JSON pointer; empty when absent.
pub fn array_at<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Converts an object to YAML the way it would be written back.
pub fn to_yaml(value: &Value) -> String {
    serde_yaml::to_string(value).expect("JSON values serialise as YAML")
}
