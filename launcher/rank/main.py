"""One rank from start to exit: its arguments, its job resolved (the same checks as `labs plan`), the run
(launcher/rank/train.py), its status file, and a clean exit. Started by `labs launch` (with --run_dir,
reading the resolved files), directly under `deepspeed`/`torchrun` (`--module launcher.worker --job JOB`),
or as one process (`python -m tasks.fine_tune --dry_run`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from launcher.common.errors import LabsError
from launcher.common.run_dir import EXIT_STOPPED, rank_status

log = logging.getLogger("labs")


def parse_args(argv: list[str] | None, default_task: str | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launcher.worker", description=__doc__)
    p.add_argument("--job", help="job YAML (default: built-in defaults for the task)")
    p.add_argument("--run_dir", help="run folder; with job.yaml + ds_config.json written by `labs launch`")
    p.add_argument("--config_dir", help="where the resolved job.yaml + ds_config.json are (default: the run "
                                        "folder; a resume with overrides writes them under resumes/)")
    p.add_argument("--ds-config", "--ds_config", "--deepspeed_config", dest="ds_config",
                   help="DeepSpeed JSON config (--deepspeed_config as in DeepSpeed's add_config_arguments)")
    p.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed scripts' sake; always on")
    p.add_argument("--hostfile")
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry_run", "--dry-run", action="store_true")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max_steps", type=int)
    p.add_argument("--data_dir")
    p.add_argument("--resume", nargs="?", const="auto")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sets = [s for group in args.sets for s in group]
    if default_task and not args.job:
        args.sets = [f"task={default_task}", f"name={default_task}"] + args.sets
    for flag, key in (("epochs", "train.epochs"), ("max_steps", "train.max_steps"), ("data_dir", "data.data_dir")):
        if getattr(args, flag) is not None:
            args.sets.append(f"{key}={getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None, default_task: str | None = None) -> None:
    # keeps torch and DeepSpeed out of the labs process
    from launcher.rank.train import run  # imports torch and DeepSpeed: after the arguments are read
    args = parse_args(argv, default_task)
    status = RankStatus(args.run_dir)
    code, error = 0, ""
    try:
        if run(args).get("status") == "stopped":
            code = EXIT_STOPPED
    except LabsError as e:
        error = f"error: {e}"
        print(f"[rank {os.environ.get('RANK', '0')}] {error}", file=sys.stderr, flush=True)
        code = 2
    except BaseException:  # printed here: leave() may end the process before Python would print it
        error = traceback.format_exc()
        print(error, end="", file=sys.stderr, flush=True)
        code = 1
    if error and log.handlers:
        log.error("%s", error.rstrip())  # the rank's own log holds its traceback, not only its stderr
    status.finish(code, error)
    leave(code)


class RankStatus:
    """`logs/rank<N>.status.json`: this rank's host and pid from its start, its exit code and error at
    its end. `labs launch` reads them to name the rank that failed first (a rank killed by a signal or
    the OOM killer leaves a start record only) instead of the peers that failed on its closed socket."""

    def __init__(self, run_dir: str | None):
        rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK")
        self.path = rank_status(Path(run_dir), rank) if run_dir and rank is not None else None
        self.record: dict[str, Any] = {"rank": int(rank or 0), "host": os.uname().nodename, "pid": os.getpid(),
                                       "started": time.time()}
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.record) + "\n")
            os.replace(tmp, self.path)
        except OSError:
            pass

    def finish(self, code: int, error: str) -> None:
        self.record.update(exit=code, ended=time.time(), error=error[-4000:])
        self._write()


def leave(code: int) -> None:
    """End this rank. With a process group: a last barrier when all went well, then ``os._exit``.

    Tearing gloo down on the way out (destroy_process_group or the interpreter's own finalisers) races
    with peers on other hosts that have already gone: the job then ends in ``terminate called without
    an active exception`` (SIGABRT) on a rank that trained correctly. Everything this rank wrote is
    closed by now, so flushing the streams and leaving without C++ teardown is safe; on an error the
    rank leaves at once and its peers fail on the closed connection instead of waiting on a barrier.
    """
    dist = sys.modules.get("torch.distributed")  # never imported here: a rank that failed before torch has none
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    if code in (0, EXIT_STOPPED):
        try:
            dist.barrier()
        except Exception as e:  # a peer died after this rank finished
            print(f"[rank {os.environ.get('RANK', '0')}] error: final barrier failed: {e}", file=sys.stderr)
            code = 1
    mpi = sys.modules.get("mpi4py.MPI")  # started by mpirun: it counts a rank without MPI_Finalize as failed
    if code == 0 and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
