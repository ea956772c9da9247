#!/bin/sh
# Container command of every Redis node: redis-server with the arguments it is given (the
# config file, then the StatefulSet's options), and the password of the redis-auth Secret.
#
# REDISCLI_AUTH holds the password, from the Secret: the variable every redis-cli in the
# container reads (the probes, the postStart hook, `kubectl exec ... redis-cli`). Redis gets it
# on standard input (the trailing `-`: configuration read after the file, before the command
# line's options), so it is never in a ConfigMap nor on a command line:
#   requirepass  every client (the services, the bootstrap Job, the probes, the hook, the
#                exporter) authenticates with it; an unauthenticated one is answered NOAUTH;
#   masterauth   a replica authenticates with it to its master (any node may be either).
set -eu

password=${REDISCLI_AUTH:-}
if [ -z "$password" ]; then
  echo "redis-start: REDISCLI_AUTH is empty: it must hold the redis-auth Secret's password" >&2
  exit 1
fi
# It goes unquoted into a config line, and unescaped into the services' redis:// URL.
case "$password" in
  *[!A-Za-z0-9._~-]*)
    echo "redis-start: the password may hold only letters, digits and . _ ~ -" >&2
    exit 1
    ;;
esac

exec redis-server "$@" - <<CONFIG
requirepass $password
masterauth $password
CONFIG
