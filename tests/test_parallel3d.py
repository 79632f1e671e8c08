"""Sequence parallelism, pipeline x tensor and data x tensor parallelism: the rank order, and `labs plan`
refusing layouts that cannot run, listing the ones that can. (That each run equals one rank over real
updates, and what each rank holds: tests/test_equivalence_pipeline.py and tests/test_equivalence_tp_sp.py.)
"""

from __future__ import annotations

import pytest

from launcher.common.errors import LabsError
from launcher.common.layout import Layout, valid_layouts

# ---------------------------------------------------------------- the plan: layouts checked before launch

def test_layout_orders_ranks_tp_then_sp_then_dp_then_pp():
    lay = Layout(world=8, tp=2, pp=2)
    assert [lay.coords(r) for r in (0, 1, 2, 5)] == [{"pp": 0, "dp": 0, "sp": 0, "tp": 0},
                                                     {"pp": 0, "dp": 0, "sp": 0, "tp": 1},
                                                     {"pp": 0, "dp": 1, "sp": 0, "tp": 0},
                                                     {"pp": 1, "dp": 0, "sp": 0, "tp": 1}]
    sp = Layout(world=4, sp=2)
    assert (sp.dp, [sp.sp_rank(r) for r in range(4)], [sp.dp_rank(r) for r in range(4)]) == (2, [0, 1, 0, 1],
                                                                                          [0, 0, 1, 1])
    assert valid_layouts(4, heads=4, layers=2) == [
        "dp 4 x tp 1 x pp 1", "dp 2 x tp 1 x pp 1 x sp 2", "dp 1 x tp 1 x pp 1 x sp 4", "dp 2 x tp 2 x pp 1",
        "dp 1 x tp 4 x pp 1", "dp 2 x tp 1 x pp 2", "dp 1 x tp 2 x pp 2"]


def _plan(tmp_path, job: str, slots: int, *sets: str):
    from launcher.launch.make_plan import make_plan
    hosts = tmp_path / f"hosts{slots}"
    hosts.write_text(f"localhost slots={slots}\n")
    return make_plan(job, hostfile=str(hosts), sets=list(sets), run_dir=str(tmp_path / "run"))


SP_JOB, PT_JOB = "jobs/fine_tune_sequence_parallel.yaml", "jobs/fine_tune_pipeline_tensor_parallel.yaml"
BAD = [
    # (job, hostfile slots, overrides, words the message must contain)
    (SP_JOB, 3, [], ["sequence_parallel_size = 2", "world size 3", "Valid layouts for 3 rank(s): dp 3 x tp 1 x pp 1"]),
    (SP_JOB, 3, ["ds.sequence_parallel_size=3", "data.block_size=33"], ["sequence_parallel_size = 3", "4 attention heads",
                                                  "valid layouts for 3 ranks: dp 3 x tp 1 x pp 1"]),
    (SP_JOB, 2, ["data.block_size=31"], ["sequence_parallel_size = 2", "data.block_size = 31"]),
    (SP_JOB, 4, ["ds.tensor_parallel.autotp_size=2"], ["sequence parallel size 2 with tensor parallel size 2",
                                                       "dp 1 x tp 2 x pp 2"]),
    (SP_JOB, 2, ["model.name=gpt2-tiny"], ["sequence_parallel_size = 2", "'gpt2'"]),
    (PT_JOB, 6, [], ["pipeline.stages = 2", "autotp_size = 2", "world size 6", "dp 1 x tp 2 x pp 3"]),
    (PT_JOB, 4, ["ds.pipeline.stages=4", "ds.tensor_parallel.autotp_size=1"], ["pipeline.stages = 4",
                                                                              "2 transformer blocks"]),
    (PT_JOB, 8, ["ds.tensor_parallel.autotp_size=8", "ds.pipeline.stages=1"], ["autotp_size = 8", "4 attention heads"]),
    (PT_JOB, 4, ["model.name=gpt2-tiny"], ["pipeline.stages = 2 with tensor_parallel.autotp_size = 2", "'gpt2'"]),
]


@pytest.mark.parametrize("job,slots,sets,words", BAD)
def test_plan_refuses_layouts_that_cannot_run(tmp_path, job, slots, sets, words):
    with pytest.raises(LabsError) as e:
        _plan(tmp_path, job, slots, *sets)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_plan_accepts_the_three_dimensional_layouts(tmp_path):
    assert _plan(tmp_path, PT_JOB, 8, "ds.train_batch_size=16").layout.describe() == "world 8 = dp 2 x tp 2 x pp 2"
    assert _plan(tmp_path, SP_JOB, 4, "ds.train_batch_size=16").layout.describe() == "world 4 = dp 2 x tp 1 x pp 1 x sp 2"
