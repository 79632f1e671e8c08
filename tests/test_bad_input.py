"""Bad input never becomes a traceback or a hang, and what `labs plan` accepts runs in the ranks.

Generated malformed jobs, DeepSpeed configs, hostfiles and data files (hypothesis) go through
`labs plan` in this process: each either plans (exit 0) or exits 2 with one "error: ..." message
that names the file; any other exception fails the test with its traceback, and no plan may take
10 s. Hostfiles are parsed as DeepSpeed's runner parses them (compared on generated hostfiles).
A few generated jobs that plan are trained for one step in one plain process. Then one unit test per
rule, with its message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from launcher.cli import main as labs_main
from launcher.common.errors import LabsError
from launcher.common.files import MAX_DEPTH, load_json, load_yaml, load_yaml_mapping, read_text
from launcher.config import job as job_module
from launcher.config.hostfile import MAX_SLOTS, host_problem, load_hostfile, parse_hostfile
from launcher.config.job import default_name, load_job, set_field
from launcher.config.schema import show
from tasks.data_check import SAMPLES, check_data_files, parse_label
from tasks.options import check_options
from tasks.presets import PRESETS

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
DS_CONFIG = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "torch_adam": True}},
             "zero_optimization": {"stage": 0}}


# ---------------------------------------------------------------- running `labs plan` in-process


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="labs-bad-input-") as d:
        yield Path(d)


def base_files(d: Path, job: Any = None, ds: Any = None, hosts: str = "localhost slots=1\n") -> dict[str, Path]:
    """A job that plans (fine_tune, llama-tiny, built-in text) with its config and hostfile in d."""
    paths = {"ds": d / "ds.json", "hosts": d / "hosts", "job": d / "job.yaml"}
    paths["ds"].write_text(json.dumps(DS_CONFIG if ds is None else ds))
    paths["hosts"].write_text(hosts)
    if job is None:
        job = base_job(paths)
    paths["job"].write_text(yaml.safe_dump(job, allow_unicode=True))
    return paths


def base_job(paths: dict[str, Path]) -> dict[str, Any]:
    return {"task": "fine_tune", "ds_config": str(paths["ds"]), "hostfile": str(paths["hosts"]),
            "model": {"name": "llama-tiny"}, "data": {"dataset": "sample", "block_size": 16},
            "train": {"max_steps": 2, "output_dir": str(paths["job"].parent / "runs")}}


def plan(*args: str) -> tuple[int, str]:
    """`labs plan ARGS` in this process: (exit code, stderr). Any exception but SystemExit propagates."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            labs_main(["plan", *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"labs plan {args} took {elapsed:.1f} s"
    return code, err.getvalue()


def assert_clean(code: int, err: str, *files: Path | str) -> None:
    """Exit 0, or exit 2 with one 'error: ...' message that names one of the files."""
    assert code in (0, 2), f"exit {code}: {err}"
    if code == 2:
        assert err.startswith("error: "), err
        assert any(str(f) in err for f in files), f"no file named in: {err}"


# ---------------------------------------------------------------- generated values

SPECIAL = ["", ".", "..", "../x", "/abs/x", "a/b", "a\x00b", "\x07", "é", "ok", "1h", "online", "sample",
           "llama-tiny", "bert-tiny", "x" * 300, "a,b", " ", "-x", "10:00"]
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**32 - 1, 2**32, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(SPECIAL))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 3)), inner, max_size=3),
                      max_leaves=6)


def _job_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(job_module.Job):
        if f.name == "path":
            continue
        if dataclasses.is_dataclass(f.type) or f.name in ("model", "data", "train", "wandb", "cluster"):
            section = getattr(job_module.Job(), f.name)
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
        keys.append(f.name)
    return keys + ["bogus", "train.bogus", "options.lora_r", "options.num_labels", "options.max_length",
                   "options.gradient_checkpointing", "ds.zero_optimization.stage", "ds.train_micro_batch_size_per_gpu"]


JOB_KEYS = _job_keys()
MUTATIONS = st.lists(st.tuples(st.sampled_from(JOB_KEYS), VALUES), min_size=1, max_size=3)


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = ["ds", dotted[3:]] if dotted.startswith("ds.") else dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def encode(text: str, how: str) -> bytes:
    if how == "utf-16":
        return text.encode("utf-16")
    if how == "utf-16-no-bom":
        return text.encode("utf-16-le")
    if how == "latin-1":
        return (text + "\n# café\n").encode("latin-1", errors="replace")
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8")
    if how == "nul":
        return text.encode("utf-8") + b"\x00\x01"
    return text.encode("utf-8", errors="surrogatepass")


