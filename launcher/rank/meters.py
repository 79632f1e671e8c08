"""Measured inside the ranks: the peak resident memory of the first steps above the framework's baseline
(GPU: torch.cuda.max_memory_allocated), beside the prediction, in metrics.jsonl and the summary.
"""

from __future__ import annotations

import importlib
import resource

import torch
import torch.distributed as dist

from launcher.common.cache import store_baseline
from launcher.common.text import fmt_bytes
from launcher.resolve import predict_run

PEAK_STEPS = 3
"""The measured peak is read after this many optimizer steps (the first allocates Adam's moments while the
gradients are alive; later steps repeat the same pattern)."""


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM (peak resident) / RssShmem of this process, bytes; {} where /proc is missing."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssShmem", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def rss_now() -> int:
    s = _proc_status()
    if "VmRSS" in s:
        return s["VmRSS"]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_peak() -> int:
    s = _proc_status()
    if "VmHWM" in s:
        return s["VmHWM"]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


BASELINE_IMPORTS = ("torch", "deepspeed", "transformers", "datasets")
"""What every rank imports before it builds anything; the framework baseline is the resident memory after them."""


def import_framework() -> None:
    for name in BASELINE_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:  # the model classes (transformers loads them lazily; a rank always does)
        # imported only when the baseline is measured (a child process of the plan, or a rank)
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401
    except ImportError:
        pass


class PeakMeter:
    """This rank's memory, measured. CPU: resident memory (VmRSS) right after the framework's imports is
    the rank's baseline; the peak is the high-water mark (VmHWM, the kernel's own maximum of VmRSS, so no
    sampling thread can miss a spike) read after the first PEAK_STEPS optimizer steps, minus that
    baseline. GPU: `torch.cuda.max_memory_allocated` (the baseline is the CUDA allocator's 0).
    `mark(name)` records RSS and its peak at the phases of the start-up (for the breakdown)."""

    def __init__(self, device: str = "cpu"):
        import_framework()
        self.device = device
        self.baseline = rss_now() if device == "cpu" else 0
        self.phases: dict[str, dict[str, int]] = {}
        self.peak: int | None = None
        self.at_step = 0
        self.steps = PEAK_STEPS
        self.record: dict | None = None
        self.mark("baseline")

    def _now(self) -> dict[str, int]:
        if self.device == "cpu":
            s = _proc_status()
            return {"rss": s.get("VmRSS", rss_now()), "hwm": s.get("VmHWM", rss_peak()), "shmem": s.get("RssShmem", 0)}
        return {"rss": torch.cuda.memory_allocated(), "hwm": torch.cuda.max_memory_allocated(), "shmem": 0}

    def mark(self, name: str) -> None:
        self.phases[name] = self._now()

    def step(self, step: int) -> None:
        """After each optimizer step: the peak is taken at step PEAK_STEPS (or the last, if fewer)."""
        if self.peak is None and step >= PEAK_STEPS:
            self.finish(step)

    def finish(self, step: int) -> None:
        if self.peak is None:
            now = self._now()
            self.phases[f"step{step}"] = now
            self.peak, self.at_step = max(now["hwm"] - self.baseline, 0), step

    def report(self) -> dict:
        return {"memory_baseline_bytes": self.baseline, "memory_peak_bytes": self.peak,
                "memory_peak_at_step": self.at_step, "memory_device": self.device,
                "memory_phases": {k: {kk: v - (self.baseline if kk != "shmem" else 0) for kk, v in p.items()}
                                  for k, p in self.phases.items()}}


def write_memory_record(mem: PeakMeter, job, cfg: dict, layout, metrics, step: int) -> dict:
    """Every rank's measured peak beside the prediction for it and their ratio; rank 0 writes it to
    metrics.jsonl (kind "memory") and keeps it for the summary. Collective (all_gather_object)."""
    try:
        pred = predict_run(job, cfg, layout)
    except Exception as e:  # a model the predictor does not know: measured only, and why
        pred, why = None, f"{type(e).__name__}: {e}"
    else:
        why = None
    measured: list = [None] * layout.world
    mine = (mem.peak, mem.baseline)
    if dist.is_initialized():
        dist.all_gather_object(measured, mine)
    else:
        measured = [mine]
    per_rank = pred.per_rank if pred else [None] * len(measured)
    rec = {"kind": "memory", "step": step, "device": mem.device,
           "measured_bytes": [m[0] for m in measured], "baseline_bytes": [m[1] for m in measured],
           "predicted_bytes": [p.above_baseline if p else None for p in per_rank],
           "ratio": [round(p.above_baseline / m[0], 3) if p and m[0] else None for p, m in zip(per_rank, measured, strict=True)],
           "predicted_total_bytes": [p.above_baseline + m[1] if p else None for p, m in zip(per_rank, measured, strict=True)],
           "predicted_parts": [p.parts if p else None for p in per_rank]}
    if why:
        rec["prediction_error"] = why
    mem.record = rec
    metrics.write(rec)
    if dist.is_initialized() and dist.get_rank() == 0 and mem.device == "cpu":
        store_baseline(mem.baseline, "measured by rank 0 of a run")  # what labs plan adds to its prediction
    return rec


def summary_row(rec: dict | None) -> list[tuple[str, str]]:
    """The run summary's line: each rank's measured peak beside the prediction and their ratio."""
    if not rec or not rec.get("measured_bytes"):
        return []
    meas, pred = rec["measured_bytes"], rec.get("predicted_bytes") or []
    text = ("measured " + " / ".join(fmt_bytes(b) if b is not None else "-" for b in meas)
            + f" above the baseline ({fmt_bytes(max(rec.get('baseline_bytes') or [0]))}), after step {rec['step']}")
    if any(pred):
        text += ("; predicted " + " / ".join(fmt_bytes(p) if p else "-" for p in pred) + " (ratio "
                 + " / ".join(f"{r:.2f}" if r else "-" for r in rec.get("ratio") or []) + ")")
    return [("peak memory / rank", text)]
