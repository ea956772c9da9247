#!/usr/bin/env bash
# Deploys one Kustomize overlay with the images push-images.sh pushed, pinned by digest.
# Staging waits for every Deployment to roll out; production hands the new version to Argo
# Rollouts, whose canary steps pause for analysis until `nix run .#promote`.
#
# Usage: deploy-overlay.sh OVERLAY IMAGE_REFS
set -euo pipefail

overlay=kustomize/overlays/$1
refs=$2

while read -r service reference; do
  (cd "$overlay" && kustomize edit set image "flash-sale/$service=$reference")
done <"$refs"

rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
kustomize build "$overlay" >"$rendered"
kubectl apply -f "$rendered"

workloads() {
  kubectl get -f "$rendered" -o jsonpath="{range .items[?(@.kind==\"$1\")]}{.metadata.namespace} {.metadata.name}{\"\\n\"}{end}"
}

workloads Deployment | while read -r namespace name; do
  kubectl -n "$namespace" rollout status "deployment/$name" --timeout=10m
done
workloads Rollout | while read -r namespace name; do
  kubectl argo rollouts -n "$namespace" get rollout "$name"
done
