#!/usr/bin/env bash
# Installs what tests/flake needs on a fresh Debian machine, as root: Debian's nix-bin (for
# nix-instantiate), shellcheck, and nixpkgs-fmt and deadnix from crates.io. Safe to run again:
# whatever is already installed is left alone.
set -euo pipefail

missing=()
command -v nix-instantiate >/dev/null || missing+=(nix-bin)
command -v shellcheck >/dev/null || missing+=(shellcheck)
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The versions the Nix files were formatted and linted with.
declare -A crates=([nixpkgs-fmt]=1.3.0 [deadnix]=1.3.1)
for tool in "${!crates[@]}"; do
  command -v "$tool" >/dev/null || cargo install "$tool" --version "${crates[$tool]}" --locked
done
