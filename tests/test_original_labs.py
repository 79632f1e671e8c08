"""The original labs' commands, on this project's modules: `torchrun --nproc_per_node 2 -m tasks.LAB
--epochs 1` with each lab's own dataset (AG News, IMDB, WikiText) from LABS_DATA_DIR, and with
--dry_run on the built-in sample; `python -m tasks.fine_tune --dry_run`. No job file, no launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, assert_ok

from launcher.common.errors import LabsError
from launcher.common.proc import free_port
from launcher.config.job import load_job

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
NO_DATA = f"{SHARED_DATA} not present (LABS_DATA_DIR laid out like shared/data)"


def _env(data_dir: Path | None) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LABS_DATA_DIR", None)
    return env | ({"LABS_DATA_DIR": str(data_dir)} if data_dir else {})


def _run(cmd: list[str], data_dir: Path | None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env(data_dir))


def _torchrun(lab: str, out: Path, *args: str, data_dir: Path | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`torchrun --nproc_per_node 2 -m tasks.LAB ARGS --set train.output_dir=OUT`; (process, summary)."""
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", f"tasks.{lab}", *args,
           "--set", f"train.output_dir={out}"]
    proc = _run(cmd, data_dir)
    assert_ok(proc)
    runs = sorted(out.glob(f"{lab}/*/summary.json"))
    assert len(runs) == 1, (proc.stdout[-2000:], runs)
    return proc, json.loads(runs[0].read_text())


# ---------------------------------------------------------------- each lab's own data, by default


@pytest.mark.parametrize("lab, dataset, files", [
    ("simple_model", "ag_news", ["ag_news/jointmatch/dev.csv", "ag_news/original/test.csv"]),
    ("transfer", "imdb", ["imdb/train.csv.gz", "imdb/test.csv.gz"]),
    ("fine_tune", "wikitext", ["wikitext2/tokens/wiki.valid.tokens", "wikitext2/tokens/wiki.test.tokens"]),
    ("tinyllama", "wikitext", ["wikitext2/tokens/wiki.valid.tokens"]),
])
def test_lab_defaults_name_its_own_dataset_and_the_layout_when_offline(monkeypatch, lab, dataset, files):
    """Without --job a lab reads its own dataset; offline with no data folder, the error names the files
    that --data_dir / LABS_DATA_DIR must hold, and the dry run."""
    from tasks.registry import lab_defaults
    from tasks.text_data import load_splits
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LABS_DATA_DIR", raising=False)
    job = load_job(None, [f"task={lab}", *lab_defaults(lab)])
    assert job.data.dataset == dataset
    with pytest.raises(LabsError) as e:
        load_splits(job)
    msg = str(e.value)
    assert f"data.dataset = {dataset!r}" in msg and "--data_dir" in msg and "LABS_DATA_DIR" in msg, msg
    assert all(f in msg for f in files) and "--dry_run" in msg, msg


def test_a_classifier_given_plain_text_names_its_own_dataset(tmp_path):
    """The old failure: simple_model on the job defaults' wikitext through a data folder died on a missing
    `label` column; now the plan and the ranks say which dataset the lab reads."""
    from tasks.data_check import check_data_files
    from tasks.text_data import load_splits
    job = load_job(None, ["task=simple_model", f"data.data_dir={tmp_path}"])
    for check in (check_data_files, load_splits):
        with pytest.raises(LabsError, match=r"task 'simple_model' classifies labelled text.*data.dataset=ag_news "
                                            r"data.dataset_config=null.*ag_news/jointmatch/dev.csv"):
            check(job)


def test_missing_layout_file_names_the_layout(tmp_path):
    from tasks.text_data import load_splits
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "train.csv.gz").write_bytes(b"")
    job = load_job(None, ["task=transfer", "data.dataset=imdb", "data.dataset_config=null", f"data.data_dir={tmp_path}"])
    with pytest.raises(LabsError, match=r"has no '.*imdb/test.csv.gz' for dataset 'imdb'; it expects imdb/train.csv.gz "
                                        r"and imdb/test.csv.gz \(gzipped CSV with the header id,rating,label,text"):
        load_splits(job)


def test_task_modules_do_not_import_the_worker():
    """`python -m tasks.LAB` runs the worker, which imports the task modules: importing a task module must
    not import the worker back."""
    code = ("import sys, tasks.simple_model, tasks.transfer, tasks.fine_tune, tasks.tinyllama, tasks.rag; "
            "assert 'launcher.worker' not in sys.modules, 'launcher.worker imported'")
    assert_ok(_run([sys.executable, "-c", code], None, timeout=120))


# ---------------------------------------------------------------- the commands, run


@pytest.mark.distributed
@pytest.mark.skipif(not (SHARED_DATA / "ag_news").is_dir(), reason=NO_DATA)
def test_torchrun_simple_model_on_ag_news(ds_ops, tmp_path):
    proc, s = _torchrun("simple_model", tmp_path, "--epochs", "1", "--set", "data.max_train_samples=64",
                        "data.max_eval_samples=32", data_dir=SHARED_DATA)
    assert "data: ag_news from" in proc.stdout and "train 8,000 rows (ag_news/jointmatch/dev.csv)" in proc.stdout
    assert s["world"] == 2 and s["steps"] == 64 // 8  # zero2.json: 2 ranks x micro batch 2 x 2 accumulation
    assert 0.0 <= s["accuracy"] <= 1.0


@pytest.mark.distributed
@pytest.mark.skipif(not (SHARED_DATA / "imdb").is_dir(), reason=NO_DATA)
def test_torchrun_transfer_on_imdb(ds_ops, tmp_path):
    proc, s = _torchrun("transfer", tmp_path, "--epochs", "1", "--set", "data.max_train_samples=32",
                        "data.max_eval_samples=16", "options.max_length=128", data_dir=SHARED_DATA)
    assert "data: imdb from" in proc.stdout and "train 25,000 rows (imdb/train.csv.gz)" in proc.stdout
    assert s["world"] == 2 and s["steps"] == 32 // 8 and 0.0 <= s["accuracy"] <= 1.0


@pytest.mark.distributed
@pytest.mark.parametrize("lab", ["simple_model", "transfer"])
def test_torchrun_dry_run_on_the_builtin_sample(ds_ops, tmp_path, lab):
    proc, s = _torchrun(lab, tmp_path, "--dry_run")
    assert "data: the built-in sample" in proc.stdout
    assert s["world"] == 2 and s["task"] == lab and "accuracy" in s


@pytest.mark.distributed  # real DeepSpeed processes: not in make test-fast
def test_python_m_fine_tune_dry_run(ds_ops, tmp_path):
    proc = _run([sys.executable, "-m", "tasks.fine_tune", "--dry_run", "--set", f"train.output_dir={tmp_path}"], None)
    assert_ok(proc)
    s = json.loads(next(tmp_path.glob("fine_tune/*/summary.json")).read_text())
    assert s["world"] == 1 and s["steps"] >= 1 and s["perplexity"] > 1


def test_python_m_transfer_offline_without_data_is_one_clear_error(tmp_path):
    proc = _run([sys.executable, "-m", "tasks.transfer", "--epochs", "1", "--set", f"train.output_dir={tmp_path}"],
                None)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.dataset = 'imdb'" in proc.stderr and "imdb/train.csv.gz" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
