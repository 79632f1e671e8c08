#!/bin/bash
# Slurm batch job: one launcher per node (srun), the ranks meeting at the first node of the job.
#
#   labs launch JOB --backend slurm        renders this file into the run folder (nodes and ranks per
#                                          node from the hostfile's shape, #SBATCH values from the job's
#                                          cluster section) and submits it with sbatch
#   sbatch --nodes=2 scripts/slurm_job.sh  by hand, from the repository root
#
# Settings (environment, or written below by `labs`; defaults in brackets):
#   LABS_REPO         the repository, the same path on every node [$SLURM_SUBMIT_DIR]
#   LABS_BIN          its venv's bin [$LABS_REPO/.venv/bin]
#   PROCS_PER_NODE    ranks per node (GPUs, or CPU processes) [1]
#   MASTER_PORT       [29500]
#   LABS_WORKER_ARGS  what launcher.worker gets [--job jobs/tinyllama_lora.yaml]
#   LAUNCHER          deepspeed (deepspeed --no_ssh --node_rank=$SLURM_NODEID) or torchrun [deepspeed]
#   LABS_RUN_DIR      the run folder (on a filesystem every node shares) [from --run_dir in LABS_WORKER_ARGS]
#
# Stopping: Slurm sends this batch shell SIGTERM 120 s before the time limit (--signal=B:TERM@120), and
# `scancel --batch --signal=TERM JOB` does the same by hand; the shell writes LABS_RUN_DIR/STOP and every
# rank finishes its step, saves a checkpoint and exits 75; `labs launch JOB --resume RUN` continues.
#SBATCH --job-name=llm-labs
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --signal=B:TERM@120
set -euo pipefail
# @labs-settings
export LABS_REPO=${LABS_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
export LABS_BIN=${LABS_BIN:-$LABS_REPO/.venv/bin}
export PROCS_PER_NODE=${PROCS_PER_NODE:-1}
export MASTER_PORT=${MASTER_PORT:-29500}
export LABS_WORKER_ARGS=${LABS_WORKER_ARGS:---job jobs/tinyllama_lora.yaml}
export LAUNCHER=${LAUNCHER:-deepspeed}
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}

if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
  echo "slurm_job.sh: not inside a Slurm job; submit it with sbatch (or labs launch JOB --backend slurm)" >&2
  exit 2
fi
if [ ! -x "$LABS_BIN/python" ]; then
  echo "slurm_job.sh: no python in LABS_BIN=$LABS_BIN; run 'make setup' in $LABS_REPO or set LABS_BIN" >&2
  exit 2
fi
cd "$LABS_REPO"
export PATH="$LABS_BIN:$PATH"
export PYTHONPATH="$LABS_REPO${PYTHONPATH:+:$PYTHONPATH}"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
echo "slurm job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES node(s) x $PROCS_PER_NODE rank(s), master $MASTER_ADDR:$MASTER_PORT, $LAUNCHER"

if [ -z "${LABS_RUN_DIR:-}" ] && [[ " $LABS_WORKER_ARGS " =~ \ --run_dir\ ([^ ]+) ]]; then
  LABS_RUN_DIR=${BASH_REMATCH[1]}
fi
export LABS_RUN_DIR=${LABS_RUN_DIR:-}
stop_ranks() {
  echo "slurm job $SLURM_JOB_ID: SIGTERM; the ranks finish their step, save a checkpoint and exit 75"
  if [ -n "$LABS_RUN_DIR" ]; then
    echo "SIGTERM to Slurm batch job $SLURM_JOB_ID at $(date)" > "$LABS_RUN_DIR/STOP"
  else
    kill -TERM "$srun_pid" 2>/dev/null || true  # no run folder to write to: srun signals the ranks
  fi
}
trap stop_ranks TERM

# One task per node. Each writes its own hostfile: with --no_ssh DeepSpeed only needs the number of
# nodes and the slots (the node rank picks the line); without one it silently runs a world of 1.
# --kill-on-bad-exit: a node whose ranks fail ends the whole job instead of leaving the others waiting.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  set -euo pipefail
  if [ "$LAUNCHER" = torchrun ]; then
    exec torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$PROCS_PER_NODE" --node_rank="$SLURM_NODEID" \
      --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" -m launcher.worker $LABS_WORKER_ARGS
  fi
  hostfile=${TMPDIR:-/tmp}/labs-hostfile.$SLURM_JOB_ID.$SLURM_NODEID
  for ((k = 0; k < SLURM_JOB_NUM_NODES; k++)); do echo "node$k slots=$PROCS_PER_NODE"; done > "$hostfile"
  exec deepspeed --no_ssh --node_rank="$SLURM_NODEID" --num_nodes="$SLURM_JOB_NUM_NODES" \
    --num_accelerators="$PROCS_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    --hostfile="$hostfile" --module launcher.worker $LABS_WORKER_ARGS' &
srun_pid=$!
# `wait` returns early (> 128) when a trapped signal arrives: wait again until srun (the ranks) has ended
# (an exited, unreaped srun still answers kill -0, so its own exit code is what `wait` returns last)
set +e
while :; do
  wait "$srun_pid"
  code=$?
  if [ "$code" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done
exit "$code"
