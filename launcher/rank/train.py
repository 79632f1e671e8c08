"""Inside every rank: build -> fit -> train_step -> evaluate -> finish, each a named function.

`run(args)` resolves the job (the same checks as `labs plan`, before any collective), starts the process group,
builds the task's parts and wraps the model by the strategy the layout chooses (launcher/parallel), then
`fit` loops over epochs and steps (`step_once` is one optimizer step), evaluating and checkpointing as the job
says, and `finish` exports the model, writes the summary and says what the run folder holds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from launcher.checkpoint.store import Manifest, latest_note, newest, sha
from launcher.common.errors import LabsError
from launcher.common.proc import (
    COMM_OP_SECONDS,
    clear_stale_build_locks,
    comm_op_built,
    device,
    extensions_dir,
    single_process_env,
    to_device,
)
from launcher.common.run_dir import CHECKPOINTS, DS_CONFIG, HF, JOB, METRICS, PROBE, SUMMARY, rank_log
from launcher.common.text import parse_duration
from launcher.config.ds.load import precision
from launcher.config.ds.optim import ops_needed
from launcher.config.job import job_to_dict
from launcher.config.schema import build_section
from launcher.parallel.build import build_strategy
from launcher.rank import mfu
from launcher.rank.meters import PeakMeter, write_memory_record
from launcher.rank.report import (
    Metrics,
    before_from_metrics,
    comms_summary,
    eval_sums,
    generate_samples,
    print_summary,
    rank_info,
    stop_early,
)
from launcher.rank.setup import (
    StopRequest,
    log,
    place_outputs,
    quiet_console,
    resolve_in_rank,
    seed_everything,
    setup_logging,
    setup_wandb,
    to_console,
)
from tasks.options import OPTIONS
from tasks.registry import get_task


@dataclass
class Run:
    """What one rank's run holds while it trains."""

    args: argparse.Namespace
    job: Any
    cfg: dict[str, Any]
    layout: Any
    rank: int
    run_dir: Path
    task: Any = None
    parts: Any = None
    strategy: Any = None
    metrics: Any = None
    mem: Any = None
    stop: Any = None
    use_wandb: bool = False
    step: int = 0
    loss: float = float("nan")
    train_time: float = 0.0
    tokens_seen: int = 0
    local_samples: int = 0
    eval_result: dict[str, float] = field(default_factory=dict)
    eval_before: dict[str, float] = field(default_factory=dict)
    samples_before: dict[str, Any] = field(default_factory=dict)
    last_eval: int = -1
    last_save: int = -1

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS


def run(args: argparse.Namespace) -> dict[str, Any]:
    single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.run_dir:  # started by labs launch: the console is for rank 0's progress (-v: everything)
        quiet_console(rank_log(Path(args.run_dir), rank), rank)
    job, cfg, layout = resolve_in_rank(args, world)  # user errors surface before any collective
    r = start(args, job, cfg, layout, rank)
    build(r)
    stopped = fit(r)
    if stopped:
        return stop_early(r.strategy, lambda reason: save(r, reason), r.step, r.last_save, stopped, r.run_dir,
                          rank, r.loss)
    return finish(r)