ENCODINGS = st.sampled_from(["utf-8", "utf-8", "utf-8", "bom", "utf-16", "utf-16-no-bom", "latin-1", "nul"])


# ---------------------------------------------------------------- fuzz: jobs


@FUZZ
@given(mutations=MUTATIONS, how=ENCODINGS)
def test_generated_jobs_plan_or_exit_2(mutations, how):
    with workdir() as d:
        paths = base_files(d)
        job = base_job(paths)
        for key, value in mutations:
            set_dotted(job, key, value)
        paths["job"].write_bytes(encode(yaml.safe_dump(job, allow_unicode=True), how))
        code, err = plan(str(paths["job"]))
        assert_clean(code, err, paths["job"], paths["ds"], paths["hosts"], SAMPLES, *_strings(job))


def _strings(value: Any) -> Iterator[str]:
    """Strings in a generated job (a path it names may be the file in the message)."""
    if isinstance(value, str) and value.strip():
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@FUZZ
@given(doc=st.one_of(VALUES, st.text(max_size=200)), raw=st.booleans())
def test_generated_job_documents_plan_or_exit_2(doc, raw):
    """Whole job files that are junk: YAML of any shape, or any text."""
    with workdir() as d:
        paths = base_files(d)
        text = doc if raw and isinstance(doc, str) else yaml.safe_dump(doc, allow_unicode=True)
        paths["job"].write_bytes(text.encode("utf-8", errors="surrogatepass"))
        code, err = plan(str(paths["job"]))
        assert_clean(code, err, paths["job"])


def alias_bomb(levels: int, width: int) -> str:
    lines = ["a0: &a0 [lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


@settings(max_examples=15, deadline=None, database=None)
@given(levels=st.integers(2, 30), width=st.integers(2, 12), where=st.sampled_from(["top", "options", "set"]))
def test_yaml_alias_bombs_are_refused_at_once(levels, width, where):
    with workdir() as d:
        paths = base_files(d)
        bomb = alias_bomb(levels, width)
        if where == "set":
            args = ["--set", "options.x=" + "{" + bomb.replace("\n", ", ").rstrip(", ") + "}"]
        else:
            text = paths["job"].read_text()
            if where == "options":
                text += "options:\n" + "".join(f"  {line}\n" for line in bomb.splitlines())
            else:
                text += bomb
            paths["job"].write_text(text)
            args = []
        code, err = plan(str(paths["job"]), *args)
        assert code in (0, 2)
        if width ** (levels - 1) * 2 > 10_000:  # expands past the budget
            assert code == 2 and "alias" in err and (str(paths["job"]) in err or "--set" in err), err


# ---------------------------------------------------------------- fuzz: DeepSpeed configs

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8),
                         st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, -1, "auto", 2]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@st.composite
