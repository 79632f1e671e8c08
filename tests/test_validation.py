"""Every user mistake the foundation promises to catch: exit code 2, one message naming the
file, the field, the bad value and the fix, before any rank starts, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO, labs, min_world

from launcher.common.errors import LabsError
from launcher.config.hostfile import parse_hostfile
from launcher.launch.make_plan import make_plan


def write(path, text):
    path.write_text(text)
    return str(path)


def ds_file(tmp_path, **cfg):
    base = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": 2}}
    return write(tmp_path / "ds.json", json.dumps(base | cfg))


def plan_error(*args, **kwargs) -> str:
    with pytest.raises(LabsError) as e:
        make_plan(*args, **kwargs)
    return str(e.value)


def test_unknown_top_level_ds_key_is_refused_with_suggestion(tmp_path):
    path = ds_file(tmp_path, zero_optimisation={"stage": 2})
    msg = plan_error("jobs/demo.yaml", ds_config=path)
    assert path in msg and "'zero_optimisation'" in msg and "did you mean 'zero_optimization'" in msg


def test_batch_triad_that_does_not_multiply_out(tmp_path):
    path = ds_file(tmp_path, train_batch_size=10)
    msg = plan_error("jobs/demo.yaml", ds_config=path)
    assert path in msg and "train_batch_size = 10" in msg and "2 x 2 x 2 = 8" in msg
    assert "set train_batch_size to 8" in msg


def test_batch_triad_depends_on_world_size(tmp_path):
    hf = write(tmp_path / "hosts", "localhost slots=1\n")
    msg = plan_error("jobs/demo.yaml", hostfile=hf, sets=["ds.train_batch_size=8"])  # a fixed global batch
    assert "2 x 2 x 1 = 4" in msg


SHIPPED = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))


def _min_world(config: str) -> int:
    from launcher.config.ds.load import load_ds_config
    return min_world(load_ds_config(REPO / "ds_configs" / config))


@pytest.mark.parametrize("config, slots", [(c, n) for c in SHIPPED for n in (1, 2, 4) if n % _min_world(c) == 0])
def test_shipped_configs_fit_any_world_size(bf16_cpu, tmp_path, config, slots):
    """Micro batch and accumulation are fixed, the global batch derived: 1, 2 or 4 ranks all plan."""
    hf = write(tmp_path / "hosts", f"localhost slots={slots}\n")
    plan = make_plan("jobs/fine_tune_zero2.yaml", ds_config=f"ds_configs/{config}", hostfile=hf)
    c = plan.ds_config
    assert c["train_batch_size"] == c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * plan.layout.dp


def test_readme_cluster_example_plans():
    plan = make_plan("jobs/tinyllama_lora.yaml", hostfile="hostfiles/cluster.example")
    assert plan.layout.world == 4 and plan.job.backend == "ssh" and plan.ds_config["train_batch_size"] == 16


def test_auto_batch_is_resolved_for_the_world():
    plan = make_plan("jobs/demo.yaml", sets=["ds.train_batch_size=auto"])
    assert plan.ds_config["train_batch_size"] == 8


@pytest.mark.parametrize("stage", [4, -1, "two"])
def test_zero_stage_out_of_range(tmp_path, stage):
    path = ds_file(tmp_path, zero_optimization={"stage": stage})
    msg = plan_error("jobs/demo.yaml", ds_config=path)
    assert path in msg and f"zero_optimization.stage = {stage!r}" in msg and "0, 1, 2 or 3" in msg


def test_invalid_json_names_line(tmp_path):
    path = write(tmp_path / "bad.json", '{"train_batch_size": 8,\n  "zero_optimization": {stage: 2}}')
    msg = plan_error("jobs/demo.yaml", ds_config=path)
    assert path in msg and "line 2" in msg


@pytest.mark.parametrize("text, expected", [
    ("localhost 2\n", "is not a hostfile line; expected 'HOST slots=N'"),
    ("localhost slots=two\n", "is not a hostfile line"),
    ("node1 slots=2\nnode1 slots=2\n", "host 'node1' is listed twice"),
    ("node1 slots=0\n", "slots=0; slots must be >= 1"),
    ("# only a comment\n\n", "no hosts"),
])
def test_hostfile_errors(text, expected):
    with pytest.raises(LabsError) as e:
        parse_hostfile(text, "hosts.txt")
    assert "hosts.txt" in str(e.value) and expected in str(e.value)


def test_hostfile_line_number_and_comments():
    hf = parse_hostfile("# cluster\nnode1 slots=2  # first\n\nnode2 slots=4\n", "h")
    assert hf.hosts == {"node1": 2, "node2": 4} and hf.world_size == 6
    with pytest.raises(LabsError, match=r"h:3: host 'node2' has slots=-1"):
        parse_hostfile("node1 slots=1\n\nnode2 slots=-1\n", "h")


@pytest.mark.parametrize("flag, missing, expected", [
    ("ds_config", "nope/zero9.json", "DeepSpeed config 'nope/zero9.json' does not exist"),
    ("hostfile", "nope/hosts", "hostfile 'nope/hosts' does not exist"),
])
def test_missing_files(flag, missing, expected):
    msg = plan_error("jobs/demo.yaml", **{flag: missing})
    assert expected in msg


def test_missing_job_file_lists_ready_jobs():
    msg = plan_error("jobs/nope.yaml")
    assert "job file 'jobs/nope.yaml' does not exist" in msg and "jobs/demo.yaml" in msg


def test_missing_data_file():
    msg = plan_error("jobs/demo.yaml", sets=["data.train_files=[/no/such/train.txt]"])
    assert "jobs/demo.yaml" in msg and "data.train_files" in msg and "/no/such/train.txt" in msg


def test_unknown_task_lists_the_tasks():
    msg = plan_error("jobs/demo.yaml", sets=["task=fine_tuning"])
    assert "task = 'fine_tuning' does not exist" in msg and "fine_tune" in msg


def test_unknown_job_key_and_wrong_type():
    msg = plan_error("jobs/demo.yaml", sets=["train.epoch=2"])
    assert "unknown key 'train.epoch'" in msg and "did you mean train.'epochs'" in msg
    msg = plan_error("jobs/demo.yaml", sets=["train.epochs=two"])
    assert "train.epochs = 'two' has the wrong type; expected int" in msg


def test_offline_hub_model_names_the_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = plan_error("jobs/demo.yaml", sets=["model.name=TinyLlama/TinyLlama-1.1B-Chat-v1.0"])
    assert "TinyLlama/TinyLlama-1.1B-Chat-v1.0" in msg and "--set model.name=" in msg and "llama-tiny" in msg


def test_offline_hub_dataset_names_the_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from launcher.config.job import load_job
    from tasks.text_data import load_splits
    job = load_job("jobs/fine_tune_zero2.yaml", [])
    job.data.data_dir = None
    with pytest.raises(LabsError) as e:
        load_splits(job)
    assert "'wikitext'" in str(e.value) and "--data_dir" in str(e.value) and "data.train_files" in str(e.value)


def test_model_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    msg = plan_error("jobs/demo.yaml", sets=[f"model.name={tmp_path}"])
    assert str(tmp_path) in msg and "no weights" in msg


def test_cli_exit_code_2_and_existing_run_folder_untouched(tmp_path):
    run = tmp_path / "demo" / "20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step3")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (run / "job.yaml").write_text((REPO / "jobs" / "demo.yaml").read_text() + "name: demo\n")
    (run / "ds_config.json").write_text((REPO / "ds_configs" / "zero2.json").read_text())
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = labs("launch", "jobs/demo.yaml", "--resume", str(run), "--set", "ds.zero_optimization.stage=7",
                "--set", f"train.output_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "zero_optimization.stage = 7" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_plan_is_fast_and_starts_nothing():
    from launcher.launch.advice import framework_baseline
    framework_baseline()  # measured once per machine (a child process, seconds) and cached: not what is timed
    code = ("import sys, time; t = time.perf_counter(); from launcher.cli import main\n"
            "try: main(['plan', 'jobs/fine_tune_zero3.yaml'])\n"
            "except SystemExit: pass\n"
            "print('ELAPSED', time.perf_counter() - t, 'torch' in sys.modules, 'deepspeed' in sys.modules)")
    before = sorted((REPO / "runs").rglob("*")) if (REPO / "runs").exists() else []
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    out = proc.stdout
    assert "world 2 = dp 2 x tp 1 x pp 1" in out and "ZeRO-3:" in out and "<- this config" in out
    assert "train_batch_size 8 = micro batch 2 x grad accum 2 x dp 2" in out
    assert "--module launcher.worker --run_dir" in out and "localhost slots=2" in out
    elapsed = out.split("ELAPSED ")[1].split()[0]
    # DeepSpeed's own config classes check the config (importing DeepSpeed takes 2-3 s); no process group
    assert "torch.distributed" not in proc.stderr and float(elapsed) < 10.0 and wall < 20.0
    after = sorted((REPO / "runs").rglob("*")) if (REPO / "runs").exists() else []
    assert after == before  # plan writes nothing
