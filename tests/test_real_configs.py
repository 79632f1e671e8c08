"""Real public DeepSpeed configs (tests/data/real_configs/, sources in SOURCES.tsv) through `labs plan`
with the dry-run job: each is accepted, or refused with exit 2 and one message naming the file. What
is accepted must train: a sample of the accepted ones (those needing no C++ op build) trains 2 steps
on 2 ranks here; all of them were trained when the list below was last changed (see README)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
from conftest import MACHINE_BF16, REPO, assert_ok, launch, read_metrics

from launcher.cli import main

CORPUS = REPO / "tests" / "data" / "real_configs"
CONFIGS = sorted(CORPUS.glob("*.json"))
JOB = "jobs/fine_tune_dry_run.yaml"
ACCEPTED = {
    "accelerate__ds_config_zero3_model_only", "accelerate__sp-alst.ds-config", "alpaca__default_offload_opt_param",
    "axolotl__zero3_bf16_cpuoffload_all", "bigscience__ds_config_bf16", "chatglm__deepspeed",
    "deepspeed__template_zero3", "fastchat__deepspeed_config_s2", "fastchat__deepspeed_config_s3",
    "llamafactory__ds_z0_config", "llamafactory__ds_z2_autotp_config", "llamafactory__ds_z2_offload_config",
    "llamafactory__ds_z3_offload_config", "llava__zero3_offload", "transformers__ds_config_zero2",
    "transformers__ds_config_zero3", "transformers__ds_config_zero3_bf16",
}
"""Accepted by the plan; every one trained 2 steps on 2 ranks (`labs launch JOB --ds-config F --dry_run
--max_steps 2`) when this list was written. A config that starts or stops being accepted must be
looked at, trained, and the list changed."""
TRAINED_HERE = ["accelerate__sp-alst.ds-config", "chatglm__deepspeed", "llamafactory__ds_z2_autotp_config",
                "deepspeed__template_zero3"]
"""The sample trained in the suite: ZeRO-3 bf16 with an `_comment`-free HF config, ZeRO-2 fp16-"auto",
tensor parallel (autotp_size 2) with ZeRO-2 and `_comment`, a config with no batch, optimizer or scheduler."""


def plan(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["plan", JOB, "--ds-config", str(path), "--dry_run"])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_corpus_has_sources():
    with open(CORPUS / "SOURCES.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(CONFIGS) >= 30
    assert {r["file"] for r in rows} == {p.name for p in CONFIGS}
    assert all(len(r["commit"]) == 40 and r["repository"] and r["licence"] for r in rows)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accepted_or_refused_with_one_message(bf16_cpu, path):
    code, out, err = plan(path)
    assert code in (0, 2), err
    assert "Traceback" not in out + err
    if path.stem in ACCEPTED:
        assert code == 0, err
        assert "  command: " in out
    else:
        assert code == 2, f"{path.name} is accepted now: train it, then add it to ACCEPTED"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0], err


@pytest.mark.distributed
@pytest.mark.parametrize("name", TRAINED_HERE)
def test_accepted_config_trains_on_two_ranks(ds_ops, tmp_path, name):
    if not MACHINE_BF16 and json.loads((CORPUS / f"{name}.json").read_text()).get("bf16", {}).get("enabled") is True:
        pytest.skip(f"{name} trains in bf16, which labs refuses on this CPU (neither avx512_bf16 nor amx_bf16)")
    proc, run_dir = launch(JOB, tmp_path, "--ds-config", str(CORPUS / f"{name}.json"), "--dry_run",
                           "--max_steps", "2", "--set", "train.export=false")
    assert_ok(proc)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
