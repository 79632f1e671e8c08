"""What the benchmark scripts share: one workload, arms that run it (this project's `labs launch`, a plain
PyTorch loop under torchrun, the HF Trainer with a DeepSpeed config), interleaved repeats, and tables.

An arm is one way to train the workload; `run_arm` starts it as its own process(es) and reads back the
per-step times of global rank 0. Throughput is steady state: the tokens of the steps after the first
`warmup` ones over their summed step time (each stack times forward + backward + optimizer step of
one global batch, after the batch is in memory). MFU uses launcher/py's FLOPs per token and the
matmul peak measured in the same invocation (ranks x the peak of one rank at its thread count).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass
class Workload:
    job: str = "jobs/compare.yaml"  # llama-small on WikiText-2 (the local data folder)
    model: str = "llama-small"
    seq: int = 64
    global_batch: int = 8  # sequences per optimizer step
    steps: int = 6
    warmup: int = 2  # steps left out of the throughput
    precision: str = "fp32"
    sets: list[str] = field(default_factory=list)  # extra job overrides (e.g. data.data_dir=...)
    device: str = "cpu"  # or cuda (bench/gpu_check.sh)

    def job_sets(self) -> list[str]:
        samples = max(self.global_batch * (self.steps + 1), 64)
        return [f"model.name={self.model}", f"data.block_size={self.seq}", f"data.max_train_samples={samples}",
                "data.max_eval_samples=8", *self.sets]

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.global_batch


@dataclass
class Arm:
    name: str
    kind: str  # labs | torch | hf
    ranks: int
    threads: int  # per rank
    micro: int  # micro-batch per rank
    ds_config: str | None = None  # labs, hf
    # torch AdamW: default (for-loop on CPU) | foreach | fused. Every arm takes fused by default, the AdamW every
    # shipped ds_config builds ("torch_adam": true, "fused": true): the same implementation on both sides
    optimizer: str = "fused"
    sets: list[str] = field(default_factory=list)  # labs: extra --set
    note: str = ""
    precision: str | None = None  # overrides the workload's
    global_batch: int | None = None  # overrides the workload's

    def workload(self, w: Workload) -> Workload:
        return replace(w, precision=self.precision or w.precision, global_batch=self.global_batch or w.global_batch)

    def grad_accum(self, w: Workload) -> int:
        per = self.micro * self.ranks
        if w.global_batch % per:
            raise ValueError(f"{self.name}: global batch {w.global_batch} is not a multiple of micro {self.micro} "
                             f"x ranks {self.ranks}")
        return w.global_batch // per


def _env(threads: int, device: str = "cpu") -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), DS_ACCELERATOR="cuda" if device == "cuda" else "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    # the venv's ninja first: another ninja on PATH rebuilds DeepSpeed's comm op in the shared cache
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def command(arm: Arm, w: Workload, out: Path) -> tuple[list[str], dict[str, str]]:
    w = arm.workload(w)
    ga = arm.grad_accum(w)
    bf16 = w.precision == "bf16"
    if arm.kind == "labs":
        hostfile = out / f"slots{arm.ranks}"
        hostfile.write_text(f"localhost slots={arm.ranks}\n")
        ds = arm.ds_config or "ds_configs/zero0.json"
        if bf16 and not ds.endswith("_bf16.json"):
            ds = ds.replace(".json", "_bf16.json")
        sets = [f"train.output_dir={out / 'runs'}", f"train.max_steps={w.steps}", "train.export=false",
                "train.eval_every=0", "train.log_every=1", "train.checkpoint=false",
                f"ds.train_micro_batch_size_per_gpu={arm.micro}", f"ds.gradient_accumulation_steps={ga}",
                "ds.train_batch_size=auto", *w.job_sets(), *arm.sets]
        if arm.optimizer != "default":
            sets.append(f"ds.optimizer.params.{arm.optimizer}=true")
        cmd = [sys.executable, "-m", "launcher.cli", "launch", w.job, "--ds-config", ds, "--hostfile", str(hostfile),
               "--set", *sets]
        return cmd, _env(arm.threads, w.device)
    script = {"torch": "bench/torch_loop.py", "hf": "bench/hf_trainer.py"}[arm.kind]
    args = ["--job", w.job, "--steps", str(w.steps), "--micro", str(arm.micro), "--accum", str(ga),
            "--precision", w.precision, "--threads", str(arm.threads), "--optimizer", arm.optimizer,
            "--device", w.device, "--out_json", str(out / "result.json"), "--set", *w.job_sets()]
    if arm.kind == "hf":
        args += ["--ds_config", arm.ds_config or "ds_configs/zero2.json"]
    if arm.ranks == 1 and arm.kind == "torch":
        return [sys.executable, script, *args], _env(arm.threads, w.device)
    from launcher.common.proc import free_port
    return [_bin("torchrun"), "--nproc_per_node", str(arm.ranks), "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), script, *args], _env(arm.threads, w.device)


IDLE = 0.10  # a run during which other processes took less than this share of the cores counts as idle
BREAKDOWN = re.compile(r"time \(ms\) \| fwd: ([\d.]+) \| bwd: ([\d.]+) \| bwd_inner: ([\d.]+) \| "
                       r"bwd_allreduce: ([\d.]+) \| step: ([\d.]+)")


def _labs_result(out: Path, log: str) -> dict[str, Any]:
    runs = sorted((out / "runs").glob("*/*/metrics.jsonl"))
    if not runs:
        raise RuntimeError("no metrics.jsonl")
    rows = [json.loads(x) for x in runs[-1].read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    summ = json.loads((runs[-1].parent / "summary.json").read_text())
    res = {"step_times": [r["step_time_s"] for r in rows], "losses": [r["loss"] for r in rows],
           "tokens_per_step": round(rows[-1]["tokens_per_s"] * rows[-1]["step_time_s"]),
           "flops_per_token": summ.get("flops_per_token"), "run_mfu": summ.get("mfu"), "run_peak": summ.get("peak")}
    parts = [tuple(map(float, m.groups())) for m in BREAKDOWN.finditer(log)]
    if parts:  # DeepSpeed's wall_clock_breakdown, ms per step: fwd, bwd (= inner + allreduce), step
        keep = parts[2:] or parts
        res["breakdown_ms"] = {k: statistics.median(p[i] for p in keep)
                               for i, k in enumerate(("forward", "backward", "backward_compute", "allreduce", "optimizer"))}
    return res


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_arm(arm: Arm, w: Workload, out: Path, timeout: int = 900) -> dict[str, Any]:
    """Run one repeat of an arm in its own folder; returns its measurements (or an error), with
    `others_load`: the CPU time other processes of the machine took during the run, as a fraction
    of all cores (0: the arm had the machine to itself; 0.5: others used one of two cores)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd, env = command(arm, w, out)
    busy0, ours0 = _busy_cpu_s(), _children_cpu_s()
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            code = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            code = -9
    wall = time.perf_counter() - t0
    ours = _children_cpu_s() - ours0
    others = max(_busy_cpu_s() - busy0 - ours, 0.0) / (wall * (os.cpu_count() or 1))
    if "--master_port" in cmd:  # DeepSpeed's CPU comm op leaves a /dev/shm workspace per rank (labs removes its own)
        from launcher.common.proc import remove_shm
        remove_shm(cmd[cmd.index("--master_port") + 1])
    log = (out / "log.txt").read_text(errors="replace")
    base = {"arm": arm.name, "wall_s": wall, "exit": code, "cpu_s": ours, "others_load": others}
    if code != 0:
        return {**base, "error": log[-2000:]}
    try:
        res = _labs_result(out, log) if arm.kind == "labs" else json.loads((out / "result.json").read_text())
    except (OSError, ValueError, RuntimeError) as e:
        return {**base, "error": f"{type(e).__name__}: {e}\n{log[-1500:]}"}
    times = res["step_times"][w.warmup:] or res["step_times"]
    res.update(base, tokens_per_s=res["tokens_per_step"] * len(times) / sum(times), step_s=statistics.median(times))
    return res