def ds_texts(draw) -> bytes:
    kind = draw(st.sampled_from(["junk", "value", "deep", "huge_number", "nan", "dup", "mutated", "bytes"]))
    if kind == "junk":
        return draw(st.text(max_size=100)).encode("utf-8", errors="surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=100))
    if kind == "value":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "deep":
        n = draw(st.integers(MAX_DEPTH - 2, 20_000))
        inner = "[" * n + "]" * n
        return json.dumps(DS_CONFIG)[:-1].encode() + f', "zero_optimization": {inner}}}'.encode()
    if kind == "huge_number":
        return f'{{"train_micro_batch_size_per_gpu": {"9" * draw(st.integers(4000, 6000))}}}'.encode()
    if kind == "nan":
        return b'{"train_micro_batch_size_per_gpu": 2, "gradient_clipping": NaN}'
    if kind == "dup":
        return b'{"train_micro_batch_size_per_gpu": 2, "train_micro_batch_size_per_gpu": 4}'
    cfg = json.loads(json.dumps(DS_CONFIG))
    cfg[draw(st.sampled_from(["train_batch_size", "train_micro_batch_size_per_gpu", "zero_optimization",
                              "gradient_accumulation_steps", "steps_per_print"]))] = draw(JSON_VALUES)
    return json.dumps(cfg).encode()


@FUZZ
@given(text=ds_texts(), how=st.sampled_from(["utf-8", "utf-8", "utf-16", "bom"]))
def test_generated_ds_configs_plan_or_exit_2(text, how):
    with workdir() as d:
        paths = base_files(d)
        if how == "utf-16":
            text = text.decode("utf-8", errors="replace").encode("utf-16")
        elif how == "bom":
            text = b"\xef\xbb\xbf" + text
        paths["ds"].write_bytes(text)
        code, err = plan(str(paths["job"]))
        assert_clean(code, err, paths["ds"])


def test_huge_ds_config_is_refused_quickly(tmp_path):
    paths = base_files(tmp_path)
    paths["ds"].write_text('{"steps_per_print": 1, "x": "' + "a" * (11 * 1024 * 1024) + '"}')
    code, err = plan(str(paths["job"]))
    assert code == 2 and str(paths["ds"]) in err and "at most" in err


# ---------------------------------------------------------------- fuzz: hostfiles

HOST_NAMES = st.sampled_from(["localhost", "node1", "node-2", "10.0.0.1", "::1", "a#b", "ho st", "é", "\ufeffnode"])
SLOT_TEXT = st.one_of(st.integers(-3, MAX_SLOTS + 3).map(str), st.sampled_from(["", "two", "2.0", "٣", "1" * 30, "0"]))
SPACES = st.sampled_from([" ", "  ", "\t", " \x0b ", "\u2003", ""])


@st.composite
def hostfile_texts(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["host", "host", "comment", "blank", "junk", "spaced", "extra"]))
        host, slots, sp = draw(HOST_NAMES), draw(SLOT_TEXT), draw(SPACES)
        if kind == "host":
            lines.append(f"{sp}{host}{draw(SPACES)}slots={slots}{sp}")
        elif kind == "spaced":
            lines.append(f"{host} slots {sp}= {slots}")
        elif kind == "extra":
            lines.append(f"{host} slots={slots} {draw(st.sampled_from(['max_slots=2', '# comment', 'x', '#']))}")
        elif kind == "comment":
            lines.append(f"{sp}# {draw(st.text(max_size=10))}")
        elif kind == "blank":
            lines.append(sp)
        else:
            lines.append(draw(st.text(max_size=15)))
    ends = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return ends.join(lines) + draw(st.sampled_from(["", ends]))


@pytest.fixture(scope="module")
def deepspeed_fetch_hostfile():
    from deepspeed.launcher.runner import fetch_hostfile
    return fetch_hostfile


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=hostfile_texts())
def test_hostfiles_parse_as_deepspeed_parses_them(deepspeed_fetch_hostfile, text):
    """What DeepSpeed's runner refuses we refuse; what it accepts we read the same, unless one of our
    extra rules (slots 1..MAX_SLOTS, host names, nothing but max_slots=N or a comment after the slots, no
    byte-order mark, no NUL byte) refuses it."""
    with workdir() as d:
        path = d / "hosts"
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        try:
            theirs = dict(deepspeed_fetch_hostfile(str(path)))
        except ValueError:
            theirs = None
        try:
            ours = load_hostfile(path).hosts
        except LabsError as e:
            assert str(path) in str(e)
            if theirs is not None:
                trailer = "ignored by DeepSpeed's runner" in str(e) or "whole number of ranks" in str(e)
                assert any(n < 1 or n > MAX_SLOTS for n in theirs.values()) or "\x00" in text or trailer or \
                    any(host_problem(h) for h in theirs), (text, theirs, str(e))
            return
        assert theirs == ours, text


@FUZZ
@given(text=hostfile_texts(), how=ENCODINGS)
def test_generated_hostfiles_plan_or_exit_2(text, how):
    with workdir() as d:
        paths = base_files(d)
        paths["hosts"].write_bytes(encode(text, how))
        code, err = plan(str(paths["job"]), "--backend", "ssh")
        assert_clean(code, err, paths["hosts"], paths["job"])


# ---------------------------------------------------------------- fuzz: data files

LABELS = st.sampled_from(["0", "1", "2", "3"] * 30 + ["4", "-1", "1.7", "3.0", "abc", "", " 2", "1e3", "nan"])
TEXTS = st.sampled_from(["hello world", "a, b", 'say "hi"', "", "multi\nline", "é", '"open', 'x"', '""'])
QUOTE = st.sampled_from([json.dumps] * 8 + [str, lambda t: f'"{t}"'])  # mostly CSV-quoted, sometimes raw


