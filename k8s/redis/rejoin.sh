#!/bin/sh
# postStart hook of every Redis node.
#
# A node that restarts keeps its slots and its peers in nodes.conf, but a peer that moved has a
# new pod IP. Meeting every peer at its current address lets the cluster heal on its own after
# pods are rescheduled. A node that knows of no assigned slot (not in a cluster yet) is left
# alone: the bootstrap Job forms the cluster. The hook never fails the container; it only helps.
set -u

self=${POD_NAME:-}
port=${REDIS_PORT:-6379}
tries=0
until [ "$(redis-cli -p "$port" ping 2>/dev/null)" = "PONG" ]; do
  tries=$((tries + 1))
  if [ "$tries" -ge 30 ]; then
    exit 0
  fi
  sleep 1
done

assigned=$(redis-cli -p "$port" cluster info 2>/dev/null | tr -d '\r' | sed -n 's/^cluster_slots_assigned://p')
if [ "${assigned:-0}" = "0" ]; then
  exit 0
fi

for node in ${REDIS_NODES:-}; do
  host=${node%:*}
  peer_port=${node##*:}
  case "$host" in
    "$self".*) continue ;;
  esac
  ip=$(getent hosts "$host" | awk '{ print $1; exit }')
  if [ -n "$ip" ]; then
    redis-cli -p "$port" cluster meet "$ip" "$peer_port" >/dev/null 2>&1 || true
  fi
done
exit 0
