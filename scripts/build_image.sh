#!/usr/bin/env bash
# Build the project image (the Dockerfile), with docker or podman.
#
#   scripts/build_image.sh [--local] [--print] [-t IMAGE]
#
# Default: `ENGINE build -t IMAGE .` with the Dockerfile's public defaults (python:3.11-slim, the
# PyTorch CPU index); TORCH_VERSION, TORCH_INDEX_URL, DEEPSPEED_VERSION, DS_ACCELERATOR and BASE_IMAGE,
# when set, become --build-arg (a CUDA build: see docs/containers.md).
#
# --local: for a machine that reaches only PyPI and Debian's mirror (no Docker Hub, no PyTorch index),
# as root, with podman (WITH_CONTAINERS=1 scripts/install_cluster_deps.sh). It
#   1. keeps all podman state in LABS_CTR_DIR (default /var/tmp/llm-labs-ctr) and writes
#      LABS_CTR_DIR/env.sh (CONTAINERS_CONF/CONTAINERS_STORAGE_CONF: runc, cgroupfs, nofile <= 20000);
#   2. makes a stand-in for python:3.11-slim once (debootstrap bookworm + Debian's Python 3.11 + pip:
#      localhost/labs-python:3.11-slim, ~3 min) and passes it as BASE_IMAGE;
#   3. passes the package sources this machine's pip uses (its find-links folders and file:// indexes,
#      e.g. /opt/wheels with the torch CPU wheel) as PIP_FIND_LINKS/PIP_EXTRA_INDEX_URL build args,
#      mounted read-only into the build, its CA bundle (PIP_CERT), and TORCH_INDEX_URL=PyPI (the CPU
#      wheel then comes from find-links); the build uses the host network.
# The same Dockerfile is built either way. Layers are cached: a rebuild after a code change redoes
# only the project's layer (~5 s); the first build ~9 min on 2 cores (base ~1.5 min, layers ~7 min).
# IMAGE: default localhost:5000/llm-labs:latest (REGISTRY and TAG change it, as in push_image.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

local=0 print=0
IMAGE=${IMAGE:-${REGISTRY:-localhost:5000}/llm-labs:${TAG:-latest}}
while [ $# -gt 0 ]; do
  case "$1" in
    --local) local=1 ;;
    --print) print=1 ;;
    -t) IMAGE=${2:?-t needs an image name}; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "build_image.sh: unknown argument '$1' (--local, --print, -t IMAGE)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  if [ "$print" = 1 ]; then printf '%q ' "$@"; echo; else echo "+ $*" >&2; "$@"; fi
}

build_args=()
for arg in BASE_IMAGE TORCH_VERSION TORCH_INDEX_URL DEEPSPEED_VERSION DS_ACCELERATOR; do
  if [ -n "${!arg:-}" ]; then build_args+=(--build-arg "$arg=${!arg}"); fi
done
if [ "${DS_ACCELERATOR:-cpu}" != cpu ]; then build_args+=(--build-arg PREBUILD_CPU_OPS=0); fi

if [ "$local" = 0 ]; then
  ENGINE=${CONTAINER_ENGINE:-$(command -v docker || command -v podman || echo docker)}
  run "$(basename "$ENGINE")" build -t "$IMAGE" "${build_args[@]}" .
  exit 0
fi

# ---- --local: podman, a local base, this machine's pip sources ----
[ "$(id -u)" = 0 ] || { echo "build_image.sh --local: run as root" >&2; exit 1; }
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || { echo "build_image.sh: no $tool; run WITH_CONTAINERS=1 scripts/install_cluster_deps.sh" >&2; exit 1; }
done
CTR=${LABS_CTR_DIR:-/var/tmp/llm-labs-ctr}
mkdir -p "$CTR"/{root,runroot}
# hard nofile here is 20000 (the OCI default fails: "error setting rlimit"); crun refuses this hybrid cgroup setup
cat > "$CTR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
cat > "$CTR/storage.conf" <<EOF
[storage]
driver = "overlay"
runroot = "$CTR/runroot"
graphroot = "$CTR/root"
EOF
echo "export CONTAINERS_CONF=$CTR/containers.conf CONTAINERS_STORAGE_CONF=$CTR/storage.conf" > "$CTR/env.sh"
. "$CTR/env.sh"

