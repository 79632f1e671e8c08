"""The environment a rank runs in, shared by the launcher (`labs launch`) and the ranks themselves:
accelerator, DeepSpeed's extensions folder and its build locks, /dev/shm clean-up, the set-up that
lets one plain `python` process run like a launched rank, and the stop signal (SIGTERM / SIGINT /
a stop file / `train.max_time`) that makes every rank finish its step and save a checkpoint.

Nothing here imports torch or DeepSpeed at module level: `labs plan` imports it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXIT_STOPPED = 75
"""Exit code of a rank (and of `labs launch`) that stopped early on a signal or `train.max_time`
after saving a checkpoint: the run is resumable with `--resume` (75 is EX_TEMPFAIL: try again)."""
STOP_FILE = "STOP"
"""Written into the run folder by `labs launch` on SIGTERM/SIGINT: ranks on any host that shares the
folder see it at the end of their step (ranks started by pdsh, Slurm or mpirun get no signal)."""


def accelerator() -> str:
    return os.environ.get("DS_ACCELERATOR") or ("cuda" if shutil.which("nvidia-smi") else "cpu")


def device():
    """The device a rank's inputs and its own collectives' tensors live on: DeepSpeed's accelerator's
    (cuda:LOCAL_RANK under nccl, which refuses CPU tensors; cpu under gloo)."""
    import torch
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def to_device(batch: dict, dev) -> dict:
    """A collated batch with its tensors on `dev` (DeepSpeed's engine does not move inputs; its
    pipeline engine does, and a no-op move costs nothing)."""
    return {k: v.to(dev, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def extensions_dir() -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions")


# ---------------------------------------------------------------- DeepSpeed's JIT build locks

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


# ---------------------------------------------------------------- /dev/shm

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


# ---------------------------------------------------------------- ports

def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, from 20000-32767: below Linux's ephemeral range (32768-60999), where every
    outgoing connection of the machine takes its ports, so it is far less likely to be taken between
    this check and the rendezvous binding it (`labs launch` retries if it is all the same)."""
    import random
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


# ---------------------------------------------------------------- one plain process

def single_process_env() -> None:
    """Let one plain `python` process run the same code as a launched rank."""
    if "RANK" not in os.environ and ("OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ):
        # started by mpirun (`--launcher openmpi`): DeepSpeed's MPI discovery (mpi4py) sets RANK,
        # WORLD_SIZE, LOCAL_RANK and MASTER_ADDR (rank 0's `hostname -I`); the plan's port and address win
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


# ---------------------------------------------------------------- a quiet console

def verbose() -> bool:
    return os.environ.get("LABS_VERBOSE", "") not in ("", "0")


def quiet_console(log_file: Path, rank: int) -> None:
    """Keep the console for what a user reads (rank 0's progress, its summary, errors): every rank's
    stderr (Python and library warnings, tracebacks) and every other rank's stdout go to its log file
    instead, where `labs launch` shows them if the rank fails first. `labs launch -v` (LABS_VERBOSE=1)
    leaves everything on the console."""
    if verbose():
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    global _console_fd
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    _console_fd = os.dup(1)
    os.dup2(fd, 2)
    if rank != 0:
        os.dup2(fd, 1)
    os.close(fd)
    import logging
    import warnings
    logging.captureWarnings(True)  # to stderr, which is the log file now
    warnings.simplefilter("default")


_console_fd: int | None = None


def to_console(text: str) -> None:
    """One write to the console even from a quiet rank (its line `rank R host H: ...`), in one piece so
    that ranks sharing a pipe do not interleave."""
    sys.stdout.flush()
    os.write(_console_fd if _console_fd is not None else 1, text.encode())


def quiet_deepspeed(log_file: Path) -> None:
    """DeepSpeed's own logger writes INFO and WARNING lines to stdout: in quiet mode only its errors stay
    on the console; the rest goes to the rank's log."""
    if verbose():
        return
    import logging

    from deepspeed.utils import logger as ds_logger
    for h in ds_logger.handlers:
        h.setLevel(logging.ERROR)
    fh = logging.FileHandler(log_file)
    fh.setLevel(logging.INFO)
    fh.setFormatter(logging.Formatter("%(asctime)s [deepspeed %(levelname)s] %(message)s", "%H:%M:%S"))
    ds_logger.addHandler(fh)


# ---------------------------------------------------------------- stopping early, on every rank

def parse_duration(text: str | int | float | None) -> float | None:
    """'3h50m', '90m', '45s', '1h', '2d', or seconds as a number -> seconds; None/''/0 -> None.
    Raises ValueError with the accepted forms."""
    import re
    if text is None or text == "" or text == 0:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("it must be >= 0")
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([dhms])", "", s).strip():
        raise ValueError("write it like 3h50m, 90m, 45s or a number of seconds")
    unit = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(n) * unit[u] for n, u in parts)


class StopRequest:
    """Why this rank should stop after its current step: a SIGTERM/SIGINT it received, the run
    folder's STOP file, or `train.max_time` elapsed. `agreed()` is collective: every rank learns
    whether any rank wants to stop, so all of them save the same step's checkpoint together.

    The same signal a second time while stopping ends the rank at once (KeyboardInterrupt / SIGTERM)."""

    def __init__(self, run_dir: Path | None = None, max_time: float | None = None):
        self.reason: str | None = None
        self.stop_file = run_dir / STOP_FILE if run_dir else None
        self.deadline = time.monotonic() + max_time if max_time else None
        self.max_time = max_time
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only the same signal twice ends the rank at once: DeepSpeed's launcher answers a Ctrl-C
        # (SIGINT to the whole terminal group) by sending its ranks SIGTERM too, right after.
        if self.reason == f"signal {signal.Signals(signum).name}":
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.reason = f"signal {signal.Signals(signum).name}"

    def local(self) -> str | None:
        if self.reason:
            return self.reason
        if self.stop_file is not None and self.stop_file.exists():
            try:
                why = self.stop_file.read_text().strip().splitlines()[0]
            except (OSError, IndexError):
                why = "written by labs launch"
            return f"the run's STOP file: {why}"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return f"train.max_time ({self.max_time:.0f} s) reached"
        return None

    def agreed(self) -> str | None:
        """Collective over the default process group: the reason if any rank stops, else None."""
        import torch
        import torch.distributed as dist
        mine = self.local()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        codes = ["", "signal", "stop file", "max_time"]
        code = 0 if mine is None else (1 if mine.startswith("signal") else 2 if "STOP" in mine else 3)
        t = torch.tensor([code], dtype=torch.int32, device=device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t) == 0:
            return None
        return mine or f"another rank's {codes[int(t)]}"


def say_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
