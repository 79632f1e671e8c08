"""OpenMP's wait policy for the ranks: libgomp's default (threads spin a while when they wait) against
OMP_WAIT_POLICY=PASSIVE (they sleep), which `labs launch` gives its ranks unless the user sets one
(launcher.common.proc.rank_environment).

    python bench/omp_wait.py [--repeats 3] [--json bench/results/omp_wait.json]

The workload is one rank with 2 OpenMP threads, where the policy matters: `labs launch jobs/demo.yaml`
on smollm2-tiny (SmolLM2's shape with 2 blocks), ZeRO-0, 10 updates of 4 sequences of 12 tokens, the
export, on a 1-slot hostfile (DeepSpeed binds the rank to both cores: OMP_NUM_THREADS=2). Two conditions:
alone, and beside one busy process (a shell loop, as another program on a laptop or a second test worker).
Arms run in turn within each repeat (ACTIVE, PASSIVE, then the other order on the next repeat), so a drift
of the machine moves both. Reported per run: the launch's wall time, the CPU seconds of every process it
started (runner, launch.py, the rank: user + sys), and the run's own training time (summary.json); then
per condition the median and range of PASSIVE / ACTIVE. Not a test: the machine's load moves it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.common.cache import cpu_model  # noqa: E402  (the name runs record, without torch)

SETS = ["model.name=smollm2-tiny", "data.dataset=sample", "data.block_size=12", "train.epochs=1",
        "ds.train_micro_batch_size_per_gpu=1", "ds.gradient_accumulation_steps=4", "train.max_steps=10",
        "train.eval_every=0", "train.export=true", "train.checkpoint=false"]


def one_run(policy: str, out: Path) -> dict:
    hosts = out / "hosts1"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text("localhost slots=1\n")
    cmd = [sys.executable, "-m", "launcher.cli", "launch", "jobs/demo.yaml", "--hostfile", str(hosts),
           "--ds-config", "ds_configs/zero0.json", "--set", f"train.output_dir={out}", *SETS]
    env = os.environ | {"OMP_WAIT_POLICY": policy, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # its rusage: the launch and every process it waited for
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"labs launch failed ({policy}); run it by hand: {' '.join(cmd)}")
    (summary,) = out.glob("demo/*/summary.json")
    return {"policy": policy, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "train_s": round(json.loads(summary.read_text())["train_time_s"], 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    load_before, runs = os.getloadavg(), []
    with tempfile.TemporaryDirectory(prefix="omp_wait_") as tmp:
        for condition in ("alone", "beside one busy process"):
            busy = subprocess.Popen(["bash", "-c", "while :; do :; done"]) if condition != "alone" else None
            try:
                for r in range(args.repeats):
                    order = ("ACTIVE", "PASSIVE") if r % 2 == 0 else ("PASSIVE", "ACTIVE")
                    for policy in order:
                        row = {"condition": condition, "repeat": r,
                               **one_run(policy, Path(tmp) / f"{condition[:5]}-{r}-{policy}")}
                        runs.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                if busy:
                    busy.kill()
                    busy.wait()
    ratios = {}
    for condition in ("alone", "beside one busy process"):
        ratios[condition] = {}
        for key in ("wall_s", "cpu_s", "train_s"):
            pairs = [(a[key], b[key]) for a in runs for b in runs if a["condition"] == b["condition"] == condition
                     and a["repeat"] == b["repeat"] and a["policy"] == "PASSIVE" and b["policy"] == "ACTIVE"]
            rs = [x / y for x, y in pairs]
            ratios[condition][key] = {"median": round(statistics.median(rs), 3), "min": round(min(rs), 3),
                                      "max": round(max(rs), 3)}
            print(f"{condition:24s} {key:8s} PASSIVE / ACTIVE: median {statistics.median(rs):.2f}, "
                  f"range {min(rs):.2f}-{max(rs):.2f} over {len(rs)} pairs")
    result = {"command": "python bench/omp_wait.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
              "runs": runs, "passive_over_active": ratios}
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")



if __name__ == "__main__":
    main()
