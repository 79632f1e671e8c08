"""Every way a user starts the same task: one plain process, `labs launch` (deepspeed runner and
torchrun backends), and the runners by hand as the seed's README does; W&B offline read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_ok, launch, read_metrics, run_dirs, summary

pytestmark = pytest.mark.distributed
BIN = Path(sys.executable).parent


def run(cmd: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_python_module_dry_run_single_process(ds_ops, tmp_path):
    proc = run([sys.executable, "-m", "tasks.fine_tune", "--dry_run", "--set", f"train.output_dir={tmp_path}"], tmp_path)
    assert_ok(proc)
    (rd,) = run_dirs(tmp_path)
    s = summary(rd)
    assert s["world"] == 1 and s["steps"] == 3 and s["zero_stage"] == 2  # the default job's ds_configs/zero2.json
    assert s["checkpoint_dir"] is None and not (rd / "checkpoints").exists()  # a dry run keeps no checkpoint
    assert "== summary" in proc.stdout and "perplexity" in proc.stdout and "tokens/s" in proc.stdout


def test_labs_launch_dry_run_two_ranks(ds_ops, tmp_path):
    proc, rd = launch("jobs/fine_tune_zero2.yaml", tmp_path, "--dry_run")
    assert_ok(proc)
    s = summary(rd)
    # a dry run keeps the job's own strategy (ZeRO-2 here), only smaller
    assert s["world"] == 2 and s["steps"] == 3 and s["zero_stage"] == 2
    assert "ds_configs/zero2.json" in (rd / "job.yaml").read_text()
    env_file = (rd / "ds_env").read_text()
    assert "DS_ACCELERATOR=cpu\n" in env_file and "TORCH_EXTENSIONS_DIR=" in env_file
    assert all(line and not line.startswith("#") and "=" in line for line in env_file.splitlines())


def test_deepspeed_runner_by_hand(ds_ops, tmp_path):
    cmd = [str(BIN / "deepspeed"), "--hostfile", "hostfiles/localhost", "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", "29561", "--module", "launcher.worker", "--job", "jobs/fine_tune_dry_run.yaml",
           "--set", f"train.output_dir={tmp_path}"]
    proc = run(cmd, tmp_path)
    assert_ok(proc)
    (rd,) = run_dirs(tmp_path)
    assert summary(rd)["world"] == 2 and len(read_metrics(rd)) == 3


def test_torchrun_by_hand_and_backend(ds_ops, tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29562", "-m", "launcher.worker",
           "--job", "jobs/fine_tune_dry_run.yaml", "--set", f"train.output_dir={tmp_path / 'byhand'}"]
    proc = run(cmd, tmp_path)
    assert_ok(proc)
    (rd,) = run_dirs(tmp_path / "byhand")
    by_hand = read_metrics(rd)
    proc, rd2 = launch("jobs/fine_tune_dry_run.yaml", tmp_path / "backend", "--backend", "torchrun")
    assert_ok(proc)
    assert "torchrun --nnodes 1 --nproc_per_node 2" in proc.stdout
    assert summary(rd2)["world"] == 2
    assert [r["loss"] for r in read_metrics(rd2)] == pytest.approx([r["loss"] for r in by_hand], rel=1e-6)


def test_wandb_offline_records_loss_and_throughput(ds_ops, tmp_path):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": ""}
    proc, rd = launch("jobs/fine_tune_dry_run.yaml", tmp_path, "--set", "wandb.enabled=true", "wandb.tags=[test,dp]",
                      "wandb.group=lab-group", "wandb.project=labs-test", env=env)
    assert_ok(proc)
    assert "W&B run (offline) written to" in proc.stdout and "wandb sync" in proc.stdout
    (run_file,) = list((rd / "wandb").glob("offline-run-*/run-*.wandb"))
    history, config_keys, run = read_wandb_file(run_file)
    assert len(history["train/loss"]) == 3 and len(history["train/tokens_per_s"]) == 3
    assert history["train/loss"] == pytest.approx([r["loss"] for r in read_metrics(rd)], rel=1e-6)
    assert "eval/perplexity" in history
    assert {"layout", "ds_config"} <= config_keys
    assert run == {"group": "lab-group", "tags": ["test", "dp"], "project": "labs-test"}


def read_wandb_file(path: Path) -> tuple[dict[str, list[float]], set[str], dict]:
    """Read an offline run's .wandb file: a 7-byte header, then LevelDB-log records (32 KiB blocks,
    7-byte record headers: crc, length, type FULL/FIRST/MIDDLE/LAST) holding protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += (block - pos % block) % block
        elif kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    history: dict[str, list[float]] = {}
    config_keys: set[str] = set()
    run: dict = {}
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(float(item.value_json))
        elif rec.WhichOneof("record_type") == "config":
            config_keys |= {u.key for u in rec.config.update}
        elif rec.WhichOneof("record_type") == "run":
            run = {"group": rec.run.run_group, "tags": list(rec.run.tags), "project": rec.run.project}
    return history, config_keys, run
