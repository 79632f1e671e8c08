"""MFU: FLOPs per token (hand count, and torch's FlopCounterMode), the cached matmul peak, the MFU in
a run's summary.json / metrics.jsonl, and a bf16 config on 2 gloo ranks (launcher/py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_ok, launch, needs_bf16, read_metrics, summary

from launcher.common.cache import table_peak
from launcher.estimate.flops import token_flops
from launcher.estimate.shape import count_params
from launcher.rank.mfu import Meter, model_flops, summary_rows
from launcher.rank.peak import Peak, measure_matmul, peak
from launcher.tools.peak import main
from tasks.presets import PRESETS, VOCAB, preset_flops

SEQ = 64


def test_flops_per_token_hand_count_llama_58m():
    """llama-58m (h 512, i 1408, 8 layers, 8 heads, vocab 32,000, untied) at s = 512, by hand."""
    h, i, layers, vocab, s = 512, 1408, 8, 32000, 512
    per_layer = 4 * h * h + 3 * h * i  # q, k, v, o + gate, up, down
    n = layers * per_layer + vocab * h  # + LM head; the embedding lookup is not a matmul
    assert n == 42_074_112
    want = 6 * n + 12 * layers * h * s
    got = preset_flops("llama-58m", s)
    assert got.total == want == 277_610_496
    assert got.matmul_params == n and got.attention == 12 * layers * h * s
    assert got.formula == "6N + 12*L*h*s"
    # N is the parameter count less the embedding and the norms
    total, _ = count_params(PRESETS["llama-58m"], VOCAB["llama-sp"])
    assert n == total - vocab * h - layers * 2 * h - h


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_flops_per_token_matches_flop_counter(name):
    """One forward + backward under torch.utils.flop_counter (eager attention: torch counts its bmm,
    not the CPU SDPA kernel) equals the formula within 2 % (it counts matmuls only, as the formula)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from tasks.causal_lm import preset_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(name, VOCAB[PRESETS[name]["tokenizer"]]),
                                             attn_implementation="eager")
    x = torch.randint(0, 1000, (2, SEQ))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=x, labels=x).loss.backward()
    measured = counter.get_total_flops() / x.numel()
    formula = model_flops(model, SEQ)
    assert formula.total == preset_flops(name, SEQ).total  # from the live model = from the preset
    assert measured == pytest.approx(formula.total, rel=0.02)


