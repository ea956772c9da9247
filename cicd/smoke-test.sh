#!/usr/bin/env bash
# Smoke test of a deployed overlay through its gateway Service: the gateway is ready, answers a
# bad order with a 4xx and the common JSON error, and serves its metrics.
#
# Usage: smoke-test.sh OVERLAY
set -euo pipefail

overlay=kustomize/overlays/$1
app_port=18080
management_port=18081

namespace=$(kustomize build "$overlay" |
  kubectl get -f - -o jsonpath='{range .items[?(@.kind=="Service")]}{.metadata.namespace} {.metadata.name}{"\n"}{end}' |
  awk '$2 == "gateway" { print $1 }')

kubectl -n "$namespace" port-forward service/gateway "$app_port:8080" "$management_port:8081" >/dev/null &
forward=$!
body=$(mktemp)
trap 'kill "$forward"; rm -f "$body"' EXIT

for _ in $(seq 30); do
  curl -fsS "http://127.0.0.1:$management_port/health/ready" >/dev/null && break
  sleep 2
done
curl -fsS "http://127.0.0.1:$management_port/health/ready" >/dev/null

status=$(curl -sS -o "$body" -w '%{http_code}' -H 'Content-Type: application/json' \
  -d '{"userId":"smoke-test","activityId":"1","quantity":0}' \
  "http://127.0.0.1:$app_port/api/flash-sale/order/create")
case $status in
  4??) ;;
  *)
    echo "a bad order was answered $status" >&2
    exit 1
    ;;
esac
jq -e 'has("code") and has("message")' "$body" >/dev/null

curl -fsS "http://127.0.0.1:$management_port/metrics" | grep -q '^http_requests_total'
echo "smoke test of $1 passed"
