"""Backends: each a small function from a plan to the command that starts the ranks.

Every command ends in `launcher.worker --run_dir RUN`: the worker reads the resolved job and
DeepSpeed config that `labs launch` wrote into the run folder, so all ranks run the same thing.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.plan import Plan

REPO = Path(__file__).resolve().parent.parent
PASS_THROUGH = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                "LABS_DATA_DIR", "LABS_CACHE_DIR", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR",
                "WANDB_ENTITY", "WANDB_PROJECT", "MALLOC_MMAP_THRESHOLD_")


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def extensions_dir() -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions")


def accelerator() -> str:
    return os.environ.get("DS_ACCELERATOR") or ("cuda" if shutil.which("nvidia-smi") else "cpu")


def runner_env(plan: Plan) -> dict[str, str]:
    """What every rank needs in its environment; also written as the runner's DS_ENV_FILE."""
    per_host = max(plan.hostfile.hosts.values())
    env = {
        "DS_ACCELERATOR": accelerator(),
        "TORCH_EXTENSIONS_DIR": extensions_dir(),
        "OMP_NUM_THREADS": str(max((os.cpu_count() or 1) // per_host, 1)),
        # The venv's bin first: its ninja builds DeepSpeed's ops; a second ninja version on PATH
        # (e.g. /usr/bin) hashes commands differently and forces rebuilds of the shared cache.
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key in PASS_THROUGH:
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def worker_args(plan: Plan) -> list[str]:
    """The worker reads the resolved job and DeepSpeed config from the run folder."""
    return ["--run_dir", str(plan.run_dir)] + (["--resume"] if plan.resume else [])


def local_command(plan: Plan) -> list[str]:
    cmd = [_bin("deepspeed"), "--hostfile", str(plan.hostfile.path), "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--master_port", str(plan.master_port)]
    if shutil.which("numactl"):
        cmd.append("--bind_cores_to_rank")
    return cmd + ["--module", "launcher.worker", *worker_args(plan)]


def torchrun_command(plan: Plan) -> list[str]:
    return [_bin("torchrun"), "--nnodes", "1", "--nproc_per_node", str(plan.layout.world),
            "--master_addr", "127.0.0.1", "--master_port", str(plan.master_port),
            "-m", "launcher.worker", *worker_args(plan)]


COMMANDS = {"local": local_command, "torchrun": torchrun_command}


def build_command(plan: Plan) -> list[str]:
    return COMMANDS[plan.job.backend](plan)
