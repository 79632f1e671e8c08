"""What a rank writes about its run: metrics.jsonl (mirrored to DeepSpeed's monitors: W&B, csv, tensorboard),
the evaluation sums over the whole eval split, the early-stop record, every rank's line and the summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from launcher.common.proc import device, to_device
from launcher.rank.mfu import summary_rows

log = logging.getLogger("labs")


class Metrics:
    """metrics.jsonl on global rank 0, mirrored to the DeepSpeed monitors (W&B, csv, tensorboard)."""

    def __init__(self, path: Path, rank: int, samples_per_step: int):
        self.file = open(path, "a") if rank == 0 else None
        self.monitor = None
        # DeepSpeed's monitors log at step = samples seen (its own Train/Samples/lr); W&B drops
        # events whose step goes backwards, so ours use the same axis.
        self.samples_per_step = samples_per_step

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.monitor is not None and self.monitor.enabled:
            samples = record.get("step", 0) * self.samples_per_step
            self.monitor.write_events([(f"{record['kind']}/{k}", v, samples) for k, v in record.items()
                                       if isinstance(v, (int, float)) and k != "kind"])


def comms_summary(cfg: dict[str, Any], run_dir: Path, rank: int) -> None:
    """With `comms_logger` enabled, DeepSpeed records every collective; its summary (collective over the
    ranks) goes to the rank-0 log and `comms_summary.json`."""
    sec = cfg.get("comms_logger")
    if not (isinstance(sec, dict) and sec.get("enabled")):
        return
    # keeps torch and DeepSpeed out of the labs process
    import deepspeed.comm as ds_comm
    summary = ds_comm.log_summary(return_dict=True) or {}
    if rank == 0:
        (run_dir / "comms_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        ops = summary.get("summary", {}) if isinstance(summary, dict) else {}
        log.info("communication (comms_logger): %s; details in comms_summary.json",
                 ", ".join(f"{op} x{sum(v.get('count', 0) for v in sizes.values())}" for op, sizes in ops.items())
                 or "no collective recorded")


def stop_early(strategy, save, step: int, last_save: int, reason: str, run_dir: Path, rank: int,
                loss: float) -> dict[str, Any]:
    """Every rank agreed to stop after `step`: save that step's checkpoint (unless just saved), record
    why, and leave with EXIT_STOPPED; no evaluation or export (the run is not finished)."""
    if step != last_save:
        save(reason)
    record = {"status": "stopped", "reason": reason, "step": step, "checkpoint": str(run_dir / "checkpoints" /
              f"step{step}"), "final_train_loss": loss, "run_dir": str(run_dir)}
    if rank == 0:
        (run_dir / "stopped.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("stopped after step %d (%s); checkpoint %s saved: continue with --resume %s",
             step, reason, record["checkpoint"], run_dir)
    return record


def rank_info(strategy, rank: int, world: int, local_samples: int, mem=None) -> list[dict[str, Any]]:
    """Per rank: peak RSS and what the strategy says this rank holds (collective; rank 0 keeps it)."""

    # keeps torch and DeepSpeed out of the labs process
    import torch.distributed as dist
    info = {"rank": rank, "host": os.uname().nodename, "samples": local_samples, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **(strategy.shard_info() if hasattr(strategy, "shard_info") else {}), **(mem.report() if mem else {})}
    out: list[Any] = [None] * world
    dist.all_gather_object(out, info)
    return out


def eval_sums(task, strategy, parts, layout, dp_rank: int, mb: int) -> dict[str, float]:
    """Metric sums over the whole eval split, identical for any world size: each data-parallel
    rank takes every dp-th sample; ranks short of batches repeat one with weight 0 so that every
    rank runs the same number of forwards (ZeRO-3 and pipelines need that)."""
    # keeps torch and DeepSpeed out of the labs process
    import torch

    # keeps torch and DeepSpeed out of the labs process
    import torch.distributed as dist

    n = len(parts.eval_data)
    dev = device()
    mine = list(range(dp_rank, n, layout.dp))
    n_batches = math.ceil(math.ceil(n / layout.dp) / mb)
    sums: dict[str, float] = {}
    show = (not dist.is_initialized() or dist.get_rank() == 0) and n_batches > 1
    with torch.no_grad():  # an evaluation keeps no graph (nor its memory: the step-0 eval comes first)
        for i in tqdm(range(n_batches), desc="eval", unit="batch", disable=not show, leave=False, file=sys.stdout,
                      mininterval=1.0, dynamic_ncols=True):
            idx = mine[i * mb:(i + 1) * mb]
            weight = 1.0 if idx else 0.0
            batch = to_device(parts.collate([parts.eval_data[j] for j in (idx or mine[:1] or [0])]), dev)
            for k, v in task.eval_batch(strategy.forward(batch), batch).items():
                sums[k] = sums.get(k, 0.0) + weight * v
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=dev)
    if dist.is_initialized() and layout.dp > 1:
        dist.all_reduce(t)
        t /= layout.world // layout.dp  # every rank of a tp/pp/sp group holds the same sums
    return dict(zip(keys, t.tolist(), strict=True))


SKIP_GENERATION = {
    "pipeline": "pipeline parallel: each stage holds some of the layers, and HF generate needs the whole model in "
                "one process (the exported hf/ folder generates)",
    "sequence": "sequence parallel: the attention expects every rank's slice of each sequence, which generate's "
                "one-token steps do not give (the exported hf/ folder generates)",
}
"""Layouts where the before/after samples are skipped, with the reason the summary gives."""


def generate_samples(strategy, parts, layout, zero_stage: int, prompts: list[str], tokens: int) -> dict[str, Any]:
    """Greedy answers of the model as it stands to `prompts` ({"samples": [...]}), or why there are none
    ({"skipped": reason}); {} for a model that does not generate (a classifier). Data and tensor parallel
    (ZeRO 0-3) generate on every rank in step (ZeRO-3 gathers the parameters, AutoTP all-reduces)."""
    if not prompts:
        return {}
    if layout.pp > 1 or layout.sp > 1:
        return {"skipped": SKIP_GENERATION["pipeline" if layout.pp > 1 else "sequence"]}
    model = strategy.module
    try:
        generates = bool(model.can_generate())
    except AttributeError:
        generates = False
    if not generates:
        return {}
    # keeps torch, DeepSpeed and transformers out of the labs process (tasks.causal_lm imports them)
    from tasks.causal_lm import greedy_samples
    synced = zero_stage == 3 or layout.tp > 1
    return {"samples": greedy_samples(model, parts.tokenizer, prompts, tokens, synced=synced)}


def before_from_metrics(path: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """A resumed run's step-0 evaluation and samples, as its first start recorded them in metrics.jsonl."""
    ev: dict[str, float] = {}
    samples: dict[str, Any] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if rec.get("step") == 0 and rec.get("kind") == "eval" and not ev:
            ev = {k: v for k, v in rec.items() if k not in ("kind", "step")}
        elif rec.get("step") == 0 and rec.get("kind") == "samples" and not samples:
            samples = {k: v for k, v in rec.items() if k in ("samples", "skipped")}
    return ev, samples


