"""Tensor parallelism (DeepSpeed AutoTP, tp 2; and dp 2 x tp 2) and sequence parallelism (Ulysses, sp 2),
each equal to ONE rank over real updates (tests/equivalence.py: every step's loss and gradient norm,
the evaluation, the exported weights), also under activation checkpointing; each rank holds what the
strategy says; and planted faults (a tensor-parallel all-reduce off by 1e-4, the sequence ranks' gradient
sum skipped, an all-to-all off by 1e-4) are caught.
"""

from __future__ import annotations

import pytest
from conftest import summary
from equivalence import STEPS, assert_caught, assert_equivalent, run

pytestmark = pytest.mark.distributed

TOL = 1e-5  # fp32; measured: see docs/strategies.md "The proofs"
CKPT = ("ds.activation_checkpointing.partition_activations=true",)
HIDDEN, INTER, VOCAB, HEADS = 64, 176, 32000, 4  # llama-tiny


@pytest.mark.parametrize("ckpt", [False, True])
def test_tensor_parallel_equals_one_rank_and_splits_matrices(ckpt, one_rank, tmp_path):
    rd = run(tmp_path, "ds_configs/tensor_parallel.json", 2, *(CKPT if ckpt else ()))
    assert_equivalent(rd, one_rank, TOL)
    ranks, ref = summary(rd)["ranks"], summary(one_rank)["ranks"][0]
    hd, i, tp = HIDDEN, INTER, 2
    want = {"self_attn.q_proj": [hd // tp, hd], "self_attn.k_proj": [hd // tp, hd],
            "self_attn.v_proj": [hd // tp, hd], "self_attn.o_proj": [hd, hd // tp],
            "mlp.gate_proj": [i // tp, hd], "mlp.up_proj": [i // tp, hd], "mlp.down_proj": [hd, i // tp]}
    for r in ranks:
        assert r["strategy"] == "tensor_parallel"
        assert {k.split("layers.0.")[1].removesuffix(".weight"): v
                for k, v in r["split_shapes"].items() if "layers.0." in k} == want
        assert r["split_shapes"]["lm_head.weight"] == [VOCAB // tp, hd]  # vocab-parallel head
        split = 2 * (4 * hd * hd + 3 * hd * i) + VOCAB * hd  # the blocks' linears + the head
        assert r["params_local"] == ref["params_local"] - split // tp
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    # HF generate on the AutoTP-sliced model (both ranks in step) answers the prompts as the one rank does
    s, one = summary(rd), summary(one_rank)
    assert s["samples_before"] == one["samples_before"] and s["samples_after"] == one["samples_after"]
    assert s["samples_after"] and s["samples_after"] != s["samples_before"]
    if ckpt:  # HF says so when gradient checkpointing is on
        assert "incompatible with gradient checkpointing" in (rd / "logs" / "rank0.log").read_text()


def test_data_x_tensor_parallel_equals_one_rank(one_rank, tmp_path):
    """dp 2 x tp 2 through AutoTP: 2 replicas of a 2-way split, micro 2 x accumulation 2 x dp 2 = 8."""
    rd = run(tmp_path, "ds_configs/tensor_parallel.json", 4, "ds.gradient_accumulation_steps=2")
    assert_equivalent(rd, one_rank, TOL)
    s = summary(rd)
    assert s["layout"] == "world 4 = dp 2 x tp 2 x pp 1"
    assert [r["tp_rank"] for r in s["ranks"]] == [0, 1, 0, 1]
    assert [r["samples"] for r in s["ranks"]] == [STEPS * 4] * 4  # a tp pair reads the same 4 per step


@pytest.mark.parametrize("ckpt", [False, True])
def test_sequence_parallel_equals_one_rank_and_splits_the_sequence(ckpt, one_rank, tmp_path):
    rd = run(tmp_path, "ds_configs/sequence_parallel.json", 2, *(CKPT if ckpt else ()))
    assert_equivalent(rd, one_rank, TOL)
    s = summary(rd)
    assert s["layout"] == "world 2 = dp 1 x tp 1 x pp 1 x sp 2"
    assert [r["seq_slice"] for r in s["ranks"]] == [[0, 16], [16, 32]]
    assert s["samples_after"] is None and s["samples_skipped"].startswith("sequence parallel: ")
    for r in s["ranks"]:
        assert r["strategy"] == "sequence_parallel" and r["seq_len"] == 32
        # all heads of 16 tokens before the all-to-all, half the heads of all 32 tokens after it
        assert r["shapes"]["qkv_before_all_to_all"] == [2, 16, HEADS, 16]
        assert r["shapes"]["attention_qkv_after_all_to_all"] == [2, 32, HEADS // 2, 16]


# ---------------------------------------------------------------- planted faults: the check must fail

def test_a_tensor_parallel_all_reduce_off_by_1e4_is_caught(one_rank, tmp_path):
    """Rank 1 adds its row-parallel partial sums (forward) and its input-gradient parts (backward)
    scaled by 1 + 1e-4 into AutoTP's all-reduces."""
    rd = run(tmp_path, "ds_configs/tensor_parallel.json", 2, fault={"LABS_FAULT": "all_reduce:scale:1e-4"})
    assert_caught(rd, one_rank, TOL, factor=3)


def test_the_sequence_ranks_gradient_sum_skipped_is_caught(one_rank, tmp_path):
    """The bug DeepSpeed 0.19's own `sequence_parallel_size` handling has (trap 18): the sequence ranks'
    gradient parts never added up. Planted by skipping the gradient reduction over the 2 ranks (ZeRO-1's
    all-reduce) on both: each rank steps with its own part only."""
    rd = run(tmp_path, "ds_configs/sequence_parallel.json", 2,
             fault={"LABS_FAULT": "all_reduce,reduce,reduce_scatter_tensor:skip:0", "LABS_FAULT_RANK": "all"})
    assert_caught(rd, one_rank, TOL)


def test_an_all_to_all_off_by_1e4_is_caught(one_rank, tmp_path):
    """Rank 1 sends q, k, v and the attention output (and their gradients) scaled by 1 + 1e-4 in
    Ulysses' all-to-alls."""
    rd = run(tmp_path, "ds_configs/sequence_parallel.json", 2, fault={"LABS_FAULT": "all_to_all_single:scale:1e-4"})
    assert_caught(rd, one_rank, TOL, factor=3)
