"""One data-loading path for every lab: local files, a data folder, the built-in sample, or the hub.

Precedence: `data.train_files` > `data.data_dir` (laid out like ../shared/data) > the built-in
sample (`data.dataset: sample`) > `datasets.load_dataset(data.dataset, data.dataset_config)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from launcher.errors import LabsError
from launcher.job import Job

SAMPLES = Path(__file__).parent / "samples"
# Where each hub dataset lives inside a data folder laid out like ../shared/data.
LOCAL_LAYOUT: dict[str, dict[str, list[str]]] = {
    "wikitext": {"train": ["wikitext2/tokens/wiki.valid.tokens"],
                 "validation": ["wikitext2/tokens/wiki.test.tokens"]},
}
SAMPLE_FILES = {"fine_tune": "parallelism.txt", "tinyllama": "parallelism.txt"}


def _builder(files: list[str]) -> str:
    """The `datasets` builder for these files: csv, json (also .jsonl) or text; .gz allowed."""
    kinds = {"csv": "csv", "json": "json", "jsonl": "json"}
    found = {kinds.get(Path(f.removesuffix(".gz")).suffix.lstrip("."), "text") for f in files}
    if len(found) > 1:
        raise LabsError(f"data files mix formats {sorted(found)}: {files}; use one format")
    return found.pop()


def _load_files(train: list[str], evals: list[str]) -> datasets.DatasetDict:
    files = {"train": train} | ({"validation": evals} if evals else {})
    ds = datasets.load_dataset(_builder(train + evals), data_files=files)
    if "validation" not in ds:
        split = ds["train"].train_test_split(test_size=0.1, seed=0, shuffle=False)
        ds = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return ds


def load_splits(job: Job) -> datasets.DatasetDict:
    """Train and validation splits as a DatasetDict (columns as in the source files)."""
    d = job.data
    if d.train_files:
        return _load_files(d.train_files, d.eval_files)
    if d.dataset == "sample":
        name = SAMPLE_FILES.get(job.task)
        if not name:
            raise LabsError(f"{job.path}: task {job.task!r} has no built-in sample; set data.train_files")
        lines = [ln for ln in (SAMPLES / name).read_text().splitlines() if ln.strip()]
        cut = max(len(lines) * 9 // 10, 1)
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict({d.text_column: lines[:cut]}),
            validation=datasets.Dataset.from_dict({d.text_column: lines[cut:]}))
    if d.data_dir and d.dataset in LOCAL_LAYOUT:
        layout = LOCAL_LAYOUT[d.dataset]
        root = Path(d.data_dir).expanduser()
        paths = {k: [str(root / f) for f in v] for k, v in layout.items()}
        missing = [p for v in paths.values() for p in v if not Path(p).is_file()]
        if missing:
            raise LabsError(f"data_dir {d.data_dir!r} has no {missing[0]!r} for dataset {d.dataset!r}; "
                            f"set data.train_files/eval_files or fix --data_dir")
        return _load_files(paths["train"], paths["validation"])
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    fix = ("give local files with --data_dir DIR (laid out like shared/data) or "
           "--set data.train_files=[train.txt] data.eval_files=[eval.txt], or --set data.dataset=sample")
    if offline:
        raise LabsError(f"{job.path}: data.dataset = {d.dataset!r} is a hub dataset and this machine is "
                        f"offline (HF_HUB_OFFLINE=1); {fix}")
    try:
        ds = datasets.load_dataset(d.dataset, d.dataset_config)
    except Exception as e:  # network, missing dataset: all mean "use local files"
        raise LabsError(f"{job.path}: could not load hub dataset {d.dataset!r} "
                        f"({type(e).__name__}: {str(e)[:200]}); {fix}") from None
    if "validation" not in ds:
        ds["validation"] = ds.get("test") or ds["train"].train_test_split(test_size=0.1, seed=0)["test"]
    return ds


def require_column(ds: datasets.Dataset, column: str, what: str, source: str) -> None:
    if column not in ds.column_names:
        raise LabsError(f"{source}: no column {column!r} for the {what}; columns are {ds.column_names}. "
                        f"Map it with --set data.{what}_column=NAME")
    if len(ds) == 0:
        raise LabsError(f"{source}: no rows; the {what} data is empty")
