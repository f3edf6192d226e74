#!/usr/bin/env bash
# Builds the real node's programs from the pinned Go modules under tools/ into a cache
# directory outside the repository, keyed by version: kubelet and kube-proxy (the control
# plane's Kubernetes release), containerd 2.x with its runc shim and ctr, the CNI plugins the
# node's bridge network uses, crictl and CoreDNS. runc itself comes from Debian.
# A second run finds the binaries and does nothing.
#
#   KUBELM_CACHE   cache root (default: ~/.cache/kubelm)
#   prints the bin directory on its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${KUBELM_CACHE:-$HOME/.cache/kubelm}
tools=$root/tools

module_version() { # module go.mod-dir -> version pinned in that go.mod
  awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2; exit} $1 == "require" && $2 == m {print $3; exit}' "$2/go.mod"
}

k8s_version=$(module_version k8s.io/kubernetes "$tools/kubernetes")
containerd_version=$(module_version github.com/containerd/containerd/v2 "$tools/containerd")
key=$(cat "$tools"/{kubernetes,containerd,cni-plugins,cri-tools,coredns}/go.{mod,sum} | sha256sum | cut -c1-12)
bin="$cache/bin/node-$k8s_version-containerd-$containerd_version-$key"
binaries=(kubelet kube-proxy containerd containerd-shim-runc-v2 ctr crictl coredns
  cni/bridge cni/host-local cni/loopback cni/portmap)

complete() { for b in "${binaries[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
if complete; then
  echo "$bin"
  exit 0
fi

mkdir -p "$bin.partial/cni"
export GOFLAGS=-mod=mod CGO_ENABLED=0
major_minor=${k8s_version#v}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=${major_minor%%.*}"
  ldflags+=" -X $pkg.gitMinor=$(echo "$major_minor" | cut -d. -f2) -X $pkg.gitTreeState=clean"
done
build() { # module-dir output-dir [go build flags...] packages...
  local dir=$1 out=$2; shift 2
  (cd "$tools/$dir" && go build -trimpath -o "$out/" "$@")
}

echo "building kubelet and kube-proxy $k8s_version" >&2
build kubernetes "$bin.partial" -ldflags "$ldflags" k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
echo "building containerd $containerd_version" >&2
# Without btrfs, devmapper and zfs snapshotters: the node uses overlayfs, and no C library is needed.
cver="-X github.com/containerd/containerd/v2/version.Version=$containerd_version"
build containerd "$bin.partial" -tags "no_btrfs no_devmapper no_zfs" -ldflags "-s -w $cver" \
  github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
  github.com/containerd/containerd/v2/cmd/ctr
echo "building the CNI plugins, crictl and CoreDNS" >&2
build cni-plugins "$bin.partial/cni" -ldflags "-s -w" \
  github.com/containernetworking/plugins/plugins/main/bridge github.com/containernetworking/plugins/plugins/main/loopback \
  github.com/containernetworking/plugins/plugins/ipam/host-local github.com/containernetworking/plugins/plugins/meta/portmap
build cri-tools "$bin.partial" -ldflags "-s -w" sigs.k8s.io/cri-tools/cmd/crictl
build coredns "$bin.partial" -ldflags "-s -w" github.com/coredns/coredns
rm -rf "$bin" && mv "$bin.partial" "$bin"
echo "$bin"