def _sample_rows(s: dict[str, Any]) -> list[str]:
    if s.get("samples_skipped"):
        return [f"  samples: none ({s['samples_skipped']})"]
    before, after = s.get("samples_before") or [], s.get("samples_after") or []
    if not after:
        return []
    lines = [f"  greedy samples ({s.get('sample_tokens', '?')} new tokens), before -> after training:"]
    for i, a in enumerate(after):
        b = before[i]["answer"] if i < len(before) else "?"
        lines.append(f"    {a['prompt']!r}: {b!r} -> {a['answer']!r}")
    return lines


def print_summary(s: dict[str, Any]) -> None:
    rows = [("steps", s["steps"]), ("layout", s["layout"]), ("ZeRO stage", s["zero_stage"]),
            ("final train loss", f"{s['final_train_loss']:.4f}")]
    before = s.get("eval_before") or {}
    rows += [(k.replace("_", " ") + (" (step 0 -> end)" if k in before else ""),
              (f"{before[k]:.4f} -> " if k in before else "") + f"{v:.4f}") for k, v in s.items()
             if k in ("eval_loss", "perplexity", "accuracy")]
    # keeps torch and DeepSpeed out of the labs process
    from launcher.rank.meters import summary_row
    rows += [("tokens/s", f"{s['tokens_per_s']:.0f}"), *summary_rows(s), *summary_row(s.get("memory")),
             ("train time", f"{s['train_time_s']:.1f} s"),
             ("model saved to", s["model_dir"] or "not exported (train.export: false)"), ("checkpoints", s["checkpoint_dir"] or "none kept (train.checkpoint: false, as in dry runs)")]
    width = max(len(k) for k, _ in rows)
    print("\n== summary\n" + "\n".join([f"  {k:<{width}}  {v}" for k, v in rows] + _sample_rows(s)), flush=True)
