"""`labs runs [--output_dir runs]`: the run folders with their size, status and final metrics;
`labs runs --prune ...` removes the ones the user chooses (and only shows them without `--yes`).

Status: finished (summary.json), stopped (stopped.json: a signal or train.max_time; resumable),
running (a process of this machine names the folder), failed (anything else: a crash, a kill).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.common.errors import LabsError
from launcher.common.text import fmt_bytes, parse_duration


@dataclass
class Run:
    path: Path
    job: str
    status: str
    size: int
    mtime: float
    steps: int | None
    metric: str

    @property
    def dry(self) -> bool:
        try:
            return "checkpoint: false" in (self.path / "job.yaml").read_text()
        except OSError:
            return False


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _running(path: Path) -> bool:
    needle = str(path).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def find_runs(output_dir: Path) -> list[Run]:
    runs = []
    for job_yaml in sorted(output_dir.glob("*/*/job.yaml")):
        d = job_yaml.parent
        summary, stopped = _read(d / "summary.json"), _read(d / "stopped.json")
        if _running(d):
            status = "running"
        elif summary and (not stopped or (d / "summary.json").stat().st_mtime >= (d / "stopped.json").stat().st_mtime):
            status = "finished"
        elif stopped:
            status = "stopped"
        else:
            status = "failed"
        rec = summary or stopped
        metric = ", ".join(f"{k} {rec[k]:.4g}" for k in ("final_train_loss", "eval_loss", "perplexity", "accuracy")
                           if isinstance(rec.get(k), (int, float)))
        runs.append(Run(d, d.parent.name, status, _size(d), job_yaml.stat().st_mtime,
                        rec.get("steps", rec.get("step")), metric))
    return runs


def select(runs: list[Run], statuses: list[str], older: float | None, keep_last: int | None,
           dry: bool) -> list[Run]:
    chosen = [r for r in runs if r.status != "running"]
    if statuses:
        chosen = [r for r in chosen if r.status in statuses]
    if older is not None:
        chosen = [r for r in chosen if time.time() - r.mtime > older]
    if dry:
        chosen = [r for r in chosen if r.dry]
    if keep_last is not None:
        newest: dict[str, list[Run]] = {}
        for r in sorted(runs, key=lambda r: r.mtime, reverse=True):
            newest.setdefault(r.job, []).append(r)
        keep = {r.path for rs in newest.values() for r in rs[:keep_last]}
        chosen = [r for r in chosen if r.path not in keep]
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="labs runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs", help="where the runs are (train.output_dir) [runs]")
    p.add_argument("--prune", action="store_true", help="remove runs chosen by the filters below")
    p.add_argument("--status", default="", help="with --prune: failed,stopped,finished (comma-separated)")
    p.add_argument("--older", help="with --prune: only runs older than this (7d, 12h, 90m)")
    p.add_argument("--keep-last", "--keep_last", dest="keep_last", type=int,
                   help="with --prune: keep the newest N runs of each job")
    p.add_argument("--dry", action="store_true", help="with --prune: only dry runs")
    p.add_argument("--yes", action="store_true", help="with --prune: really remove (else only list)")
    args = p.parse_args(argv)
    root = Path(args.output_dir)
    if not root.is_dir():
        raise LabsError(f"--output_dir {root}: no such folder (runs land in train.output_dir, runs/ by default)")
    runs = find_runs(root)
    if not args.prune:
        if not runs:
            print(f"no runs under {root}/")
            return 0
        width = max(len(str(r.path)) for r in runs)
        for r in runs:
            steps = f"{r.steps} steps" if r.steps is not None else ""
            print(f"{str(r.path):<{width}}  {r.status:<8} {fmt_bytes(r.size):>10}  {steps:>10}  {r.metric}")
        print(f"{len(runs)} run(s), {fmt_bytes(sum(r.size for r in runs))}; remove some with "
              f"`labs runs --prune --status failed --yes` (see --help)")
        return 0
    statuses = [s.strip() for s in args.status.split(",") if s.strip()]
    bad = [s for s in statuses if s not in ("failed", "stopped", "finished")]
    if bad:
        raise LabsError(f"--status {args.status}: {', '.join(bad)} is not one of failed, stopped, finished")
    try:
        older = parse_duration(args.older)
    except ValueError as e:
        raise LabsError(f"--older {args.older}: {e}") from None
    if not (statuses or older is not None or args.keep_last is not None or args.dry):
        raise LabsError("--prune needs a choice: --status, --older, --keep-last or --dry (running runs are never "
                        "removed)")
    chosen = select(runs, statuses, older, args.keep_last, args.dry)
    for r in chosen:
        print(f"{'removing' if args.yes else 'would remove'} {r.path} ({r.status}, {fmt_bytes(r.size)})")
        if args.yes:
            shutil.rmtree(r.path, ignore_errors=True)
    total = fmt_bytes(sum(r.size for r in chosen))
    print(f"{len(chosen)} run(s), {total} " + ("removed" if args.yes else "would be removed; add --yes to remove them"))
    return 0
