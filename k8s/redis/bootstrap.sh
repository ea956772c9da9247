#!/bin/sh
# Forms the Redis Cluster once.
#
# REDIS_NODES lists every node as host:port, separated by spaces; REDIS_CLUSTER_REPLICAS is the
# number of replicas each master gets (the nodes are masters and their replicas). The script
# waits until each node answers, then:
#   - the cluster is already formed (state ok, every node known): nothing to do, exit 0;
#   - every node is empty (knows only itself, owns no slot): create the cluster, with
#     REDIS_CLUSTER_REPLICAS replicas per master;
#   - anything else (half formed, still converging after a restart): wait, and fail at the
#     deadline so a human looks at it, rather than guess.
# Every redis-cli call authenticates with REDISCLI_AUTH (the Job sets it from the redis-auth
# Secret); a node that refuses it (NOAUTH, WRONGPASS) fails the run at once, naming the node.
set -eu

: "${REDIS_NODES:?REDIS_NODES must list the nodes as host:port}"
: "${REDIS_CLUSTER_REPLICAS:?REDIS_CLUSTER_REPLICAS must give the replicas per master}"
deadline=$(( $(date +%s) + ${BOOTSTRAP_TIMEOUT_SECONDS:-300} ))

say() { printf 'redis-bootstrap: %s\n' "$*"; }

# info_field HOST PORT FIELD: one field of CLUSTER INFO (its lines end in CRLF).
info_field() {
  redis-cli -h "$1" -p "$2" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$3://p"
}

expired() { [ "$(date +%s)" -ge "$deadline" ]; }

count=0
for node in $REDIS_NODES; do
  count=$((count + 1))
  host=${node%:*}
  port=${node##*:}
  while :; do
    answer=$(redis-cli -h "$host" -p "$port" ping 2>/dev/null || true)
    case "$answer" in
      PONG) break ;;
      NOAUTH* | WRONGPASS*)
        say "node $node refuses our password ($answer): is REDISCLI_AUTH the redis-auth Secret's password?"
        exit 1
        ;;
    esac
    if expired; then
      say "node $node never answered"
      exit 1
    fi
    sleep 2
  done
done
say "all $count nodes answer"

while :; do
  formed=yes
  fresh=yes
  for node in $REDIS_NODES; do
    host=${node%:*}
    port=${node##*:}
    state=$(info_field "$host" "$port" cluster_state)
    known=$(info_field "$host" "$port" cluster_known_nodes)
    assigned=$(info_field "$host" "$port" cluster_slots_assigned)
    if [ "$state" != "ok" ] || [ "$known" != "$count" ]; then
      formed=no
    fi
    if [ "$known" != "1" ] || [ "$assigned" != "0" ]; then
      fresh=no
    fi
  done

  if [ "$formed" = yes ]; then
    say "cluster already formed over $count nodes"
    exit 0
  fi

  if [ "$fresh" = yes ]; then
    addresses=""
    for node in $REDIS_NODES; do
      host=${node%:*}
      port=${node##*:}
      ip=$(getent hosts "$host" | awk '{ print $1; exit }')
      if [ -z "$ip" ]; then
        say "cannot resolve $host"
        exit 1
      fi
      addresses="$addresses $ip:$port"
    done
    say "creating the cluster over$addresses"
    # shellcheck disable=SC2086 # one word per node address
    redis-cli --cluster create $addresses --cluster-replicas "$REDIS_CLUSTER_REPLICAS" --cluster-yes
  elif expired; then
    say "cluster neither formed nor empty; inspect with: redis-cli cluster nodes"
    exit 1
  fi
  sleep 2
done
