"""Real 2-rank DeepSpeed runs of fine_tune: ZeRO 0-3 equal a 1-rank run with the same seed, data
and global batch (the proof that data parallelism is real), resume, and the HF export."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import assert_ok, launch, read_metrics, summary

pytestmark = pytest.mark.distributed

STEPS = 6  # over two epochs of the built-in text (5 global batches of 8 per epoch)
COMMON = ("--set", "data.dataset=sample", "data.block_size=32", "model.name=llama-tiny",
          "train.eval_every=0", f"train.max_steps={STEPS}", "train.epochs=2")


@pytest.fixture(scope="module")
def one_rank(ds_ops, tmp_path_factory):
    """The reference: 1 rank, micro batch 2 x 4 accumulation steps = the same global batch of 8."""
    out = tmp_path_factory.mktemp("ref")
    hosts = out / "hosts"
    hosts.write_text("localhost slots=1\n")
    proc, run = launch("jobs/demo.yaml", out, "--hostfile", str(hosts), "--ds-config", "ds_configs/zero0.json",
                       *COMMON, "ds.gradient_accumulation_steps=4")
    assert_ok(proc)
    return read_metrics(run)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_equal_one_rank(stage, one_rank, tmp_path):
    proc, run = launch("jobs/demo.yaml", tmp_path, "--ds-config", f"ds_configs/zero{stage}.json", *COMMON)
    assert_ok(proc)
    # DeepSpeed's CPU comm op leaves a 66 MiB /dev/shm workspace per rank (named by the run's port):
    # the ranks remove theirs (other runs on the machine may hold their own meanwhile)
    port = re.search(r"rendezvous port (\d+)", proc.stdout).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    two = read_metrics(run)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert two[-1]["loss"] < two[0]["loss"] - 0.1, "loss must go down"
    for a, b in zip(one_rank, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (stage, a["step"], a["loss"], b["loss"])
    s = summary(run)
    assert s["world"] == 2 and s["zero_stage"] == stage and s["layout"] == "world 2 = dp 2 x tp 1 x pp 1"
    assert f"ZeRO-{stage}" in (run / "logs" / "rank0.log").read_text()
    assert (run / "logs" / "rank1.log").is_file()
    if stage in (2, 3):  # ZeRO-3: weights consolidated from the partitioned checkpoint
        check_export(run)


def check_export(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert (run / "hf" / "model.safetensors").is_file()
    AutoTokenizer.from_pretrained(run / "hf")
    probe = torch.load(run / "probe_logits.pt")
    with torch.no_grad():
        logits = model(**probe["batch"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)


def test_resume_continues_with_the_same_losses(ds_ops, tmp_path):
    args = ("--ds-config", "ds_configs/zero2.json", *COMMON[:-2], "train.epochs=2", "train.save_every=3")
    proc, full = launch("jobs/demo.yaml", tmp_path / "full", *args, "train.max_steps=6")
    assert_ok(proc)
    proc, part = launch("jobs/demo.yaml", tmp_path / "part", *args, "train.max_steps=3")
    assert_ok(proc)
    assert (part / "checkpoints" / "latest").read_text().strip() == "step3"
    proc, again = launch("jobs/demo.yaml", tmp_path / "part", *args, "train.max_steps=6", "--resume", str(part))
    assert_ok(proc)
    assert again is None  # --resume continues in the same run folder
    resumed = read_metrics(part)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(read_metrics(full)[3:], resumed[3:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a, b)
    assert (part / "checkpoints" / "latest").read_text().strip() == "step6"