@st.composite
def csv_texts(draw) -> str:
    header = draw(st.sampled_from([["label", "text"]] * 4 + [["text", "label"], ["text"], ["label", "content"], []]))
    rows = [",".join(header)] if header else []
    for _ in range(draw(st.integers(0, 12))):
        fields = [draw(QUOTE)(draw(TEXTS)) if c != "label" else draw(LABELS) for c in header or ["label", "text"]]
        if draw(st.integers(0, 29)) == 0:
            fields.append("extra")
        rows.append(",".join(fields))
    return "\n".join(rows) + draw(st.sampled_from(["", "\n", "\n\n"]))


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=csv_texts(), how=ENCODINGS, eval_file=st.booleans())
def test_generated_data_files_plan_or_exit_2(text, how, eval_file):
    with workdir() as d:
        paths = base_files(d)
        data = d / "train.csv"
        data.write_bytes(encode(text, how))
        sets = ["task=simple_model", "model.name=bert-tiny", f"data.train_files=[{data}]"]
        if eval_file:
            sets.append(f"data.eval_files=[{data}]")
        code, err = plan(str(paths["job"]), *[x for s in sets for x in ("--set", s)])
        assert_clean(code, err, data, paths["job"])


@pytest.fixture(scope="module")
def hf_datasets_cache(tmp_path_factory):
    old = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets"))
    yield
    if old is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=csv_texts(), eval_file=st.booleans())
def test_plan_data_check_agrees_with_the_ranks_loader(hf_datasets_cache, text, eval_file):
    """check_data_files (plan) accepts a CSV when the ranks' loader (datasets + the label checks) does,
    and refuses what it refuses; both with a LabsError naming the file."""
    from tasks.classifier import labelled_splits
    with workdir() as d:
        data = d / "train.csv"
        data.write_text(text)
        sets = ["task=simple_model", f"data.train_files=[{data}]"] + ([f"data.eval_files=[{data}]"] if eval_file else [])
        job = load_job(None, sets)
        plan_error = rank_error = None
        try:
            check_data_files(job)
        except LabsError as e:
            plan_error = str(e)
        try:
            labelled_splits(job, 4)
        except LabsError as e:
            rank_error = str(e)
        if plan_error:
            assert str(data) in plan_error
        if rank_error:
            assert str(data) in rank_error
        event("accepted" if plan_error is None else "refused")
        assert plan_error is not None or rank_error is None, (text, rank_error)  # accepted: the ranks load it
        # refused: the ranks refuse it too, or pandas would misread it (rows longer than the header shift
        # the columns: the first becomes the index)
        assert plan_error is None or rank_error is not None or "fields but there are" in plan_error, (text, plan_error)


# ---------------------------------------------------------------- accepted jobs train


@st.composite
def trainable_jobs(draw) -> dict[str, Any]:
    task = draw(st.sampled_from(["fine_tune", "simple_model"]))
    job = {"task": task, "train": {"seed": draw(st.sampled_from([0, 7, 2**32 - 1, 2**32, -1])),
                                   "log_every": draw(st.sampled_from([0, 1, 5])),
                                   "eval_every": draw(st.sampled_from([-1, 0, 1])),
                                   "save_every": draw(st.sampled_from([-2, 0, 1])),
                                   "epochs": draw(st.sampled_from([0, 1, 2]))},
           "data": {"max_train_samples": draw(st.sampled_from([None, -1, 0, 8, 64])),
                    "max_eval_samples": draw(st.sampled_from([None, 0, 4]))}}
    if task == "fine_tune":
        job["model"] = {"name": draw(st.sampled_from(["llama-tiny", "gpt2-tiny"]))}
        job["data"]["block_size"] = draw(st.sampled_from([1, 2, 16]))
        job["lines"] = [f"line {i} of generated text about parallel training on many ranks" for i in range(80)]
    else:
        job["model"] = {"name": "bert-tiny"}
        job["options"] = {"num_labels": draw(st.sampled_from([1, 2, 4])), "label_names": [],
                          "max_length": draw(st.sampled_from([2, 16]))}
        job["labels"] = draw(st.lists(st.sampled_from(["0", "1", "1", "3", "1.7", "2.0"]), min_size=24, max_size=24))
    return job


def _write_trainable(d: Path, case: dict[str, Any]) -> Path:
    case = json.loads(json.dumps(case))
    if "lines" in case:
        data = d / "train.txt"
        data.write_text("\n".join(case.pop("lines")) + "\n")
    else:
        data = d / "train.csv"
        data.write_text("label,text\n" + "".join(f"{v},sample text number {i}\n" for i, v in enumerate(case.pop("labels"))))
    hosts = d / "hosts"
    hosts.write_text("localhost slots=1\n")
    case |= {"ds_config": str(REPO / "ds_configs" / "cpu_dry_run.json"), "hostfile": str(hosts)}
    case["data"]["train_files"] = [str(data)]
    path = d / "job.yaml"
    path.write_text(yaml.safe_dump(case))
    return path


