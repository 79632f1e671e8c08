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


# What a run folder (runs/<job>/<timestamp>/) holds; `labs launch`, the ranks and the tools read these names.
JOB = "job.yaml"  # the resolved job
DS_CONFIG = "ds_config.json"  # the resolved DeepSpeed config
METRICS = "metrics.jsonl"  # train / eval / memory records, one JSON object a line (rank 0)
SUMMARY = "summary.json"  # written at the end of a finished run (rank 0)
STOPPED = "stopped.json"  # written instead when every rank stopped early and saved a checkpoint
HF = "hf"  # the model exported in Hugging Face format (train.export)
CHECKPOINTS = "checkpoints"  # DeepSpeed checkpoints step<N>/ (removed when train.checkpoint is false)
LOGS = "logs"  # rank<N>.log and rank<N>.status.json of every rank
PROBE = "probe_logits.pt"  # one eval batch and the trained model's logits on it (export checks)
COMMS = "comms_summary.json"  # DeepSpeed's comms_logger summary, when enabled
RESUMES = "resumes"  # the resolved job and config of each resume with overrides


def rank_log(run_dir: Path, rank: int | str) -> Path:
    return Path(run_dir) / LOGS / f"rank{rank}.log"


def rank_status(run_dir: Path, rank: int | str) -> Path:
    return Path(run_dir) / LOGS / f"rank{rank}.status.json"


def written(run_dir: Path) -> list[str]:
    """What a finished run folder holds of the files a user looks for, as they exist now."""
    run_dir = Path(run_dir)
    names = (SUMMARY, METRICS, HF + "/", CHECKPOINTS + "/")
    return [n for n in names if (run_dir / n.rstrip("/")).exists()]
