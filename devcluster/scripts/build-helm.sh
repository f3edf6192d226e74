#!/usr/bin/env bash
# Builds helm from the pinned Go module under tools/helm into a cache directory outside the
# repository, keyed by version. A second run finds the binary and does nothing.
#
#   KUBELM_CACHE   cache root (default: ~/.cache/kubelm)
#   prints the bin directory on its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${KUBELM_CACHE:-$HOME/.cache/kubelm}
tools="$root/tools/helm"

helm_version=$(awk '$1 == "require" && $2 == "helm.sh/helm/v4" {print $3; exit}' "$tools/go.mod")
# The go.sum digest is part of the key so an edited pin never reuses a stale binary.
key=$(cat "$tools/go.sum" "$tools/go.mod" | sha256sum | cut -c1-12)
bin="$cache/bin/helm-$helm_version-$key"

if [ -x "$bin/helm" ]; then
  echo "$bin"
  exit 0
fi

rm -rf "$bin.partial"
mkdir -p "$bin.partial"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
# Without the version variable helm reports only its major.minor; metadata stays empty as in a
# tagged upstream build, which also keeps "+unreleased" out of `helm version`.
pkg=helm.sh/helm/v4/internal/version
ldflags="-s -w -X $pkg.version=$helm_version -X $pkg.gitTreeState=clean"

echo "building helm $helm_version (a few minutes on a cold cache)" >&2
(cd "$tools" && go build -trimpath -ldflags "$ldflags" -o "$bin.partial/helm" helm.sh/helm/v4/cmd/helm)
rm -rf "$bin" && mv "$bin.partial" "$bin"
echo "$bin"
