"""How long `labs plan` takes against a bare `python -c "import deepspeed"` on the same machine, as a ratio.

    python bench/plan.py [--runs 11] [--job jobs/demo.yaml] [--json bench/results/plan.json]

Each repeat starts both as whole processes, in turn (plan, import, plan, import, ...), so a drift of the
machine's speed moves both; the ratio is taken pair by pair and its median and range printed, with the
machine's load average before and after. The plan imports DeepSpeed itself (its config parser checks the
ds_config), so the ratio says what the planning adds on top of that import. Not a test: the machine's load
moves it (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=11)
    p.add_argument("--job", default="jobs/demo.yaml")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    plan = [sys.executable, "-m", "launcher.cli", "plan", args.job]
    bare = [sys.executable, "-c", "import deepspeed"]
    load_before = os.getloadavg()
    wall(plan), wall(bare)  # warm the page cache
    pairs = [(wall(plan), wall(bare)) for _ in range(args.runs)]
    load_after = os.getloadavg()
    ratios = [a / b for a, b in pairs]
    out = {"job": args.job, "runs": args.runs, "plan_s": statistics.median(a for a, _ in pairs),
           "import_deepspeed_s": statistics.median(b for _, b in pairs), "ratio_median": statistics.median(ratios),
           "ratio_min": min(ratios), "ratio_max": max(ratios), "load_before": load_before[0],
           "load_after": load_after[0], "cpu": _cpu(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"labs plan {args.job}: median {out['plan_s']:.2f} s; python -c 'import deepspeed': median "
          f"{out['import_deepspeed_s']:.2f} s; ratio median {out['ratio_median']:.2f} (range "
          f"{out['ratio_min']:.2f}-{out['ratio_max']:.2f}) over {args.runs} pairs; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {out['cpu']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
