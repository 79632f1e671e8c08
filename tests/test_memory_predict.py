"""Will it fit? The plan's per-rank peak-memory prediction (launcher/memory.py) against what runs measured.

The model-state formulas are checked to the byte against StateMeter's counts of the engines' tensors; the
whole prediction against peaks measured on this machine by `labs compare` (recorded below, with the command
that produced them); the plan's lines and its --memory advice in-process; and one real 2-rank launch checks
that every run measures its peak, reports it beside the prediction in metrics.jsonl and summary.json, and
lands within the stated tolerance.
"""

from __future__ import annotations

import pytest
from conftest import assert_ok, launch, read_metrics, summary

from launcher.common.cache import store_baseline
from launcher.common.layout import Layout
from launcher.common.text import parse_size
from launcher.estimate.memory import Setup, model_state_bytes, per_rank, predict, stage_params, zero_model_state_bytes
from launcher.estimate.shape import Shape
from tasks.presets import PRESETS, VOCAB

SMALL = Shape.of(PRESETS["llama-small"], VOCAB["llama-sp"])
MiB = 2**20


def setup(config: str, seq: int = 64, world: int = 2, **kw) -> Setup:
    """The Setup of ds_configs/<config>.json on `world` ranks, with the compare job's global batch (8)."""
    import json

    from conftest import REPO

    from launcher.config.ds.load import resolve_batch
    cfg = json.loads((REPO / "ds_configs" / f"{config}.json").read_text())
    layout = Layout.from_ds_config(cfg, world)
    cfg = resolve_batch(cfg, layout.dp, config)
    s = Setup.of(cfg, layout, seq, device="cpu")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


# StateMeter's counts (bytes) on rank 0 of `labs compare jobs/compare.yaml` (llama-small, fp32, 2 ranks):
# params, fp32 master, gradients (peak over the first step), Adam moments (+ a 4-byte step count per tensor).
MEASURED_STATES = {
    "zero0": (19597568, 78390272, 0, 78390272, 156780700),
    "zero1": (19597568, 78390272, 39195136, 78390272, 78390276),
    "zero2": (19597568, 78390272, 39195136, 39195136, 78390276),
    "zero3": (19597568, 39195136, 39195136, 78390272, 78390276),
    "zero3_offload": (19597568, 39195136, 39195136, 78390272, 78390276),
    "pipeline": (9798656, 39194624, 0, 39194624, 78389324),
    "tensor_parallel": (13895936, 55583744, 55583744, 55583744, 111167492),
}


@pytest.mark.parametrize("config", sorted(MEASURED_STATES))
def test_fp32_model_states_equal_what_the_engines_hold(config):
    """fp32 Adam is 16 B/param (+ ZeRO's 4 B master partition), not DeepSpeed's mixed-precision 20: the
    measured ZeRO-0 state is 299 MiB, which the plan used to print as 374."""
    n_local, params, master, grads, opt = MEASURED_STATES[config]
    s = setup(config)
    assert stage_params(SMALL, s)[0] == n_local
    got = model_state_bytes(n_local, s)
    assert (got["params"], got["master"], got["grads"]) == (params, master, grads)
    assert 0 <= opt - got["optimizer"] < 1024  # Adam's step counters


def test_bf16_model_states_are_deepspeeds_mixed_precision_accounting():
    for stage in range(4):
        s = setup("zero0_bf16", stage=stage)
        largest = SMALL.embed
        got = sum(model_state_bytes(SMALL.params, s, largest).values())
        if stage in (2, 3):  # the stages DeepSpeed has an estimator for (tests/test_memory_and_configs.py)
            assert got == zero_model_state_bytes(stage, SMALL.params, largest, 2)
        else:
            assert got == pytest.approx(zero_model_state_bytes(stage, SMALL.params, largest, 2), abs=8)


def test_pipeline_stages_hold_their_layers_and_the_last_stage_the_logits():
    s = setup("pipeline")
    p0, p1 = stage_params(SMALL, s)
    assert p0 + p1 == SMALL.params and p0 == MEASURED_STATES["pipeline"][0]
    first, last = predict(SMALL, s)
    assert first.parts["logits + loss"] == 0 < last.parts["logits + loss"]
    assert "2 micro-batches in flight" in " ".join(first.parts)  # 1F1B: stage 0 of 2 holds 2 of its 4
    mp = predict(SMALL, setup("model_parallel"))
    assert mp[1].parts["logits + loss"] == 4 * last.parts["logits + loss"]  # one micro-batch of 8, not 2


