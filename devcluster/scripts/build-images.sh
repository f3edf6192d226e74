#!/usr/bin/env bash
# Builds kubelm's two images from Dockerfile.runtime and Dockerfile.operator, and the dev overlay's
# Redis and RabbitMQ (manifests/dev/images), where no image registry is reachable.
#
#   build-images.sh             build what is missing; prints the image references on its last line
#   build-images.sh save REF    write REF (and its release tag) as an image archive to stdout
#
# - The base image comes from Debian packages: debootstrap makes a root filesystem with
#   Python 3.11 and a virtualenv on PATH (what the public Python image offers), imported with
#   `docker import`.
# - The pods' sandbox (pause) image is Kubernetes' own pause.c from the pinned module, compiled
#   statically, alone in an image.
# - A private dockerd (its own socket, data root under the cache, no bridge and no iptables
#   rules) runs while the script does; builds use the host network.
# - The host's CA bundle, when pip is configured with one, reaches pip as the `pip-cert` build
#   secret: never a layer of the image.
# - Images are tagged by content (`dev-<digest of their inputs>`) and rebuilt only when their inputs
#   change; each also carries the release tag the install manifests name. The dev node imports them
#   straight from `save`, so no archive is kept on disk.
#
#   KUBELM_CACHE   cache root (default: ~/.cache/kubelm)
#   KUBELM_DEBIAN_MIRROR   (default: http://deb.debian.org/debian)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${KUBELM_CACHE:-$HOME/.cache/kubelm}
mirror=${KUBELM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
base_packages=python3,python3-venv,ca-certificates,passwd
built=$cache/images
mkdir -p "$built"
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
version=$(awk -F'"' '/^version = / {print $2; exit}' "$root/operator/pyproject.toml")
content_tag() { # repository inputs... -> repository:dev-<digest of the base, the release tag and the inputs>
  local repository=$1; shift
  echo "$repository:dev-$(printf '%s %s %s' "$base_key" "$version" "$(hash_inputs "$@")" | sha256sum | cut -c1-12)"
}
runtime_tag=$(content_tag kubelm/runtime Dockerfile.runtime constraints.txt contract runtime)
operator_tag=$(content_tag kubelm/operator Dockerfile.operator constraints.txt contract operator)
redis_tag=$(content_tag kubelm/redis manifests/dev/images/redis.Dockerfile)
rabbitmq_tag=$(content_tag kubelm/rabbitmq manifests/dev/images/rabbitmq.Dockerfile)
k8s_dir=$(cd "$root/tools/kubernetes" && GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' k8s.io/kubernetes)
pause_source=$k8s_dir/build/pause/linux/pause.c
pause_tag="kubelm/pause:$(sha256sum "$pause_source" | cut -c1-12)"
tags=("$pause_tag" "$runtime_tag" "$operator_tag" "$redis_tag" "$rabbitmq_tag")
# A stamp per built image spares starting dockerd when everything is there.
stamp() { echo "$built/$(echo "$1" | tr '/:' '__').built"; }
all_built() { for t in "${tags[@]}"; do [ -e "$(stamp "$t")" ] || return 1; done; }

# -- a private dockerd ----------------------------------------------------------------------------
run_dir=/run/kubelm-docker
sock=$run_dir/docker.sock
docker=(/usr/bin/docker --host "unix://$sock")
start_dockerd() {
  mkdir -p "$run_dir"
  "${docker[@]}" info >/dev/null 2>&1 && return 0
  log "starting a private dockerd (data in $cache/docker)"
  dockerd --host "unix://$sock" --data-root "$cache/docker" --exec-root "$run_dir/exec" \
    --pidfile "$run_dir/dockerd.pid" --bridge none --iptables=false --ip6tables=false --ip-masq=false \
    >"$run_dir/dockerd.log" 2>&1 &
  dockerd_pid=$!
  trap 'kill "$dockerd_pid" 2>/dev/null; wait "$dockerd_pid" 2>/dev/null || true' EXIT
  for _ in $(seq 300); do "${docker[@]}" info >/dev/null 2>&1 && return 0; sleep 0.2; done
  tail -20 "$run_dir/dockerd.log" >&2
  exit 1
}
drop_older() { # tag: older builds of the same image are of no further use
  local tag=$1
  rm -f "$built/$(echo "${tag%%:*}" | tr '/' '_')_"*.built
  "${docker[@]}" image ls --format '{{.Repository}}:{{.Tag}}' "${tag%%:*}" \
    | { grep -vxF -e "$tag" -e "${tag%%:*}:$version" || true; } | xargs -r "${docker[@]}" image rm >/dev/null
}
built_as() { # tag
  drop_older "$1"
  touch "$(stamp "$1")"
}

if [ "${1:-}" = save ]; then
  ref=${2:?usage: build-images.sh save REF}
  start_dockerd
  aliases=("$ref")
  "${docker[@]}" image inspect "${ref%%:*}:$version" >/dev/null 2>&1 && aliases+=("${ref%%:*}:$version")
  "${docker[@]}" save "${aliases[@]}"
  exit 0
fi

if all_built; then
  echo "${tags[*]}"
  exit 0
fi
start_dockerd
# A stamp whose image docker no longer has (its data root was removed) means: build again.
for t in "${tags[@]}"; do
  "${docker[@]}" image inspect "$t" >/dev/null 2>&1 || rm -f "$(stamp "$t")"
done

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
  drop_older "$base_tag"
fi

# -- the sandbox image -----------------------------------------------------------------------------
if [ ! -e "$(stamp "$pause_tag")" ]; then
  log "building $pause_tag from $pause_source"
  pause_root=$(mktemp -d "$cache/pause.XXXXXX")
  gcc -Os -static -Wall -Werror -DVERSION="kubelm-${pause_tag##*:}" -o "$pause_root/pause" "$pause_source"
  tar -C "$pause_root" -c pause | "${docker[@]}" import --change 'ENTRYPOINT ["/pause"]' - "$pause_tag" >/dev/null
  rm -rf "$pause_root"
  built_as "$pause_tag"
fi

# -- kubelm's images --------------------------------------------------------------------------------
secret=()
cert=$(python3 -m pip config get global.cert 2>/dev/null || true)
cert=${PIP_CERT:-$cert}
[ -n "$cert" ] && [ -s "$cert" ] && secret=(--secret "id=pip-cert,src=$cert")
build() { # tag dockerfile
  local tag=$1 dockerfile=$2 name
  [ -e "$(stamp "$tag")" ] && return 0
  name=$(basename "${tag%%:*}")
  log "building $tag from $dockerfile"
  DOCKER_BUILDKIT=1 "${docker[@]}" build --network host --progress plain --build-arg "BASE=$base_tag" \
    "${secret[@]}" -f "$root/$dockerfile" -t "$tag" -t "${tag%%:*}:$version" "$root" >"$cache/build-$name.log" 2>&1 \
    || { tail -30 "$cache/build-$name.log" >&2; exit 1; }
  built_as "$tag"
}
build "$operator_tag" Dockerfile.operator
build "$redis_tag" manifests/dev/images/redis.Dockerfile
build "$rabbitmq_tag" manifests/dev/images/rabbitmq.Dockerfile
build "$runtime_tag" Dockerfile.runtime
"${docker[@]}" image prune -f >/dev/null
# BuildKit keeps the layers of every build it made. Keep the most recently used 10 GB: the runtime's
# dependency layer (~6 GB) survives a change to our sources, older builds' layers go.
"${docker[@]}" builder prune --force --keep-storage 10GB >/dev/null
log "images ready in $(( $(date +%s) - started ))s"
echo "${tags[*]}"
