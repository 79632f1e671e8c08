"""The rank entry point: `deepspeed --module launcher.worker`, `torchrun -m launcher.worker`, and what `labs launch`
starts on every rank. What a rank does lives in launcher/rank/ (main: arguments and exit; train: the run)."""

from __future__ import annotations

import sys

from launcher.rank.main import main


def run_lab(task: str, argv: list[str] | None = None) -> None:
    """`python -m tasks.LAB [worker flags]`: one rank of the worker running this lab. Without --job the
    lab's own model and dataset replace the job defaults (the user's --set come after, so they win).
    A lab imports this only under `if __name__ == "__main__":` (an entry point, as this module is)."""
    from tasks.registry import lab_defaults
    argv = sys.argv[1:] if argv is None else list(argv)
    has_job = any(a == "--job" or a.startswith("--job=") for a in argv)
    main(([] if has_job else ["--set", *lab_defaults(task)]) + argv, default_task=task)


if __name__ == "__main__":
    main()