BASE=${BASE_IMAGE:-localhost/labs-python:3.11-slim}
if [ -z "${BASE_IMAGE:-}" ] && [ "$print" = 0 ] && ! podman image exists "$BASE"; then
  mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
           2>/dev/null | awk '/^(deb|URIs:)/{for(i=1;i<=NF;i++) if($i ~ /^https?:/){print $i; exit}}' || true)}
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$CTR/base-rootfs
  echo "build_image.sh: making $BASE with debootstrap from $mirror (~3 min, once)" >&2
  if [ ! -e "$rootfs/.done" ]; then
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,libpython3.11-dev,ca-certificates bookworm "$rootfs" "$mirror" \
      > "$CTR/debootstrap.log" 2>&1 || { tail -20 "$CTR/debootstrap.log" >&2; exit 1; }
    # like python:3.11-slim: `python`/`pip` on PATH, pip may install system-wide, no apt lists or caches
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
    # this machine's apt settings (e.g. a snapshot mirror whose Release files are old)
    cp /etc/apt/apt.conf.d/99artifact-registry "$rootfs/etc/apt/apt.conf.d/" 2>/dev/null || true
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    touch "$rootfs/.done"
  fi
  tar -C "$rootfs" --exclude=./.done -c . | podman import --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$BASE" >/dev/null
fi
build_args+=(--build-arg "BASE_IMAGE=$BASE")

# This machine's pip sources: find-links folders and file:// indexes, mounted at the same paths.
pip_cfg=$(python3 -m pip config list 2>/dev/null || true)
cfg() { sed -n "s/^[^=]*\.$1='\(.*\)'$/\1/p" <<< "$pip_cfg" | tr ' ' '\n' | grep -v '^$' | sort -u || true; }
mounts=() find_links=() extra_index=()
while read -r d; do
  [ -n "$d" ] && [ -d "${d#file://}" ] || continue
  find_links+=("${d#file://}"); mounts+=(-v "${d#file://}:${d#file://}:ro")
done < <({ cfg find-links; tr ' ' '\n' <<< "${PIP_FIND_LINKS:-}"; } | sed 's|^file://||' | sort -u)
while read -r u; do
  case "$u" in
    file://*) [ -d "${u#file://}" ] && { extra_index+=("$u"); mounts+=(-v "$(dirname "${u#file://}"):$(dirname "${u#file://}"):ro"); } ;;
    http*) extra_index+=("$u") ;;
  esac
done < <(cfg extra-index-url)
[ ${#find_links[@]} = 0 ] || build_args+=(--build-arg "PIP_FIND_LINKS=$(printf '%s ' "${find_links[@]}" | sed 's/ $//')")
[ ${#extra_index[@]} = 0 ] || build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$(printf '%s ' "${extra_index[@]}" | sed 's/ $//')")
# its CA bundle (a proxy's own CA: the base image's bundle would refuse PyPI's certificate)
cert=${PIP_CERT:-$(cfg cert | head -1)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  mounts+=(-v "$cert:/run/labs-pip-cert.pem:ro"); build_args+=(--build-arg PIP_CERT=/run/labs-pip-cert.pem)
fi
if [ -z "${TORCH_INDEX_URL:-}" ]; then
  index=$(cfg index-url | head -1)
  build_args+=(--build-arg "TORCH_INDEX_URL=${index:-https://pypi.org/simple}")
fi

run podman build --pull=never --network host --layers "${mounts[@]}" -t "$IMAGE" "${build_args[@]}" .
if [ "$print" = 0 ]; then
  podman image prune -f >/dev/null  # the untagged images earlier builds left (their layers stay cached)
  podman image ls "$IMAGE"
fi
