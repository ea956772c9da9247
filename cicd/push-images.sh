#!/usr/bin/env bash
# Pushes the images of `nix build .#all-images` and prints, one line per service, the reference by
# digest the overlays then deploy: `<service> <registry>/flash-sale/<service>:<tag>@sha256:...`
# (the tag for people to read, the digest what runs), the file `deploy.sh --images` reads.
#
# Usage: push-images.sh IMAGES_DIR REGISTRY TAG
# Reads REGISTRY_USER and REGISTRY_PASSWORD (the seed's CI variables).
set -euo pipefail

images=$1
registry=$2
tag=$3

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
authfile=$workdir/auth.json

printf '%s' "$REGISTRY_PASSWORD" |
  skopeo login --authfile "$authfile" --username "$REGISTRY_USER" --password-stdin "${registry%%/*}" >&2

for archive in "$images"/*.tar.gz; do
  service=$(basename "$archive" .tar.gz)
  repository=$registry/flash-sale/$service
  # The archive is ours, built by Nix: there is no signature policy to apply to it.
  skopeo --insecure-policy copy --authfile "$authfile" --digestfile "$workdir/digest" \
    "docker-archive:$archive" "docker://$repository:$tag" >&2
  echo "$service $repository:$tag@$(cat "$workdir/digest")"
done
