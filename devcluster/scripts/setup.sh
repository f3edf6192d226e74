#!/usr/bin/env bash
# One idempotent setup for a fresh machine: Debian packages, the Python virtualenv
# with the kubelm projects (editable) and dev tools, the control plane and node binaries, the images,
# and the tools the tests use (helm, kstatus, KEDA's CRDs).
# A second run checks each step and changes nothing.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
venv=${KUBELM_VENV:-$root/.venv}
cache=${KUBELM_CACHE:-$HOME/.cache/kubelm}
apt_packages=(redis-server rabbitmq-server erlang-base libjemalloc2 openssl ca-certificates make
  # the real node and the images (devcluster/scripts/build-node.sh, build-images.sh)
  docker.io runc iptables conntrack iproute2 kmod debootstrap gcc libc6-dev
  # the response cache's second backend, for its tests
  memcached)

log() { printf '[setup] %s\n' "$*" >&2; }

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  # The packages' own service scripts must not start system-wide daemons: devcluster runs its own.
  # A policy-rc.d the machine already has is left as it is.
  own_policy=false
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo_cmd[@]}" chmod +x /usr/sbin/policy-rc.d
    own_policy=true
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if $own_policy; then "${sudo_cmd[@]}" rm -f /usr/sbin/policy-rc.d; fi
fi

# The virtualenv is rebuilt only when a dependency file changes.
stamp=$(cat constraints.txt requirements-dev.txt */pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.kubelm-stamp" 2>/dev/null)" != "$stamp" ]; then
  log "installing Python packages into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -c constraints.txt -r requirements-dev.txt \
    -e contract -e operator -e runtime -e devcluster
  echo "$stamp" > "$venv/.kubelm-stamp"
fi

log "control plane binaries"
bin=$(KUBELM_CACHE="$cache" bash devcluster/scripts/build-control-plane.sh | tail -n 1)
log "the real node's programs"
node_bin=$(KUBELM_CACHE="$cache" bash devcluster/scripts/build-node.sh | tail -n 1)
log "kubelm's images (from Dockerfile.runtime and Dockerfile.operator)"
KUBELM_CACHE="$cache" bash devcluster/scripts/build-images.sh >/dev/null
log "KEDA's CRDs (for tests of the keda autoscaling engine)"
KUBELM_CACHE="$cache" bash devcluster/scripts/fetch-keda-crds.sh >/dev/null
log "helm and kstatus (for tests of the chart and the GitOps health checks)"
KUBELM_CACHE="$cache" bash devcluster/scripts/build-helm.sh >/dev/null
KUBELM_CACHE="$cache" bash devcluster/scripts/build-kstatus.sh >/dev/null
log "ready: binaries in $bin and $node_bin"
