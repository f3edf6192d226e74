#!/usr/bin/env bash
# Builds tools/kstatus, a small program around sigs.k8s.io/cli-utils' kstatus (the status rules Flux
# waits on), into a cache directory outside the repository, keyed by the pinned version and a digest
# of the module files. A second run finds the binary and does nothing.
#
#   KUBELM_CACHE   cache root (default: ~/.cache/kubelm)
#   prints the directory holding `kstatus` on its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${KUBELM_CACHE:-$HOME/.cache/kubelm}
src="$root/tools/kstatus"

version=$(awk '$1 == "sigs.k8s.io/cli-utils" && $2 ~ /^v/ {print $2; exit}
               $1 == "require" && $2 == "sigs.k8s.io/cli-utils" {print $3; exit}' "$src/go.mod")
[ -n "$version" ] || { echo "no sigs.k8s.io/cli-utils pin in $src/go.mod" >&2; exit 1; }
# main.go is in the key with go.sum and go.mod: the program is ours, so an edit to it must rebuild too.
key=$(cat "$src"/go.sum "$src"/go.mod "$src"/main.go | sha256sum | cut -c1-12)
bin="$cache/bin/kstatus-$version-$key"

if [ -x "$bin/kstatus" ]; then
  echo "$bin"
  exit 0
fi

echo "building kstatus (cli-utils $version)" >&2
rm -rf "$bin.partial"
mkdir -p "$bin.partial"
# -mod=readonly: a go.sum that does not cover the build is an error, never a silent re-resolve.
(cd "$src" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
  go build -trimpath -ldflags "-s -w" -o "$bin.partial/kstatus" .)
rm -rf "$bin" && mv "$bin.partial" "$bin"
echo "$bin"
