"""Benchmark (not a test): bf16 against fp32 on the same job, seed, data and global batch; the loss curves
side by side and their relative difference, from real runs.

    .venv/bin/python bench/bf16_curves.py [--job jobs/compare.yaml] [--strategies zero2,zero2_bf16] [--steps 60]
        [--png docs/bf16_vs_fp32_loss.png] [--out bench/results/bf16]

Runs `labs compare` (launcher/compare.py: each strategy through the real launcher, 2 local ranks) and
plots the train losses it recorded; OUT holds compare's report.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.tools.compare import run  # noqa: E402


def plot(results: list[dict], png: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, rel) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    for r in results:
        label = f"{r['strategy']} ({r.get('precision', '?')}, {r['tokens_per_s']:.0f} tok/s)"
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=label, linewidth=1.4)
    ax.set(ylabel="train loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    base = results[0]["losses"]
    for r in results[1:]:
        d = [100 * (b - a) / a for a, b in zip(base, r["losses"], strict=False)]
        rel.plot(range(1, len(d) + 1), d, color="tab:orange", linewidth=1.2)
    rel.axhline(0, color="black", linewidth=0.6)
    rel.set(xlabel="optimizer step", ylabel=f"% vs {results[0]['strategy']}")
    rel.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="jobs/compare.yaml")
    p.add_argument("--strategies", default="zero2,zero2_bf16")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--png", default=str(REPO / "docs" / "bf16_vs_fp32_loss.png"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "bf16"))
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--report-only", action="store_true", help="re-plot from OUT/results.json")
    a = p.parse_args()
    command = "python bench/bf16_curves.py " + " ".join(sys.argv[1:])
    args = argparse.Namespace(job=a.job, strategies=a.strategies, steps=a.steps, out=a.out, hostfile="hostfiles/localhost",
                              sets=[s for g in a.sets for s in g], report_only=a.report_only, command=command)
    results = run(args, command)
    shutil.rmtree(Path(a.out) / "runs", ignore_errors=True)  # checkpoints; the numbers are in results.json
    plot(results, Path(a.png), f"{a.job}: {results[0]['global_batch']} sequences/step, 2 ranks, same seed and data")
    for r in results:
        print(json.dumps({k: r.get(k) for k in ("strategy", "precision", "final_loss", "eval_loss", "tokens_per_s",
                                                  "mfu", "peak")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