@pytest.mark.distributed  # real DeepSpeed processes: not in make test-fast
@settings(max_examples=3, deadline=None, database=None, phases=[Phase.generate],  # no shrinking: 10 s a run
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=trainable_jobs())
def test_generated_jobs_that_plan_train_one_step(ds_ops, case):
    """A job `labs plan` accepts trains (one step, one plain process, the worker's own checks)."""
    with workdir() as d:
        job = _write_trainable(d, case)
        sets = ["--set", f"train.output_dir={d / 'runs'}", "--set", "train.max_steps=1"]
        code, err = plan(str(job), "--dry_run", *sets)
        assert_clean(code, err, job, d / "train.csv", d / "train.txt")
        assume(code == 0)
        proc = subprocess.run([sys.executable, "-m", "launcher.worker", "--job", str(job), "--dry_run",
                               "--max_steps", "1", "--set", f"train.output_dir={d / 'runs'}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{job.read_text()}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "done: 1 steps" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- files.py


def test_non_utf8_files_name_the_file_and_the_fix(tmp_path):
    cases = {"u16": "task: x\n".encode("utf-16"), "u16le": "task: x\n".encode("utf-16-le"),
             "latin": "name: café\n".encode("latin-1"), "bin": bytes(range(256))}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LabsError) as e:
            read_text(tmp_path / name, "job file")
        assert str(tmp_path / name) in str(e.value) and "UTF-8" in str(e.value), name
    (tmp_path / "bom").write_bytes(b"\xef\xbb\xbftask: x\n")
    assert read_text(tmp_path / "bom", "job file") == "task: x\n"
    with pytest.raises(LabsError, match="byte-order mark"):
        read_text(tmp_path / "bom", "hostfile", allow_bom=False)


def test_size_cap_fifo_and_folder_are_refused_without_reading(tmp_path):
    (tmp_path / "big").write_text("x" * 2000)
    with pytest.raises(LabsError, match=r"2,000 bytes; a job file may have at most 1,000 bytes"):
        read_text(tmp_path / "big", "job file", max_bytes=1000)
    os.mkfifo(tmp_path / "fifo")  # reading it would block for ever
    for p in (tmp_path / "fifo", tmp_path):
        with pytest.raises(LabsError, match="not a regular file"):
            read_text(p, "hostfile")


def test_yaml_limits():
    t0 = time.perf_counter()
    with pytest.raises(LabsError, match=r"j.yaml: line \d+ column \d+: refused: .*10,000 values .*alias"):
        load_yaml(alias_bomb(10, 10), "j.yaml")
    with pytest.raises(LabsError, match="alias refers to the anchor it is inside"):
        load_yaml("a: &a [1, *a]", "j.yaml")
    with pytest.raises(LabsError, match=f"nest more than {MAX_DEPTH} levels"):
        load_yaml("x: " + "[" * 5000 + "]" * 5000, "j.yaml")
    with pytest.raises(LabsError, match="4300 digits"):
        load_yaml("seed: " + "9" * 5000, "j.yaml")
    with pytest.raises(LabsError, match="control character"):
        load_yaml("name: '\x07'", "j.yaml")
    assert time.perf_counter() - t0 < 2
    assert load_yaml("a: &a [1, 2]\nb: *a\n", "j.yaml") == {"a": [1, 2], "b": [1, 2]}  # a few aliases are fine


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "string"), ("5\n", "number")])
def test_job_that_is_not_a_mapping(tmp_path, text, kind):
    (tmp_path / "job.yaml").write_text(text)
    with pytest.raises(LabsError) as e:
        load_yaml_mapping(tmp_path / "job.yaml", "job file")
    assert str(tmp_path / "job.yaml") in str(e.value) and f"must be a mapping of keys (like 'task: fine_tune'), " \
                                                        f"got a {kind}" in str(e.value)
    assert load_yaml_mapping(tmp_path / "job.yaml", "job file", text="") == {}


@pytest.mark.parametrize("text, expected", [
    ("[" * 100_000 + "]" * 100_000, f"nest more than {MAX_DEPTH} levels"),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"nest more than {MAX_DEPTH} levels"),
    ('{"a": ' + "9" * 5000 + "}", "4300 digits"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": 1, "a": 2}', "key 'a' appears twice"),
    ('{"a": 1,\n "b": }', "line 2 column 7: invalid JSON"),
])
def test_json_limits(tmp_path, text, expected):
    (tmp_path / "ds.json").write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(LabsError) as e:
        load_json(tmp_path / "ds.json", "DeepSpeed config")
    assert str(tmp_path / "ds.json") in str(e.value) and expected in str(e.value)
    assert time.perf_counter() - t0 < 2
    (tmp_path / "ok.json").write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    load_json(tmp_path / "ok.json", "DeepSpeed config")


