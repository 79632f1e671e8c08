#!/usr/bin/env bash
# The per-node container route for real, on one machine and without a registry:
#   podman (runc + cgroupfs, all state in CTR_DIR), a local Debian base image made with debootstrap
#   (a stand-in for python:3.11-slim, which cannot be pulled here; with g++ like the Dockerfile), this
#   machine's venv, Python and repo bind-mounted read-only at their own paths, a private copy of a
#   TORCH_EXTENSIONS_DIR brought up to date here with the venv's ninja (the containers run the same
#   ninja, so they only load DeepSpeed's comm op; another ninja would recompile it, ~30-70 s), and
#   two containers started by scripts/deploy_nodes.sh (NODE_RANK 0 and 1, MASTER_IP 127.0.0.1)
#   running the probe job.
# Exit 0 when both ranks trained. Needs root and `WITH_CONTAINERS=1 scripts/install_cluster_deps.sh`.
# First run ~3 min (debootstrap), later runs ~30 s. Undo: CONTAINERS_STORAGE_CONF=$CTR_DIR/storage.conf
# podman rmi localhost/labs-smoke-base:bookworm-gxx; rm -rf $CTR_DIR
# The project image itself, pushed and pulled through a registry: scripts/build_image.sh --local and
# tests/test_container.py::test_image_pushed_pulled_and_trained_on_two_fake_hosts (docs/containers.md).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CTR_DIR=${CTR_DIR:-${TMPDIR:-/tmp}/labs-ctr}
VENV=${VENV:-$REPO/.venv}
PYHOME=$(dirname "$(dirname "$(readlink -f "$VENV/bin/python3")")")
# seed: the cluster tests' copy (built with the venv's ninja, like the containers'), else the shared one
SEED_EXT=$REPO/.cache/torch_extensions-cluster
[ -d "$SEED_EXT" ] || SEED_EXT=${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}
EXT=$CTR_DIR/torch_extensions
BASE=localhost/labs-smoke-base:bookworm-gxx
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

[ "$(id -u)" = 0 ] || { echo "container_smoke.sh: run as root" >&2; exit 1; }
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || { echo "container_smoke.sh: no $tool; run WITH_CONTAINERS=1 scripts/install_cluster_deps.sh" >&2; exit 1; }
done

mkdir -p "$CTR_DIR"/{root,runroot,deploy,runs}
# hard nofile/nproc limits here are low (the OCI defaults fail: "error setting rlimit"); crun refuses this hybrid cgroup setup
cat > "$CTR_DIR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
cat > "$CTR_DIR/storage.conf" <<EOF
[storage]
driver = "overlay"
runroot = "$CTR_DIR/runroot"
graphroot = "$CTR_DIR/root"
EOF
export CONTAINERS_CONF=$CTR_DIR/containers.conf CONTAINERS_STORAGE_CONF=$CTR_DIR/storage.conf

if ! podman image exists "$BASE"; then
  echo "container_smoke.sh: making $BASE with debootstrap (~100 s, once)"
  [ -d "$CTR_DIR/rootfs/usr" ] || debootstrap --variant=minbase --include=python3,g++,libc6-dev bookworm "$CTR_DIR/rootfs" "$MIRROR" >"$CTR_DIR/debootstrap.log" 2>&1
  tar -C "$CTR_DIR/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
fi

# the containers' copy of the comm op, brought up to date here with the venv's ninja (the one they use)
rm -rf "$EXT" && mkdir -p "$EXT"
if [ -d "$SEED_EXT" ]; then cp -a "$SEED_EXT/." "$EXT/" && rm -f "$EXT"/*/lock; fi
PATH=$VENV/bin:$PATH DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$EXT "$VENV/bin/python" -c \
  "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()" \
  >"$CTR_DIR/prebuild.log" 2>&1 || { echo "container_smoke.sh: comm op build failed: $CTR_DIR/prebuild.log" >&2; exit 1; }

export CONTAINER_ENGINE=podman IMAGE=$BASE MASTER_IP=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29561}
export NUM_NODES=2 PROCS_PER_NODE=1 BATCH=4 EPOCHS=1 DEPLOY_DIR=$CTR_DIR/deploy RUNS_DIR=$CTR_DIR/runs
# the base image is not pulled (it lives only here); root inside, as the mounted venv and EXT are root's
export ENTRY=$REPO/tests/cluster/probe_train.py GPU_FLAGS="" PULL=0 RUN_AS=0:0
# (an explicit --ulimit, like deploy_nodes.sh's nofile, drops default_ulimits: nproc must be given again)
export RUN_ARGS="--ulimit nproc=4096:4096 -v $PYHOME:$PYHOME:ro -v $VENV:$VENV:ro -v $REPO:$REPO:ro -v $EXT:$EXT -w $REPO
 -e PATH=$VENV/bin:/usr/bin:/bin -e DS_ACCELERATOR=cpu -e TORCH_EXTENSIONS_DIR=$EXT -e OMP_NUM_THREADS=1"
RUN_ARGS=${RUN_ARGS//$'\n'/}

pids=()
for rank in 0 1; do
  NODE_RANK=$rank scripts/deploy_nodes.sh --print
  NODE_RANK=$rank timeout 300 scripts/deploy_nodes.sh > "$CTR_DIR/node$rank.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
grep -h '^rank \|PROBE_OK' "$CTR_DIR/node0.log" "$CTR_DIR/node1.log" || true
if [ "$rc" = 0 ] && grep -q 'PROBE_OK world=2' "$CTR_DIR/node0.log"; then
  echo "container_smoke.sh: PASS"
else
  echo "container_smoke.sh: FAIL (logs: $CTR_DIR/node0.log $CTR_DIR/node1.log)" >&2
  exit 1
fi
