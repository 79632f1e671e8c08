#!/usr/bin/env bash
# Build the project image and push it to a registry the nodes can pull from.
#
#   [REGISTRY=host:5000] [TAG=v1] [TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126] \
#   [DS_ACCELERATOR=cuda] scripts/push_image.sh [--print]
#
# Image: ${REGISTRY:-localhost:5000}/llm-labs:${TAG:-latest}. Engine: CONTAINER_ENGINE, else docker,
# else podman. TORCH_VERSION, TORCH_INDEX_URL, DEEPSPEED_VERSION and DS_ACCELERATOR, when set, become
# --build-arg (defaults in the Dockerfile: CPU torch 2.13.0). --print shows the commands only.
set -euo pipefail
cd "$(dirname "$0")/.."

print=0
case "${1:-}" in
  "") ;;
  --print) print=1 ;;
  *) echo "push_image.sh: unknown argument '$1' (only --print)" >&2; exit 2 ;;
esac

ENGINE=${CONTAINER_ENGINE:-$(command -v docker || command -v podman || true)}
if [ -z "$ENGINE" ]; then
  [ "$print" = 1 ] || { echo "push_image.sh: neither docker nor podman found (or set CONTAINER_ENGINE)" >&2; exit 1; }
  ENGINE=docker
fi
ENGINE=$(basename "$ENGINE")
IMAGE=${REGISTRY:-localhost:5000}/llm-labs:${TAG:-latest}

build=("$ENGINE" build -t "$IMAGE")
for arg in TORCH_VERSION TORCH_INDEX_URL DEEPSPEED_VERSION DS_ACCELERATOR; do
  if [ -n "${!arg:-}" ]; then build+=(--build-arg "$arg=${!arg}"); fi
done
if [ "${DS_ACCELERATOR:-cpu}" != cpu ]; then build+=(--build-arg PREBUILD_CPU_OPS=0); fi
build+=(.)
push=("$ENGINE" push)
# podman insists on TLS unless told otherwise; a registry on localhost is plain http
if [ "$ENGINE" = podman ] && [[ "$IMAGE" == localhost[:/]* ]]; then push+=(--tls-verify=false); fi
push+=("$IMAGE")

for cmd in build push; do
  declare -n argv=$cmd
  if [ "$print" = 1 ]; then
    printf '%q ' "${argv[@]}"; echo
  else
    echo "+ ${argv[*]}" >&2
    "${argv[@]}"
  fi
done