# ---------------------------------------------------------------- job rules


@pytest.mark.parametrize("override, expected", [
    ("train.seed=-1", "train.seed = -1; it must be in [0, 2**32)"),
    ("train.seed=4294967296", "train.seed = 4294967296; it must be in [0, 2**32)"),
    ("train.epochs=0", "train.epochs = 0; it must be >= 1"),
    ("train.log_every=0", "train.log_every = 0; it must be >= 1 (it logs every N steps)"),
    ("train.max_steps=-1", "train.max_steps = -1; it must be >= 1"),
    ("train.max_steps=0", "train.max_steps = 0; it must be >= 1"),
    ("train.eval_every=-1", "train.eval_every = -1; it must be >= 0"),
    ("train.save_every=-5", "train.save_every = -5; it must be >= 0"),
    ("train.output_dir=''", "train.output_dir = ''; it must be a path"),
    ("data.block_size=1", "data.block_size = 1; it must be >= 2"),
    ("data.max_train_samples=-1", "data.max_train_samples = -1; it must be >= 1"),
    ("data.max_eval_samples=0", "data.max_eval_samples = 0; it must be >= 1"),
    ("data.label_offset=-1", "data.label_offset = -1; it must be >= 0"),
    ("data.train_files=[a.txt, 5]", "data.train_files[1] = 5 has the wrong type; expected str"),
    ("data.text_columns=[title, '']", "data.text_columns[1] = ''; it must not be empty"),
    ("data.column_names=[a, b, a]", "data.column_names = ['a', 'b', 'a']; each column needs its own name"),
    ("wandb.mode=online2", "wandb.mode = 'online2'; choose one of online, offline, disabled"),
    ("wandb.tags=['a,b']", "wandb.tags[0] = 'a,b'; W&B tags have 1-64 characters"),
    ("cluster.ssh_port=0", "cluster.ssh_port = 0; it must be between 1 and 65535"),
    ("cluster.ssh_timeout=0", "cluster.ssh_timeout = 0; it must be >= 1"),
    ("cluster.cpus_per_task=0", "cluster.cpus_per_task = 0; it must be >= 1"),
    ("cluster.time=1h", "cluster.time = '1h'; Slurm's formats"),
    ("cluster.sbatch_args=[account=ml]", "cluster.sbatch_args[0] = 'account=ml'; each is an sbatch flag"),
    ("cluster.master_addr='a b'", "cluster.master_addr = 'a b'; it must be a host name or an IP address"),
    ("ds={1: 2}", "ds has the key 1; keys must be strings"),
    ("train=5", "train must be a mapping (key: value lines), got 5"),
    ('model.name="a\\x00b"', "model.name = 'a\\x00b'; it holds the control character"),
    ("train.seed=0x" + "f" * 3000, "train.seed = <a 12000-bit number>; it must be in [0, 2**32)"),
])
def test_job_ranges_are_checked_with_file_field_value_and_fix(override, expected):
    with pytest.raises(LabsError) as e:
        load_job("jobs/demo.yaml", [override])
    assert str(e.value).startswith("jobs/demo.yaml: ") and expected in str(e.value)


@pytest.mark.parametrize("name", ["../x", "/abs/run", "a/b", "..", ".", "-x", "", "a b", "x" * 200])
def test_job_names_are_folder_safe(name):
    with pytest.raises(LabsError) as e:
        load_job("jobs/demo.yaml", [f"name={json.dumps(name)}"])
    assert f"name = {show(name)}" in str(e.value) and "no '/', no '..'" in str(e.value)


def test_default_name_from_the_file_is_made_folder_safe(tmp_path):
    assert default_name(Path("my job (copy).yaml")) == "my_job_copy_"
    assert default_name(Path("...yaml")) == "job"
    (tmp_path / "my job.yaml").write_text("task: fine_tune\n")
    assert load_job(tmp_path / "my job.yaml").name == "my_job"


def test_valid_edges_and_empty_sections_are_accepted(tmp_path):
    job = load_job("jobs/demo.yaml", ["train.seed=4294967295", "train.seed=0", "train.eval_every=0",
                                      "train.max_steps=null", "data.max_train_samples=1", "cluster.time=2-00:30",
                                      "wandb.mode=disabled", "name=run.v2_final-1"])
    assert job.train.seed == 0 and job.name == "run.v2_final-1"
    (tmp_path / "j.yaml").write_text("task: fine_tune\ntrain:\n  # epochs: 2\n")
    assert load_job(tmp_path / "j.yaml").train.epochs == 1


