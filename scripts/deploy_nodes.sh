#!/usr/bin/env bash
# Start this node's share of a multi-node run in a container: one `deepspeed --no_ssh` launcher
# per node, all meeting at MASTER_IP. Run it on every node (or under `srun`, which sets SLURM_NODEID).
#
#   MASTER_IP=10.0.0.1 NUM_NODES=2 PROCS_PER_NODE=1 BATCH=4 EPOCHS=1 IMAGE=localhost:5000/llm-labs:latest \
#   NODE_RANK=0 scripts/deploy_nodes.sh [--print | --print-inner]
#
# required: MASTER_IP NUM_NODES PROCS_PER_NODE BATCH EPOCHS, and IMAGE (except with --print-inner)
# optional: NODE_RANK (default SLURM_NODEID, else 0)  JOB (jobs/tinyllama_lora.yaml)  MASTER_PORT (29500)
#           ENTRY (what deepspeed runs; default: --module launcher.worker --job JOB --set train.epochs=EPOCHS
#                  --set ds.train_micro_batch_size_per_gpu=BATCH)
#           CONTAINER_ENGINE (docker)  DEPLOY_DIR (where the hostfile is written)  RUNS_DIR (./runs, mounted
#           at /app/runs; RUN_AS must be able to write there)  SHM_SIZE (2g)
#           GPU_FLAGS (--gpus all when nvidia-smi exists)  RUN_ARGS (more container flags, e.g. "-v /data:/data:ro")
#           LABS_DATA_DIR (a data folder on this node: mounted read-only at /app/data in the container,
#                  which gets LABS_DATA_DIR=/app/data)
#           PULL (1: `ENGINE pull IMAGE` first, so a pushed new build of the same tag is used; 0: don't)
#           RUN_AS (uid:gid the ranks run as; default the invoking user, SUDO_UID:SUDO_GID under sudo,
#                   so the run folder is theirs; as plain root the image's own user, labs 1000:1000)
# --print        print the pull and container commands instead of running them
# --print-inner  print only the deepspeed command the container runs (to run it without a container)
# Exit 2 on a missing or invalid variable.
#
# A hostfile is always passed: `--no_ssh --node_rank=0` without one silently runs a world of 1.
# With --no_ssh, DeepSpeed ignores DS_ENV_FILE/.deepspeed_env: ranks get the container's environment.
set -euo pipefail

mode=run
case "${1:-}" in
  "") ;;
  --print) mode=print ;;
  --print-inner) mode=inner ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "deploy_nodes.sh: unknown argument '$1' (use --print, --print-inner or --help)" >&2; exit 2 ;;
esac

example() {
  case "$1" in
    MASTER_IP) echo "MASTER_IP=10.0.0.1 (the address of node rank 0, reachable from every node)" ;;
    NUM_NODES) echo "NUM_NODES=2" ;;
    PROCS_PER_NODE) echo "PROCS_PER_NODE=1 (ranks per node: GPUs, or CPU processes)" ;;
    BATCH) echo "BATCH=4 (micro-batch per rank)" ;;
    EPOCHS) echo "EPOCHS=1" ;;
    IMAGE) echo "IMAGE=localhost:5000/llm-labs:latest (see scripts/push_image.sh)" ;;
  esac
}
required=(MASTER_IP NUM_NODES PROCS_PER_NODE BATCH EPOCHS)
[ "$mode" = inner ] || required+=(IMAGE)
for var in "${required[@]}"; do
  if [ -z "${!var:-}" ]; then
    echo "deploy_nodes.sh: $var is not set; example: $(example "$var")" >&2
    exit 2
  fi
done

NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
JOB=${JOB:-jobs/tinyllama_lora.yaml}
MASTER_PORT=${MASTER_PORT:-29500}
for var in NUM_NODES PROCS_PER_NODE BATCH EPOCHS NODE_RANK MASTER_PORT; do
  if ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
    echo "deploy_nodes.sh: $var must be a whole number, got '${!var}'" >&2
    exit 2
  fi
done
if [ "$NUM_NODES" -lt 1 ] || [ "$PROCS_PER_NODE" -lt 1 ] || [ "$NODE_RANK" -ge "$NUM_NODES" ]; then
  echo "deploy_nodes.sh: need NUM_NODES >= 1, PROCS_PER_NODE >= 1 and 0 <= NODE_RANK < NUM_NODES" \
       "(got NUM_NODES=$NUM_NODES PROCS_PER_NODE=$PROCS_PER_NODE NODE_RANK=$NODE_RANK)" >&2
  exit 2
fi

