"""The machine and the process a rank runs in, without torch at module level (`labs plan` imports it):
accelerator, DeepSpeed's extensions folder and its build locks, /dev/shm clean-up, ports, and the set-up
that lets one plain `python` process run like a launched rank.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
from pathlib import Path

from launcher.common.run_dir import REPO


def accelerator() -> str:
    return os.environ.get("DS_ACCELERATOR") or ("cuda" if shutil.which("nvidia-smi") else "cpu")


def device():
    """The device a rank's inputs and its own collectives' tensors live on: DeepSpeed's accelerator's
    (cuda:LOCAL_RANK under nccl, which refuses CPU tensors; cpu under gloo)."""
    import torch  # keeps torch and DeepSpeed out of the labs process
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def to_device(batch: dict, dev) -> dict:
    """A collated batch with its tensors on `dev` (DeepSpeed's engine does not move inputs; its
    pipeline engine does, and a no-op move costs nothing)."""
    return {k: v.to(dev, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def extensions_dir() -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions")


def _open_by_any_process(path: Path) -> bool:
    """True when some process of this machine holds `path` open. torch's FileBaton keeps the lock
    file's descriptor open while it builds, so a lock nobody holds is a leftover of a killed build."""
    target = str(path.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == target:
                        return True
                except OSError:
                    continue
        except OSError:
            continue
    return False


def clear_stale_build_locks(ext_dir: str | Path | None = None, say=print) -> list[Path]:
    """Remove `<TORCH_EXTENSIONS_DIR>/<op>/lock` files whose builder is gone (torch would wait on
    them forever, silently). Returns the locks removed. Only this machine's processes can be seen:
    on Linux without /proc nothing is removed."""
    root = Path(ext_dir or extensions_dir())
    if not Path("/proc/self/fd").is_dir() or not root.is_dir():
        return []
    removed = []
    for lock in root.glob("*/lock"):
        if _open_by_any_process(lock):
            continue
        try:
            lock.unlink()
        except OSError:
            continue
        removed.append(lock)
        say(f"removed a stale DeepSpeed build lock {lock} (its build was killed; the op is rebuilt once)")
    return removed


COMM_OP = "deepspeed_shm_comm"


COMM_OP_SECONDS = "40-80"


def comm_op_built(ext_dir: str | Path | None = None) -> bool:
    root = Path(ext_dir or extensions_dir())
    return (root / COMM_OP / f"{COMM_OP}.so").is_file()


SHM_DIR = Path("/dev/shm")


def shm_segments(port: int | str, rank: int | str = "*") -> list[Path]:
    """The shared-memory workspaces DeepSpeed's CPU comm op creates for a job whose ranks all sit on
    one host (deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>, 66 MiB each).
    DeepSpeed never unlinks them: left alone, every local run keeps that much RAM until reboot."""
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"))


def remove_shm(port: int | str, rank: int | str = "*") -> int:
    """Unlink the job's workspaces (mappings still open keep working); returns how many."""
    gone = 0
    for seg in shm_segments(port, rank):
        try:
            seg.unlink()
            gone += 1
        except OSError:
            pass
    return gone


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, from 20000-32767: below Linux's ephemeral range (32768-60999), where every
    outgoing connection of the machine takes its ports, so it is far less likely to be taken between
    this check and the rendezvous binding it (`labs launch` retries if it is all the same)."""
    for _ in range(200):
        port = random.randint(20000, 32767)
        if port_free(port, host):
            return port
    with socket.socket() as s:  # every try taken: let the kernel choose
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def single_process_env() -> None:
    """Let one plain `python` process run the same code as a launched rank."""
    if "RANK" not in os.environ and ("OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ):
        # started by mpirun (`--launcher openmpi`): DeepSpeed's MPI discovery (mpi4py) sets RANK,
        # WORLD_SIZE, LOCAL_RANK and MASTER_ADDR (rank 0's `hostname -I`); the plan's port and address win
        # keeps torch and DeepSpeed out of the labs process
        from deepspeed.comm.comm import mpi_discovery
        mpi_discovery(distributed_port=int(os.environ.get("LABS_MASTER_PORT", "29500")), verbose=False)
        if os.environ.get("LABS_MASTER_ADDR"):
            os.environ["MASTER_ADDR"] = os.environ["LABS_MASTER_ADDR"]
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if "LOCAL_SIZE" not in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        # torchrun sets LOCAL_WORLD_SIZE; DeepSpeed's CPU shm all-reduce reads LOCAL_SIZE (SIGSEGV without)
        os.environ["LOCAL_SIZE"] = os.environ["LOCAL_WORLD_SIZE"]
    os.environ.setdefault("DS_ACCELERATOR", accelerator())
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rank_environment(ranks_per_host: int, threads: int | None = None) -> dict[str, str]:
    """The environment every rank gets, whoever starts it (`labs launch`'s backends, the RAG lab's
    tensor-parallel relaunch, `labs serve`): this accelerator and extensions folder, the threads of one
    rank, OpenMP's threads sleeping when they wait (OMP_WAIT_POLICY=PASSIVE unless the user set it: libgomp's
    default spin-wait doubled a 1-rank run's CPU and wall time beside one other busy process, measured in
    bench/omp_wait.py), the venv's bin first on PATH (its ninja builds DeepSpeed's ops; a second ninja version on PATH,
    e.g. /usr/bin, hashes commands differently and forces rebuilds of the shared cache), and the
    repository in front of the user's own PYTHONPATH (extended, never replaced)."""
    return {
        "DS_ACCELERATOR": accelerator(),
        "TORCH_EXTENSIONS_DIR": extensions_dir(),
        "OMP_NUM_THREADS": str(threads or max((os.cpu_count() or 1) // max(ranks_per_host, 1), 1)),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE",
        "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def release_shm_buffers() -> None:
    """Unlink this rank's /dev/shm file of DeepSpeed's CPU shared-memory all-reduce. Collective.

    deepspeed_shm_comm (loaded by `deepspeed.init_distributed` on CPU when all ranks share a host)
    creates one ~66 MiB file per rank, `deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`,
    and never unlinks it: every run left them behind, in RAM (tmpfs). Once every rank has mapped
    its peers' files (they have when all passed the barrier), each unlinks its own; the memory
    stays mapped until the ranks exit, and is then freed."""
    import torch.distributed as dist  # keeps torch and DeepSpeed out of the labs process
    if not dist.is_initialized():
        return
    dist.barrier()  # (a 1-rank run on CPU creates its file too)
    remove_shm(os.environ.get("MASTER_PORT", "-"), dist.get_rank())
