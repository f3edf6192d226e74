#!/usr/bin/env bash
# Builds kubelm's two images from Dockerfile.runtime and Dockerfile.operator where no image
# registry is reachable, and saves each as an image archive the dev node imports.
#
# - The base image comes from Debian packages: debootstrap makes a root filesystem with
#   Python 3.11 and a virtualenv on PATH (what the public Python image offers), imported with
#   `docker import`.
# - A private dockerd (its own socket, data root under the cache, no bridge and no iptables
#   rules) runs for the build only; builds use the host network.
# - The host's CA bundle, when pip is configured with one, reaches pip as the `pip-cert` build
#   secret: never a layer of the image.
# - The pods' sandbox (pause) image is Kubernetes' own pause.c from the pinned module, compiled
#   statically, alone in an image.
# - Everything is cached by content: an archive is rebuilt only when its inputs change.
#
#   KUBELM_CACHE   cache root (default: ~/.cache/kubelm)
#   KUBELM_DEBIAN_MIRROR   (default: http://deb.debian.org/debian)
#   prints `reference=archive` for each image (pause, runtime, operator) on its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${KUBELM_CACHE:-$HOME/.cache/kubelm}
mirror=${KUBELM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
base_packages=python3,python3-venv,ca-certificates,passwd
images=$cache/images
mkdir -p "$images"
log() { printf '[images] %s\n' "$*" >&2; }
started=$(date +%s)

hash_inputs() { # paths... -> short digest of their content (files under directories included)
  (cd "$root" && find "$@" -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}
# Bump base_recipe when the way the base image is made changes (not its inputs listed here).
base_recipe=1
base_key=$(printf '%s %s %s\n' "$suite" "$base_packages" "$base_recipe" | sha256sum | cut -c1-12)
base_tag="kubelm/base:$suite-py3-$base_key"
runtime_tag="kubelm/runtime:dev-$(printf '%s %s' "$base_key" "$(hash_inputs Dockerfile.runtime constraints.txt contract runtime)" | sha256sum | cut -c1-12)"
operator_tag="kubelm/operator:dev-$(printf '%s %s' "$base_key" "$(hash_inputs Dockerfile.operator constraints.txt contract operator)" | sha256sum | cut -c1-12)"
k8s_dir=$(cd "$root/tools/kubernetes" && GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' k8s.io/kubernetes)
pause_source=$k8s_dir/build/pause/linux/pause.c
pause_tag="kubelm/pause:$(sha256sum "$pause_source" | cut -c1-12)"
archive() { echo "$images/$(echo "$1" | tr '/:' '__').tar"; }
tags=("$pause_tag" "$runtime_tag" "$operator_tag")
result() { for t in "${tags[@]}"; do printf '%s=%s ' "$t" "$(archive "$t")"; done; echo; }
all_built() { for t in "${tags[@]}"; do [ -s "$(archive "$t")" ] || return 1; done; }

if all_built; then
  result
  exit 0
fi

# -- a private dockerd for the build --------------------------------------------------------------
run_dir=/run/kubelm-docker
sock=$run_dir/docker.sock
docker=(/usr/bin/docker --host "unix://$sock")
mkdir -p "$run_dir"
if ! "${docker[@]}" info >/dev/null 2>&1; then
  log "starting a private dockerd (data in $cache/docker)"
  dockerd --host "unix://$sock" --data-root "$cache/docker" --exec-root "$run_dir/exec" \
    --pidfile "$run_dir/dockerd.pid" --bridge none --iptables=false --ip6tables=false --ip-masq=false \
    >"$run_dir/dockerd.log" 2>&1 &
  dockerd_pid=$!
  trap 'kill "$dockerd_pid" 2>/dev/null; wait "$dockerd_pid" 2>/dev/null || true' EXIT
  for _ in $(seq 300); do "${docker[@]}" info >/dev/null 2>&1 && break; sleep 0.2; done
  "${docker[@]}" info >/dev/null || { tail -20 "$run_dir/dockerd.log" >&2; exit 1; }
fi

# -- the base image from Debian packages -----------------------------------------------------------
if ! "${docker[@]}" image inspect "$base_tag" >/dev/null 2>&1; then
  log "debootstrap $suite ($base_packages)"
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  debootstrap --variant=minbase --include="$base_packages" "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  # The virtualenv plays the role of the public image's /usr/local Python: `pip` installs there.
  chroot "$rootfs" python3 -m venv /opt/python
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$suite" "$mirror" "$suite" > "$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
  tar -C "$rootfs" -c . | "${docker[@]}" import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$base_tag" >/dev/null
  rm -rf "$rootfs"
fi

# -- the sandbox image -----------------------------------------------------------------------------
if [ ! -s "$(archive "$pause_tag")" ]; then
  log "building $pause_tag from $pause_source"
  pause_root=$(mktemp -d "$cache/pause.XXXXXX")
  gcc -Os -static -Wall -Werror -DVERSION="kubelm-${pause_tag##*:}" -o "$pause_root/pause" "$pause_source"
  tar -C "$pause_root" -c pause | "${docker[@]}" import --change 'ENTRYPOINT ["/pause"]' - "$pause_tag" >/dev/null
  rm -rf "$pause_root"
  rm -f "$images"/kubelm_pause_*.tar
  "${docker[@]}" save "$pause_tag" -o "$(archive "$pause_tag").partial" && mv "$(archive "$pause_tag").partial" "$(archive "$pause_tag")"
fi

# -- kubelm's images --------------------------------------------------------------------------------
secret=()
cert=$(python3 -m pip config get global.cert 2>/dev/null || true)
cert=${PIP_CERT:-$cert}
[ -n "$cert" ] && [ -s "$cert" ] && secret=(--secret "id=pip-cert,src=$cert")
build() { # tag dockerfile
  local tag=$1 dockerfile=$2 out
  out=$(archive "$tag")
  [ -s "$out" ] && return 0
  log "building $tag from $dockerfile"
  DOCKER_BUILDKIT=1 "${docker[@]}" build --network host --progress plain --build-arg "BASE=$base_tag" \
    "${secret[@]}" -f "$root/$dockerfile" -t "$tag" "$root" >"$cache/build-${dockerfile#Dockerfile.}.log" 2>&1 \
    || { tail -30 "$cache/build-${dockerfile#Dockerfile.}.log" >&2; exit 1; }
  # Older archives of the same image are of no further use.
  rm -f "$images/$(echo "${tag%%:*}" | tr '/' '_')_"*.tar
  "${docker[@]}" save "$tag" -o "$out.partial" && mv "$out.partial" "$out"
}
build "$operator_tag" Dockerfile.operator
build "$runtime_tag" Dockerfile.runtime
"${docker[@]}" image prune -f >/dev/null
log "images ready in $(( $(date +%s) - started ))s"
result
