"""Benchmark (not a test): this project against plain PyTorch DDP and the HF Trainer on one workload.

    .venv/bin/python bench/baselines.py --quick                 # under 5 minutes on 2 cores
    .venv/bin/python bench/baselines.py [--precision bf16] [--repeats 3] [--arms torch_ddp,labs_zero2,...]
        [--set data.data_dir=../shared/data] [--out bench/results/baselines]

The same model (a tasks/presets.py Llama), sequence length, global batch, precision and number of steps,
the same data and seed (every stack builds them with the project's task code), and the same optimizer:
torch's fused AdamW, which every shipped ds_config builds (the plain loops get `--optimizer fused`, the labs
arms `ds.optimizer.params.fused=true`, the HF Trainer the ds_config's own), trained by:

- torch_ddp     a plain PyTorch loop, DistributedDataParallel over gloo, under torchrun (2 ranks x 1 core)
- torch_1proc   the same loop in one process with every core (full run only)
- hf_zero2      transformers.Trainer with ds_configs/zero2.json (`TrainingArguments(use_cpu=True,
                deepspeed=...)`), under torchrun, 2 ranks
- labs_zeroK    `labs launch` with ds_configs/zeroK.json, 2 ranks (quick: zero2 only)
- labs_1proc    this project's fastest one-process setting (bench/fastpath.py, docs/benchmarks.md): 1 rank
                with every core, the whole global batch as one micro-batch (full run only)

Arms run interleaved (every arm once per round, the order rotated) for --repeats rounds. Reported per arm:
median and min-max of steady-state tokens/s and MFU (launcher/mfu.py; the matmul peak measured at the
start of this invocation), the ratio against torch_ddp taken within each round, the process wall time,
and a per-step breakdown (forward / backward / gradient all-reduce / optimizer): DeepSpeed's
wall_clock_breakdown for the labs arms (one extra, untimed round), timers in the loop for torch_ddp.
Writes OUT/results.json, OUT/baselines.md and OUT/baselines.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    REPO,
    Arm,
    Workload,
    breakdown_table,
    interleave,
    machine,
    peaks,
    run_arm,
    summarize,
    table,
)

BASELINE = "torch_ddp"


def arms_for(w: Workload, quick: bool, ranks: int = 2) -> list[Arm]:
    g = w.global_batch
    cores = len(os.sched_getaffinity(0))
    per_rank = max(g // (2 * ranks), 1)  # 2 micro-batches per rank, as the shipped configs
    t = max(cores // ranks, 1)
    arms = [Arm("torch_ddp", "torch", ranks, t, per_rank, note="plain PyTorch DDP, torchrun"),
            Arm("hf_zero2", "hf", ranks, t, per_rank, "ds_configs/zero2.json", note="HF Trainer + DeepSpeed ZeRO-2")]
    stages = [2] if quick else [0, 1, 2, 3]
    arms += [Arm(f"labs_zero{k}", "labs", ranks, t, per_rank, f"ds_configs/zero{k}.json",
                 note=f"labs launch, ZeRO-{k}") for k in stages]
    if not quick:
        arms.append(Arm("labs_1proc", "labs", 1, cores, g, "ds_configs/zero0.json",
                        note="labs launch, 1 rank, whole batch"))
        arms.insert(1, Arm("torch_1proc", "torch", 1, cores, g, note="plain PyTorch, 1 process"))
    return arms


def plot(rows, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["runs"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] for r in ok]
    for ax, key, label, scale in ((axes[0], "tokens_per_s", "tokens / s", 1), (axes[1], "mfu", "MFU (%)", 100)):
        med = [r[key] * scale for r in ok]
        err = [[(r[key] - r[f"{key}_min"]) * scale for r in ok], [(r[f"{key}_max"] - r[key]) * scale for r in ok]]
        ax.bar(names, med, yerr=err, capsize=4, color=["tab:gray" if r["kind"] != "labs" else "tab:blue" for r in ok])
        ax.set(ylabel=label)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 arms (torch_ddp, hf_zero2, labs_zero2), sequence 64, "
                                                        "batch 8, 5 steps: under 5 minutes")
    p.add_argument("--model", default="llama-small", help="a tasks/presets.py name or a save_pretrained() folder")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees one, else cpu")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the multi-rank arms (cores or GPUs)")
    p.add_argument("--seq", type=int)
    p.add_argument("--global_batch", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arms", help="comma-separated subset of the arm names")
    p.add_argument("--no_breakdown", action="store_true", help="skip the untimed wall_clock_breakdown round")
    p.add_argument("--out")
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "cpu"
    w = Workload(model=a.model, precision=a.precision, sets=[s for g in a.sets for s in g], device=a.device,
                 seq=a.seq or (64 if a.quick else 128), global_batch=a.global_batch or (8 if a.quick else 16),
                 steps=a.steps or (5 if a.quick else 12))
    arms = arms_for(w, a.quick, a.ranks)
    if a.arms:
        want = a.arms.split(",")
        arms = [x for x in arms if x.name in want]
    out = Path(a.out or REPO / "bench" / "results" / ("baselines_quick" if a.quick else "baselines"))
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/baselines.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    print(f"workload: {w.model}, sequence {w.seq}, global batch {w.global_batch} sequences, {w.steps} steps "
          f"(first {w.warmup} not timed), {w.precision}; {len(arms)} arms x {a.repeats} rounds", flush=True)
    peak_of = peaks(arms, w)
    for (prec, t), pk in peak_of.items():
        print(f"peak: {prec} {t} thread(s): {pk.describe()}", flush=True)
    results = interleave(arms, w, a.repeats, out)
    breakdown_runs = []
    if not a.no_breakdown and not a.quick:
        print("breakdown round (DeepSpeed wall_clock_breakdown, not timed)", flush=True)
        for arm in arms:
            if arm.kind == "labs":
                b = replace(arm, sets=[*arm.sets, "ds.wall_clock_breakdown=true", "ds.steps_per_print=1"])
                res = run_arm(b, w, out / "arms" / arm.name / "breakdown")
                breakdown_runs.append(res)
                for r in results:  # attach the breakdown to the arm's timed results
                    if r["arm"] == arm.name and "error" not in r and res.get("breakdown_ms"):
                        r["breakdown_ms"] = res["breakdown_ms"]
    rows = summarize(arms, w, results, peak_of, BASELINE)
    md = table(rows, BASELINE)
    bd = breakdown_table(rows)
    took = time.perf_counter() - started
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = (f"`{command}` on {when}, {machine()}; took {took / 60:.1f} min. Workload: {w.model}, sequence {w.seq}, "
            f"global batch {w.global_batch} sequences ({w.tokens_per_step} tokens) per optimizer step, {w.steps} "
            f"steps (the first {w.warmup} not timed), {w.precision}; {a.repeats} interleaved rounds.")
    (out / "baselines.md").write_text(f"{head}\n\n{md}\n\n{bd}\n")
    (out / "results.json").write_text(json.dumps(
        {"command": command, "date": when, "machine": machine(), "took_s": took, "workload": asdict(w),
         "peaks": {f"{k[0]} {k[1]} threads": v.describe() for k, v in peak_of.items()},
         "rows": rows, "runs": results, "breakdown_runs": breakdown_runs}, indent=1, default=str) + "\n")
    plot(rows, out / "baselines.png", f"{w.model}, seq {w.seq}, batch {w.global_batch}, {w.precision}: "
                                      f"median and min-max of {a.repeats} rounds")
    print(f"\n{head}\n\n{md}\n\n{bd}\n\nwritten: {out}/baselines.md, results.json, baselines.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