def peaks(arms: list[Arm], w: Workload, refresh: bool = True) -> dict[tuple[str, int], Any]:
    """The matmul peak of one rank for each (precision, threads) the arms use, measured now (and written
    to the cache the runs read, so their own summaries use the same denominators)."""
    from launcher.rank.peak import peak
    keys = sorted({(a.workload(w).precision, a.threads) for a in arms})
    return {k: peak(k[0], k[1], device=w.device, refresh=refresh) for k in keys}


def interleave(arms: list[Arm], w: Workload, repeats: int, out: Path, say=print) -> list[dict[str, Any]]:
    """Every arm once per round, the order rotated each round (A B C, B C A, ...)."""
    results: list[dict[str, Any]] = []
    for r in range(repeats):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            res = run_arm(arm, w, out / "arms" / arm.name / f"r{r}")
            res["repeat"] = r
            results.append(res)
            if "error" in res:
                say(f"  round {r + 1}: {arm.name:<22} FAILED (exit {res['exit']}), see {out / 'arms' / arm.name}")
            else:
                say(f"  round {r + 1}: {arm.name:<22} {res['tokens_per_s']:7.0f} tok/s  step {res['step_s']:.3f} s  "
                    f"wall {res['wall_s']:.0f} s  others' load {100 * res['others_load']:.0f}%")
    return results


