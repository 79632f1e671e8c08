"""Sequence parallelism (Ulysses, sp2), pipeline x tensor parallelism (pp2 x tp2) and data x tensor
parallelism (dp2 x tp2): each run's losses equal the 1-rank run's, each rank holds what the strategy
says (sequence slices, sliced matrices, stages), and `labs plan` refuses layouts that cannot run,
listing the ones that can.

Every run reads the same 8 sequences of 32 tokens per step (micro 2 x accum 4 x dp 1, or micro 2 x
accum 2 x dp 2), same seed and data, fp32; the reference is the plain HF model on one rank.
"""

from __future__ import annotations

import pytest
from conftest import assert_ok, assert_same_losses, launch, summary

from launcher.common.errors import LabsError
from launcher.common.layout import Layout, valid_layouts

STEPS = 3
REL_TOL = 1e-3  # fp32; measured differences ~1e-7 for all three
QUICK = ("train.checkpoint=false",)
LLAMA_TINY = {"hidden": 64, "inter": 176, "heads": 4, "vocab": 32000}


def _hostfile(tmp_path_factory, slots: int) -> str:
    p = tmp_path_factory.mktemp("hosts") / f"slots{slots}"
    p.write_text(f"localhost slots={slots}\n")
    return str(p)


def _run(tmp_path_factory, job: str, slots: int, *sets: str):
    out = tmp_path_factory.mktemp("runs")
    proc, run_dir = launch(job, out, "--hostfile", _hostfile(tmp_path_factory, slots),
                           "--set", f"train.max_steps={STEPS}", *QUICK, *sets)
    assert_ok(proc)
    return run_dir


def _assert_same_losses(run_dir, ref_dir):
    return assert_same_losses(run_dir, ref_dir, STEPS, REL_TOL)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, ds_ops):
    """llama-tiny on ONE rank: the sequence-parallel config with sequence_parallel_size = 1 (plain HF model)."""
    return _run(tmp_path_factory, "jobs/fine_tune_sequence_parallel.yaml", 1, "ds.sequence_parallel_size=1")


@pytest.mark.distributed
def test_sequence_parallel_equals_one_rank_and_splits_the_sequence(tmp_path_factory, ref):
    run_dir = _run(tmp_path_factory, "jobs/fine_tune_sequence_parallel.yaml", 2, "train.export=false")
    _assert_same_losses(run_dir, ref)
    s = summary(run_dir)
    assert s["layout"] == "world 2 = dp 1 x tp 1 x pp 1 x sp 2"
    ranks, h = s["ranks"], LLAMA_TINY["heads"]
    assert [r["seq_slice"] for r in ranks] == [[0, 16], [16, 32]]
    for r in ranks:
        assert r["strategy"] == "sequence_parallel" and r["seq_len"] == 32
        # all heads of 16 tokens before the all-to-all, half the heads of all 32 tokens after it
        assert r["shapes"]["qkv_before_all_to_all"] == [2, 16, h, 16]
        assert r["shapes"]["attention_qkv_after_all_to_all"] == [2, 32, h // 2, 16]
        assert r["params_local"] == summary(ref)["ranks"][0]["params_local"]  # the model is whole on each


def _block_shapes(tp: int) -> dict[str, list[int]]:
    hd, i = LLAMA_TINY["hidden"], LLAMA_TINY["inter"]
    return {"self_attn.q_proj": [hd // tp, hd], "self_attn.k_proj": [hd // tp, hd],
            "self_attn.v_proj": [hd // tp, hd], "self_attn.o_proj": [hd, hd // tp],
            "mlp.gate_proj": [i // tp, hd], "mlp.up_proj": [i // tp, hd], "mlp.down_proj": [hd, i // tp]}


@pytest.mark.distributed
def test_pipeline_x_tensor_parallel_equals_one_rank(tmp_path_factory, ref):
    run_dir = _run(tmp_path_factory, "jobs/fine_tune_pipeline_tensor_parallel.yaml", 4)
    _assert_same_losses(run_dir, ref)
    s, ref_params = summary(run_dir), summary(ref)["ranks"][0]["params_local"]
    assert s["layout"] == "world 4 = dp 1 x tp 2 x pp 2"
    ranks = s["ranks"]
    assert [(r["stage"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["strategy"] == "pipeline_tensor_parallel" for r in ranks)
    assert ranks[0]["layer_types"] == ["LlamaEmbed", "LlamaBlock"]
    assert ranks[2]["layer_types"] == ["LlamaBlock", "Norm", "Head"]
    hd, i = LLAMA_TINY["hidden"], LLAMA_TINY["inter"]
    block_linears = 4 * hd * hd + 3 * hd * i
    for r in ranks:
        assert r["split_shapes"] == _block_shapes(2)
    # one tensor rank of each stage holds half of its block's matrices; together the two stages of
    # one tensor rank hold the model less the other tensor rank's halves of both blocks
    assert ranks[0]["params_local"] + ranks[2]["params_local"] == ref_params - 2 * block_linears // 2
    assert ranks[0]["params_local"] == ranks[1]["params_local"]
    # the export gathers the slices: whole matrices under the HF names
    from safetensors.torch import load_file
    weights = load_file(str(run_dir / "hf" / "model.safetensors"))
    assert list(weights["model.layers.1.mlp.down_proj.weight"].shape) == [hd, i]
    assert list(weights["model.layers.0.self_attn.q_proj.weight"].shape) == [hd, hd]
    assert sum(w.numel() for w in weights.values()) == ref_params


@pytest.mark.distributed
def test_data_x_tensor_parallel_equals_one_rank(tmp_path_factory, ref):
    """dp2 x tp2 through DeepSpeed AutoTP: 2 replicas of a 2-way split, micro 2 x accum 2 x dp 2 = 8."""
    run_dir = _run(tmp_path_factory, "jobs/fine_tune_tensor_parallel.yaml", 4, "ds.gradient_accumulation_steps=2",
                   "train.export=false")
    _assert_same_losses(run_dir, ref)
    s = summary(run_dir)
    assert s["layout"] == "world 4 = dp 2 x tp 2 x pp 1"
    assert [r["tp_rank"] for r in s["ranks"]] == [0, 1, 0, 1]
    assert [r["samples"] for r in s["ranks"]] == [STEPS * 4] * 4  # a tp pair reads the same 4 per step


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
