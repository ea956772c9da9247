#!/bin/sh
# startupProbe and livenessProbe of every Redis node: it answers PONG to an authenticated PING
# (REDISCLI_AUTH, from the redis-auth Secret). redis-cli exits 0 on an error reply such as
# NOAUTH, so the answer is checked, not the exit status.
set -u

[ "$(redis-cli -p "${REDIS_PORT:-6379}" ping 2>/dev/null)" = "PONG" ]
