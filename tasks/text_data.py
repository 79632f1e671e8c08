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
    "ag_news": {"train": ["ag_news/jointmatch/dev.csv"], "validation": ["ag_news/original/test.csv"]},
    "imdb": {"train": ["imdb/train.csv.gz"], "validation": ["imdb/test.csv.gz"]},
}
# How a local file's columns map onto the hub dataset's (`text`, `label` from 0): the same options a
# job gives for its own files (data.column_names, text_columns, label_column, label_offset).
# AG News: the 8,000-row train subset has only the description, so the test split uses it alone too.
LOCAL_COLUMNS: dict[str, dict] = {
    "ag_news/jointmatch/dev.csv": dict(text_columns=["content"], label_column="label", label_offset=1),
    "ag_news/original/test.csv": dict(column_names=["label", "title", "content"], text_columns=["content"],
                                      label_column="label", label_offset=1),
}
SAMPLE_FILES = {"fine_tune": "parallelism.txt", "tinyllama": "parallelism.txt",
                "simple_model": "ag_news_sample.csv", "transfer": "imdb_sample.csv"}


def _builder(files: list[str]) -> str:
    """The `datasets` builder for these files: csv, json (also .jsonl) or text; .gz allowed."""
    kinds = {"csv": "csv", "json": "json", "jsonl": "json"}
    found = {kinds.get(Path(f.removesuffix(".gz")).suffix.lstrip("."), "text") for f in files}
    if len(found) > 1:
        raise LabsError(f"data files mix formats {sorted(found)}: {files}; use one format")
    return found.pop()


def _load_files(train: list[str], evals: list[str], column_names: list[str] | None = None) -> datasets.DatasetDict:
    files = {"train": train} | ({"validation": evals} if evals else {})
    builder = _builder(train + evals)
    extra = {"column_names": column_names} if column_names and builder == "csv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=files, **extra)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        if "corresponds to no data" in str(e):
            raise LabsError(f"{', '.join(train + evals)}: no rows; the data files are empty") from None
        raise LabsError(f"could not read {train + evals} as {builder} ({type(e).__name__}: {str(e)[:300]}); "
                        f"check the files (headerless CSV: set data.column_names)") from None
    if "validation" not in ds:
        split = ds["train"].train_test_split(test_size=0.1, seed=0, shuffle=False)
        ds = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return ds


def _load_one(files: list[str], column_names: list[str] | None) -> datasets.Dataset:
    extra = {"column_names": column_names} if column_names else {}
    return datasets.load_dataset(_builder(files), data_files={"train": files}, **extra)["train"]


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
        try:
            labels.append(int(v) - label_offset)
        except (TypeError, ValueError):
            raise LabsError(f"{source}: row {i}: label {v!r} in column {label_column!r} is not an integer "
                            f"class id") from None
    return datasets.Dataset.from_dict({out_text: texts, out_label: labels})


def load_splits(job: Job) -> datasets.DatasetDict:
    """Train and validation splits as a DatasetDict (columns as in the source files)."""
    d = job.data
    if d.train_files:
        return _load_files(d.train_files, d.eval_files, d.column_names or None)
    if d.dataset == "sample":
        name = SAMPLE_FILES.get(job.task)
        if not name:
            raise LabsError(f"{job.path}: task {job.task!r} has no built-in sample; set data.train_files")
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
        layout = LOCAL_LAYOUT[d.dataset]
        root = Path(d.data_dir).expanduser()
        paths = {k: [str(root / f) for f in v] for k, v in layout.items()}
        missing = [p for v in paths.values() for p in v if not Path(p).is_file()]
        if missing:
            raise LabsError(f"data_dir {d.data_dir!r} has no {missing[0]!r} for dataset {d.dataset!r}; "
                            f"set data.train_files/eval_files or fix --data_dir")
        if not any(f in LOCAL_COLUMNS for v in layout.values() for f in v):
            return _load_files(paths["train"], paths["validation"])
        out = {}
        for split, files in layout.items():  # files of one split share a layout
            spec = LOCAL_COLUMNS.get(files[0], {})
            raw = _load_one(paths[split], spec.get("column_names"))
            out[split] = map_columns(raw, spec.get("text_columns") or [d.text_column],
                                     spec.get("label_column", d.label_column), spec.get("label_offset", 0),
                                     ", ".join(paths[split]), out_text=d.text_column, out_label=d.label_column)
        return datasets.DatasetDict(out)
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
