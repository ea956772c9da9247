// Validates custom resources against the schemas published in the @kubernetes-models packages,
// generated from the Go API types of Argo Rollouts and the Prometheus Operator (a Rollout's pod
// template is the core PodTemplateSpec of the kubernetes-models package): types, enums,
// patterns, required fields, and unknown fields. The one validator of the custom resources.
//
// Input on stdin: a JSON array of objects. Output: one line per object, "ok <kind>/<name>" or
// "error <kind>/<name>: <reason>". Exit status 1 if any object failed or had no schema.
//
// The packages' validators accept unknown fields, where the API server (strict field validation,
// kubectl's default) rejects a field the CRD's structural schema does not declare. Their schemas
// are compiled into code, so the declared fields are learnt from the validator itself: every
// object is handed over behind a Proxy that records which properties the validator reads. A
// validator reads each property its schema declares (and every key of a map), so an own key it
// never read is unknown. An object it reads nothing of has a free-form schema
// (x-kubernetes-preserve-unknown-fields) and is left alone.
import { Rollout } from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1/Rollout";
import { AnalysisTemplate } from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1/AnalysisTemplate";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = new Map([
  ["argoproj.io/v1alpha1/Rollout", Rollout],
  ["argoproj.io/v1alpha1/AnalysisTemplate", AnalysisTemplate],
  ["monitoring.coreos.com/v1/ServiceMonitor", ServiceMonitor],
  ["monitoring.coreos.com/v1/PrometheusRule", PrometheusRule],
]);

// Wraps `value` and everything below it in recording proxies; `seen` gets one entry per object.
function track(value, path, seen) {
  if (value === null || typeof value !== "object") return value;
  for (const key of Object.keys(value)) {
    value[key] = track(value[key], `${path}/${key}`, seen);
  }
  if (Array.isArray(value)) return value;
  const read = new Set();
  seen.push({ path, target: value, read });
  return new Proxy(value, {
    get(target, key, receiver) {
      if (typeof key === "string") read.add(key);
      return Reflect.get(target, key, receiver);
    },
  });
}

function unknownFields(seen) {
  return seen
    .filter(({ read }) => read.size > 0)
    .flatMap(({ path, target, read }) =>
      Object.keys(target)
        .filter((key) => !read.has(key))
        .map((key) => `${path}/${key}`),
    );
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const objects = JSON.parse(Buffer.concat(chunks).toString("utf8"));

let failed = 0;
for (const object of objects) {
  const id = `${object.kind}/${object.metadata?.name}`;
  const Model = models.get(`${object.apiVersion}/${object.kind}`);
  if (!Model) {
    console.log(`error ${id}: no schema for ${object.apiVersion} ${object.kind}`);
    failed++;
    continue;
  }
  const seen = [];
  const model = new Model(object);
  try {
    model.validate.call(track(model, "", seen));
  } catch (error) {
    console.log(`error ${id}: ${String(error.message ?? error).replace(/\s+/g, " ")}`);
    failed++;
    continue;
  }
  const unknown = unknownFields(seen);
  if (unknown.length > 0) {
    console.log(`error ${id}: unknown fields ${unknown.join(", ")}`);
    failed++;
  } else {
    console.log(`ok ${id}`);
  }
}
process.exit(failed === 0 ? 0 : 1);
