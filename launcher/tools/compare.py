"""`labs compare JOB.yaml --strategies zero0,zero2,pipeline,...`: run one job once per strategy
(same steps, seed, data and global batch; only the DeepSpeed config changes) through the real
launcher, and write a report folder: report.md (a table), results.json and PNG plots.

    labs compare jobs/compare.yaml --strategies zero0,zero2,zero3,pipeline,model_parallel,tensor_parallel \\
        --steps 30 --out docs/compare

A strategy is a ds_configs/<name>.json; `name@K` runs it on K local ranks (e.g. `zero0@1`, the
1-process baseline). Model-state bytes per rank are measured inside each rank from the tensors
the engine holds (launcher/parallel/meter.py StateMeter) and set beside launcher/estimate/memory.py's formula; each
rank's peak memory above its baseline (launcher/py PeakMeter) beside the plan's prediction and
their ratio (a table in report.md and peak_memory.png; --report-only predicts again from each run's files).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher.common.errors import LabsError
from launcher.common.layout import Layout
from launcher.common.run_dir import REPO
from launcher.common.text import fmt_bytes, fmt_flops
from launcher.config.ds.load import precision, resolve_batch
from launcher.config.job import load_job
from launcher.launch.make_plan import make_plan
from launcher.resolve import predict_run

ALL = ("zero0", "zero1", "zero2", "zero3", "pipeline", "model_parallel", "tensor_parallel", "sequence_parallel",
       "pipeline_tensor_parallel@4")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="labs compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="job YAML (its ds_config is replaced by each strategy's)")
    p.add_argument("--strategies", default="zero0,zero2,zero3,pipeline,model_parallel,tensor_parallel",
                   help=f"comma-separated ds_configs names, optionally NAME@RANKS (known: {', '.join(ALL)})")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per strategy")
    p.add_argument("--out", help="report folder (default runs/compare/<timestamp>)")
    p.add_argument("--hostfile", default="hostfiles/localhost")
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra overrides for every run")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from OUT/results.json")
    args = p.parse_args(argv)
    args.sets = [s for g in args.sets for s in g]
    return args


def _strategy(spec: str) -> tuple[str, int | None]:
    name, _, ranks = spec.partition("@")
    if not (REPO / "ds_configs" / f"{name}.json").is_file():
        raise LabsError(f"--strategies: {name!r} has no ds_configs/{name}.json; known: {', '.join(ALL)}")
    return name, int(ranks) if ranks else None


def _fp32_formula(stage: int, params: int, dp: int) -> int:
    """fp32 Adam (these runs): 4 B params + 4 B grads + 8 B moments, plus the 4 B fp32 master
    partition that DeepSpeed's ZeRO optimizers (stages 1-3) keep even when the parameters are
    fp32 (a separate copy, measured), sharded by stage: 16P at 0, 8P + 12P/N at 1, 4P + 16P/N at 2,
    20P/N at 3. Not counted: ZeRO-3's transient flattened copy of the gradient partition that
    exists during the optimizer step (+4P/N, see docs/benchmarks.md)."""
    n = max(dp, 1)
    if stage == 0:
        return 16 * params
    if stage == 1:
        return 8 * params + 12 * params // n
    if stage == 2:
        return 4 * params + 16 * params // n
    return 20 * params // n


def run_one(args, spec: str, out: Path) -> dict[str, Any]:

    name, ranks = _strategy(spec)
    label = spec.replace("@", "_at")
    hostfile = args.hostfile
    if ranks:
        hostfile = str(out / "hosts" / f"slots{ranks}")
        Path(hostfile).parent.mkdir(parents=True, exist_ok=True)
        Path(hostfile).write_text(f"localhost slots={ranks}\n")
    extra = [f"train.max_steps={args.steps}", "train.export=false", "train.eval_every=0"]
    if ranks:  # another world size: keep the global batch, derive the accumulation steps
        extra.append("ds.gradient_accumulation_steps=auto")
    if name in ("pipeline", "model_parallel") and ranks == 1:
        extra.append("ds.pipeline.stages=1")
    if name in ("tensor_parallel", "pipeline_tensor_parallel") and ranks == 1:
        extra.append("ds.tensor_parallel.autotp_size=1")
    if name == "pipeline_tensor_parallel" and ranks == 1:
        extra.append("ds.pipeline.stages=1")
    if name == "sequence_parallel" and ranks == 1:
        extra.append("ds.sequence_parallel_size=1")
    sets = [*args.sets, *extra]
    ds = f"ds_configs/{name}.json"
    plan = make_plan(args.job, ds_config=ds, hostfile=hostfile, sets=sets)  # refuse before launching
    runs = out / "runs" / label
    cmd = [sys.executable, "-m", "launcher.cli", "launch", args.job, "--ds-config", ds, "--hostfile", hostfile,
           "--set", f"train.output_dir={runs}", *sets]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print(f"== {spec}: {plan.layout.describe()} ... ", end="", flush=True)
    t0 = time.perf_counter()
    with open(out / "logs" / f"{label}.log", "w") as log:
        code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    dirs = sorted(runs.glob("*/*/summary.json"))
    if code != 0 or not dirs:
        raise LabsError(f"strategy {spec} failed (exit {code}); see {out / 'logs' / f'{label}.log'}")
    run_dir = dirs[-1].parent
    summ = json.loads((run_dir / "summary.json").read_text())
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    total, largest = plan.params or (0, 0)
    lay = plan.layout
    ranks_info = summ["ranks"]
    stage = plan.zero_stage
    res = {
        "strategy": spec, "ds_config": ds, "world": lay.world, "dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "sp": lay.sp,
        "zero_stage": stage, "micro_batches": plan.ds_config["gradient_accumulation_steps"],
        "global_batch": plan.ds_config["train_batch_size"], "steps": summ["steps"],
        "final_loss": summ["final_train_loss"], "eval_loss": summ.get("eval_loss"),
        "tokens_per_s": summ["tokens_per_s"], "precision": precision(plan.ds_config),
        "flops_per_s": summ.get("flops_per_s"), "mfu": summ.get("mfu"), "peak": summ.get("peak"),
        "flops_per_token": summ.get("flops_per_token"),
        "step_time_s": statistics.median(r["step_time_s"] for r in train[1:] or train),
        "losses": [r["loss"] for r in train], "wall_s": wall,
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks_info],
        "state_bytes": [r["state_bytes"]["total"] for r in ranks_info],
        "state_detail": [r["state_bytes"] for r in ranks_info],
        "params_per_rank": [r["params_local"] for r in ranks_info],
        "formula_mixed_bytes": plan.memory().get(stage),
        "formula_fp32_bytes": [_fp32_formula(stage, r["params_local"], lay.dp * lay.sp) for r in ranks_info],
        "params_total": total, "run_dir": str(run_dir), "command": getattr(args, "command", None),
        "memory": summ.get("memory"),
        "memory_ranks": [{k: v for k, v in r.items() if k.startswith("memory_")} for r in ranks_info],
    }
    print(f"loss {res['final_loss']:.4f}, {res['tokens_per_s']:.0f} tok/s, {wall:.0f} s", flush=True)
    return res


def _mib(b: float) -> str:
    return fmt_bytes(b)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mb(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def repredict(r: dict[str, Any]) -> None:
    """The memory prediction of a measured run, made again by this version of launcher/py from the
    run's own job.yaml and ds_config.json (so a report rebuilt after a calibration shows the new figures)."""
    m = r.get("memory")
    rd = Path(r.get("run_dir", ""))
    if not m or not (rd / "job.yaml").is_file():
        return

    cfg = json.loads((rd / "ds_config.json").read_text())
    layout = Layout.from_ds_config(cfg, r["world"])
    cfg = resolve_batch(cfg, layout.dp, str(rd / "ds_config.json"))
    pred = predict_run(load_job(rd / "job.yaml", []), cfg, layout)
    if pred is None:
        return
    ranks = pred.per_rank
    m["predicted_bytes"] = [p.above_baseline for p in ranks]
    m["predicted_parts"] = [p.parts for p in ranks]
    m["ratio"] = [round(p.above_baseline / b, 3) if b else None for p, b in zip(ranks, m["measured_bytes"], strict=True)]


