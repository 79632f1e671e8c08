"""Tensor-parallel generation's plumbing: the launcher's ranks, the process group DeepSpeed inference
joins, the shard grain that splits small models evenly, and re-launching as N ranks under torchrun.
(The rank-side environment comes from launcher.rank_env, which tasks may use; a task does not know
how it is launched otherwise.)"""

from __future__ import annotations

import os
import subprocess
import sys


def launcher_world() -> tuple[int, int]:
    """(global rank, world size) from the launcher's environment (deepspeed, torchrun); (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Join the launcher's process group (gloo on CPU), once, ready for DeepSpeed inference."""
    # keeps torch and DeepSpeed out of the labs process
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's CPU shared-memory all-reduce (used by inference_all_reduce) sets itself up only
    # when LOCAL_SIZE == world size; the deepspeed runner exports LOCAL_SIZE, torchrun does not (it
    # has LOCAL_WORLD_SIZE), and without the set-up the first row-parallel forward dies of SIGSEGV.
    if "LOCAL_SIZE" not in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        os.environ["LOCAL_SIZE"] = os.environ["LOCAL_WORLD_SIZE"]
    # keeps torch and DeepSpeed out of the labs process
    import deepspeed

    # keeps torch and DeepSpeed out of the labs process
    import deepspeed.comm as ds_comm
    if ds_comm.is_initialized():
        return
    # keeps torch and DeepSpeed out of the labs process
    from tasks.api import release_shm_buffers
    cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if cpu else None)
    release_shm_buffers()  # else every run leaves ~66 MiB per rank in /dev/shm
    if cpu and os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE"):
        # ranks on several hosts: no shared memory between them; make DeepSpeed take its own
        # fallback (a process-group all_reduce) instead of the uninitialised shared-memory kernel
        ds_comm.comm.cdb.shm_vector_kernel_level = 0


def tp_grain(config, tp_size: int) -> int:
    """DeepSpeed's tp_grain_size (default 64): shards of MLP and head matrices are multiples of it.
    The largest grain <= 64 that splits hidden and intermediate sizes evenly, so a small model
    (llama-tiny: 64 / 176) is halved instead of cut 64 / 112 and 64 / 0 (lm_head)."""
    dims = [getattr(config, a, None) for a in ("hidden_size", "intermediate_size", "n_embd", "n_inner")]
    grain = 64
    while grain > 1 and any(d and d % (grain * tp_size) for d in dims):
        grain //= 2
    return grain


def relaunch(argv: list[str], tp_size: int) -> int:
    """Alone with --tp_size N > 1: run the same command as N ranks on this host under torchrun."""

    # keeps torch and DeepSpeed out of the labs process
    from tasks.api import rank_environment
    # as `labs launch` sets up its ranks (the one rank environment), the cores shared out between the ranks
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None
    env = os.environ | rank_environment(tp_size, threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp_size),
           "-m", "tasks.rag", *argv]
    print(f"tensor-parallel generation on {tp_size} ranks: torchrun --standalone --nproc_per_node {tp_size} "
          f"-m tasks.rag {' '.join(argv)}", flush=True)
    return subprocess.call(cmd, env=env)
