//! Rendering the overlays and reading the objects they hold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::tools;

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
        let kubectl = tools::require("kubectl");
        let mut command = Command::new(kubectl);
        command.arg("kustomize").arg(dir);
        let output = command
            .output()
            .with_context(|| format!("kubectl kustomize {}", dir.display()))?;
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
        self.objects
            .iter()
            .find(|object| object.kind() == kind && object.name() == name)
            .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered output"))
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
        self.0
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn api_version(&self) -> &str {
        self.str_at("/apiVersion")
    }

    /// The API group: `apps` for `apps/v1`, empty for the core group.
    pub fn group(&self) -> &str {
        match self.api_version().split_once('/') {
            Some((group, _)) => group,
            None => "",
        }
    }

    pub fn kind(&self) -> &str {
        self.str_at("/kind")
    }

    pub fn name(&self) -> &str {
        self.str_at("/metadata/name")
    }

    pub fn namespace(&self) -> Option<&str> {
        self.0
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
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
        matches!(self.group(), "argoproj.io" | "monitoring.coreos.com")
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
                .and_then(|template| template.pointer("/metadata/labels")),
        )
    }

    /// Every container of the pod template, init containers included.
    pub fn containers(&self) -> Vec<&Value> {
        let Some(spec) = self.pod_spec() else {
            return Vec::new();
        };
        ["initContainers", "containers"]
            .iter()
            .filter_map(|key| spec.get(*key).and_then(Value::as_array))
            .flatten()
            .collect()
    }
}

/// A JSON object of strings as a map (absent or not an object: empty).
pub fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .map(|(key, value)| (key.clone(), value.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a Kubernetes label selector (`matchLabels`, `matchExpressions`) selects `labels`.
/// An empty selector selects everything, as in a NetworkPolicy's `podSelector: {}`.
pub fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let wanted = string_map(selector.get("matchLabels"));
    if !wanted
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
    {
        return false;
    }
    let expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    expressions.iter().all(|expression| {
        let key = expression
            .get("key")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let values: Vec<&str> = expression
            .get("values")
            .and_then(Value::as_array)
            .map(|values| values.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let actual = labels.get(key).map(String::as_str);
        match expression.get("operator").and_then(Value::as_str) {
            Some("In") => actual.is_some_and(|value| values.contains(&value)),
            Some("NotIn") => actual.is_none_or(|value| !values.contains(&value)),
            Some("Exists") => actual.is_some(),
            Some("DoesNotExist") => actual.is_none(),
            other => panic!("unknown selector operator {other:?}"),
        }
    })
}

/// Converts an object to YAML the way it would be written back.
pub fn to_yaml(value: &Value) -> String {
    serde_yaml::to_string(value).expect("JSON values serialise as YAML")
}
