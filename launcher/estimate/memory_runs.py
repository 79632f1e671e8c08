"""The measured peaks the memory model is fitted on and checked against (docs/memory_runs.json, written by
bench/memory_runs.py), and the prediction of each again with the current formulas: pure arithmetic on the
stored shape and Setup, no plan and no torch (tests/test_memory_predict.py, docs/strategies.md "Will it fit?").
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from launcher.common.files import MiB
from launcher.estimate.memory import Setup, per_rank, predict
from launcher.estimate.shape import Shape

DATA_FILE = Path(__file__).resolve().parents[2] / "docs" / "memory_runs.json"
SETS = ("fit", "test")
"""fit: the runs the constants of launcher/estimate/memory.py were fitted on; test: every other run, never
used to fit (other models and sizes, sequence lengths, strategies, the demo)."""

__all__ = ["DATA_FILE", "SETS", "error_table", "headline", "load_runs", "predicted_bytes", "ratios", "summary"]


def load_runs(path: Path = DATA_FILE) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["runs"]


def _build(cls, values: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def predicted_bytes(run: dict[str, Any]) -> list[int]:
    """Each rank's predicted peak above its baseline for a stored run (its shape and Setup)."""
    return [rm.above_baseline for rm in per_rank(predict(_build(Shape, run["shape"]), _build(Setup, run["setup"])))]


def ratios(run: dict[str, Any]) -> list[float]:
    """predicted / measured, per rank."""
    return [p / m for p, m in zip(predicted_bytes(run), run["measured_bytes"], strict=True)]


def error_table(data: dict[str, Any]) -> str:
    """Every stored run: measured and predicted peak per rank above the baseline, and their ratio."""
    rows = ["| set | run | measured MiB (per rank) | predicted MiB | predicted / measured | load (1 min, start / end) |",
            "|---|---|---:|---:|---:|---:|"]
    for r in data["runs"]:
        pred = predicted_bytes(r)
        rows.append(f"| {r['set']} | {r['name']} | {' / '.join(str(round(b / MiB)) for b in r['measured_bytes'])} "
                    f"| {' / '.join(str(round(b / MiB)) for b in pred)} "
                    f"| {' / '.join(f'{p / m:.2f}' for p, m in zip(pred, r['measured_bytes'], strict=True))} "
                    f"| {' / '.join(str(x) for x in r['load_average_1min'])} |")
    return "\n".join(rows)


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per set: the lowest and highest ratio over every rank of every run, the worst relative error and the
    mean absolute relative error (what README.md and docs/strategies.md quote)."""
    out = {}
    for which in SETS:
        rs = [x for r in runs if r["set"] == which for x in ratios(r)]
        if rs:
            out[which] = {"runs": sum(r["set"] == which for r in runs), "ranks": len(rs), "min": min(rs),
                          "max": max(rs), "worst": max(abs(x - 1) for x in rs),
                          "mean_abs": sum(abs(x - 1) for x in rs) / len(rs)}
    return out


def headline(runs: list[dict[str, Any]], which: str) -> str:
    """The sentence README.md (the test set) and docs/strategies.md (both) quote, computed from the data."""
    s = summary(runs)[which]
    return (f"{'fitted on' if which == 'fit' else 'out of sample'}: {s['runs']} runs, {s['ranks']} rank peaks, "
            f"predicted/measured {s['min']:.2f}-{s['max']:.2f} (worst error {100 * s['worst']:.0f}%, "
            f"mean {100 * s['mean_abs']:.0f}%)")
