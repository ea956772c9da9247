// Validates custom resources against the schemas published in the @kubernetes-models packages
// (generated from the Argo Rollouts and Prometheus Operator CRDs).
//
// Input on stdin: a JSON array of objects. Output: one line per object, "ok <kind>/<name>" or
// "error <kind>/<name>: <reason>". Exit status 1 if any object failed or had no schema.
//
// These schemas check types, enums, patterns and required fields; they do not reject unknown
// fields. tests/deploy catches unknown fields with its typed models (src/crds.rs).
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
  try {
    new Model(object).validate();
    console.log(`ok ${id}`);
  } catch (error) {
    console.log(`error ${id}: ${String(error.message ?? error).replace(/\s+/g, " ")}`);
    failed++;
  }
}
process.exit(failed === 0 ? 0 : 1);
