"""Benchmark (not a test): every parallel strategy on one job, with ratios against baselines
measured in the same run: `zero0@1` (one process, all cores) and `zero0` (2 data-parallel ranks).

    .venv/bin/python bench/strategies.py [--job jobs/compare.yaml] [--steps 30] [--out bench/results/strategies]
        [--set data.data_dir=../shared/data] [--keep_runs]

Runs `labs compare` (launcher/compare.py) and adds bench/results/.../strategies.json and a
markdown table with the ratios (tokens/s and model-state bytes per rank vs the baselines).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.common.text import fmt_bytes  # noqa: E402
from launcher.tools.compare import run  # noqa: E402

STRATEGIES = "zero0@1,zero0,zero1,zero2,zero3,pipeline,model_parallel,tensor_parallel"


def table(results: list[dict]) -> str:
    by = {r["strategy"]: r for r in results}
    one, dp = by.get("zero0@1"), by.get("zero0")
    rows = ["| strategy | ranks | tokens/s | vs 1 process | vs zero0 (2 ranks) | model states / rank (max) "
            "| vs zero0 | final loss |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        st = max(r["state_bytes"])
        vs_one = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else "-"
        vs_dp = f"{r['tokens_per_s'] / dp['tokens_per_s']:.2f}x" if dp else "-"
        st_dp = f"{st / max(dp['state_bytes']):.2f}x" if dp else "-"
        rows.append(f"| {r['strategy']} | {r['world']} | {r['tokens_per_s']:.0f} | {vs_one} | {vs_dp} "
                    f"| {fmt_bytes(st)} | {st_dp} | ")
        rows[-1] += f"{r['final_loss']:.4f} |"
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="jobs/compare.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--strategies", default=STRATEGIES)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "strategies"))
    p.add_argument("--keep_runs", action="store_true",
                   help="keep OUT/runs (each strategy's run folder with its checkpoints, ~2 GB in all)")
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra overrides for every run (e.g. data.data_dir=/path/to/shared/data)")
    a = p.parse_args()
    command = "python bench/strategies.py " + " ".join(sys.argv[1:])
    args = argparse.Namespace(job=a.job, strategies=a.strategies, steps=a.steps, out=a.out,
                              hostfile="hostfiles/localhost", sets=[s for g in a.sets for s in g],
                              report_only=False, command=command)
    results = run(args, command)
    md = table(results)
    out = Path(a.out)
    (out / "strategies.json").write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
    (out / "strategies.md").write_text(md + "\n")
    if not a.keep_runs:
        shutil.rmtree(out / "runs", ignore_errors=True)  # checkpoints; the numbers are in results.json
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