def test_activation_checkpointing_and_sequence_length_move_the_activations():
    base = predict(SMALL, setup("zero0", seq=512))[0]
    ckpt = predict(SMALL, setup("zero0", seq=512, checkpointing=True))[0]
    assert ckpt.parts["activations"] < base.parts["activations"] / 2
    assert ckpt.parts["logits + loss"] == base.parts["logits + loss"]
    short = predict(SMALL, setup("zero0", seq=64))[0]
    assert base.parts["logits + loss"] == 8 * short.parts["logits + loss"]


# Peaks above the baseline measured by `labs compare` on this machine (2 ranks, 4 steps, fp32, WikiText-2),
# MiB per rank: (model, strategy, block_size) -> [rank 0, rank 1]. Produced by
#   labs compare jobs/compare.yaml --strategies zero0,zero1,zero2,zero3,zero3_offload,pipeline,model_parallel,
#       tensor_parallel --steps 4 [--set data.block_size=512] [--set model.name=llama-58m data.block_size=128]
# The constants in launcher/memory.py were fitted to llama-small at block_size 64 and to llama-58m's ZeRO-1/3
# (which showed that ZeRO's extra copies do not grow with the model: glibc's 32 MiB mmap threshold).
MEASURED_PEAKS = {
    ("llama-small", "zero0", 64): [694, 700],
    ("llama-small", "zero1", 64): [708, 686],
    ("llama-small", "zero2", 64): [635, 645],
    ("llama-small", "zero3", 64): [966, 891],
    ("llama-small", "zero3_offload", 64): [896, 889],
    ("llama-small", "pipeline", 64): [451, 554],
    ("llama-small", "model_parallel", 64): [410, 610],
    ("llama-small", "tensor_parallel", 64): [835, 812],
    ("llama-small", "zero0", 512): [1135, 1241],
    ("llama-small", "zero1", 512): [1179, 1195],
    ("llama-small", "zero2", 512): [1130, 1169],
    ("llama-small", "zero3", 512): [1398, 1326],
    ("llama-small", "zero3_offload", 512): [1444, 1381],
    ("llama-small", "pipeline", 512): [551, 1100],
    ("llama-small", "model_parallel", 512): [599, 2648],
    ("llama-small", "tensor_parallel", 512): [1112, 1110],
    ("llama-58m", "zero1", 128): [1438, 1479],
    ("llama-58m", "zero3", 128): [1537, 1499],
    ("llama-58m", "pipeline", 128): [948, 1149],
    ("llama-58m", "tensor_parallel", 128): [1515, 1733],
}


@pytest.mark.parametrize("key", sorted(MEASURED_PEAKS), ids=lambda k: f"{k[0]}-{k[1]}-s{k[2]}")
def test_prediction_within_20_percent_of_the_measured_peak(key):
    model, config, seq = key
    shape = Shape.of(PRESETS[model], VOCAB["llama-sp"])
    pred = per_rank(predict(shape, setup(config, seq=seq)))
    for rank, measured in enumerate(MEASURED_PEAKS[key]):
        ratio = pred[rank].above_baseline / (measured * MiB)
        assert 0.8 <= ratio <= 1.2, f"rank {rank}: predicted {pred[rank].above_baseline / MiB:.0f} MiB, " \
                                    f"measured {measured} MiB (ratio {ratio:.2f}): {pred[rank].parts}"


# Single launches outside the compare job (labs launch ... --set train.max_steps=3), MiB per rank:
# (label, model, ds_config, block_size, data through datasets.load_dataset) -> [rank 0, rank 1]
OTHER_PEAKS = {
    ("compare.yaml, one micro-batch", "llama-small", "cpu_dry_run", 64, True): [544, 577],
    ("built-in text, two micro-batches", "llama-small", "zero0", 64, False): [582, 564],
    ("fine_tune_dry_run.yaml", "llama-small", "cpu_dry_run", 32, False): [493, 494],
}


