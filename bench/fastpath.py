"""Benchmark (not a test): which settings make one CPU machine train fastest, each measured against a
baseline in the same invocation.

    .venv/bin/python bench/fastpath.py [--repeats 3] [--seq 128] [--global_batch 16] [--steps 8]
        [--groups threads,optimizer,batch,precision] [--out bench/results/fastpath]

Groups of arms (all interleaved in one invocation; baseline `labs_1x2`: `labs launch` with 1 rank using
both cores, the whole global batch as one micro-batch, the shipped configs' optimizer, fp32):
- threads:   ranks x threads per rank: the plain PyTorch loop at 1x1, 1x2 and 2x1 (DDP, one core each),
             and labs at 1x2 and 2x1 (ZeRO-0)
- optimizer: torch AdamW as the configs build it (`"torch_adam": true`: the for-loop implementation on
             CPU), `foreach`, `fused` (ds_config `optimizer.params.fused: true`)
- batch:     the same tokens per optimizer step as 1 micro-batch, 2 and 8 micro-batches accumulated; and
             twice the tokens per optimizer step
- precision: bf16 (ds_configs/zero0_bf16.json) vs fp32, with the fused optimizer
- comm:      ZeRO-2 on 2 ranks x 1 core as shipped (overlap_comm off, 5e6-element buckets) against
             overlap_comm on, and 5e7-element buckets
- compile:   `train.compile: true` (torch.compile, inductor) vs eager, both with the fused optimizer; the
             compilation falls in the untimed first steps (--steps must leave timed ones after it)

The optimizer step alone, per implementation and thread count: bench/optimizers.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import REPO, Arm, Workload, interleave, machine, peaks, summarize, table  # noqa: E402

BASELINE = "labs_1x2"


def arms_for(w: Workload, groups: set[str]) -> list[Arm]:
    g = w.global_batch
    z0 = "ds_configs/zero0.json"
    arms = [Arm(BASELINE, "labs", 1, 2, g, z0, note="baseline")]
    if "threads" in groups:
        arms += [Arm("torch_1x1", "torch", 1, 1, g, note="plain PyTorch, 1 process, 1 thread"),
                 Arm("torch_1x2", "torch", 1, 2, g, note="plain PyTorch, 1 process, 2 threads"),
                 Arm("torch_ddp_2x1", "torch", 2, 1, g // 2, note="plain PyTorch DDP, 2 ranks x 1 core"),
                 Arm("labs_2x1", "labs", 2, 1, g // 2, z0, note="labs ZeRO-0, 2 ranks x 1 core")]
    if "optimizer" in groups:
        arms += [Arm("labs_1x2_foreach", "labs", 1, 2, g, z0, optimizer="foreach"),
                 Arm("labs_1x2_fused", "labs", 1, 2, g, z0, optimizer="fused")]
    if "batch" in groups:
        arms += [Arm("labs_1x2_accum2", "labs", 1, 2, g // 2, z0, note="2 micro-batches accumulated"),
                 Arm("labs_1x2_accum8", "labs", 1, 2, max(g // 8, 1), z0, note="8 micro-batches accumulated"),
                 Arm("labs_1x2_double_tokens", "labs", 1, 2, 2 * g, z0, global_batch=2 * g,
                     note="twice the tokens per optimizer step")]
    if "precision" in groups:
        arms += [Arm("labs_1x2_fused_bf16", "labs", 1, 2, g, z0, optimizer="fused", precision="bf16")]
        if "optimizer" not in groups:
            arms.append(Arm("labs_1x2_fused", "labs", 1, 2, g, z0, optimizer="fused"))
    if "comm" in groups:  # ZeRO-2 on 2 ranks x 1 core: overlap_comm and bucket sizes (shipped: off, 5e6)
        z2 = "ds_configs/zero2.json"
        arms += [Arm("labs_2x1_zero2", "labs", 2, 1, g // 2, z2, note="ZeRO-2 as shipped"),
                 Arm("labs_2x1_zero2_overlap", "labs", 2, 1, g // 2, z2,
                     sets=["ds.zero_optimization.overlap_comm=true"], note="overlap_comm: true"),
                 Arm("labs_2x1_zero2_bucket5e7", "labs", 2, 1, g // 2, z2,
                     sets=["ds.zero_optimization.reduce_bucket_size=50000000",
                           "ds.zero_optimization.allgather_bucket_size=50000000"], note="buckets 5e7")]
    if "compile" in groups:  # torch.compile through DeepSpeed's engine.compile(); its first steps compile
        arms += [Arm("labs_1x2_fused_compile", "labs", 1, 2, g, z0, optimizer="fused", sets=["train.compile=true"],
                     note="train.compile: true (inductor), fused AdamW")]
        if not groups & {"optimizer", "precision"}:
            arms.append(Arm("labs_1x2_fused", "labs", 1, 2, g, z0, optimizer="fused"))
    return arms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-small")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--global_batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--groups", default="threads,optimizer,batch,precision")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "fastpath"))
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    w = Workload(model=a.model, seq=a.seq, global_batch=a.global_batch, steps=a.steps,
                 sets=[s for g in a.sets for s in g])
    arms = arms_for(w, set(a.groups.split(",")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/fastpath.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    print(f"{len(arms)} arms x {a.repeats} rounds; {w.model}, sequence {w.seq}, global batch {w.global_batch}",
          flush=True)
    peak_of = peaks(arms, w)
    results = interleave(arms, w, a.repeats, out)
    rows = summarize(arms, w, results, peak_of, BASELINE)
    md = table(rows, BASELINE)
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    took = time.perf_counter() - started
    head = (f"`{command}` on {when}, {machine()}; took {took / 60:.1f} min. Workload: {w.model}, sequence {w.seq}, "
            f"global batch {w.global_batch} sequences unless the arm says otherwise, {w.steps} steps (first "
            f"{w.warmup} not timed); {a.repeats} interleaved rounds. Peaks: "
            + "; ".join(f"{k[0]} {k[1]} thread(s) {v.flops / 1e9:.0f} GFLOP/s" for k, v in peak_of.items()) + ".")
    (out / "fastpath.md").write_text(f"{head}\n\n{md}\n")
    (out / "results.json").write_text(json.dumps(
        {"command": command, "date": when, "machine": machine(), "took_s": took, "workload": asdict(w),
         "peaks": {f"{k[0]} {k[1]} threads": v.describe() for k, v in peak_of.items()},
         "rows": rows, "runs": results}, indent=1, default=str) + "\n")
    print(f"\n{head}\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
