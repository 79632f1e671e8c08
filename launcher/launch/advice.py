"""The plan's memory lines: this machine's budget per rank, the framework's baseline (measured once per
machine, cached), the predicted peak of this config and of every other strategy on the same ranks, and
what would fit, fastest first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from launcher.common.cache import cached_baseline, read_cache, store_baseline
from launcher.common.errors import LabsError
from launcher.common.files import MiB
from launcher.common.run_dir import REPO
from launcher.common.text import fmt_bytes, parse_size
from launcher.estimate.memory import Prediction, RankMemory, Setup, _with, alternatives, predict, step_seconds
from launcher.estimate.shape import Shape
from launcher.resolve import predict_run


def framework_baseline(measure: bool = True) -> tuple[int | None, str]:
    """Resident memory of a process that imported torch, deepspeed, transformers and datasets: measured once
    per machine in a child process (a few seconds) and cached in $LABS_CACHE_DIR/memory_baseline.json; every
    run's rank 0 refreshes it with its own figure."""
    c = cached_baseline()
    if c:
        return c["bytes"], f"{c['source']}, {c['when'][:10]}, cached"
    if not measure:
        return None, "not measured yet"
    code = "from launcher.rank.meters import import_framework, rss_now; import_framework(); print(rss_now())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             cwd=REPO,
                             env=os.environ | {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
        rss = int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None, "could not be measured"
    store_baseline(rss, "measured by labs plan")
    return rss, "measured now, cached"


def machine_speed(precision: str = "fp32", threads: int = 1) -> tuple[float, float]:
    """(FLOP/s of one rank, bytes/s between ranks) for the ranking: the cached matmul peak (labs peak) when
    there is one, else 100 GFLOP/s; gloo's measured ~1.2 GB/s on CPU, 100 GB/s for GPUs."""
    flops = 100e9
    try:
        best = [v["flops"] for k, v in read_cache().items() if f"| {precision} |" in k]
        if best:
            flops = min(best)
    except Exception:
        pass
    gpu = os.environ.get("DS_ACCELERATOR", "cpu") != "cpu"
    return flops, (100e9 if gpu else 1.2e9)


def fits(budget: int, shape: Shape, setup: Setup, baseline: int) -> list[tuple[str, Setup, int, float]]:
    """Every alternative (strategies x micro-batch sizes that keep the global batch x activation checkpointing
    off/on) whose predicted peak per rank is within `budget`, fastest first: (name, setup, peak, seconds)."""
    flops, bw = machine_speed(setup.precision)
    out = []
    for name, alt in [("this config", setup), *[(n, a) for n, a in alternatives(shape, setup) if a != setup]]:
        global_batch = alt.micro * alt.grad_accum * alt.dp
        micros = sorted({m for m in (alt.micro, *(2**k for k in range(12))) if m <= global_batch
                         and global_batch % (m * alt.dp) == 0 and (name != "model_parallel" or m == alt.micro)},
                        reverse=True)
        for m in micros:
            for ckpt in (False, True):
                cand = _with(alt, micro=m, grad_accum=global_batch // (m * alt.dp), checkpointing=ckpt)
                peak = max(r.total for r in predict(shape, cand, baseline))
                if peak <= budget:
                    out.append((name, cand, peak, step_seconds(shape, cand, flops, bw)))
    out.sort(key=lambda x: x[3])
    return out


def free_memory_per_rank(ranks_here: int) -> tuple[int, str]:
    """This machine's available memory (MemAvailable; a GPU's total memory with DS_ACCELERATOR set to one)
    divided among the ranks the hostfile starts here."""
    if os.environ.get("DS_ACCELERATOR", "cpu") not in ("cpu", ""):
        if shutil.which("nvidia-smi"):  # the GPU's memory (each rank has one); no torch import in the plan
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=20).stdout.split()
                return int(out[0]) * MiB, f"GPU memory {fmt_bytes(int(out[0]) * MiB)} (nvidia-smi)"
            except (subprocess.SubprocessError, ValueError, IndexError, OSError):
                pass
    avail = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return avail // max(ranks_here, 1), f"this machine's available memory {fmt_bytes(avail)} / {ranks_here} rank(s)"


NAMES = {"zero0": "ZeRO-0", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 + offload",
         "pipeline": "pipeline", "model_parallel": "model parallel", "tensor_parallel": "tensor parallel",
         "this config": "this config"}


def _short_parts(rm: RankMemory) -> str:
    groups: dict[str, int] = {"framework": rm.baseline}
    for k, v in rm.parts.items():
        key = ("model states" if k.startswith("model states") else "activations" if k.startswith(("activations", "logits"))
               else "buffers" if k.startswith("communication") else "temporaries" if k.startswith(("optimizer", "ZeRO"))
               else "model as built" if k.startswith("the HF model") else "runtime")
        groups[key] = groups.get(key, 0) + v
    return " + ".join(f"{k} {fmt_bytes(v)}" for k, v in groups.items() if v)


def plan_lines(plan, budget_text: str | None = None, verbose: bool = False) -> list[str]:
    """The plan's memory lines: the predicted peak per rank of this config (its parts), the same for the other
    strategies on the same ranks and global batch, and whether it fits the memory per rank (--memory, or
    this machine's available memory over its ranks), with the configurations that do, fastest first."""
    try:
        pred = predict_run(plan.job, plan.ds_config, plan.layout)
    except (KeyError, TypeError, ValueError):
        pred = None
    if pred is None:
        return []
    baseline, source = framework_baseline()
    base = baseline or 0
    pred = Prediction(pred.shape, pred.setup, predict(pred.shape, pred.setup, base), "this config")
    s = pred.setup
    worst = max(pred.ranks, key=lambda r: r.total)
    lines = [f"  memory per rank, predicted peak: {fmt_bytes(worst.total)}"
             + (f" ({worst.what}, the largest)" if len(pred.ranks) > 1 else "") + f" = {_short_parts(worst)}"
             + f" [{s.precision}, micro batch {s.micro} x {s.seq // s.sp} tokens"
             + (", activation checkpointing" if s.checkpointing else "") + "]"]
    if verbose:
        lines.append(f"    framework baseline {fmt_bytes(base)} ({source}; torch, deepspeed, transformers, datasets "
                     f"imported); per part:")
        for rm in pred.ranks:
            lines.append(f"    {rm.what} ({rm.params:,} params): "
                         + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in rm.parts.items() if v))
    others = []
    for name, alt in alternatives(pred.shape, s):
        peak = max(r.total for r in predict(pred.shape, alt, base))
        others.append(f"{NAMES[name]}: {fmt_bytes(peak)}" + (" <- this config" if alt == s else ""))
    lines.append(f"  other strategies on {s.world} rank(s), same global batch: " + ", ".join(others))
    ranks_here = max(plan.hostfile.hosts.values()) if plan.hostfile.hosts else s.world
    if budget_text:
        try:
            budget, where = parse_size(budget_text), f"--memory {budget_text}"
        except ValueError as e:
            raise LabsError(f"--memory: {e}") from None
    else:
        budget, where = free_memory_per_rank(ranks_here)
    if worst.total <= budget:
        lines.append(f"  fits: {fmt_bytes(worst.total)} of {fmt_bytes(budget)} per rank ({where})")
        return lines
    lines.append(f"  DOES NOT FIT: {fmt_bytes(worst.total)} predicted, {fmt_bytes(budget)} per rank ({where})")
    ok = fits(budget, pred.shape, s, base)
    if not ok:
        lines.append("    no strategy, micro-batch size or activation checkpointing brings it under that: "
                     "more ranks, a smaller model or a shorter sequence")
        return lines
    lines.append("    these fit, fastest first (predicted time per step on this machine, a rough guide):")
    seen = set()
    for name, cand, peak, sec in ok:
        key = (name, cand.micro, cand.checkpointing)
        if key in seen:
            continue
        seen.add(key)
        flag = {"this config": "", "zero0": "--ds-config ds_configs/zero0.json"}.get(name, f"--ds-config ds_configs/{name}.json")
        sets = [f"ds.train_micro_batch_size_per_gpu={cand.micro}", f"ds.gradient_accumulation_steps={cand.grad_accum}"]
        if cand.checkpointing:
            sets.append("ds.activation_checkpointing.partition_activations=true")
        lines.append(f"    {len(seen)}. {NAMES[name]}, micro batch {cand.micro} x {cand.grad_accum}"
                     + (", activation checkpointing" if cand.checkpointing else "")
                     + f": {fmt_bytes(peak)}, ~{sec:.2f} s/step  ({' '.join([flag, '--set', *sets]).strip()})")
        if len(seen) >= (10 if verbose else 5):
            break
    return lines
