"""A real 2-rank ZeRO-2 run of fine_tune resumed from its own checkpoint continues with the same losses.
(ZeRO 0-3 equal to one rank, and the HF export: tests/test_equivalence_dp.py.)"""

from __future__ import annotations

import pytest
from conftest import assert_ok, launch, read_metrics

pytestmark = pytest.mark.distributed

STEPS = 6  # over two epochs of the built-in text (5 global batches of 8 per epoch)
COMMON = ("--set", "data.dataset=sample", "data.block_size=32", "model.name=llama-tiny",
          "train.eval_every=0", f"train.max_steps={STEPS}", "train.epochs=2")


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
