"""Cluster test infrastructure: fake hosts (fakehosts.py), a private Slurm (slurm.py), a probe job.

The probe (probe_train.py) prints `rank R host H loss L` from every rank and `PROBE_OK world=W`.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "probe_train.py"
VENV_BIN = Path(sys.prefix) / "bin"  # the venv running the tests: the same path on every fake host
SHARED_EXT = REPO / ".cache" / "torch_extensions"
_RANK_LINE = re.compile(r"rank (\d+) host (\S+) loss ([\d.]+)")
_BUILD_COMM_OP = (
    "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
)


def extensions_dir() -> Path:
    """TORCH_EXTENSIONS_DIR of the cluster tests: LABS_CLUSTER_EXT_DIR, else .cache/torch_extensions-cluster.

    Their own copy (seeded from the shared .cache/torch_extensions): the shared one is rebuilt each
    time a process with another ninja on PATH touches it, and a build killed mid-way leaves a `lock`
    file that makes every later run wait forever.
    """
    return Path(os.environ.get("LABS_CLUSTER_EXT_DIR", REPO / ".cache" / "torch_extensions-cluster"))


def rank_env() -> dict[str, str]:
    """What every rank needs (DeepSpeed on CPU); over ssh it must come through the DS_ENV_FILE.

    The venv's bin comes first on PATH: its ninja, not /usr/bin/ninja, must build DeepSpeed's comm
    op, or each switch between the two recompiles it (~30-70 s).
    """
    return {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(extensions_dir()),
        "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "OMP_NUM_THREADS": "1",
    }


@functools.cache
def prepare_comm_op(timeout: float = 420) -> dict[str, str]:
    """Build (or just load) DeepSpeed's CPU comm op once, so rank start-up takes seconds; returns rank_env()."""
    ext = extensions_dir()
    if not ext.exists() and SHARED_EXT.is_dir():
        shutil.copytree(SHARED_EXT, ext, ignore=shutil.ignore_patterns("lock"))
    from launcher.common.proc import clear_stale_build_locks
    clear_stale_build_locks(ext)  # a lock no process holds open is a killed build's
    env = rank_env()
    cmd = [str(VENV_BIN / "python"), "-c", _BUILD_COMM_OP]
    try:
        res = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        for lock in ext.glob("*/lock"):  # ours, from the build just killed
            lock.unlink()
        raise RuntimeError(f"building DeepSpeed's comm op in {ext} took over {timeout} s") from None
    if res.returncode != 0:
        raise RuntimeError(f"building DeepSpeed's comm op in {ext} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return env


def probe_ranks(output: str) -> dict[int, str]:
    """rank -> host, from the probe's `rank R host H loss L` lines."""
    return {int(m[1]): m[2] for m in _RANK_LINE.finditer(output)}
