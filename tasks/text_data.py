"""One data-loading path for every lab: local files, a data folder, the built-in sample, or the hub.

Precedence: `data.train_files` > `data.data_dir` (laid out like ../shared/data) > the built-in
sample (`data.dataset: sample`) > `datasets.load_dataset(data.dataset, data.dataset_config)`.

`check_data_files(job)` is the plan's quick look at the same local files (without `datasets`,
which is imported only where data is loaded): text that is UTF-8, not empty, CSV rows that fit the
header, the columns the job names, labels that are integers in range. What it cannot see (the
rows past its first MiBs) the ranks refuse with the same messages.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import datasets

from tasks.api import Job, LabsError, show
from tasks.data_check import (
    LOCAL_COLUMNS,
    LOCAL_LAYOUT,
    SAMPLE_FILES,
    SAMPLES,
    _builder,
    _layout_fix,
    _layout_paths,
    check_dataset_fits_task,
    parse_label,
)

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("labs")




def _load_dataset(builder: str, files: dict[str, list[str]], column_names: list[str] | None) -> datasets.DatasetDict:
    """`datasets.load_dataset` on local files; what it cannot read is a LabsError naming the files."""
    names = [f for v in files.values() for f in v]
    extra = {"column_names": column_names} if column_names and builder == "csv" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, **extra)
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        if "corresponds to no data" in str(e):
            raise LabsError(f"{', '.join(names)}: no rows; the data files are empty") from None
        cause = e.__cause__ or e
        raise LabsError(f"could not read {names} as {builder} ({type(cause).__name__}: {str(cause)[:300]}); "
                        f"check the files (UTF-8 text; a CSV's rows as many fields as its header; headerless "
                        f"CSV: set data.column_names)") from None


def _load_files(train: list[str], evals: list[str], column_names: list[str] | None = None) -> datasets.DatasetDict:
    files = {"train": train} | ({"validation": evals} if evals else {})
    ds = _load_dataset(_builder(train + evals), files, column_names)
    if "validation" not in ds:
        if len(ds["train"]) < 2:
            raise LabsError(f"{', '.join(train)}: {len(ds['train'])} row(s); without data.eval_files a tenth of the "
                            f"rows is held out for evaluation: give more rows or data.eval_files")
        split = ds["train"].train_test_split(test_size=0.1, seed=0, shuffle=False)
        ds = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return ds


def _load_one(files: list[str], column_names: list[str] | None) -> datasets.Dataset:
    return _load_dataset(_builder(files), {"train": files}, column_names)["train"]




def map_columns(ds: datasets.Dataset, text_columns: list[str], label_column: str, label_offset: int,
                source: str, out_text: str = "text", out_label: str = "label") -> datasets.Dataset:
    """Keep two columns: the text (several columns joined with a space) and the label minus offset."""
    for col in [*text_columns, label_column]:
        if col not in ds.column_names:
            raise LabsError(f"{source}: no column {col!r}; columns are {ds.column_names}. Map columns with "
                            f"data.text_column / data.text_columns / data.label_column (headerless CSV: "
                            f"data.column_names)")
    if len(ds) == 0:
        raise LabsError(f"{source}: no rows; expected labelled text")
    texts = [" ".join(str(r[c] or "") for c in text_columns) for r in ds.select_columns(text_columns)]
    labels = []
    for i, v in enumerate(ds[label_column]):
        label = parse_label(v)
        if label is None:
            raise LabsError(f"{source}: row {i}: label {show(v)} in column {label_column!r} is not an integer "
                            f"class id; labels are 0, 1, 2, ... (or from data.label_offset)")
        labels.append(label - label_offset)
    return datasets.Dataset.from_dict({out_text: texts, out_label: labels})






def load_splits(job: Job) -> datasets.DatasetDict:
    """Train and validation splits as a DatasetDict (columns as in the source files)."""
    d = job.data
    check_dataset_fits_task(job)
    if d.train_files:
        return _load_files(d.train_files, d.eval_files, d.column_names or None)
    if d.dataset == "sample":
        name = SAMPLE_FILES.get(job.task)
        if not name:
            raise LabsError(f"{job.path}: task {job.task!r} has no built-in sample; set data.train_files")
        log.info("data: the built-in sample %s", SAMPLES / name)
        if name.endswith(".csv"):  # labelled sample: a quarter held out for evaluation
            rows = datasets.load_dataset("csv", data_files=str(SAMPLES / name))["train"]
            split = rows.train_test_split(test_size=0.25, seed=0)
            return datasets.DatasetDict(train=split["train"], validation=split["test"])
        lines = [ln for ln in (SAMPLES / name).read_text().splitlines() if ln.strip()]
        cut = max(len(lines) * 9 // 10, 1)
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict({d.text_column: lines[:cut]}),
            validation=datasets.Dataset.from_dict({d.text_column: lines[cut:]}))
    if d.data_dir and d.dataset in LOCAL_LAYOUT:
        return _load_data_dir(job)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    fix = _layout_fix(d.dataset)
    if offline:
        raise LabsError(f"{job.path}: data.dataset = {d.dataset!r} is a hub dataset, this machine is offline "
                        f"(HF_HUB_OFFLINE=1) and no data folder is given; {fix}")
    try:
        ds = datasets.load_dataset(d.dataset, d.dataset_config)
    except Exception as e:  # network, missing dataset: all mean "use local files"
        raise LabsError(f"{job.path}: could not load hub dataset {d.dataset!r} "
                        f"({type(e).__name__}: {str(e)[:200]}); {fix}") from None
    if "validation" not in ds:
        ds["validation"] = ds.get("test") or ds["train"].train_test_split(test_size=0.1, seed=0)["test"]
    log.info("data: hub dataset %s (%s), splits %s", d.dataset, d.dataset_config, ", ".join(ds))
    return ds




def _load_data_dir(job: Job) -> datasets.DatasetDict:
    """The dataset from a folder laid out like shared/data, its columns mapped onto the hub's."""
    d = job.data
    layout, paths = LOCAL_LAYOUT[d.dataset], _layout_paths(job)
    if not any(f in LOCAL_COLUMNS for v in layout.values() for f in v):
        ds = _load_files(paths["train"], paths["validation"])
    else:
        out = {}
        for split, files in layout.items():  # files of one split share a layout
            spec = LOCAL_COLUMNS.get(files[0], {})
            raw = _load_one(paths[split], spec.get("column_names"))
            out[split] = map_columns(raw, spec.get("text_columns") or [d.text_column],
                                     spec.get("label_column", d.label_column), spec.get("label_offset", 0),
                                     ", ".join(paths[split]), out_text=d.text_column, out_label=d.label_column)
        ds = datasets.DatasetDict(out)
    log.info("data: %s from %s: train %s rows (%s), eval %s rows (%s)", d.dataset, d.data_dir,
             f"{len(ds['train']):,}", ", ".join(layout["train"]), f"{len(ds['validation']):,}",
             ", ".join(layout["validation"]))
    return ds


def require_column(ds: datasets.Dataset, column: str, what: str, source: str) -> None:
    if column not in ds.column_names:
        raise LabsError(f"{source}: no column {column!r} for the {what}; columns are {ds.column_names}. "
                        f"Map it with --set data.{what}_column=NAME")
    if len(ds) == 0:
        raise LabsError(f"{source}: no rows; the {what} data is empty")


# ---------------------------------------------------------------- the plan's look at local files