def test_command_line_paths_are_checked_like_the_job_file():
    job = load_job("jobs/demo.yaml")
    set_field(job, "ds_config", "ds_configs/zero3.json", "--ds-config")
    assert job.ds_config == "ds_configs/zero3.json"
    for value, expected in (("a" * 5000, "it is 5,000 characters long"), ("x/" + "a" * 300, "each name at most 255")):
        with pytest.raises(LabsError, match=f"--hostfile: hostfile = .*; .*{expected}"):
            set_field(job, "hostfile", value, "--hostfile")


def test_bad_set_values_are_one_message():
    for item, expected in (("train.epochs=[", "--set train.epochs: line 1 column 2: not valid YAML"),
                           ("=3", "expected KEY=VALUE"),
                           ("train.epochs.x=1", "'epochs' is not a section")):
        with pytest.raises(LabsError, match=expected.replace("[", r"\[")):
            load_job("jobs/demo.yaml", [item])


# ---------------------------------------------------------------- task options


@pytest.mark.parametrize("task, model, override, expected", [
    ("transfer", "minilm-l6", "options.finetune=top", "options.finetune = 'top'; choose one of head, last_k, all, lora"),
    ("transfer", "minilm-l6", "options.lora_r=0", "options.lora_r = 0; it must be >= 1"),
    ("transfer", "minilm-l6", "options.lora_alpha=0", "options.lora_alpha = 0; it must be >= 1"),
    ("tinyllama", "llama-tiny", "options.lora_dropout=1.0", "options.lora_dropout = 1.0; it must be in [0, 1)"),
    ("tinyllama", "llama-tiny", "options.lora_target_modules=[]", "options.lora_target_modules = []; list one"),
    ("tinyllama", "llama-tiny", "options.lora_target_modules=[norm]", "['norm'], which LoRA cannot wrap"),
    ("simple_model", "bert-tiny", "options.num_labels=1", "options.num_labels = 1; it must be >= 2"),
    ("simple_model", "bert-tiny", "options.num_labels=3", "options.label_names = ['World', 'Sports', 'Business', "
                                                          "'Sci/Tech']; give one name per class (3"),
    ("simple_model", "bert-tiny", "options.max_length=2", "options.max_length = 2; it must be >= 3"),
    ("simple_model", "bert-tiny", "options.max_length=1000", "options.max_length = 1000 is more than the 512 positions"),
    ("fine_tune", "llama-tiny", "data.block_size=513", "data.block_size = 513 is more than the 512 positions"),
    ("transfer", "minilm-l6", "options={finetune: last_k, last_k: 7}", "has 6 encoder layers; options.last_k = 7"),
    ("fine_tune", "bert-tiny", "task=fine_tune", "is a BERT encoder"),
    ("simple_model", "llama-tiny", "task=simple_model", "is a causal-LM preset"),
])
def test_task_options_are_checked_against_their_ranges_and_the_model(task, model, override, expected):
    job = load_job(None, [f"task={task}", f"model.name={model}", override])
    with pytest.raises(LabsError) as e:
        check_options(job, PRESETS[model])
    assert str(e.value).startswith("<defaults>: ") and expected in str(e.value)


# ---------------------------------------------------------------- hostfiles


@pytest.mark.parametrize("text, expected", [
    ("localhost slots = 2\n", "no spaces around '='; write 'localhost slots=2'"),
    ("localhost slots=0\n", "slots=0; slots must be >= 1 and at most 1024"),
    ("localhost slots=" + "9" * 5000 + "\n", "slots=99999999999999999999...; slots must be >= 1"),
    ("node1#rack2 slots=2\n", "host 'node1#rack2' is not a host name"),
    ("localhost\n", "is not a hostfile line; expected 'HOST slots=N'"),
])
def test_hostfile_rules(text, expected):
    with pytest.raises(LabsError) as e:
        parse_hostfile(text, "hosts")
    assert str(e.value).startswith("hosts:1: ") and expected in str(e.value)


def test_hostfile_reads_what_deepspeed_reads():
    text = "node1 slots=2 max_slots=4\r\n  node2\tslots=1  # rack 2\r\n# node3 slots=9\n\x0c\n"
    assert parse_hostfile(text, "h").hosts == {"node1": 2, "node2": 1}