def test_lora_flops_formula_against_flop_counter():
    """LoRA: 4N (frozen base: forward + backward through activations) + 6A + attention; torch counts
    ~1 % less (the first block's frozen projections need no input gradient)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from tasks.causal_lm import preset_config
    from tasks.lora import apply_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(preset_config("llama-small", 32000), attn_implementation="eager")
    model = apply_lora(base, "CAUSAL_LM", 8, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"])
    x = torch.randint(0, 1000, (2, SEQ))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=x, labels=x).loss.backward()
    f = model_flops(model, SEQ)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert f.adapter_params == adapters > 0 and f.formula.startswith("4N")
    assert f.total == 4 * f.matmul_params + 6 * adapters + f.attention
    assert counter.get_total_flops() / x.numel() == pytest.approx(f.total, rel=0.02)


def test_peak_is_cached_per_dtype_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("LABS_CACHE_DIR", str(tmp_path))
    calls = []

    def fake(dtype, threads, device):
        calls.append((dtype, threads))
        return {"flops": {"fp32": 1e11, "bf16": 5e11}[dtype] * threads, "size": 64}

    first = peak("fp32", 1, measure=fake)
    again = peak("fp32", 1, measure=fake)
    assert calls == [("fp32", 1)]  # the second call read the cache
    assert first.flops == again.flops == 1e11
    assert "measured now" in first.source and "cached" in again.source
    assert peak("bf16", 1, measure=fake).flops == 5e11
    assert peak("fp32", 2, measure=fake).flops == 2e11
    assert calls == [("fp32", 1), ("bf16", 1), ("fp32", 2)]
    data = json.loads((tmp_path / "peak.json").read_text())
    assert len(data) == 3 and all(k.startswith("cpu: ") for k in data)
    assert any("| bf16 | 1 threads" in k for k in data)
    # --refresh measures again and keeps the higher figure; --replace keeps the new one
    slower = lambda d, t, dev: (calls.append((d, t)), {"flops": 5e10, "size": 64})[1]  # noqa: E731
    assert peak("fp32", 1, refresh=True, measure=slower).flops == 1e11 and calls[-1] == ("fp32", 1)
    assert peak("fp32", 1, refresh=True, replace=True, measure=slower).flops == 5e10
    assert peak("fp32", 1, measure=fake).flops == 5e10


def test_real_probe_and_labs_peak(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LABS_CACHE_DIR", str(tmp_path))
    r = measure_matmul("fp32", 1, sizes=(256,), repeats=2)
    assert r["size"] == 256 and 1e8 < r["flops"] < 1e14
    monkeypatch.setattr("launcher.rank.peak.measure_matmul", lambda d, t, dev: {"flops": 3e11, "size": 128})
    assert main(["--dtype", "fp32", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "300.0 GFLOP/s" in out and str(tmp_path / "peak.json") in out


def test_gpu_datasheet_peaks():
    assert table_peak("cuda: NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert table_peak("cuda: NVIDIA H100 PCIe", "bf16") == 756e12
    assert table_peak("cuda: NVIDIA H200", "bf16") == 989e12
    assert table_peak("cuda: NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert table_peak("cuda: NVIDIA L40S", "bf16") == 362e12
    assert table_peak("cuda: NVIDIA A100-SXM4-80GB", "fp32") is None  # measured instead
    assert table_peak("cuda: Some Future GPU", "bf16") is None


def test_meter_fields_and_summary_rows():
    f = token_flops(1000, 2, 8, 16)  # 6000 + 12*2*8*16 = 9072
    assert f.total == 9072
    m = Meter(f, Peak(1e6, "fp32", 1, "cpu: test", "measured"), ranks=2)
    fields = m.fields(tokens=100, seconds=2.0)
    assert fields["flops_per_s"] == pytest.approx(9072 * 50)
    assert fields["mfu"] == pytest.approx(9072 * 50 / 2e6)
    s = m.summary(100, 2.0)
    assert s["peak_flops"] == 2e6 and "2 ranks x" in s["peak"]
    rows = dict(summary_rows(s))
    assert rows["MFU"].startswith("22.7% of 2.0 MFLOP/s")  # the denominator beside the MFU


@pytest.mark.distributed
def test_mfu_in_one_process_dry_run(tmp_path):
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "launcher.worker", "--job", "jobs/fine_tune_dry_run.yaml",
                           "--set", f"train.output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert_ok(proc)
    run_dir = next(p.parent for p in tmp_path.glob("*/*/summary.json"))
    s = summary(run_dir)
    assert 0 < s["mfu"] < 1 and s["flops_per_s"] > 0 and s["peak_flops"] > 0
    assert s["flops_per_token"] == preset_flops("llama-tiny", 32).total
    assert "fp32" in s["peak"] and s["flops_formula"] == "6N + 12*L*h*s"
    rows = read_metrics(run_dir)
    assert rows and all(0 < r["mfu"] < 1 and r["flops_per_s"] > 0 for r in rows)
    assert "MFU" in proc.stdout and "FLOPs per token" in proc.stdout


@pytest.mark.distributed
@needs_bf16
def test_bf16_zero2_trains_on_two_gloo_ranks(tmp_path, ds_ops):
    """ds_configs/zero2_bf16.json: bf16 weights and activations, gradients reduced in fp32
    (`communication_data_type`); the comms logger shows 4 bytes per gradient element reduced."""
    proc, run_dir = launch("jobs/fine_tune_dry_run.yaml", tmp_path, "--ds-config", "ds_configs/zero2_bf16.json",
                           "--dry_run", "--max_steps", "2", "--set", "ds.comms_logger.enabled=true")
    assert_ok(proc)
    s = summary(run_dir)
    assert s["steps"] == 2 and s["world"] == 2 and s["zero_stage"] == 2
    assert math.isfinite(s["final_train_loss"]) and 9 < s["final_train_loss"] < 11
    assert "bf16" in s["peak"] and "2 ranks" in s["peak"] and 0 < s["mfu"] < 1
    cfg = json.loads((run_dir / "ds_config.json").read_text())
    assert cfg["bf16"]["enabled"] is True and cfg["communication_data_type"] == "fp32"
    comms = json.loads((run_dir / "comms_summary.json").read_text())["summary"]
    # llama-tiny's 4.2M gradients fit one 5e6-element bucket: one all-reduce of 4 bytes per element
    # (bf16 on the wire would be 2 bytes per element)
    params = s["ranks"][0]["params_local"]
    assert max(int(size) for size in comms["all_reduce"]) == 4 * params


def test_bf16_configs_differ_from_fp32_only_in_precision():
    for fp32 in ("zero0", "zero1", "zero2", "zero3", "pipeline", "tensor_parallel", "model_parallel"):
        a = json.loads((REPO / "ds_configs" / f"{fp32}.json").read_text())
        b = json.loads((REPO / "ds_configs" / f"{fp32}_bf16.json").read_text())
        # the data-parallel configs leave bf16 to the job (train.bf16: true/false/auto; unset: off)
        assert a["bf16"] == {"enabled": "auto" if fp32.startswith("zero") else False}
        assert b.pop("bf16") == {"enabled": True}
        assert b.pop("communication_data_type") == "fp32"
        a.pop("bf16")
        assert a == b


def test_compare_report_has_mfu(tmp_path):
    from launcher.tools.compare import write_report
    r = {"strategy": "zero0@1", "world": 1, "dp": 1, "tp": 1, "pp": 1, "micro_batches": 4, "tokens_per_s": 1000.0,
         "step_time_s": 0.5, "peak_rss_bytes": [2**30], "state_bytes": [2**28], "global_batch": 8,
         "state_detail": [{"params": 1, "master": 0, "grads": 1, "optimizer": 2}], "formula_fp32_bytes": [2**28],
         "formula_mixed_bytes": None, "final_loss": 6.0, "losses": [7.0, 6.0], "precision": "bf16",
         "flops_per_s": 5e10, "mfu": 0.25, "peak": "200.0 GFLOP/s (bf16, 2 threads, measured)"}
    write_report([r], Path(tmp_path), "jobs/compare.yaml", 2, "labs compare ...")
    text = (tmp_path / "report.md").read_text()
    assert "| 50.0 GFLOP/s | 25.0% |" in text and "200.0 GFLOP/s (bf16" in text


def test_bench_harness_tables_and_breakdown_parser():
    """bench/harness.py: DeepSpeed's wall_clock_breakdown lines parsed; medians, min-max and per-round
    ratios against the baseline; the MFU from the preset's FLOPs and the peak of the arm's threads."""
    sys.path.insert(0, str(REPO))
    from bench import harness

    line = "[Rank 0] time (ms) | fwd: 362.24 | bwd: 811.15 | bwd_inner: 630.02 | bwd_allreduce: 181.06 | step: 646.20"
    assert [float(x) for x in harness.BREAKDOWN.search(line).groups()] == [362.24, 811.15, 630.02, 181.06, 646.2]
    w = harness.Workload(seq=64, global_batch=8)
    arms = [harness.Arm("base", "torch", 2, 1, 2), harness.Arm("fast", "labs", 1, 2, 8)]
    runs = [{"arm": a, "repeat": r, "tokens_per_s": t, "step_s": 1.0, "wall_s": 20.0, "losses": [7.0],
             "others_load": 0.1, "exit": 0}
            for a, r, t in [("base", 0, 100.0), ("fast", 0, 200.0), ("base", 1, 50.0), ("fast", 1, 150.0),
                            ("base", 2, 100.0), ("fast", 2, 100.0)]]
    peak = Peak(1e11, "fp32", 1, "cpu: test", "measured")
    rows = harness.summarize(arms, w, runs, {("fp32", 1): peak, ("fp32", 2): peak}, "base")
    fast = rows[1]
    assert (fast["tokens_per_s"], fast["tokens_per_s_min"], fast["tokens_per_s_max"]) == (150.0, 100.0, 200.0)
    assert fast["ratio"] == 2.0 and (fast["ratio_min"], fast["ratio_max"]) == (1.0, 3.0)  # 200/100, 150/50, 100/100
    assert fast["best_ratio"] == 2.0 and fast["accum"] == 1 and rows[0]["accum"] == 2
    assert fast["mfu"] == pytest.approx(150 * preset_flops("llama-small", 64).total / 1e11)
    assert rows[0]["mfu"] == pytest.approx(100 * preset_flops("llama-small", 64).total / 2e11)  # 2 ranks
    md = harness.table(rows, "base")
    assert "| fast | 1 x 2 | fp32 | 8 x 1 x 1 | fused | 150 (100-200) | 2.00x (1.00-3.00) |" in md


def test_bf16_auto_follows_the_machine_and_the_job(tmp_path, monkeypatch):
    """train.bf16: auto turns bf16 on where the CPU lists amx_bf16/avx512_bf16 and off where it lists
    neither; a job that says nothing keeps fp32 (the equivalence tests' jobs)."""
    from launcher.launch.make_plan import make_plan

    for flags, expect in (("fpu sse2 avx512f amx_bf16 amx_tile", True), ("fpu sse2 avx2", False)):
        info = tmp_path / f"cpuinfo-{expect}"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr("launcher.config.ds.optim.CPUINFO", info)
        plan = make_plan("jobs/fine_tune_zero2.yaml", dry_run=True)
        assert plan.ds_config["bf16"]["enabled"] is expect
        assert any("bf16.enabled" in n and "train.bf16 = auto" in n for n in plan.notes), plan.notes
        assert make_plan("jobs/demo.yaml").ds_config["bf16"]["enabled"] is False  # unset: fp32


def test_compile_is_planned_for_data_parallel_and_refused_elsewhere():
    """train.compile (DeepSpeed's engine.compile) runs for data parallelism; a layout it was not made for
    is refused by the plan with the field to change (a compiled run is measured in docs/benchmarks.md:
    the suite cannot afford its minutes of inductor compilation on 2 cores)."""
    from launcher.common.errors import LabsError
    from launcher.launch.make_plan import make_plan
    plan = make_plan("jobs/fine_tune_dry_run.yaml", ds_config="ds_configs/zero2.json", sets=["train.compile=true"],
                     dry_run=True)
    assert plan.job.train.compile is True
    with pytest.raises(LabsError, match="train.compile = true with world 2 = .*pp 2.*set train.compile to false"):
        make_plan("jobs/fine_tune_pipeline.yaml", sets=["train.compile=true"], dry_run=True)


def test_bench_plain_loop_takes_the_labs_hyper_parameters_and_deepspeeds_warmup():
    """bench/torch_loop.py (and the HF Trainer arm) train with what `labs launch` resolves for the job:
    from scratch lr 3e-3 / 5 warm-up steps, a pretrained model lr 5e-5 / 10; and the plain loop's lr factor
    per update equals DeepSpeed's WarmupLR (log, from 0) on a real optimizer, update by update."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupLR
    sys.path.insert(0, str(REPO))
    from bench.torch_loop import labs_hparams, warmup_factor

    scratch = labs_hparams("jobs/compare.yaml", [], 2)
    assert (scratch["lr"], scratch["warmup"], scratch["weight_decay"], scratch["clip"]) == (3e-3, 5, 0.01, 1.0)
    tuned = labs_hparams("jobs/compare.yaml", ["model.name=smollm2-135m"], 1)
    assert (tuned["lr"], tuned["warmup"], tuned["weight_decay"]) == (5e-5, 10, 0.0)
    for warmup in (5, 10):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = WarmupLR(opt, warmup_min_lr=0, warmup_max_lr=1.0, warmup_num_steps=warmup)  # steps once itself
        ds = []
        for _ in range(warmup + 3):  # what the engine does per update: the optimizer step, then sched.step()
            ds.append(opt.param_groups[0]["lr"])
            sched.step()
        ours = [warmup_factor(k, warmup) for k in range(warmup + 3)]  # LambdaLR: update k+1 takes factor k
        assert ours == pytest.approx(ds, abs=1e-12), (warmup, ours, ds)