def start(args: argparse.Namespace, job, cfg: dict[str, Any], layout, rank: int) -> Run:
    """The process group, the run folder (broadcast from rank 0 when no launcher made one), logging, the stop
    signal, and the resolved files written once."""
    if os.environ["DS_ACCELERATOR"] == "cpu":
        clear_stale_build_locks(say=lambda m: to_console(f"[rank {rank}] {m}\n"))
        if not comm_op_built() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            to_console(f"[rank {rank}] building DeepSpeed's CPU comm op into {extensions_dir()} "
                       f"(once per extensions folder, about {COMM_OP_SECONDS} s)\n")
    # the rank's baseline: resident memory after the framework's imports
    mem = PeakMeter("cpu" if os.environ["DS_ACCELERATOR"] == "cpu" or not torch.cuda.is_available() else "cuda")
    deepspeed.init_distributed(dist_backend="gloo" if os.environ["DS_ACCELERATOR"] == "cpu" else None)
    mem.mark("distributed")
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        box = [str(Path(job.train.output_dir) / job.name / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    setup_logging(run_dir, rank)
    r = Run(args, job, cfg, layout, rank, run_dir, mem=mem)
    r.stop = StopRequest(run_dir, parse_duration(job.train.max_time))  # from now on a signal saves
    if rank == 0 and not (run_dir / JOB).is_file():
        (run_dir / JOB).write_text(yaml.safe_dump(job_to_dict(job), sort_keys=False))
        (run_dir / DS_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    r.use_wandb = setup_wandb(job, cfg, run_dir)
    place_outputs(cfg, run_dir)
    return r


def build(r: Run) -> None:
    """The task's parts, the strategy wrapping its model, the metrics file and W&B's config."""
    job, cfg, layout = r.job, r.cfg, r.layout
    r.task = get_task(job.task)
    options = build_section(OPTIONS[job.task], job.options, job.path, "options.")
    seed_everything(job.train.seed)
    r.parts = r.task.build(job, options, dry_run=r.args.dry_run)
    r.mem.mark("built")
    n_params = sum(p.numel() for p in r.parts.model.parameters())
    n_train = sum(p.numel() for p in r.parts.model.parameters() if p.requires_grad)
    for op, seconds, built in ops_needed(cfg):
        if not built and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            to_console(f"[rank {r.rank}] building DeepSpeed's {op} op into {extensions_dir()} "
                       f"(once per extensions folder, about {seconds} s)\n")
    r.strategy = build_strategy(r.parts.model, cfg, layout)
    if job.train.compile:  # the plan allows it where the strategy table says so (data parallel)
        log.info("compiling the model with torch.compile (DeepSpeed engine.compile(); the first steps include it)")
        r.strategy.engine.compile()
    r.mem.mark("engine")
    log.info("task %s | model %s | %s params (%.1f%% trainable) | %s | ZeRO-%s | host %s",
             job.task, job.model.name, f"{n_params:,}", 100.0 * n_train / max(n_params, 1),
             layout.describe(), cfg.get("zero_optimization", {}).get("stage", 0), os.uname().nodename)
    r.metrics = Metrics(r.run_dir / METRICS, r.rank, cfg["train_batch_size"])
    r.metrics.monitor = r.strategy.monitor
    if r.use_wandb and r.rank == 0:
        # imported only when used (wandb is slow to import)
        import wandb
        if wandb.run is not None:
            wandb.config.update({"layout": {"world": layout.world, "dp": layout.dp, "tp": layout.tp,
                                            "pp": layout.pp}, "ds_config": cfg, "job": job_to_dict(job)},
                                allow_val_change=True)


def loader(r: Run):
    """(sampler, loader, steps per epoch, total steps): each data-parallel rank reads its own shard."""
    cfg, job, parts = r.cfg, r.job, r.parts
    mb, ga = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    sampler = torch.utils.data.DistributedSampler(parts.train_data, num_replicas=r.layout.dp,
                                                  rank=r.layout.dp_rank(r.rank), shuffle=True, seed=job.train.seed,
                                                  drop_last=True)
    data = torch.utils.data.DataLoader(parts.train_data, batch_size=mb, sampler=sampler, collate_fn=parts.collate,
                                       drop_last=True)
    steps_per_epoch = len(data) // ga
    if steps_per_epoch == 0:
        raise LabsError(f"{job.path}: {len(parts.train_data)} training samples are fewer than one global "
                        f"batch (train_batch_size {cfg['train_batch_size']}); give more data or lower the batch")
    total = steps_per_epoch * job.train.epochs
    if job.train.max_steps:
        total = min(total, job.train.max_steps)
    return sampler, data, steps_per_epoch, total


def resume(r: Run) -> None:
    best = newest(r.ckpt_dir)
    if best is None:
        raise LabsError(f"--resume {r.run_dir}: no complete checkpoint in {r.ckpt_dir}; start a new run")
    if r.rank == 0 and (note := latest_note(r.ckpt_dir)):
        log.info("%s", note)
    r.step = r.strategy.load(r.ckpt_dir, best[1].name)["step"]
    log.info("resumed from %s at step %d", best[1], r.step)


def evaluate(r: Run) -> dict[str, float]:
    sums = eval_sums(r.task, r.strategy, r.parts, r.layout, r.layout.dp_rank(r.rank),
                     r.cfg["train_micro_batch_size_per_gpu"])
    result = r.task.summarize(sums)
    r.metrics.write({"kind": "eval", "step": r.step, **result})
    log.info("eval @ step %d: %s", r.step, " ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result


def save(r: Run, reason: str = "scheduled") -> None:
    r.strategy.save(r.ckpt_dir, f"step{r.step}", {"step": r.step}, manifest(r.job, r.cfg, r.layout, r.step, reason),
                    keep=r.job.train.keep_checkpoints)


def fit(r: Run) -> str | None:
    """Epochs of steps from the resumed step on; the reason when every rank agreed to stop early."""
    sampler, data, steps_per_epoch, total = loader(r)
    if r.args.resume:
        resume(r)
    before(r)
    bar = tqdm(total=total, initial=r.step, disable=r.rank != 0, desc="train", unit="step",
               dynamic_ncols=True, mininterval=1.0, file=sys.stdout)
    ga, train = r.cfg["gradient_accumulation_steps"], r.job.train
    r.last_eval, r.last_save = (0 if r.step == 0 else -1), -1
    stopped, dev = None, device()
    while r.step < total and not stopped:
        epoch = r.step // steps_per_epoch
        sampler.set_epoch(epoch)
        batches = iter(data)
        for _ in range((r.step % steps_per_epoch) * ga):
            next(batches)
        while r.step < total and r.step // steps_per_epoch == epoch:
            step_once(r, [to_device(next(batches), dev) for _ in range(ga)], epoch, total)
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.4f}", epoch=epoch)
            if train.eval_every and r.step % train.eval_every == 0:
                r.eval_result, r.last_eval = evaluate(r), r.step
            if train.save_every and r.step % train.save_every == 0:
                save(r)
                r.last_save = r.step
            if r.step < total and (stopped := r.stop.agreed()):
                break
        if not stopped and not train.eval_every and r.step != r.last_eval:
            r.eval_result, r.last_eval = evaluate(r), r.step
    bar.close()
    return stopped


def samples(r: Run) -> dict[str, Any]:
    """The greedy answers to the job's train.sample_prompts as the model stands now (metrics.jsonl "samples")."""
    t, t0 = r.job.train, time.perf_counter()
    out = generate_samples(r.strategy, r.parts, r.layout, int(r.cfg.get("zero_optimization", {}).get("stage", 0)),
                           t.sample_prompts, t.sample_tokens)
    if out:
        r.metrics.write({"kind": "samples", "step": r.step, **out})
        log.info("samples @ step %d: %s (%.1f s)", r.step, "; ".join(f"{x['prompt']!r} -> {x['answer']!r}" for x in
                 out.get("samples", [])) or f"skipped: {out['skipped']}", time.perf_counter() - t0)
    return out


def before(r: Run) -> None:
    """The model before training: the step-0 evaluation and samples (a resumed run reads its first start's)."""
    if r.step == 0:
        r.samples_before = samples(r)
        r.eval_before = evaluate(r)
    elif r.rank == 0:
        r.eval_before, r.samples_before = before_from_metrics(r.run_dir / METRICS)


def step_once(r: Run, micro: list[dict[str, torch.Tensor]], epoch: int, total: int) -> None:
    """One optimizer step over `micro` (gradient accumulation), its memory peak at the first steps, its metrics."""
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in micro) * r.layout.dp
    t0 = time.perf_counter()
    r.loss = r.strategy.train_step(micro)
    dt_step = time.perf_counter() - t0
    r.local_samples += sum(len(b["input_ids"]) for b in micro)
    r.step += 1
    r.train_time += dt_step
    if r.mem.peak is None and (r.step >= r.mem.steps or r.step == total):  # the peak of the first steps
        r.mem.finish(r.step)
        write_memory_record(r.mem, r.job, r.cfg, r.layout, r.metrics, r.step)  # collective: every rank is here
    r.tokens_seen += tokens
    if not math.isfinite(r.loss):
        raise RuntimeError(f"loss became {r.loss} at step {r.step}")
    if r.step % r.job.train.log_every == 0 or r.step == total:
        r.metrics.write({"kind": "train", "step": r.step, "epoch": epoch, "loss": r.loss, "lr": r.strategy.lr(),
                         "grad_norm": r.strategy.grad_norm(),
                         "tokens_per_s": tokens / dt_step, "step_time_s": dt_step,
                         **mfu.train_fields(r.parts.model, micro, r.cfg, r.layout, tokens, dt_step)})
        log.debug("step %d loss %.5f", r.step, r.loss)


def export(r: Run) -> Path | None:
    """The final weights gathered on rank 0 and saved in Hugging Face format, with one eval batch's logits."""
    if not r.job.train.export:
        return None
    model_dir = r.run_dir / HF
    log.info("gathering the final weights on rank 0%s ...",
             " from the partitioned checkpoint (ZeRO-3)" if r.cfg.get("zero_optimization", {}).get("stage") == 3 else "")
    state = r.strategy.full_state_dict(r.ckpt_dir / f"step{r.step}")
    probe = {k: v[:1] for k, v in r.parts.collate([r.parts.eval_data[0]]).items()}
    logits = r.strategy.forward(to_device(probe, device())).logits.detach().float().cpu()
    if r.rank == 0:
        t_export = time.perf_counter()
        log.info("exporting the model in Hugging Face format to %s ...", model_dir)
        r.task.export(r.parts, state, model_dir)
        log.info("exported in %.1f s", time.perf_counter() - t_export)
        torch.save({"batch": probe, "logits": logits}, r.run_dir / PROBE)
    dist.barrier()
    return model_dir


def finish(r: Run) -> dict[str, Any]:
    """Evaluate and save the last step if not done yet, export, drop unwanted checkpoints, write the summary."""
    if r.step != r.last_eval:
        r.eval_result = evaluate(r)
    after = samples(r)
    if r.step != r.last_save:
        save(r)
    comms_summary(r.cfg, r.run_dir, r.rank)
    model_dir = export(r)
    kept = r.job.train.checkpoint is not False
    if not kept:  # e.g. a dry run: nothing to resume, and it can be 100s of MB
        if r.rank == 0:
            shutil.rmtree(r.ckpt_dir, ignore_errors=True)
        dist.barrier()
    summary = {"task": r.job.task, "steps": r.step, "world": r.layout.world, "layout": r.layout.describe(),
               "zero_stage": r.cfg.get("zero_optimization", {}).get("stage", 0),
               "final_train_loss": r.loss, **r.eval_result, "eval_before": r.eval_before,
               "samples_before": r.samples_before.get("samples"), "samples_after": after.get("samples"),
               "samples_skipped": after.get("skipped"), "sample_tokens": r.job.train.sample_tokens,
               "tokens_per_s": r.tokens_seen / r.train_time if r.train_time else 0.0,
               **mfu.summary_fields(r.parts.model, r.tokens_seen, r.train_time),
               "train_time_s": r.train_time, "run_dir": str(r.run_dir),
               "model_dir": str(model_dir) if model_dir else None,
               "checkpoint_dir": str(r.ckpt_dir) if kept else None,
               "memory": r.mem.record, "ranks": rank_info(r.strategy, r.rank, r.layout.world, r.local_samples, r.mem)}
    # every rank says where it ran and what it did: multi-host runs are checked from these lines
    to_console(f"rank {r.rank} host {os.uname().nodename}: {r.step} steps, {r.local_samples} samples of its "
               f"shard, loss {r.loss:.4f}\n")
    if r.rank == 0:
        (r.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
        finish_wandb(r, summary)
    log.info("done: %d steps, final loss %.4f", r.step, r.loss)
    return summary


def finish_wandb(r: Run, summary: dict[str, Any]) -> None:
    if not r.use_wandb:
        return
    # imported only when used (wandb is slow to import)
    import wandb
    if wandb.run is not None:
        wandb.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        where = wandb.run.dir
        wandb.finish()
        log.info("W&B run (%s) written to %s%s", os.environ.get("WANDB_MODE"), where,
                 "; upload it with `wandb sync " + str(Path(where).parent) + "`"
                 if os.environ.get("WANDB_MODE") == "offline" else "")


def manifest(job, cfg: dict[str, Any], layout, step: int, reason: str) -> Manifest:
    return Manifest(step=step, world=layout.world, dp=layout.dp, tp=layout.tp, pp=layout.pp, sp=layout.sp,
                    zero_stage=int(cfg.get("zero_optimization", {}).get("stage", 0)),
                    precision=precision(cfg), job_sha=sha(job_to_dict(job)), config_sha=sha(cfg), reason=reason)
