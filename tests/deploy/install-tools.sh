#!/usr/bin/env bash
# Installs everything `cargo test -p deploy-tests` runs, and nothing else. Idempotent: a second
# run changes nothing. Written for a fresh Debian (12 or later), run as root; CI calls it before
# the tests.
#
#   apt:  promtool (prometheus), shellcheck, python3-venv, nodejs + npm, redis-server/redis-cli
#   pip:  kubernetes-validate, pinned in tools/requirements.txt, into tools/.venv
#   npm:  the schemas of the custom resources (@kubernetes-models/argo-rollouts and
#         prometheus-operator), pinned in tools/package-lock.json, into tools/node_modules. The
#         packages declare node >= 22; they run on node 20 (npm only warns, EBADENGINE).
#
# kubectl (with kustomize v5, so 1.27 or later) is expected on the image already.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="$here/tools"

missing=()
want() {
  # want COMMAND PACKAGE: install PACKAGE unless COMMAND is already there.
  command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
want promtool prometheus
want shellcheck shellcheck
want python3 python3
want node nodejs
want npm npm
want redis-server redis-server
want redis-cli redis-tools
want od coreutils
want awk gawk
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi

if ((${#missing[@]} > 0)); then
  if [[ "$(id -u)" != 0 ]]; then
    echo "install-tools.sh: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v kubectl >/dev/null 2>&1; then
  echo "install-tools.sh: kubectl is missing; install kubectl 1.27 or later (kustomize v5)" >&2
  exit 1
fi

# kubernetes-validate, in its own virtualenv (Debian's Python refuses system-wide pip installs).
if [[ ! -x "$tools/.venv/bin/python" ]]; then
  python3 -m venv "$tools/.venv"
fi
"$tools/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --requirement "$tools/requirements.txt"

# The custom resources' schemas, exactly as locked. npm ci starts from scratch, so run it only when the lock
# changed since the last install.
if [[ ! -f "$tools/node_modules/.package-lock.json" ||
  "$tools/package-lock.json" -nt "$tools/node_modules/.package-lock.json" ]]; then
  npm ci --prefix "$tools" --no-audit --no-fund
fi

echo "install-tools.sh: ready"
kubectl version --client 2>/dev/null | head -n 2
promtool --version 2>&1 | head -n 1
shellcheck --version | sed -n 2p
"$tools/.venv/bin/kubernetes-validate" --version
node --version
