"""The plan's quick look at a job's local data files, torch- and `datasets`-free: text that is UTF-8,
not empty, CSV rows that fit the header, the columns the job names, labels that are integers in range.
What it cannot see (the rows past its first MiBs) the ranks refuse with the same messages
(tasks/text_data.py).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.common.errors import LabsError
from launcher.common.files import MiB, decode_text, is_file
from launcher.config.job import Job
from launcher.config.schema import build_section, show
from tasks.options import CAUSAL_LM_TASKS, CLASSIFIER_TASKS, OPTIONS
from tasks.registry import LAB_DATASETS

DATA_CHECK_BYTES = 4 * MiB
"""How much of each data file `check_data_files` reads: all of a smaller file, else its first
lines (the ranks check the rest when they load it)."""


@dataclass(frozen=True)
class _Columns:
    """What a job needs from the columns of its data files."""
    names: list[str] | None  # data.column_names: a headerless CSV's columns
    text: list[str]
    label: str | None  # None: a causal-LM task, text only
    offset: int = 0
    num_labels: int = 0


def check_data_files(job: Job) -> None:
    """The job's local data files (data.train_files/eval_files, or the data_dir layout's), checked
    quickly and without `datasets`: UTF-8 text, not empty, CSV rows no longer than the header, the
    text and label columns present, labels integers within the task's classes. Hub datasets and the
    built-in sample are not looked at. Raises LabsError naming the file, line, column and value."""
    if job.task not in CAUSAL_LM_TASKS + CLASSIFIER_TASKS:
        return
    check_dataset_fits_task(job)
    for files, cols, eval_given in _local_files(job):
        _builder(files)
        counts = [_check_file(f, cols) for f in files]
        rows = sum(c for c in counts if c is not None)
        if not eval_given and None not in counts and rows < 2:  # load_splits holds a tenth out
            raise LabsError(f"{', '.join(files)}: {rows} row(s); without data.eval_files a tenth of the rows is "
                            f"held out for evaluation: give more rows or data.eval_files")


def _job_columns(job: Job) -> _Columns:
    d = job.data
    if job.task in CAUSAL_LM_TASKS:
        return _Columns(d.column_names or None, [d.text_column], None)
    options = build_section(OPTIONS[job.task], job.options, job.path, "options.")
    return _Columns(d.column_names or None, d.text_columns or [d.text_column], d.label_column, d.label_offset,
                    options.num_labels)


def _local_files(job: Job) -> list[tuple[list[str], _Columns, bool]]:
    """(files, columns they need, whether eval files are separate) as load_splits would read them."""
    d = job.data
    cols = _job_columns(job)
    if d.train_files:
        return [(d.train_files + d.eval_files, cols, bool(d.eval_files))]
    if d.dataset == "sample":  # a labelled sample is a CSV read like the user's (text samples take any column)
        name = SAMPLE_FILES.get(job.task, "")
        return [([str(SAMPLES / name)], cols, True)] if name.endswith(".csv") else []
    if not d.data_dir or d.dataset not in LOCAL_LAYOUT:
        return []
    out = []
    by_split = _layout_paths(job)
    for split, files in LOCAL_LAYOUT[d.dataset].items():
        paths = by_split[split]
        spec = LOCAL_COLUMNS.get(files[0])
        if spec and cols.label is not None:  # mapped once by the layout, then by the job (offsets add up)
            cols = _Columns(spec.get("column_names"), spec.get("text_columns") or [d.text_column],
                            spec.get("label_column", d.label_column), spec.get("label_offset", 0) + d.label_offset,
                            cols.num_labels)
        out.append((paths, cols, True))
    return out


def _head_text(path: str) -> tuple[str, bool]:
    """(the file's text, or its first DATA_CHECK_BYTES cut at a line end; whether it was cut)."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read(DATA_CHECK_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        hint = "; a .gz file must be gzip-compressed" if path.endswith(".gz") else ""
        raise LabsError(f"{path}: cannot be read ({e}){hint}") from None
    cut = len(data) > DATA_CHECK_BYTES
    if cut:
        end = data.rfind(b"\n", 0, DATA_CHECK_BYTES)
        data = data[: end + 1] if end >= 0 else data[:DATA_CHECK_BYTES].rstrip(bytes(range(0x80, 0x100)))
    return decode_text(data, path), cut


def _check_file(path: str, cols: _Columns) -> int | None:
    """Check one data file; its number of rows (None when only its beginning was read)."""
    if not is_file(path):
        raise LabsError(f"{path}: the data file does not exist or is not a regular file; fix data.train_files / "
                        f"data.eval_files")
    text, cut = _head_text(path)
    if not text.strip():
        raise LabsError(f"{path}: the data file is empty; give text (one sample per line, or a CSV / JSON lines "
                        f"file with a header and rows)")
    kind = _builder([path])
    if kind == "csv":
        rows = _check_csv(path, text, cols, cut)
    elif kind == "json":
        rows = _check_json(path, text, cols, cut)
    else:
        rows = _check_plain_text(path, text, cols)
    return None if cut else rows


def _check_plain_text(path: str, text: str, cols: _Columns) -> int:
    if cols.label is not None:
        raise LabsError(f"{path}: a plain-text file has no label column; classification reads a CSV or JSON lines "
                        f"file with a text and a label column ({cols.text[0]!r}, {cols.label!r})")
    if cols.text != ["text"]:
        raise LabsError(f"{path}: a plain-text file gives one column, 'text', not {cols.text[0]!r}; "
                        f"set data.text_column: text (or use a CSV with a header)")
    return len(text.splitlines())


def _missing_column(path: str, column: str, columns: list[str]) -> LabsError:
    return LabsError(f"{path}: no column {column!r}; columns are {[show(c)[1:-1] for c in columns][:20]}. Map "
                     f"columns with data.text_column / data.text_columns / data.label_column (headerless CSV: "
                     f"data.column_names)")


def _check_label(path: str, where: str, value: Any, cols: _Columns) -> None:
    label = parse_label(value)
    if label is None:
        raise LabsError(f"{path}: {where}: label {show(value)} in column {cols.label!r} is not an integer class "
                        f"id; labels are 0, 1, 2, ... (or start at data.label_offset)")
    if not 0 <= label - cols.offset < cols.num_labels:
        after = f" after data.label_offset = {cols.offset}" if cols.offset else ""
        raise LabsError(f"{path}: {where}: label {label} in column {cols.label!r} is outside 0..{cols.num_labels - 1}"
                        f"{after}; {cols.num_labels} classes: set options.num_labels or data.label_offset")


def _csv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of the non-blank rows, as pandas (under `datasets`) splits them: as
    leniently (text after a closing quote joins the field)."""
    old = csv.field_size_limit()
    csv.field_size_limit(DATA_CHECK_BYTES)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if row:
                yield reader.line_num, row
    finally:
        csv.field_size_limit(old)


def _unclosed_quote(text: str) -> int | None:
    """The line where a quoted field opens that the file never closes (pandas: "EOF inside string")."""
    opened, pos = None, text.find('"')
    while pos >= 0:
        if opened is None:
            if pos == 0 or text[pos - 1] in ",\r\n":  # a quote opens a field only at its start
                opened = pos
            pos = text.find('"', pos + 1)
        elif text.startswith('""', pos):  # a doubled quote inside a quoted field
            pos = text.find('"', pos + 2)
        else:
            opened, pos = None, text.find('"', pos + 1)
    return None if opened is None else text.count("\n", 0, opened) + 1


def _check_csv(path: str, text: str, cols: _Columns, cut: bool) -> int:
    line = None if cut else _unclosed_quote(text)  # a cut file may end inside a quoted field
    if line is not None:
        raise LabsError(f"{path}: line {line}: a quoted field is never closed; quote a field that holds commas, "
                        f"quotes or line breaks in \"...\", with quotes inside doubled (\"\")")
    rows = _csv_rows(text)
    header = cols.names or next(rows, (0, []))[1]
    needed = cols.text + ([cols.label] if cols.label is not None else [])
    for column in needed:
        if column not in header:
            raise _missing_column(path, column, header)
    label = header.index(cols.label) if cols.label is not None else None
    count = 0
    for line, row in rows:
        count += 1
        if len(row) > len(header):
            raise LabsError(f"{path}: line {line} has {len(row)} fields but there are {len(header)} columns "
                            f"({'data.column_names' if cols.names else 'the header'}); quote fields that hold "
                            f"commas")
        if label is not None:
            _check_label(path, f"line {line}", row[label] if label < len(row) else "", cols)
    if count == 0:
        raise LabsError(f"{path}: no rows{' after the header' if not cols.names else ''}; the data file is empty")
    return count


def _json_records(path: str, text: str, cut: bool) -> list[tuple[str, Any]]:
    """(where, record) of a JSON lines file, or of a file holding one JSON list of records."""
    out: list[tuple[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:
            if not out and not cut:
                return _json_list(path, text)
            raise LabsError(f"{path}: line {n}: not JSON ({str(e)[:100]}); write one JSON object per line") from None
        if not out and isinstance(record, list) and not cut:
            return _json_list(path, text)
        out.append((f"line {n}", record))
    return out


def _json_list(path: str, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise LabsError(f"{path}: neither JSON lines (one object per line) nor one JSON list of objects "
                        f"({str(e)[:100]})") from None
    if not isinstance(data, list):
        raise LabsError(f"{path}: the JSON holds a {type(data).__name__}; write one JSON object per line "
                        f"(JSON lines) or a list of objects")
    return [(f"record {i}", r) for i, r in enumerate(data)]


def _check_json(path: str, text: str, cols: _Columns, cut: bool) -> int:
    records = _json_records(path, text, cut)
    if not records:
        raise LabsError(f"{path}: no records; the data file is empty")
    keys: set[str] = set()
    for where, record in records:
        if not isinstance(record, dict):
            raise LabsError(f"{path}: {where}: {show(record)} is not a JSON object; each sample is an object "
                            f"like {{\"text\": \"...\", \"label\": 0}}")
        keys.update(record)
        if cols.label is not None:
            _check_label(path, where, record.get(cols.label), cols)
    for column in cols.text:
        if column not in keys:
            raise _missing_column(path, column, sorted(keys))
    return len(records)


SAMPLES = Path(__file__).parent / "samples"


# Where each hub dataset lives inside a data folder laid out like ../shared/data.
LOCAL_LAYOUT: dict[str, dict[str, list[str]]] = {
    "wikitext": {"train": ["wikitext2/tokens/wiki.valid.tokens"],
                 "validation": ["wikitext2/tokens/wiki.test.tokens"]},
    "ag_news": {"train": ["ag_news/jointmatch/dev.csv"], "validation": ["ag_news/original/test.csv"]},
    "imdb": {"train": ["imdb/train.csv.gz"], "validation": ["imdb/test.csv.gz"]},
}


# The same layout in words, for the messages that ask for a data folder.
LOCAL_LAYOUT_HELP = {
    "wikitext": "wikitext2/tokens/wiki.valid.tokens (training text, one paragraph a line) and "
                "wikitext2/tokens/wiki.test.tokens (evaluation text)",
    "ag_news": "ag_news/jointmatch/dev.csv (training: CSV with the header label,content; labels 1-4) and "
               "ag_news/original/test.csv (evaluation: CSV without a header, class,title,description)",
    "imdb": "imdb/train.csv.gz and imdb/test.csv.gz (gzipped CSV with the header id,rating,label,text; "
            "label 0 = negative, 1 = positive)",
}


LABELLED_DATASETS = ("ag_news", "imdb")  # the layout's datasets with a label column


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


def parse_label(value: Any) -> int | None:
    """A class id from a cell: an integer, an integral float (3.0) or such text; else None (1.7, 'abc',
    an empty cell)."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _layout_fix(dataset: str) -> str:
    """How to give this dataset offline: the data folder it expects, or other files, or the sample."""
    where = (f"--data_dir DIR (or LABS_DATA_DIR=DIR) with {LOCAL_LAYOUT_HELP[dataset]} inside, laid out like "
             f"shared/data" if dataset in LOCAL_LAYOUT_HELP else "--data_dir DIR (laid out like shared/data)")
    return (f"give {where}; or your own files with --set data.train_files=[train.txt] data.eval_files=[eval.txt]; "
            f"or --dry_run (--set data.dataset=sample) for the built-in sample")


def check_dataset_fits_task(job: Job) -> None:
    """A classification lab refuses a dataset without labels (the job defaults' wikitext) before it loads
    it, naming its own dataset; local files and the sample are checked column by column instead."""
    d = job.data
    if job.task not in CLASSIFIER_TASKS or d.train_files or d.dataset == "sample" or d.dataset not in LOCAL_LAYOUT:
        return
    if d.dataset not in LABELLED_DATASETS:
        own, config = LAB_DATASETS[job.task]
        raise LabsError(f"{job.path}: task {job.task!r} classifies labelled text, and data.dataset = {d.dataset!r} "
                        f"is plain text without a label column; use this lab's dataset: --set data.dataset={own} "
                        f"data.dataset_config={config or 'null'} (offline: --data_dir DIR with "
                        f"{LOCAL_LAYOUT_HELP[own]}), or labelled files with data.train_files")


def _layout_paths(job: Job) -> dict[str, list[str]]:
    """The data folder's files of the job's dataset, by split; a LabsError names a missing one and the layout."""
    d = job.data
    root = Path(d.data_dir).expanduser()
    paths = {k: [str(root / f) for f in v] for k, v in LOCAL_LAYOUT[d.dataset].items()}
    missing = [p for v in paths.values() for p in v if not is_file(p)]
    if missing:
        raise LabsError(f"data_dir {d.data_dir!r} has no {missing[0]!r} for dataset {d.dataset!r}; it expects "
                        f"{LOCAL_LAYOUT_HELP[d.dataset]} (laid out like shared/data); fix --data_dir / "
                        f"LABS_DATA_DIR or set data.train_files/eval_files")
    return paths
