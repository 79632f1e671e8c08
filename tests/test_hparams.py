"""Hyper-parameters belong to the job: the shipped ds_configs say "auto" for lr, warm-up and weight decay, and
train.from_scratch (or the model: random preset or pretrained weights) picks their defaults; `labs plan` prints
the resolved values with where each came from. In process (`labs plan` runs here), no ranks."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, labs

from launcher.config.ds.load import load_ds_config
from launcher.launch.make_plan import make_plan


def hparams_line(stdout: str) -> str:
    lines = [ln for ln in stdout.splitlines() if ln.strip().startswith("hyper-parameters (")]
    assert len(lines) == 1, stdout
    return lines[0]


def test_every_shipped_config_takes_lr_and_warm_up_from_the_job():
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        cfg = load_ds_config(path)
        assert cfg["optimizer"]["params"]["lr"] == "auto", path.name
        assert cfg["scheduler"]["params"]["warmup_max_lr"] == "auto", path.name
        assert cfg["scheduler"]["params"]["warmup_num_steps"] == "auto", path.name


def test_scratch_job_resolves_3e3_and_a_fine_tune_job_5e5_in_the_plan():
    proc = labs("plan", "jobs/demo.yaml")
    assert proc.returncode == 0, proc.stderr
    line = hparams_line(proc.stdout)
    assert "training from scratch: model.name = llama-tiny is built from config" in line
    assert "lr 0.003 (the default for training from scratch; set train.lr" in line
    assert "warm-up 5 steps (the default for training from scratch" in line

    proc = labs("plan", "jobs/demo.yaml", "--set", "train.from_scratch=false", "train.max_steps=40")
    assert proc.returncode == 0, proc.stderr
    line = hparams_line(proc.stdout)
    assert "fine-tuning: train.from_scratch = false" in line
    assert "lr 5e-05 (the default for fine-tuning" in line and "warm-up 10 steps" in line
    assert "steps 40 (train.max_steps" in line

    plan = make_plan("jobs/demo.yaml", sets=["train.from_scratch=false"])
    opt, sched = plan.ds_config["optimizer"]["params"], plan.ds_config["scheduler"]["params"]
    assert (opt["lr"], opt["weight_decay"]) == (5e-5, 0.0)
    assert sched == {"warmup_min_lr": 0, "warmup_max_lr": 5e-5, "warmup_num_steps": 10}
    plan = make_plan("jobs/demo.yaml")
    assert plan.ds_config["optimizer"]["params"]["weight_decay"] == 0.01
    assert plan.ds_config["scheduler"]["params"]["warmup_max_lr"] == 3e-3


def test_the_job_value_wins_and_the_plan_says_so():
    proc = labs("plan", "jobs/demo.yaml", "--set", "train.lr=2.0e-4", "train.warmup_steps=3")
    line = hparams_line(proc.stdout)
    assert "lr 0.0002 (from the job's train.lr)" in line and "warm-up 3 steps (from the job's train.warmup_steps" in line
    # a number written in the config is the config's, and the plan says that too
    proc = labs("plan", "jobs/demo.yaml", "--set", "ds.scheduler.params.warmup_max_lr=0.001")
    assert "lr 0.001 (scheduler.params.warmup_max_lr, written in the DeepSpeed config)" in hparams_line(proc.stdout)


def test_a_model_folder_fine_tunes_by_default(tmp_path):
    """No train.from_scratch: a folder of pretrained weights (here a tiny Llama's config.json) fine-tunes."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 128}))
    (folder / "model.safetensors").write_bytes(b"")
    plan = make_plan("jobs/demo.yaml", sets=[f"model.name={folder}"])
    assert plan.ds_config["optimizer"]["params"]["lr"] == 5e-5
    assert any(n.startswith(f"hyper-parameters (fine-tuning: model.name = {folder} loads pretrained weights)")
               for n in plan.notes)


def test_the_smollm2_jobs_need_no_ds_overrides():
    for name in ("fine_tune_smollm2.yaml", "tinyllama_lora_smollm2.yaml"):
        text = (REPO / "jobs" / name).read_text()
        assert "\nds:" not in text and "from_scratch: false" in text, name


@pytest.mark.parametrize("value, expected", [
    ("maybe", "train.from_scratch = 'maybe' has the wrong type; expected bool | None"),
    ("1", "train.from_scratch = 1 has the wrong type"),
])
def test_a_bad_from_scratch_is_exit_2_naming_it(value, expected):
    proc = labs("plan", "jobs/demo.yaml", "--set", f"train.from_scratch={value}")
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


def test_a_bad_warm_up_or_sample_setting_is_exit_2_naming_it():
    proc = labs("plan", "jobs/demo.yaml", "--set", "train.warmup_steps=1.5")
    assert proc.returncode == 2 and "train.warmup_steps = 1.5; warm-up steps >= 0, or a ratio" in proc.stderr
    proc = labs("plan", "jobs/demo.yaml", "--set", "train.sample_tokens=0")
    assert proc.returncode == 2 and "train.sample_tokens = 0" in proc.stderr
