"""DeepSpeed config sections that are honoured, shown doing what they say: activation checkpointing
lowers the measured peak memory (its equivalence to plain training: tests/test_equivalence_*.py), and the monitors, the flops profiler and the comms
logger write into the run folder (not the shell's working folder)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_ok, launch, read_metrics, run_dirs, summary

pytestmark = pytest.mark.distributed


def _text(path: Path, words: int = 60000) -> Path:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    path.write_text("\n".join(" ".join(rng.choice(vocab) for _ in range(100)) for _ in range(words // 100)) + "\n")
    return path


def _one_process(out: Path, data: Path, *sets: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "launcher.worker", "--job", "jobs/fine_tune_dry_run.yaml", "--set",
                           f"train.output_dir={out}", "model.name=llama-small", "data.block_size=512",
                           f"data.train_files=[{data}]", f"data.eval_files=[{data}]", "data.max_train_samples=16",
                           "data.max_eval_samples=2", "ds.train_micro_batch_size_per_gpu=8", "train.max_steps=1",
                           "train.export=false", *sets], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    (rd,) = run_dirs(out)
    return summary(rd) | {"losses": [r["loss"] for r in read_metrics(rd)]}


def test_activation_checkpointing_lowers_peak_memory(ds_ops, tmp_path):
    data = _text(tmp_path / "text.txt")
    plain = _one_process(tmp_path / "plain", data)
    ckpt = _one_process(tmp_path / "ckpt", data, "ds.activation_checkpointing.partition_activations=true")
    # that recomputing changes no gradient: tests/test_equivalence_*.py, over 10 real updates per strategy
    saved = plain["ranks"][0]["peak_rss_bytes"] - ckpt["ranks"][0]["peak_rss_bytes"]
    assert saved > 100 * 2**20, f"activation checkpointing saved only {saved / 2**20:.0f} MiB of peak RSS"


def test_monitors_profiler_and_comms_logger_write_into_the_run_folder(ds_ops, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output_path must not land in the shell's folder
    proc, rd = launch("jobs/fine_tune_dry_run.yaml", tmp_path / "runs", "--set", "train.export=false",
                      "ds.tensorboard.enabled=true", "ds.tensorboard.output_path=tb", "ds.csv_monitor.enabled=true",
                      "ds.flops_profiler.enabled=true", "ds.flops_profiler.profile_step=1",
                      "ds.comms_logger.enabled=true")
    assert_ok(proc)
    assert list((rd / "tb").rglob("events.out.tfevents.*")), "no tensorboard events in the run folder"
    assert list((rd / "monitors").rglob("*.csv")), "no csv_monitor files in the run folder"
    assert "Flops Profiler" in (rd / "flops_profiler.txt").read_text()
    comms = json.loads((rd / "comms_summary.json").read_text())
    assert comms.get("summary"), comms
    assert "communication (comms_logger):" in (rd / "logs" / "rank0.log").read_text()
    assert not list(Path(tmp_path).glob("tb")) and not list(Path(tmp_path).glob("monitors"))