def test_hostfile_encodings(tmp_path):
    for name, data, expected in (("u16", "localhost slots=1\n".encode("utf-16"), "UTF-16"),
                                 ("bom", b"\xef\xbb\xbflocalhost slots=1\n", "without BOM"),
                                 ("latin", "h\xe9 slots=1\n".encode("latin-1"), "not UTF-8")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LabsError) as e:
            load_hostfile(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and expected in str(e.value)


# ---------------------------------------------------------------- data files


@pytest.mark.parametrize("task, name, text, expected", [
    ("simple_model", "d.csv", "", "the data file is empty"),
    ("simple_model", "d.csv", "label,text\n", "no rows after the header"),
    ("simple_model", "d.csv", "text\nhello\nworld\n", "no column 'label'; columns are ['text']"),
    ("simple_model", "d.csv", "label,body\n1,hello\n2,x\n", "no column 'text'"),
    ("simple_model", "d.csv", "label,text\n1,a\n1.7,b\n", "line 3: label '1.7' in column 'label' is not an integer"),
    ("simple_model", "d.csv", "label,text\n1,a\nabc,b\n", "line 3: label 'abc' in column 'label' is not an integer"),
    ("simple_model", "d.csv", "label,text\n1,a\n4,b\n", "line 3: label 4 in column 'label' is outside 0..3"),
    ("simple_model", "d.csv", "label,text\n1,a,b\n2,c\n", "line 2 has 3 fields but there are 2 columns"),
    ("simple_model", "d.csv", 'label,text\n1,"open\n2,x\n', "line 2: a quoted field is never closed"),
    ("simple_model", "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2: label None"),
    ("simple_model", "d.jsonl", '{"text": "a", "label": 1}\n[1]\n', "line 2: [1] is not a JSON object"),
    ("simple_model", "d.txt", "a\nb\n", "a plain-text file has no label column"),
    ("fine_tune", "d.txt", "\n  \n", "the data file is empty"),
    ("fine_tune", "d.txt", "one line", "1 row(s); without data.eval_files a tenth"),
    ("fine_tune", "d.csv", "body\nhello\nthere\n", "no column 'text'"),
])
def test_data_file_rules(tmp_path, task, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    job = load_job(None, [f"task={task}", f"data.train_files=[{path}]"])
    with pytest.raises(LabsError) as e:
        check_data_files(job)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value)


def test_data_label_offset_and_num_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("label,text\n" + "".join(f"{i % 4 + 1},t{i}\n" for i in range(8)))
    check_data_files(load_job(None, ["task=simple_model", f"data.train_files=[{path}]", "data.label_offset=1"]))
    job = load_job(None, ["task=simple_model", f"data.train_files=[{path}]"])
    with pytest.raises(LabsError, match="label 4 in column 'label' is outside 0..3"):
        check_data_files(job)


def test_data_encodings_and_gzip(tmp_path):
    for name, data, expected in (("u16.txt", "hello\nworld\n".encode("utf-16"), "UTF-16"),
                                 ("latin.txt", "caf\xe9\nb\n".encode("latin-1"), "not UTF-8"),
                                 ("fake.txt.gz", b"hello\nworld\n", "a .gz file must be gzip-compressed")):
        (tmp_path / name).write_bytes(data)
        job = load_job(None, ["task=fine_tune", f"data.train_files=[{tmp_path / name}]"])
        with pytest.raises(LabsError) as e:
            check_data_files(job)
        assert str(tmp_path / name) in str(e.value) and expected in str(e.value)


def test_shared_data_layouts_pass_quickly():
    root = REPO.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"no shared data folder at {root}")
    for job_file in ("jobs/simple_model_zero2.yaml", "jobs/transfer_imdb.yaml", "jobs/fine_tune_zero2.yaml"):
        t0 = time.perf_counter()
        check_data_files(load_job(job_file, [f"data.data_dir={root}"]))
        assert time.perf_counter() - t0 < 2, job_file


@pytest.mark.parametrize("value, expected", [
    (3, 3), (3.0, 3), ("3", 3), (" 2 ", 2), ("2.0", 2), (True, 1),
    (1.7, None), ("1.7", None), ("abc", None), ("", None), (None, None), (float("nan"), None), ("1e400", None),
])
def test_parse_label(value, expected):
    assert parse_label(value) == expected


def test_ranks_refuse_a_fractional_label(tmp_path):
    """The ranks' loader (datasets reads 1.7 as a float) refuses it instead of training class 1."""
    from tasks.classifier import labelled_splits
    path = tmp_path / "d.csv"
    path.write_text("label,text\n" + "".join(f"{i % 4},t{i}\n" for i in range(9)) + "1.7,bad\n")
    job = load_job(None, ["task=simple_model", f"data.train_files=[{path}]", f"data.eval_files=[{path}]"])
    with pytest.raises(LabsError, match=r"label 1.7 in column 'label' is not an integer class id"):
        labelled_splits(job, 4)