@pytest.mark.parametrize("key", sorted(OTHER_PEAKS), ids=lambda k: k[0])
def test_prediction_of_single_launches(key):
    _, model, config, seq, data_lib = key
    shape = Shape.of(PRESETS[model], VOCAB["llama-sp"])
    pred = per_rank(predict(shape, setup(config, seq=seq, datasets=data_lib)))
    for rank, measured in enumerate(OTHER_PEAKS[key]):
        ratio = pred[rank].above_baseline / (measured * MiB)
        assert 0.8 <= ratio <= 1.2, f"rank {rank}: predicted {pred[rank].above_baseline / MiB:.0f} MiB, " \
                                    f"measured {measured} MiB (ratio {ratio:.2f}): {pred[rank].parts}"


def test_sizes_parse():
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("512MiB") == 512 * MiB
    assert parse_size("8GB") == 8 * 10**9 and parse_size("8g") == 8 * 2**30 and parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_plan_prints_the_prediction_and_what_fits(monkeypatch, tmp_path):
    monkeypatch.setenv("LABS_CACHE_DIR", str(tmp_path))
    store_baseline(400 * MiB, "test")
    from launcher.launch.make_plan import make_plan
    from launcher.launch.render import render
    plan = make_plan("jobs/compare.yaml")
    out = render(plan, verbose=False)
    line = next(x for x in out.splitlines() if "memory per rank, predicted peak" in x)
    assert "framework 400.0 MiB" in line and "model states 299.0 MiB" in line  # fp32: 16 B/param at ZeRO-0
    assert "ZeRO-0: " in out and "<- this config" in out and "tensor parallel: " in out and "pipeline: " in out
    plan.memory_budget = "64GiB"
    assert "fits: " in render(plan, verbose=False)
    # just under this config's peak: it does not fit; what fits is listed fastest first
    peak = max(r.total for r in predict(SMALL, Setup.of(plan.ds_config, plan.layout, 64), 400 * MiB))
    plan.memory_budget = str(peak - MiB)
    out = render(plan, verbose=False)
    assert "DOES NOT FIT" in out and "fastest first" in out
    options = [x for x in out.splitlines() if x.strip()[:2] in ("1.", "2.", "3.")]
    assert options and all("--set ds.train_micro_batch_size_per_gpu=" in x for x in options)
    seconds = [float(x.split("~")[1].split(" s/step")[0]) for x in options]
    assert seconds == sorted(seconds)
    plan.memory_budget = "lots"
    from launcher.common.errors import LabsError
    with pytest.raises(LabsError, match="--memory: 'lots' is not a size"):
        render(plan, verbose=False)
    plan.memory_budget = "1MiB"
    assert "no strategy, micro-batch size or activation checkpointing" in render(plan, verbose=False)
    verbose = render(plan, verbose=True)
    assert "== peak memory per rank (predicted" in verbose and "optimizer step temporaries" in verbose


@pytest.mark.distributed
def test_every_run_measures_its_peak_beside_the_prediction(ds_ops, tmp_path):
    """A real 2-rank run (jobs/compare.yaml: llama-small on WikiText-2, ZeRO-0, 3 steps): each rank's measured
    peak above its baseline is in metrics.jsonl and summary.json with the prediction and their ratio, and the
    ratio is within 20%. (This configuration is one the constants were fitted to; llama-tiny's peak, ~200 MiB,
    moves by +-25 MiB from run to run, too much for a stable 20% check.)"""
    proc, rd = launch("jobs/compare.yaml", tmp_path, "--set", "train.max_steps=3", "data.max_eval_samples=4",
                      "train.checkpoint=false")
    assert_ok(proc)
    (rec,) = read_metrics(rd, "memory")
    s = summary(rd)
    assert s["memory"] == rec and rec["step"] == 3 and rec["device"] == "cpu"
    assert len(rec["measured_bytes"]) == 2 and all(b > 200 * MiB for b in rec["measured_bytes"])
    assert all(b > 200 * MiB for b in rec["baseline_bytes"])
    for r in s["ranks"]:
        assert r["memory_peak_bytes"] == rec["measured_bytes"][r["rank"]]
        assert r["memory_baseline_bytes"] + r["memory_peak_bytes"] <= r["peak_rss_bytes"] + 4 * MiB
    for ratio, p, b in zip(rec["ratio"], rec["predicted_bytes"], rec["measured_bytes"], strict=True):
        assert ratio == pytest.approx(p / b, abs=1e-3)
        assert 0.8 <= ratio <= 1.2, rec
