"""Benchmark (not a test): one AdamW step on a preset's parameters, per implementation and thread count.

    .venv/bin/python bench/optimizers.py [--model llama-small] [--threads 1 2] [--steps 10] [--rounds 3]
        [--dtype fp32] [--ds_cpu_adam] [--out bench/results/optimizers]

Implementations, interleaved round by round (A B C A B C ...) so that a machine whose speed drifts
affects each alike: torch.optim.AdamW as the shipped configs build it (`"torch_adam": true`; on CPU
torch's default is the per-parameter for-loop), with `foreach=True` (one multi-tensor kernel per op),
with `fused=True` (one fused kernel per parameter group), and with --ds_cpu_adam DeepSpeed's
DeepSpeedCPUAdam (a C++ op JIT-built once, ~155 s). Reported: the median time per step over all
rounds, min-max of the rounds' medians, and the ratio against the default measured in the same run.
Gradients are random and fixed; the parameters change from step to step as in training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)


def make_params(model: str, dtype):
    import torch

    from tasks.presets import PRESETS, VOCAB
    cfg = PRESETS[model]
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], VOCAB[cfg["tokenizer"]]
    shapes = [(v, h), (v, h), (h,)] + n * ([(h, h)] * 4 + [(i, h), (i, h), (h, i), (h,), (h,)])
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype) * 1e-3
    return params


def make_optimizer(kind: str, params):
    import torch
    if kind == "torch (default)":
        return torch.optim.AdamW(params, **HYPER)
    if kind == "torch foreach":
        return torch.optim.AdamW(params, foreach=True, **HYPER)
    if kind == "torch fused":
        return torch.optim.AdamW(params, fused=True, **HYPER)
    if kind == "DeepSpeedCPUAdam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, adamw_mode=True, **HYPER)
    raise KeyError(kind)


def main() -> int:
    import torch
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-small")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--ds_cpu_adam", action="store_true", help="also DeepSpeedCPUAdam (JIT build ~155 s once)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "optimizers"))
    a = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    kinds = ["torch (default)", "torch foreach", "torch fused"] + (["DeepSpeedCPUAdam"] * a.ds_cpu_adam)
    results = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        opts = {}
        for k in kinds:
            params = make_params(a.model, dtype)
            opts[k] = make_optimizer(k, params)
            opts[k].step()  # allocates the moments
        n_params = sum(q.numel() for q in params)
        per_round: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(a.rounds):
            for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order each round
                times = []
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    opts[k].step()
                    times.append(time.perf_counter() - t0)
                per_round[k].append(statistics.median(times))
        base = statistics.median(per_round[kinds[0]])
        for k in kinds:
            med = statistics.median(per_round[k])
            results.append({"model": a.model, "params": n_params, "dtype": a.dtype, "threads": threads, "impl": k,
                            "step_s": med, "min_s": min(per_round[k]), "max_s": max(per_round[k]),
                            "speedup_vs_default": base / med, "rounds": per_round[k]})
            print(f"{a.model} {n_params / 1e6:.1f}M {a.dtype} {threads} thread(s)  {k:<18} {1000 * med:8.1f} ms "
                  f"({1000 * min(per_round[k]):.1f}-{1000 * max(per_round[k]):.1f})  x{base / med:.2f} vs default",
                  flush=True)
    rows = ["| model | threads | implementation | ms / step (median) | min-max of rounds | speed-up vs default |",
            "|---|---:|---|---:|---:|---:|"]
    rows += [f"| {r['model']} ({r['params'] / 1e6:.1f}M, {r['dtype']}) | {r['threads']} | {r['impl']} "
             f"| {1000 * r['step_s']:.1f} | {1000 * r['min_s']:.1f}-{1000 * r['max_s']:.1f} "
             f"| {r['speedup_vs_default']:.2f}x |" for r in results]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/optimizers.py " + " ".join(sys.argv[1:])
    (out / "optimizers.json").write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
    (out / "optimizers.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
