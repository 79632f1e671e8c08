"""Benchmark (not a test): the measured peak memory per rank behind the memory model's fit and its check.

    .venv/bin/python bench/memory_runs.py [--only NAME,NAME] [--set fit|test] [--out docs/memory_runs.json]

Launches every run of RUNS below through the real launcher (`labs launch`, 3 optimizer steps: the peak is read
after PEAK_STEPS = 3), reads each rank's measured peak above its baseline from the run's summary.json and
writes it, with the exact command, the set it belongs to ("fit": the runs the constants of
launcher/estimate/memory.py were fitted on; "test": every other, never used to fit), the machine and its load
average around the run, into docs/memory_runs.json (entries of the same name are replaced; the rest kept).
The predictions are not stored: tests/test_memory_predict.py and `--report` compute them with the current
formulas from each run's command (`labs plan` of the same job, config, hostfile and --set values).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.common.files import MiB  # noqa: E402
from launcher.estimate.memory_runs import DATA_FILE, error_table, headline, predicted_bytes  # noqa: E402
from launcher.launch.make_plan import make_plan  # noqa: E402
from launcher.resolve import predict_run  # noqa: E402

COMMON = ["train.max_steps=3", "data.max_eval_samples=4", "train.checkpoint=false", "train.export=false",
          "data.data_dir=../shared/data"]
"""Every run: 3 steps (the peak is read there), a tiny eval, nothing saved."""

CMP = "jobs/compare.yaml"  # llama-small on WikiText-2 from ../shared/data, global batch 8, block 64
SMOL = "jobs/fine_tune_smollm2.yaml"  # SmolLM2-135M (the real weights), ZeRO-2, block 256 (data: --set below)

# name -> (set, job, ds_config or None, hostfile or None, extra --set values)
RUNS: dict[str, tuple[str, str, str | None, str | None, list[str]]] = {
    # the fit set: llama-small (19.6M, 4 blocks, vocabulary 32,000), block 64, six strategies
    "llama-small/zero0/s64": ("fit", CMP, "ds_configs/zero0.json", None, []),
    "llama-small/zero1/s64": ("fit", CMP, "ds_configs/zero1.json", None, []),
    "llama-small/zero2/s64": ("fit", CMP, "ds_configs/zero2.json", None, []),
    "llama-small/zero3/s64": ("fit", CMP, "ds_configs/zero3.json", None, []),
    "llama-small/pipeline/s64": ("fit", CMP, "ds_configs/pipeline.json", None, []),
    "llama-small/tensor_parallel/s64": ("fit", CMP, "ds_configs/tensor_parallel.json", None, []),
    # the test set: other models and sizes, sequence lengths, strategies, the demo
    "demo": ("test", "jobs/demo.yaml", None, None, []),
    "smollm2-135m/zero2/s256": ("test", SMOL, None, None, []),
    "smollm2-135m/zero0/s256": ("test", SMOL, "ds_configs/zero0.json", None, []),
    "smollm2-135m/zero1/s256": ("test", SMOL, "ds_configs/zero1.json", None, []),
    "smollm2-135m/zero3/s256": ("test", SMOL, "ds_configs/zero3.json", None, []),
    "smollm2-135m/zero3_offload/s256": ("test", SMOL, "ds_configs/zero3_offload.json", None, []),
    "smollm2-135m/pipeline/s256": ("test", SMOL, "ds_configs/pipeline.json", None, []),
    "smollm2-tiny/zero0/s256": ("test", SMOL, "ds_configs/zero0.json", None, ["model.name=smollm2-tiny"]),
    "smollm2-tiny/zero3/s256": ("test", SMOL, "ds_configs/zero3.json", None, ["model.name=smollm2-tiny"]),
    "smollm2-tiny/pipeline/s256": ("test", SMOL, "ds_configs/pipeline.json", None, ["model.name=smollm2-tiny"]),
    "llama-small/zero1/s512": ("test", CMP, "ds_configs/zero1.json", None, ["data.block_size=512"]),
    "llama-small/zero3_offload/s512": ("test", CMP, "ds_configs/zero3_offload.json", None, ["data.block_size=512"]),
    "llama-small/model_parallel/s512": ("test", CMP, "ds_configs/model_parallel.json", None, ["data.block_size=512"]),
    "llama-small/sequence_parallel/s64": ("test", CMP, "ds_configs/sequence_parallel.json", None, []),
    "llama-small/pipeline_tensor_parallel/s64": ("test", CMP, "ds_configs/pipeline_tensor_parallel.json",
                                                 "hostfiles/localhost4", []),
    "llama-58m/zero2/s128": ("test", CMP, "ds_configs/zero2.json", None, ["model.name=llama-58m", "data.block_size=128"]),
    "llama-58m/tensor_parallel/s128": ("test", CMP, "ds_configs/tensor_parallel.json", None,
                                       ["model.name=llama-58m", "data.block_size=128"]),
}


def command(name: str) -> list[str]:
    _, job, ds, hostfile, extra = RUNS[name]
    cmd = ["labs", "launch", job] + (["--ds-config", ds] if ds else []) + (["--hostfile", hostfile] if hostfile else [])
    return cmd + ["--set", *COMMON, *extra]


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "torch": metadata.version("torch"), "deepspeed": metadata.version("deepspeed"),
            "transformers": metadata.version("transformers")}


def run_one(name: str, tmp: Path) -> dict:
    out = tmp / name.replace("/", "_")
    cmd = command(name)
    load0 = os.getloadavg()[0]
    started = dt.datetime.now(dt.UTC)
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *cmd[1:], f"train.output_dir={out}"], cwd=REPO,
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    load1 = os.getloadavg()[0]
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    mem = summary["memory"]
    return {"name": name, "set": RUNS[name][0], "command": shlex.join(cmd), **describe(shlex.join(cmd)), "measured_bytes": mem["measured_bytes"],
            "baseline_bytes": mem["baseline_bytes"], "at_step": mem["step"], "precision": "fp32",
            "phases_rank0": summary["ranks"][0].get("memory_phases"),
            "load_average_1min": [round(load0, 1), round(load1, 1)],
            "env": {k: os.environ[k] for k in ("LABS_CACHE_DIR", "DS_ACCELERATOR") if k in os.environ},
            "when": started.isoformat(timespec="seconds"),
            "seconds": round((dt.datetime.now(dt.UTC) - started).total_seconds()), "machine": machine()}


def describe(command_line: str) -> dict:
    """What the prediction needs of a run, read as `labs plan` reads its command: the model, the Setup
    (launcher/estimate/memory.py) and the world; stored beside the measurement so that the tests predict it
    again with pure arithmetic (no plan, no DeepSpeed config classes)."""
    argv = shlex.split(command_line)[2:]
    job, rest = argv[0], argv[1:]
    ds = rest[rest.index("--ds-config") + 1] if "--ds-config" in rest else None
    hostfile = rest[rest.index("--hostfile") + 1] if "--hostfile" in rest else None
    sets = rest[rest.index("--set") + 1:] if "--set" in rest else []
    plan = make_plan(job, ds_config=ds, hostfile=hostfile, sets=sets)
    pred = predict_run(plan.job, plan.ds_config, plan.layout)
    return {"model": plan.job.model.name, "world": plan.layout.world, "shape": asdict(pred.shape),
            "setup": asdict(pred.setup)}


BEGIN, END = "<!-- memory_runs: begin (bench/memory_runs.py --report writes this) -->", "<!-- memory_runs: end -->"


def write_docs(data: dict) -> None:
    """The computed errors into README.md (out of sample) and docs/strategies.md (both, and every run)."""
    runs = data["runs"]
    blocks = {"README.md": f"Peak memory per rank, predicted before launch against measured (fp32, CPU), "
                           f"{headline(runs, 'test')}; {headline(runs, 'fit')} (docs/strategies.md \"Will it fit?\").",
              "docs/strategies.md": f"- {headline(runs, 'fit')}\n- {headline(runs, 'test')}\n\n"
                                    + error_table(data)}
    for name, text in blocks.items():
        path = REPO / name
        doc = path.read_text()
        a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        path.write_text(doc[:a] + "\n" + text + "\n" + doc[b:])


def figure(data: dict, path: Path) -> None:
    """Predicted against measured peak per rank, fit and test sets apart, with the +-20% band."""
    # matplotlib only when the figure is drawn
    import matplotlib
    matplotlib.use("Agg")
    # the same: pyplot after the backend is chosen
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    top = 0.0
    for which, marker in (("fit", "o"), ("test", "^")):
        xs = [m / MiB for r in data["runs"] if r["set"] == which for m in r["measured_bytes"]]
        ys = [p / MiB for r in data["runs"] if r["set"] == which for p in predicted_bytes(r)]
        ax.scatter(xs, ys, marker=marker, label=f"{which} set ({len(xs)} rank peaks)", alpha=0.75)
        top = max([top, *xs, *ys])
    line = [0, top * 1.05]
    ax.plot(line, line, "k-", lw=0.8)
    ax.plot(line, [1.2 * x for x in line], "k:", lw=0.8, label="+-20%")
    ax.plot(line, [0.8 * x for x in line], "k:", lw=0.8)
    ax.set_xlabel("measured peak above the baseline (MiB per rank)")
    ax.set_ylabel("predicted (MiB per rank)")
    ax.set_title("Peak memory per rank, fp32 on CPU (docs/memory_runs.json)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated run names (default: every run of the chosen set)")
    p.add_argument("--set", dest="which", choices=("fit", "test"), help="only this set")
    p.add_argument("--out", default=str(DATA_FILE))
    p.add_argument("--report", action="store_true",
                   help="run nothing: re-read each stored run's command as the plan does, print predicted/measured")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.report:
        data = json.loads(out.read_text())
        for r in data["runs"]:
            r.update(describe(r["command"]))
        out.write_text(json.dumps(data, indent=1) + "\n")
        print(error_table(data))
        write_docs(data)
        figure(data, REPO / "docs" / "memory_predicted_vs_measured.png")
        return 0
    names = args.only.split(",") if args.only else [n for n, r in RUNS.items() if args.which in (None, r[0])]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"--only: unknown run(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory(prefix="memory_runs_") as tmp:
        for name in names:
            rec = run_one(name, Path(tmp))
            data = json.loads(out.read_text()) if out.is_file() else {"runs": []}
            data["runs"] = [r for r in data["runs"] if r["name"] != name] + [rec]
            data["runs"].sort(key=lambda r: list(RUNS).index(r["name"]) if r["name"] in RUNS else 1e9)
            out.write_text(json.dumps(data, indent=1) + "\n")
            print(f"{name}: measured {[round(b / 2**20) for b in rec['measured_bytes']]} MiB "
                  f"({rec['seconds']} s, load {rec['load_average_1min']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
