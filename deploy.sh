#!/usr/bin/env bash
# deploy.sh: install, check and remove the flash-sale system on a Kubernetes cluster.
#
# Every command applies one kustomize overlay (kustomize/overlays/<env>) with `kubectl apply -k`;
# `infra`, `services` and `monitoring` apply the part of it whose objects carry the matching
# app.kubernetes.io/component labels. `--dry-run` renders what would be applied, and prints what
# would be run, without touching (or needing) a cluster. The namespace is the one the overlay
# renders (dev and production: flash-sale, staging: flash-sale-staging). `--images FILE` deploys
# the images a release pushed (the pipeline's image-refs) instead of the overlay's own tags.
#
# See docs/kubernetes.md for what each object does.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly ROOT
readonly KUBECTL="${KUBECTL:-kubectl}"

ENVIRONMENT="${FLASH_SALE_ENV:-dev}"
DRY_RUN=false
ASSUME_YES=false
TIMEOUT="${FLASH_SALE_TIMEOUT:-600s}"
IMAGES=""
# The overlay's namespace, read from the rendered overlay by main.
NAMESPACE=""
# With --images: a temporary kustomization that is the overlay plus the release's images.
RELEASE_DIR=""

usage() {
  cat <<EOF
Usage: ./deploy.sh [options] <command>

Commands:
  help         show this help
  all          deploy everything the overlay holds (infra, services and, if the overlay
               has it, monitoring) in one apply, then wait for it
  infra        the namespace and its policies, Redis Cluster, Redpanda, MySQL
  services     database migration, inventory-service, order-service, gateway, Ingress
               (and, in staging and production, the canary AnalysisTemplate)
  monitoring   ServiceMonitors, PrometheusRule and the Grafana dashboard
  verify       check that everything deployed is running and healthy
  cleanup      delete everything the overlay created, the namespace included

Options:
  -e, --env ENV   overlay to use: dev, staging or production (default: ${ENVIRONMENT};
                  or set FLASH_SALE_ENV)
  -n, --dry-run   render and print instead of applying; needs no cluster
  -i, --images FILE
                  deploy these images instead of the overlay's tags: one line per service,
                  "<service> <repository>[:<tag>]@sha256:<digest>" (what cicd/push-images.sh
                  prints); every flash-sale/* image of the overlay must be set
  -y, --yes       do not ask before cleanup
  -h, --help      show this help

Environment:
  KUBECTL              kubectl binary to use (default: kubectl)
  FLASH_SALE_TIMEOUT   how long to wait for each workload (default: 600s)

Secrets are never stored in this repository. On first install, deploy.sh creates them with
random values: mysql-secret (root-password, app-password), redis-auth (password, the Redis
password of the nodes, the bootstrap, the exporter and the services), flash-sale-db (url),
inventory-admin (token), gateway-auth (hs256-secret, the token issuer's HS256 key),
gateway-admission (secret, the key the gateway signs queue tickets and purchase passes with,
shared by every replica) and payment-provider (callback-secret, the key the payment provider
signs its callbacks with).
Create them yourself beforehand to choose the values.
EOF
}

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'deploy.sh: %s\n' "$*" >&2
  exit 1
}

# The overlay as written in the repository.
source_overlay_dir() { printf '%s/kustomize/overlays/%s' "$ROOT" "$ENVIRONMENT"; }

# What is rendered and applied: the overlay, or with --images the release kustomization.
overlay_dir() {
  if [[ -n "$RELEASE_DIR" ]]; then
    printf '%s' "$RELEASE_DIR"
  else
    source_overlay_dir
  fi
}

# The components each command applies (the objects' app.kubernetes.io/component label).
layer_components() {
  case "$1" in
    infra) echo "platform cache broker database" ;;
    services) echo "platform migration backend gateway canary" ;;
    monitoring) echo "monitoring" ;;
    *) die "unknown layer: $1" ;;
  esac
}

# A label selector for kubectl that picks the objects of a layer.
layer_selector() {
  local components
  components="$(layer_components "$1")"
  printf 'app.kubernetes.io/component in (%s)' "${components// /,}"
}

# Prints a command the way a shell would take it back (single quotes where needed).
show() {
  local arg line="+"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      line+=" $arg"
    else
      line+=" '$arg'"
    fi
  done
  printf '%s\n' "$line" >&2
}

# Runs a command that changes the cluster, or only shows it in a dry run.
run() {
  if [[ "$DRY_RUN" == true ]]; then
    show "$@"
  else
    "$@"
  fi
}

render() { "$KUBECTL" kustomize "$(overlay_dir)"; }

# The overlay, rendered once by main (set there).
RENDERED=""

# Prints the rendered overlay. Read it with here-strings (`<<<`), not with `render | grep -q`:
# grep quitting early would break the pipe and, under pipefail, turn a match into a failure.
rendered() { printf '%s\n' "$RENDERED"; }

# Keeps, from rendered YAML on stdin, the documents whose metadata labels carry one of the given
# component values: the offline twin of `kubectl apply -l "$(layer_selector ...)"`. It relies on
# the layout `kubectl kustomize` prints (top-level keys, labels indented by four spaces). Every
# document it prints starts with `---`, so the output of several calls is still one stream.
filter_components() {
  awk -v wanted="$*" '
    BEGIN { n = split(wanted, list, " "); for (i = 1; i <= n; i++) want[list[i]] = 1 }
    function flush() {
      if (keep && doc != "") { print "---"; printf "%s", doc }
      doc = ""; keep = 0; in_meta = 0; in_labels = 0
    }
    /^---$/ { flush(); next }
    { doc = doc $0 "\n" }
    /^metadata:/ { in_meta = 1; next }
    in_meta && /^[^ ]/ { in_meta = 0; in_labels = 0 }
    in_meta && /^  labels:/ { in_labels = 1; next }
    in_labels && /^  [^ ]/ { in_labels = 0 }
    in_labels && /^    app\.kubernetes\.io\/component: / { if ($2 in want) keep = 1 }
    END { flush() }
  '
}

# The CustomResourceDefinitions that rendered YAML on stdin needs, by the kinds it contains.
required_crds() {
  awk '/^kind: / { print $2 }' | sort -u | while read -r kind; do
    case "$kind" in
      ServiceMonitor) echo servicemonitors.monitoring.coreos.com ;;
      PrometheusRule) echo prometheusrules.monitoring.coreos.com ;;
      Rollout) echo rollouts.argoproj.io ;;
      AnalysisTemplate) echo analysistemplates.argoproj.io ;;
    esac
  done
}

check_overlay() {
  case "$ENVIRONMENT" in
    dev | staging | production) ;;
    *) die "unknown environment '$ENVIRONMENT' (expected dev, staging or production)" ;;
  esac
  [[ -f "$(source_overlay_dir)/kustomization.yaml" ]] || die "no overlay at $(source_overlay_dir)"
  command -v "$KUBECTL" >/dev/null 2>&1 || die "kubectl not found (looked for '$KUBECTL')"
}

# The name of the one Namespace object in the rendered overlay: every object lives there.
rendered_namespace() {
  awk '
    /^---$/ { kind = ""; in_meta = 0; next }
    /^kind: / { kind = $2 }
    /^metadata:/ { in_meta = 1; next }
    in_meta && /^[^ ]/ { in_meta = 0 }
    in_meta && kind == "Namespace" && /^  name: / { print $2 }
  ' <<<"$RENDERED"
}

# A kustomization directory path that leads, from directory $1, to directory $2 (both absolute
# and physical): kustomize refuses an absolute path to another kustomization.
relative_path() {
  local from="$1" up=""
  while [[ -n "$from" && "$from" != / ]]; do
    up+="../"
    from="${from%/*}"
  done
  printf '%s%s' "$up" "${2#/}"
}

# make_release_dir FILE: a temporary kustomization that takes the overlay as it is and sets
# every image FILE names, by digest (the tag, if given, stays for people to read). Removed on exit.
make_release_dir() {
  local file="$1" line service reference name tag digest
  [[ -f "$file" && -r "$file" ]] || die "--images: cannot read $file"
  RELEASE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/flash-sale-release.XXXXXX")"
  trap 'rm -rf "$RELEASE_DIR"' EXIT
  RELEASE_DIR="$(cd "$RELEASE_DIR" && pwd -P)"
  local overlay
  overlay="$(cd "$(source_overlay_dir)" && pwd -P)"
  {
    printf '# Written by deploy.sh --images %s: overlay %s with the release images.\n' "$file" "$ENVIRONMENT"
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n'
    printf 'resources:\n  - %s\n' "$(relative_path "$RELEASE_DIR" "$overlay")"
    printf 'images:\n'
  } >"$RELEASE_DIR/kustomization.yaml"
  local count=0
  while read -r service reference line || [[ -n "$service" ]]; do
    [[ -z "$service" || "$service" == "#"* ]] && continue
    [[ -z "$line" ]] || die "--images $file: more than two words in the line for '$service'"
    [[ "$service" =~ ^[a-z0-9-]+$ ]] || die "--images $file: bad service name '$service'"
    [[ "$reference" =~ ^([^@[:space:]]+)@(sha256:[0-9a-f]{64})$ ]] ||
      die "--images $file: '$service' needs a reference by digest (<repository>[:<tag>]@sha256:<64 hex>), not '$reference'"
    name="${BASH_REMATCH[1]}"
    digest="${BASH_REMATCH[2]}"
    tag=""
    if [[ "${name##*/}" == *:* ]]; then
      tag="${name##*:}"
      name="${name%:*}"
    fi
    {
      printf '  - name: flash-sale/%s\n    newName: %s\n' "$service" "$name"
      [[ -n "$tag" ]] && printf '    newTag: "%s"\n' "$tag"
      printf '    digest: %s\n' "$digest"
    } >>"$RELEASE_DIR/kustomization.yaml"
    count=$((count + 1))
  done <"$file"
  ((count > 0)) || die "--images $file names no image"
}

