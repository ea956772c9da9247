#!/bin/sh
# readinessProbe of every Redis node.
#
# A master is ready when it answers. A replica is ready only while it is in sync with its
# master: linked, and no full sync in progress. So a rolling update or a drain (the PDB counts
# only ready pods) waits until a restarted replica has its master's data before it takes the
# next node, and a replica whose master just went is not ready until it has taken over: the
# budget then refuses to evict it on top of the node already gone.
set -u

port=${REDIS_PORT:-6379}
[ "$(redis-cli -p "$port" ping 2>/dev/null)" = "PONG" ] || exit 1
info=$(redis-cli -p "$port" info replication 2>/dev/null | tr -d '\r')
case "$info" in
  *role:slave*) ;;
  *) exit 0 ;;
esac
printf '%s\n' "$info" | grep -qx 'master_link_status:up' || exit 1
printf '%s\n' "$info" | grep -qx 'master_sync_in_progress:0' || exit 1
exit 0
