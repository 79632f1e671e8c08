"""Inside every rank: a quiet console (rank 0's progress on it, the rest in the rank's log), DeepSpeed's
logger, and the stop signal (SIGTERM / SIGINT / a stop file / `train.max_time`) that makes every rank
finish its step and save a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from launcher.common.layout import Layout
from launcher.common.proc import device
from launcher.common.run_dir import DS_CONFIG, JOB, LOGS, STOP_FILE, rank_log
from launcher.config.ds.load import resolve_batch
from launcher.config.job import load_job
from launcher.resolve import resolve

log = logging.getLogger("labs")


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

    # keeps torch and DeepSpeed out of the labs process
    from deepspeed.utils import logger as ds_logger
    for h in ds_logger.handlers:
        h.setLevel(logging.ERROR)
    fh = logging.FileHandler(log_file)
    fh.setLevel(logging.INFO)
    fh.setFormatter(logging.Formatter("%(asctime)s [deepspeed %(levelname)s] %(message)s", "%H:%M:%S"))
    ds_logger.addHandler(fh)


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
        # keeps torch and DeepSpeed out of the labs process
        import torch

        # keeps torch and DeepSpeed out of the labs process
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


def resolve_in_rank(args: argparse.Namespace, world: int):
    """(job, ds_config, layout) for this rank; the same checks as `labs plan`."""



    conf = Path(args.config_dir or args.run_dir) if (args.config_dir or args.run_dir) else None
    if conf and (conf / JOB).is_file() and not args.job:
        job = load_job(conf / JOB, args.sets)
        cfg = json.loads((conf / DS_CONFIG).read_text())
        layout = Layout.from_ds_config(cfg, world, str(conf / DS_CONFIG))
        cfg = resolve_batch(cfg, layout.dp, str(conf / DS_CONFIG))
        return job, cfg, layout
    job, cfg, _, layout = resolve(args.job, ds_config=args.ds_config, hostfile=args.hostfile,
                                  sets=args.sets, dry_run=args.dry_run, world=world)
    return job, cfg, layout


def setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / LOGS).mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"[rank {rank}] %(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(rank_log(run_dir, rank))]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    if rank != 0:
        # keeps torch and DeepSpeed out of the labs process
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    quiet_deepspeed(rank_log(run_dir, rank))


def seed_everything(seed: int) -> None:

    # keeps torch and DeepSpeed out of the labs process
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def place_outputs(cfg: dict[str, Any], run_dir: Path) -> None:
    """What DeepSpeed's monitors and profiler write lands in the run folder: a relative (or missing)
    `output_path` of tensorboard / csv_monitor would be relative to each rank's working folder, and
    the flops profiler prints to the console unless given a file."""
    for key in ("tensorboard", "csv_monitor"):
        sec = cfg.get(key)
        if isinstance(sec, dict) and sec.get("enabled"):
            out = Path(sec.get("output_path") or "monitors")
            sec["output_path"] = str(out if out.is_absolute() else run_dir / out)
            sec.setdefault("job_name", run_dir.name)
    prof = cfg.get("flops_profiler")
    if isinstance(prof, dict) and prof.get("enabled"):
        out = Path(prof.get("output_file") or "flops_profiler.txt")
        prof["output_file"] = str(out if out.is_absolute() else run_dir / out)


def setup_wandb(job, cfg: dict[str, Any], run_dir: Path) -> bool:
    section = dict(cfg.get("wandb") or {})
    if not (job.wandb.enabled or section.get("enabled")):
        return False
    mode = job.wandb.mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_DIR", str(run_dir.resolve()))
    if job.wandb.tags:
        os.environ["WANDB_TAGS"] = ",".join(job.wandb.tags)
    section.update(enabled=True, project=section.get("project") or job.wandb.project,
                   group=section.get("group") or job.wandb.group or f"{job.name}-{run_dir.name}")
    if job.wandb.entity or section.get("team"):
        section["team"] = section.get("team") or job.wandb.entity
    cfg["wandb"] = section
    return True
