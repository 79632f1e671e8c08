"""The repository and the run folder: where things are, the names of what a run writes, and the
exit codes a run ends with. Every module that names a run-folder file takes the name from here.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


EXIT_STOPPED = 75
"""Exit code of a rank (and of `labs launch`) that stopped early on a signal or `train.max_time`
after saving a checkpoint: the run is resumable with `--resume` (75 is EX_TEMPFAIL: try again)."""


STOP_FILE = "STOP"
"""Written into the run folder by `labs launch` on SIGTERM/SIGINT: ranks on any host that shares the
folder see it at the end of their step (ranks started by pdsh, Slurm or mpirun get no signal)."""