def summarize(arms: list[Arm], w: Workload, results: list[dict[str, Any]], peak_of: dict[tuple[str, int], Any],
              baseline: str) -> list[dict[str, Any]]:
    """Per arm: median and min-max of tokens/s and MFU over the repeats; ratios against `baseline`
    taken repeat by repeat (the pair ran in the same round) and then their median."""
    from tasks.presets import PRESETS
    preset = None
    if w.model in PRESETS:
        from tasks.presets import preset_flops
        preset = preset_flops(w.model, w.seq).total
    by = {a.name: [r for r in results if r["arm"] == a.name and "error" not in r] for a in arms}
    base = {r["repeat"]: r["tokens_per_s"] for r in by.get(baseline, [])}
    base_best = max(base.values()) if base else None
    rows = []
    for a in arms:
        ok = by[a.name]
        pk = peak_of[(a.workload(w).precision, a.threads)]
        denom = pk.flops * a.ranks
        tps = [r["tokens_per_s"] for r in ok]
        fpt = preset or next((r["flops_per_token"] for r in ok if r.get("flops_per_token")), 0.0)
        ratios = [r["tokens_per_s"] / base[r["repeat"]] for r in ok if r["repeat"] in base]
        bd = [r["breakdown_ms"] for r in ok if r.get("breakdown_ms")]
        aw = a.workload(w)
        rows.append({**asdict(a), "precision": aw.precision, "global_batch": aw.global_batch,
                     "accum": a.grad_accum(aw), "runs": len(ok),
                     "failed": sum(1 for r in results if r["arm"] == a.name and "error" in r),
                     "tokens_per_s": statistics.median(tps) if tps else None,
                     "tokens_per_s_min": min(tps) if tps else None, "tokens_per_s_max": max(tps) if tps else None,
                     "mfu": statistics.median(tps) * fpt / denom if tps else None,
                     "mfu_min": min(tps) * fpt / denom if tps else None,
                     "mfu_max": max(tps) * fpt / denom if tps else None,
                     "peak_flops": denom, "peak": pk.describe(a.ranks),
                     "ratio": statistics.median(ratios) if ratios else None,
                     "best_tokens_per_s": max(tps) if tps else None,
                     "best_ratio": max(tps) / base_best if tps and base_best else None,
                     "others_load": statistics.median(r["others_load"] for r in ok) if ok else None,
                     "idle_tokens_per_s": [round(r["tokens_per_s"]) for r in ok if r["others_load"] < IDLE],
                     "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
                     "step_s": statistics.median(r["step_s"] for r in ok) if ok else None,
                     "wall_s": statistics.median(r["wall_s"] for r in ok) if ok else None,
                     "final_loss": statistics.median(r["losses"][-1] for r in ok) if ok else None,
                     "breakdown_ms": {k: statistics.median(b[k] for b in bd) for k in bd[0]} if bd else None})
    return rows