def _memory_cells(r: dict[str, Any]) -> str:
    """measured | predicted | ratio, per rank ('-' for runs from before the memory was measured)."""
    m = r.get("memory") or {}
    meas, pred = m.get("measured_bytes") or [], m.get("predicted_bytes") or []
    if not meas:
        return "- | - | -"
    return (" / ".join(_mb(b) if b is not None else "-" for b in meas) + " | "
            + " / ".join(_mb(b) if b is not None else "-" for b in pred) + " | "
            + " / ".join(f"{p / b:.2f}" if p and b else "-" for p, b in zip(pred, meas, strict=True)))


def _memory_table(results: list[dict[str, Any]]) -> list[str]:
    """Predicted vs measured peak per rank, and the predicted parts of rank 0 and the last rank."""
    rows = [r for r in results if (r.get("memory") or {}).get("measured_bytes")]
    if not rows:
        return []
    out = ["## Peak memory per rank: predicted vs measured", "",
           "| strategy | rank | measured above baseline | predicted | ratio | within 20% | predicted parts |",
           "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        m = r["memory"]
        for k, (b, p) in enumerate(zip(m["measured_bytes"], m["predicted_bytes"], strict=True)):
            parts = (m.get("predicted_parts") or [None] * (k + 1))[k] or {}
            ratio = p / b if p and b else None
            out.append(f"| {r['strategy']} | {k} | {_mb(b) if b else '-'} | {_mb(p) if p else '-'} "
                       f"| {f'{ratio:.2f}' if ratio else '-'} | {'yes' if ratio and 0.8 <= ratio <= 1.2 else 'NO'} "
                       f"| {', '.join(f'{n} {_mb(v)}' for n, v in parts.items() if v)} |")
    return out


def write_report(results: list[dict[str, Any]], out: Path, job: str, steps: int, command: str) -> None:
    rows = ["| strategy | ranks (dp x tp x pp) | micro-batches | tokens/s | FLOP/s | MFU | time/step | peak RSS / rank "
            "| peak above baseline / rank: measured | predicted | predicted / measured "
            "| model states / rank (measured) | of which params + master + grads + optimizer (rank 0) "
            "| fp32 formula | plan formula (mixed prec.) | final loss |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        d = r["state_detail"][0]
        parts = " + ".join(_mib(d[k]) for k in ("params", "master", "grads", "optimizer"))
        rows.append(
            f"| {r['strategy']} | {r['world']} ({r['dp']} x {r['tp']} x {r['pp']}{' x sp ' + str(r['sp']) if r.get('sp', 1) > 1 else ''}) | {r['micro_batches']} "
            f"| {r['tokens_per_s']:.0f} | {fmt_flops(r['flops_per_s']) if r.get('flops_per_s') else '-'} "
            f"| {_pct(r.get('mfu'))} | {r['step_time_s']:.3f} s "
            f"| {' / '.join(_mib(b) for b in r['peak_rss_bytes'])} | {_memory_cells(r)} "
            f"| {' / '.join(_mib(b) for b in r['state_bytes'])} | {parts} "
            f"| {' / '.join(_mib(b) for b in r['formula_fp32_bytes'])} "
            f"| {_mib(r['formula_mixed_bytes']) if r['formula_mixed_bytes'] else '-'} | {r['final_loss']:.4f} |")
    first = results[0]
    precisions = ", ".join(sorted({r.get("precision", "fp32") for r in results}))
    peaks = sorted({r["peak"] for r in results if r.get("peak")})
    text = [f"# Strategy comparison: `{job}`", "",
            f"Produced by `{command}` on this machine ({steps} steps per strategy, global batch "
            f"{first['global_batch']} sequences, same seed and data; {precisions}, CPU, gloo).", "",
            *rows, "",
            "- FLOP/s: model FLOPs per token (launcher/estimate/flops.py: "
            f"{first.get('flops_per_token', 0) / 1e6:,.1f} MFLOP/token, 6N + 12*L*h*s) x tokens/s; MFU: FLOP/s / "
            "(ranks x the matmul peak of one rank), the peak" + ("s: " if len(peaks) > 1 else ": ")
            + "; ".join(peaks or ["-"]) + ".",
            "- tokens/s: all tokens of the run / training time (rank 0's clock, first step included); "
            "time/step: median step after the first.",
            "- peak RSS / rank: `ru_maxrss` of each rank process (includes Python, torch, the tokenizer and the "
            "full HF model every rank builds before sharding).",
            "- model states / rank: parameters + gradients + optimizer states (+ ZeRO's fp32 master partition) "
            "counted from the tensors the engine holds on that rank (`StateMeter` in launcher/parallel/meter.py); "
            "'fp32 formula' is the ZeRO accounting for these fp32 runs on the rank's parameters; 'plan formula' "
            "is what `labs plan` prints (mixed-precision Adam, 20 B/param at ZeRO-0).",
            "- gradients: their peak over the first optimizer step (sampled after each backward and just before "
            "the step: ZeRO-0/1 hold full gradients while micro-batches accumulate). During its optimizer step "
            "ZeRO-3 holds its gradient partition twice, the reduce-scatter buffer (`grad_partitions_flat_buffer`) "
            "and the flattened copy that becomes the fp32 master partition's `.grad` (freed after the step); the "
            "formula counts one, so ZeRO-3 measures 4P/N above it. ZeRO's reduce buckets are not counted.",
            "- peak above baseline: each rank's high-water resident memory (VmHWM) after its first "
            "optimizer steps minus its RSS once torch, deepspeed, transformers and datasets were imported "
            "(launcher/py PeakMeter); predicted: what `labs plan` predicts for that rank "
            "(launcher/py predict: model states for the run's precision, activations and logits, "
            "communication buffers, optimizer-step temporaries, the task's runtime); the issue's target is a "
            "ratio within 0.8-1.2.", "",
            *_memory_table(results), "",
            "![loss curves](loss.png)", "", "![throughput](throughput.png)", "", "![memory per rank](png)", "", "![peak memory per rank, predicted vs measured](peak_memory.png)", ""]
    (out / "report.md").write_text("\n".join(text))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plots(results, out)


def _plots(results: list[dict[str, Any]], out: Path) -> None:
    # imported only when used (matplotlib is slow to import)
    import matplotlib
    matplotlib.use("Agg")
    # imported only when used (matplotlib is slow to import)
    import matplotlib.pyplot as plt

    names = [r["strategy"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["strategy"], linewidth=1.5, alpha=0.8)
    ax.set(xlabel="step", ylabel="train loss", title="Training loss per strategy (same seed, data, global batch)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].bar(names, [r["tokens_per_s"] for r in results], color="tab:blue")
    axes[0].set(ylabel="tokens / s", title="Throughput")
    axes[1].bar(names, [r["step_time_s"] for r in results], color="tab:orange")
    axes[1].set(ylabel="seconds", title="Median time per step")
    for a in axes:
        a.tick_params(axis="x", rotation=30)
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for ax, key, title in ((axes[0], "state_bytes", "Model states per rank (measured)"),
                           (axes[1], "peak_rss_bytes", "Peak RSS per rank")):
        for k in range(max(len(r[key]) for r in results)):
            xs = [i + (k - 0.5) * width for i in range(len(results))]
            ys = [r[key][k] / 2**20 if k < len(r[key]) else 0 for r in results]
            ax.bar(xs, ys, width, label=f"rank {k}")
        if key == "state_bytes":
            ax.scatter(range(len(results)), [max(r["formula_fp32_bytes"]) / 2**20 for r in results],
                       color="black", marker="_", s=400, zorder=3, label="fp32 ZeRO formula (max rank)")
        ax.set_xticks(range(len(results)), names, rotation=30)
        ax.set(ylabel="MiB", title=title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "png", dpi=110)
    plt.close(fig)
    peak_plot(results, out / "peak_memory.png")


def peak_plot(results: list[dict[str, Any]], path: Path, title: str = "Peak memory per rank above the baseline") -> None:
    """Measured peak per rank (bars) and the prediction (black marks), one group per strategy."""
    # imported only when used (matplotlib is slow to import)
    import matplotlib
    matplotlib.use("Agg")
    # imported only when used (matplotlib is slow to import)
    import matplotlib.pyplot as plt
    rows = [r for r in results if (r.get("memory") or {}).get("measured_bytes")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(min(16, max(7, 0.8 * len(rows) + 3)), 5))
    width = 0.38
    for i, r in enumerate(rows):
        m = r["memory"]
        for k, (b, p) in enumerate(zip(m["measured_bytes"], m["predicted_bytes"], strict=True)):
            x = i + (k - (len(m["measured_bytes"]) - 1) / 2) * width
            ax.bar(x, (b or 0) / 2**20, width * 0.95, color=f"C{k}", label=f"rank {k} measured" if i == 0 else None)
            if p:
                ax.scatter([x], [p / 2**20], color="black", marker="_", s=300, zorder=3,
                           label="predicted" if i == 0 and k == 0 else None)
    ax.set_xticks(range(len(rows)), [r["strategy"] for r in rows], rotation=30)
    ax.set(ylabel="MiB", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, command: str) -> list[dict[str, Any]]:

    out = Path(args.out or REPO / "runs" / "compare" / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        for r in results:  # the formula as of this version; the command that measured them
            r["formula_fp32_bytes"] = [_fp32_formula(r["zero_stage"], n, r["dp"] * r.get("sp", 1))
                                       for n in r["params_per_rank"]]
            repredict(r)
        command = results[0].get("command", command) if results else command
        args.steps = results[0]["steps"] if results else args.steps
    else:
        specs = [s.strip() for s in args.strategies.split(",") if s.strip()]
        for s in specs:
            _strategy(s)
        results = [run_one(args, s, out) for s in specs]
    write_report(results, out, args.job, args.steps, command)
    print(f"\nreport: {out / 'report.md'}")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = "labs compare " + " ".join(argv)
    run(args, args.command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
