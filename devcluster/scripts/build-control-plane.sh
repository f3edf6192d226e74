#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl
# from the pinned Go modules under tools/ into a cache directory outside the
# repository, keyed by version. A second run finds the binaries and does nothing.
#
#   KUBELM_CACHE   cache root (default: ~/.cache/kubelm)
#   prints the bin directory on its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${KUBELM_CACHE:-$HOME/.cache/kubelm}

module_version() { # module go.mod-dir -> version pinned in that go.mod
  awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2; exit} $1 == "require" && $2 == m {print $3; exit}' "$2/go.mod"
}

k8s_version=$(module_version k8s.io/kubernetes "$root/tools/kubernetes")
etcd_version=$(module_version go.etcd.io/etcd/server/v3 "$root/tools/etcd")
# The go.sum digest is part of the key so an edited pin never reuses stale binaries.
key=$(cat "$root"/tools/{kubernetes,etcd}/go.{sum,mod} | sha256sum | cut -c1-12)
bin="$cache/bin/k8s-$k8s_version-etcd-$etcd_version-$key"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)

complete() { for b in "${binaries[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
if complete; then
  echo "$bin"
  exit 0
fi

mkdir -p "$bin.partial"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
major_minor=${k8s_version#v}
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=${major_minor%%.*}"
  ldflags+=" -X $pkg.gitMinor=$(echo "$major_minor" | cut -d. -f2) -X $pkg.gitTreeState=clean"
  ldflags+=" -X $pkg.buildDate=$build_date"
done

echo "building etcd $etcd_version" >&2
(cd "$root/tools/etcd" && go build -trimpath -ldflags "-s -w" -o "$bin.partial/etcd" .)
echo "building kubernetes $k8s_version (several minutes on a cold cache)" >&2
(cd "$root/tools/kubernetes" && go build -trimpath -ldflags "$ldflags" -o "$bin.partial/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
rm -rf "$bin" && mv "$bin.partial" "$bin"
echo "$bin"