# The hostfile: NUM_NODES lines of PROCS_PER_NODE slots. With --no_ssh only the count and the slots
# matter (NODE_RANK picks the line), so the names are placeholders.
DEPLOY_DIR=${DEPLOY_DIR:-${TMPDIR:-/tmp}/labs-deploy}
mkdir -p "$DEPLOY_DIR"
hostfile=$DEPLOY_DIR/hostfile.${NUM_NODES}x${PROCS_PER_NODE}
for ((k = 0; k < NUM_NODES; k++)); do echo "node$k slots=$PROCS_PER_NODE"; done > "$hostfile.$$"
mv "$hostfile.$$" "$hostfile"

if [ -n "${ENTRY:-}" ]; then
  read -r -a entry <<< "$ENTRY"
else
  entry=(--module launcher.worker --job "$JOB" --set "train.epochs=$EPOCHS"
         --set "ds.train_micro_batch_size_per_gpu=$BATCH")
fi
[ "$mode" = inner ] && hf=$hostfile || hf=/deploy/hostfile
inner=(deepspeed --no_ssh "--node_rank=$NODE_RANK" "--num_nodes=$NUM_NODES"
       "--num_accelerators=$PROCS_PER_NODE" "--master_addr=$MASTER_IP" "--master_port=$MASTER_PORT"
       "--hostfile=$hf" "${entry[@]}")

if [ "$mode" = inner ]; then
  printf '%q ' "${inner[@]}"; echo
  exit 0
fi

ENGINE=${CONTAINER_ENGINE:-docker}
RUNS_DIR=${RUNS_DIR:-$PWD/runs}
if [ -z "${GPU_FLAGS+x}" ]; then
  GPU_FLAGS=""
  if command -v nvidia-smi >/dev/null; then GPU_FLAGS="--gpus all"; fi
fi
read -r -a gpu_flags <<< "$GPU_FLAGS"
read -r -a run_args <<< "${RUN_ARGS:-}"
# -e NAME (no value): passed only when set here, and the value never appears in --print output
pass_env=()
for var in DS_ACCELERATOR OMP_NUM_THREADS HF_HOME HF_HUB_OFFLINE HF_TOKEN \
           WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_ENTITY NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do
  [ -n "${!var:-}" ] && pass_env+=(-e "$var")
done
# The host's data folder is not in the image: mount it where the ranks will look for it
data_args=()
if [ -n "${LABS_DATA_DIR:-}" ]; then
  if [ ! -d "$LABS_DATA_DIR" ]; then
    echo "deploy_nodes.sh: LABS_DATA_DIR='$LABS_DATA_DIR' is not a folder on this node" \
         "(unset it, or point it to a folder laid out like shared/data)" >&2
    exit 2
  fi
  data_args=(-v "$(cd "$LABS_DATA_DIR" && pwd):/app/data:ro" -e LABS_DATA_DIR=/app/data)
fi
# The ranks run as the invoking user (not root), so what they write under RUNS_DIR is theirs.
if [ -z "${RUN_AS:-}" ]; then
  RUN_AS="${SUDO_UID:-$(id -u)}:${SUDO_GID:-$(id -g)}"
  [ "${RUN_AS%%:*}" != 0 ] || RUN_AS=1000:1000
fi
if ! [[ "$RUN_AS" =~ ^[0-9]+:[0-9]+$ ]]; then
  echo "deploy_nodes.sh: RUN_AS must be uid:gid (numbers), got '$RUN_AS'" >&2
  exit 2
fi
# host network and host name: ranks meet at MASTER_IP and report the node they run on
cmd=("$ENGINE" run --rm --network host --uts host --ulimit nofile=20000:20000 --shm-size "${SHM_SIZE:-2g}"
     "${gpu_flags[@]}" --name "llm-labs-node$NODE_RANK" --user "$RUN_AS" -e HOME=/tmp
     -e "NODE_RANK=$NODE_RANK" -e "MASTER_ADDR=$MASTER_IP" -e "MASTER_PORT=$MASTER_PORT" "${pass_env[@]}" "${data_args[@]}"
     -v "$hostfile:/deploy/hostfile:ro" -v "$RUNS_DIR:/app/runs" "${run_args[@]}"
     "$IMAGE" "${inner[@]}")
pull=("$ENGINE" pull)
# podman insists on TLS unless told otherwise; a registry on localhost is plain http
if [ "$ENGINE" = podman ] && [[ "$IMAGE" == localhost[:/]* || "$IMAGE" == 127.0.0.1[:/]* ]]; then
  pull+=(--tls-verify=false)
fi
pull+=("$IMAGE")

if [ "$mode" = print ]; then
  [ "${PULL:-1}" = 0 ] || { printf '%q ' "${pull[@]}"; echo; }
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
if [ ! -d "$RUNS_DIR" ]; then
  mkdir -p "$RUNS_DIR"
  [ "$(id -u)" != 0 ] || chown "$RUN_AS" "$RUNS_DIR"
fi
if [ "${PULL:-1}" != 0 ]; then
  "${pull[@]}" >&2
fi
exec "${cmd[@]}"
