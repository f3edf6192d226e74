#!/usr/bin/env bash
# Copies KEDA's ScaledObject and TriggerAuthentication CRDs out of KEDA's Go module (fetched from the
# module proxy, which the go command verifies against the checksum database) into the cache, by version.
# Tests install them so that what the operator emits for `autoscaling.engine: keda` is validated
# by KEDA's real schemas. Prints the directory on its last line.
set -euo pipefail

keda_version=v2.21.0
cache=${KUBELM_CACHE:-$HOME/.cache/kubelm}
out="$cache/keda-$keda_version"
files=(keda.sh_scaledobjects.yaml keda.sh_triggerauthentications.yaml)

complete() { for f in "${files[@]}"; do [ -s "$out/$f" ] || return 1; done; }
if ! complete; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "github.com/kedacore/keda/v2@$keda_version" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$out.partial"
  for f in "${files[@]}"; do cp "$dir/config/crd/bases/$f" "$out.partial/$f"; done
  rm -rf "$out"
  mv "$out.partial" "$out"
fi
echo "$out"
