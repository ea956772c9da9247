#!/bin/sh
# Creates the order topic once. An existing topic is left as it is and listed, so a changed
# partition count shows in the Job log instead of being applied behind anyone's back.
set -eu

: "${FLASH_SALE_KAFKA__BROKERS:?}" "${FLASH_SALE_KAFKA__TOPIC:?}" "${PARTITIONS:?}" "${REPLICAS:?}"
BROKERS=$FLASH_SALE_KAFKA__BROKERS
TOPIC=$FLASH_SALE_KAFKA__TOPIC
deadline=$(( $(date +%s) + ${TOPIC_TIMEOUT_SECONDS:-600} ))

# Wait until the Kafka API lists at least as many brokers as the topic needs replicas.
while :; do
  up=$(rpk cluster info -X brokers="$BROKERS" 2>/dev/null | grep -c '^[0-9]' || true)
  if [ "${up:-0}" -ge "$REPLICAS" ]; then
    break
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "create-topic: only ${up:-0} of $REPLICAS brokers answered" >&2
    exit 1
  fi
  sleep 5
done

if rpk topic describe "$TOPIC" -X brokers="$BROKERS" >/dev/null 2>&1; then
  echo "create-topic: $TOPIC exists:"
  rpk topic list -X brokers="$BROKERS"
  exit 0
fi

rpk topic create "$TOPIC" -X brokers="$BROKERS" \
  --partitions "$PARTITIONS" --replicas "$REPLICAS" \
  --topic-config cleanup.policy=delete \
  --topic-config retention.ms=604800000