# With --images, every image of ours comes from the file.
check_release_images() {
  [[ -n "$RELEASE_DIR" ]] || return 0
  local unset
  unset="$(awk '
    $1 == "-" { $1 = ""; $0 = $0 }
    $1 == "image:" && $2 ~ /^flash-sale\// { print $2 }
  ' <<<"$RENDERED" | sort -u)"
  [[ -z "$unset" ]] || die "--images $IMAGES sets no image for: $(paste -sd ' ' <<<"$unset")"
}

# Before touching a cluster: it must answer.
preflight() {
  [[ "$DRY_RUN" == true ]] && return 0
  "$KUBECTL" version >/dev/null || die "cannot reach the cluster (kubectl version failed)"
}

# check_crds < YAML: the cluster has the CRDs of every custom kind about to be applied.
check_crds() {
  local crd missing=()
  while read -r crd; do
    [[ -z "$crd" ]] && continue
    if [[ "$DRY_RUN" == true ]]; then
      log "needs CRD $crd"
    elif ! "$KUBECTL" get crd "$crd" >/dev/null 2>&1; then
      missing+=("$crd")
    fi
  done < <(required_crds)
  if ((${#missing[@]} > 0)); then
    die "the cluster lacks CRDs this overlay uses: ${missing[*]} (install the Prometheus Operator and, for staging and production, Argo Rollouts)"
  fi
}

# Production images must be pinned to real digests before anything runs them.
check_digests() {
  [[ "$DRY_RUN" == true ]] && return 0
  if grep -q '@sha256:0\{64\}' <<<"$RENDERED"; then
    die "overlay '$ENVIRONMENT' still pins placeholder image digests; set them with 'kustomize edit set image' first"
  fi
}

random_secret() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }

secret_exists() { "$KUBECTL" get secret "$1" --namespace "$NAMESPACE" >/dev/null 2>&1; }

# create_secret NAME KEY=VALUE...: values go through files in a private directory, never
# through the command line (where `ps` would show them).
create_secret() (
  name="$1"
  shift
  umask 077
  dir="$(mktemp -d)"
  trap 'rm -rf "$dir"' EXIT
  args=()
  for pair in "$@"; do
    printf '%s' "${pair#*=}" >"$dir/${pair%%=*}"
    args+=("--from-file=${pair%%=*}=$dir/${pair%%=*}")
  done
  "$KUBECTL" create secret generic "$name" --namespace "$NAMESPACE" "${args[@]}" >/dev/null
  log "created secret $name"
)

ensure_infra_secrets() {
  if [[ "$DRY_RUN" == true ]]; then
    log "would create secrets mysql-secret (root-password, app-password) and redis-auth (password) unless they exist"
    return 0
  fi
  secret_exists mysql-secret ||
    create_secret mysql-secret "root-password=$(random_secret)" "app-password=$(random_secret)"
  # Hex: start.sh accepts only letters, digits and . _ ~ - (it goes into the services' URL).
  secret_exists redis-auth || create_secret redis-auth "password=$(random_secret)"
}

ensure_service_secrets() {
  if [[ "$DRY_RUN" == true ]]; then
    log "would create secrets flash-sale-db (url), inventory-admin (token), gateway-auth (hs256-secret), gateway-admission (secret) and payment-provider (callback-secret) unless they exist"
    return 0
  fi
  if ! secret_exists flash-sale-db; then
    local password
    password="$("$KUBECTL" get secret mysql-secret --namespace "$NAMESPACE" \
      -o jsonpath='{.data.app-password}' | base64 -d)" ||
      die "secret mysql-secret is missing: run './deploy.sh --env $ENVIRONMENT infra' first"
    create_secret flash-sale-db "url=mysql://flash_sale:${password}@mysql:3306/flash_sale"
  fi
  secret_exists inventory-admin || create_secret inventory-admin "token=$(random_secret)"
  if ! secret_exists gateway-auth; then
    create_secret gateway-auth "hs256-secret=$(random_secret)"
    log "gateway-auth holds a random HS256 key: replace it with your token issuer's key"
  fi
  # The gateway's own key for tickets and passes: random is right, no one else holds it.
  secret_exists gateway-admission || create_secret gateway-admission "secret=$(random_secret)"
  if ! secret_exists payment-provider; then
    create_secret payment-provider "callback-secret=$(random_secret)"
    log "payment-provider holds a random callback key: replace it with your payment provider's key"
  fi
}

# Each Job of the layer as "<name> <types of its true conditions>".
readonly JOB_STATES='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.status=="True")].type}{"\n"}{end}'

# A Job's pod template is immutable: applying a new release over an earlier release's Job fails
# with "field is immutable". So the finished Jobs of the layer (Complete or Failed) are deleted
# first, and applying runs them again (each of them is safe to rerun). A Job still running is
# left alone rather than killed halfway through a migration. SELECTOR picks the layer.
delete_finished_jobs() {
  local selector="$1" states
  if [[ "$DRY_RUN" == true ]]; then
    show "$KUBECTL" get job --namespace "$NAMESPACE" --selector "$selector" -o "jsonpath=$JOB_STATES"
    log "would delete those of these Jobs that are Complete or Failed"
    return 0
  fi
  states="$("$KUBECTL" get job --namespace "$NAMESPACE" --selector "$selector" \
    -o "jsonpath=$JOB_STATES")" || die "cannot list the Jobs in namespace $NAMESPACE"
  local finished=()
  mapfile -t finished < <(awk '{ for (i = 2; i <= NF; i++) if ($i == "Complete" || $i == "Failed") { print $1; break } }' <<<"$states")
  ((${#finished[@]} > 0)) || return 0
  log "deleting finished Jobs (their pod templates are immutable): ${finished[*]}"
  "$KUBECTL" delete job --namespace "$NAMESPACE" --ignore-not-found --wait=true "${finished[@]}"
}

# Applies the objects of one layer of the overlay (or prints them, in a dry run).
apply_layer() {
  local layer="$1" selector
  selector="$(layer_selector "$layer")"
  local objects
  # shellcheck disable=SC2046 # one word per component
  objects="$(rendered | filter_components $(layer_components "$layer"))"
  check_crds <<<"$objects"
  delete_finished_jobs "$selector"
  if [[ "$DRY_RUN" == true ]]; then
    show "$KUBECTL" apply -k "$(overlay_dir)" --selector "$selector"
    printf '%s\n' "$objects"
    return 0
  fi
  "$KUBECTL" apply -k "$(overlay_dir)" --selector "$selector"
}

# Applies the whole overlay in one go (or prints it, in a dry run).
apply_all() {
  check_crds <<<"$RENDERED"
  delete_finished_jobs 'app.kubernetes.io/part-of=flash-sale'
  if [[ "$DRY_RUN" == true ]]; then
    show "$KUBECTL" apply -k "$(overlay_dir)"
    rendered
    return 0
  fi
  "$KUBECTL" apply -k "$(overlay_dir)"
}

ensure_namespace() {
  if [[ "$DRY_RUN" == true ]]; then
    return 0
  fi
  "$KUBECTL" apply -k "$(overlay_dir)" --selector 'app.kubernetes.io/component=platform' >/dev/null
}

wait_for() {
  run "$KUBECTL" rollout status "$1" --namespace "$NAMESPACE" --timeout "$TIMEOUT"
}

wait_job() {
  run "$KUBECTL" wait "job/$1" --namespace "$NAMESPACE" --for=condition=complete --timeout "$TIMEOUT"
}

overlay_has_rollouts() { grep -q '^kind: Rollout$' <<<"$RENDERED"; }

wait_infra() {
  wait_for statefulset/redis-cluster
  wait_for statefulset/redpanda
  wait_for statefulset/mysql
  wait_job redis-cluster-bootstrap
  wait_job redpanda-create-topic
}

wait_services() {
  wait_job flash-sale-migrate
  local service
  for service in inventory-service order-service gateway; do
    if overlay_has_rollouts; then
      # A Rollout reports progress through its own status; the canary steps run on their own.
      run "$KUBECTL" wait "rollout.argoproj.io/$service" --namespace "$NAMESPACE" \
        --for=condition=Available --timeout "$TIMEOUT"
    else
      wait_for "deployment/$service"
    fi
  done
}

deploy_infra() {
  log "infra ($ENVIRONMENT): namespace, Redis Cluster, Redpanda, MySQL"
  ensure_namespace
  ensure_infra_secrets
  apply_layer infra
  wait_infra
}

deploy_services() {
  log "services ($ENVIRONMENT): migration, inventory-service, order-service, gateway"
  check_digests
  ensure_namespace
  ensure_service_secrets
  apply_layer services
  wait_services
}

deploy_all() {
  log "all ($ENVIRONMENT): everything the overlay holds"
  check_digests
  ensure_namespace
  ensure_infra_secrets
  ensure_service_secrets
  apply_all
  wait_infra
  wait_services
}

deploy_monitoring() {
  log "monitoring ($ENVIRONMENT): ServiceMonitors, PrometheusRule, Grafana dashboard"
  if ! grep -q '^kind:' <<<"$(rendered | filter_components monitoring)"; then
    log "overlay '$ENVIRONMENT' has no monitoring component; nothing to do"
    return 0
  fi
  apply_layer monitoring
}

verify() {
  log "verify ($ENVIRONMENT)"
  run "$KUBECTL" get pods,statefulsets,hpa,pdb,ingress --namespace "$NAMESPACE" -o wide
  local app
  for app in redis-cluster redpanda mysql inventory-service order-service gateway; do
    # Readiness is each pod's own /health/ready (or its store's own check): Ready means healthy.
    run "$KUBECTL" wait pod --namespace "$NAMESPACE" --selector "app.kubernetes.io/name=$app" \
      --for=condition=Ready --timeout "$TIMEOUT"
  done
  if [[ "$DRY_RUN" == true ]]; then
    show "$KUBECTL" exec redis-cluster-0 --namespace "$NAMESPACE" -c redis -- redis-cli cluster info
  else
    "$KUBECTL" exec redis-cluster-0 --namespace "$NAMESPACE" -c redis -- redis-cli cluster info |
      tr -d '\r' | grep -qx 'cluster_state:ok' || die "the Redis Cluster is not formed (cluster_state is not ok)"
    log "Redis Cluster: cluster_state:ok"
  fi
  run "$KUBECTL" exec redpanda-0 --namespace "$NAMESPACE" -c redpanda -- rpk cluster health
  if overlay_has_rollouts; then
    run "$KUBECTL" get rollouts.argoproj.io --namespace "$NAMESPACE"
  fi
}

cleanup() {
  log "cleanup ($ENVIRONMENT): deletes namespace $NAMESPACE and every volume claim in it"
  if [[ "$DRY_RUN" != true && "$ASSUME_YES" != true ]]; then
    local answer
    read -r -p "Delete everything in namespace $NAMESPACE? [y/N] " answer || answer=""
    [[ "$answer" == y || "$answer" == Y ]] || die "cancelled"
  fi
  run "$KUBECTL" delete -k "$(overlay_dir)" --ignore-not-found --wait=true
  log "volumes whose reclaim policy is Retain stay; list them with: $KUBECTL get pv | grep $NAMESPACE/"
}

main() {
  local command=""
  while (($# > 0)); do
    case "$1" in
      -e | --env)
        [[ $# -ge 2 ]] || die "$1 needs a value"
        ENVIRONMENT="$2"
        shift 2
        ;;
      --env=*)
        ENVIRONMENT="${1#--env=}"
        shift
        ;;
      -i | --images)
        [[ $# -ge 2 ]] || die "$1 needs a file"
        IMAGES="$2"
        shift 2
        ;;
      --images=*)
        IMAGES="${1#--images=}"
        shift
        ;;
      -n | --dry-run)
        DRY_RUN=true
        shift
        ;;
      -y | --yes)
        ASSUME_YES=true
        shift
        ;;
      -h | --help | help)
        usage
        return 0
        ;;
      -*) die "unknown option: $1 (see ./deploy.sh help)" ;;
      *)
        [[ -z "$command" ]] || die "one command at a time (got '$command' and '$1')"
        command="$1"
        shift
        ;;
    esac
  done

  case "$command" in
    "")
      usage
      return 0
      ;;
    all | infra | services | monitoring | verify | cleanup) ;;
    *) die "unknown command: $command (see ./deploy.sh help)" ;;
  esac

  check_overlay
  [[ -z "$IMAGES" ]] || make_release_dir "$IMAGES"
  RENDERED="$(render)" || die "kubectl kustomize $(overlay_dir) failed"
  NAMESPACE="$(rendered_namespace)"
  [[ "$NAMESPACE" =~ ^[a-z0-9-]+$ ]] ||
    die "overlay '$ENVIRONMENT' renders no single Namespace (found: '${NAMESPACE//$'\n'/ }')"
  readonly NAMESPACE
  check_release_images
  preflight
  case "$command" in
    all) deploy_all ;;
    infra) deploy_infra ;;
    services) deploy_services ;;
    monitoring) deploy_monitoring ;;
    verify) verify ;;
    cleanup) cleanup ;;
  esac
}

main "$@"
