#!/usr/bin/env bash
# Build the project image and push it to a registry the nodes can pull from.
#
#   [REGISTRY=host:5000] [TAG=v1] [TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126] \
#   [DS_ACCELERATOR=cuda] scripts/push_image.sh [--local] [--no-build] [--print]
#
# Image: ${REGISTRY:-localhost:5000}/llm-labs:${TAG:-latest}. Engine: CONTAINER_ENGINE, else docker,
# else podman. The build is scripts/build_image.sh (TORCH_VERSION, TORCH_INDEX_URL, DEEPSPEED_VERSION,
# DS_ACCELERATOR, BASE_IMAGE become --build-arg; defaults in the Dockerfile: CPU torch 2.13.0).
# --local     build with `build_image.sh --local` (podman, a local base, this machine's pip sources)
#             and push from its podman store (LABS_CTR_DIR)
# --no-build  push the image already built under that name
# --print     show the commands only
# A registry to push to: `docker run -d -p 5000:5000 registry:2`, or without Docker Debian's
# docker-registry package (the same program): see docs/containers.md. podman pushes to localhost
# over plain http (--tls-verify=false); docker treats 127.0.0.0/8 registries as insecure by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

print=0 local=0 build=1
for a in "$@"; do
  case "$a" in
    --print) print=1 ;;
    --local) local=1 ;;
    --no-build) build=0 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "push_image.sh: unknown argument '$a' (--local, --no-build, --print)" >&2; exit 2 ;;
  esac
done

IMAGE=${REGISTRY:-localhost:5000}/llm-labs:${TAG:-latest}
if [ "$local" = 1 ]; then
  ENGINE=podman
  env_sh=${LABS_CTR_DIR:-/var/tmp/llm-labs-ctr}/env.sh
  # shellcheck disable=SC1090
  if [ -f "$env_sh" ]; then . "$env_sh"; fi
else
  ENGINE=${CONTAINER_ENGINE:-$(command -v docker || command -v podman || true)}
  if [ -z "$ENGINE" ]; then
    [ "$print" = 1 ] || { echo "push_image.sh: neither docker nor podman found (or set CONTAINER_ENGINE)" >&2; exit 1; }
    ENGINE=docker
  fi
  ENGINE=$(basename "$ENGINE")
fi

flags=()
[ "$print" = 1 ] && flags+=(--print)
[ "$local" = 1 ] && flags+=(--local)
if [ "$build" = 1 ]; then
  CONTAINER_ENGINE=$ENGINE scripts/build_image.sh "${flags[@]}" -t "$IMAGE"
fi

push=("$ENGINE" push)
# podman insists on TLS unless told otherwise; a registry on localhost is plain http
if [ "$ENGINE" = podman ] && [[ "$IMAGE" == localhost[:/]* || "$IMAGE" == 127.0.0.1[:/]* ]]; then
  push+=(--tls-verify=false)
fi
push+=("$IMAGE")
if [ "$print" = 1 ]; then
  printf '%q ' "${push[@]}"; echo
else
  echo "+ ${push[*]}" >&2
  "${push[@]}"
fi