def table(rows: list[dict[str, Any]], baseline: str) -> str:
    out = [f"| arm | ranks x threads | precision | micro x accum x ranks | optimizer | tokens/s median (min-max) "
           f"| vs {baseline} median (min-max) | best round: tokens/s, vs {baseline} | MFU median (min-max) | step "
           f"| process wall | others' load | idle runs' tokens/s (others < {100 * IDLE:.0f}%) | final loss |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if not r["runs"]:
            out.append(f"| {r['name']} | {r['ranks']} x {r['threads']} | {r['precision']} | {r['micro']} x "
                       f"{r['accum']} x {r['ranks']} | {r['optimizer']} | failed | | | | | | | | |")
            continue
        ratio = (f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})" if r["ratio"] is not None else "-")
        out.append(f"| {r['name']} | {r['ranks']} x {r['threads']} | {r['precision']} "
                   f"| {r['micro']} x {r['accum']} x {r['ranks']} | {r['optimizer']} "
                   f"| {r['tokens_per_s']:.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}) | {ratio} "
                   f"| {r['best_tokens_per_s']:.0f}, {_x(r['best_ratio'])} "
                   f"| {100 * r['mfu']:.1f}% ({100 * r['mfu_min']:.1f}-{100 * r['mfu_max']:.1f}) "
                   f"| {r['step_s']:.3f} s | {r['wall_s']:.0f} s | {100 * r['others_load']:.0f}% "
                   f"| {', '.join(map(str, r.get('idle_tokens_per_s') or [])) or '-'} | {r['final_loss']:.3f} |")
    return "\n".join(out)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    out = ["| arm | forward | backward (compute) | gradient all-reduce | optimizer step | source |",
           "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        b = r.get("breakdown_ms")
        if not b:
            continue
        src = "DeepSpeed wall_clock_breakdown" if r["kind"] == "labs" else "timers in the loop"
        if r["ranks"] == 1:
            comm = "- (1 rank)"
        elif r["kind"] == "torch" and r["accum"] < 2:  # DDP overlaps it with backward; separable with accum >= 2
            comm = "inside backward"
        else:
            comm = f"{b['allreduce']:.0f} ms"
        out.append(f"| {r['name']} | {b['forward']:.0f} ms | {b['backward_compute']:.0f} ms | {comm} "
                   f"| {b['optimizer']:.0f} ms | {src} |")
    return "\n".join(out)


def machine() -> str:
    import deepspeed
    import torch
    import transformers

    from launcher.common.cache import cpu_model
    return (f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores; torch {torch.__version__}, DeepSpeed "
            f"{deepspeed.__version__}, transformers {transformers.__version__}")


def rebuild(folder: Path, md_name: str, baseline: str) -> str:
    """Re-summarize a results.json (its runs, arms and peaks) with this version's tables; rewrites
    FOLDER/MD_NAME keeping its first paragraph (the command, date and machine)."""
    from launcher.rank.peak import Peak
    data = json.loads((folder / "results.json").read_text())
    w = Workload(**data["workload"])
    names = set(Arm.__dataclass_fields__)
    arms = [Arm(**{k: v for k, v in r.items() if k in names}) for r in data["rows"]]
    peak_of = {(r["precision"], r["threads"]): Peak(r["peak_flops"] / r["ranks"], r["precision"], r["threads"], "",
                                                    r["peak"]) for r in data["rows"]}
    rows = summarize(arms, w, data["runs"], peak_of, baseline)
    for new, old in zip(rows, data["rows"], strict=True):
        new["peak"] = old["peak"]
    data["rows"] = rows
    (folder / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    head = (folder / md_name).read_text().split("\n\n", 1)[0]
    parts = [head, table(rows, baseline)]
    if any(r.get("breakdown_ms") for r in rows):
        parts.append(breakdown_table(rows))
    text = "\n\n".join(parts) + "\n"
    (folder / md_name).write_text(text)
    return text


if __name__ == "__main__":
    print(rebuild(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
