"""What runs inside each rank: resolve the job, build the task, wrap it by strategy, train,
evaluate, checkpoint, export. Started by `labs launch` (with --run_dir, reading the resolved
files), directly under `deepspeed`/`torchrun` (`--module launcher.worker --job JOB`), or as one
process (`python -m tasks.fine_tune --dry_run`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from launcher.errors import LabsError
from launcher.rank_env import device, to_device

log = logging.getLogger("labs")


def parse_args(argv: list[str] | None, default_task: str | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launcher.worker", description=__doc__)
    p.add_argument("--job", help="job YAML (default: built-in defaults for the task)")
    p.add_argument("--run_dir", help="run folder; with job.yaml + ds_config.json written by `labs launch`")
    p.add_argument("--config_dir", help="where the resolved job.yaml + ds_config.json are (default: the run "
                                        "folder; a resume with overrides writes them under resumes/)")
    p.add_argument("--ds-config", "--ds_config", "--deepspeed_config", dest="ds_config",
                   help="DeepSpeed JSON config (--deepspeed_config as in DeepSpeed's add_config_arguments)")
    p.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed scripts' sake; always on")
    p.add_argument("--hostfile")
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry_run", "--dry-run", action="store_true")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max_steps", type=int)
    p.add_argument("--data_dir")
    p.add_argument("--resume", nargs="?", const="auto")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sets = [s for group in args.sets for s in group]
    if default_task and not args.job:
        args.sets = [f"task={default_task}", f"name={default_task}"] + args.sets
    for flag, key in (("epochs", "train.epochs"), ("max_steps", "train.max_steps"), ("data_dir", "data.data_dir")):
        if getattr(args, flag) is not None:
            args.sets.append(f"{key}={getattr(args, flag)}")
    return args


def resolve_in_rank(args: argparse.Namespace, world: int):
    """(job, ds_config, layout) for this rank; the same checks as `labs plan`."""
    from launcher import dsconfig
    from launcher.job import load_job
    from launcher.layout import Layout
    from launcher.plan import resolve

    conf = Path(args.config_dir or args.run_dir) if (args.config_dir or args.run_dir) else None
    if conf and (conf / "job.yaml").is_file() and not args.job:
        job = load_job(conf / "job.yaml", args.sets)
        cfg = json.loads((conf / "ds_config.json").read_text())
        layout = Layout.from_ds_config(cfg, world, str(conf / "ds_config.json"))
        cfg = dsconfig.resolve_batch(cfg, layout.dp, str(conf / "ds_config.json"))
        return job, cfg, layout
    job, cfg, _, layout = resolve(args.job, ds_config=args.ds_config, hostfile=args.hostfile,
                                  sets=args.sets, dry_run=args.dry_run, world=world)
    return job, cfg, layout


def _setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"[rank {rank}] %(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    if rank != 0:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    from launcher.rank_env import quiet_deepspeed
    quiet_deepspeed(run_dir / "logs" / f"rank{rank}.log")


def _seed(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _place_outputs(cfg: dict[str, Any], run_dir: Path) -> None:
    """What DeepSpeed's monitors and profiler write lands in the run folder: a relative (or missing)
    `output_path` of tensorboard / csv_monitor would be relative to each rank's working folder, and
    the flops profiler prints to the console unless given a file."""
    for key in ("tensorboard", "csv_monitor"):
        sec = cfg.get(key)
        if isinstance(sec, dict) and sec.get("enabled"):
            out = Path(sec.get("output_path") or "monitors")
            sec["output_path"] = str(out if out.is_absolute() else run_dir / out)
            sec.setdefault("job_name", run_dir.name)
    prof = cfg.get("flops_profiler")
    if isinstance(prof, dict) and prof.get("enabled"):
        out = Path(prof.get("output_file") or "flops_profiler.txt")
        prof["output_file"] = str(out if out.is_absolute() else run_dir / out)


def _comms_summary(cfg: dict[str, Any], run_dir: Path, rank: int) -> None:
    """With `comms_logger` enabled, DeepSpeed records every collective; its summary (collective over the
    ranks) goes to the rank-0 log and `comms_summary.json`."""
    sec = cfg.get("comms_logger")
    if not (isinstance(sec, dict) and sec.get("enabled")):
        return
    import deepspeed.comm as ds_comm
    summary = ds_comm.log_summary(return_dict=True) or {}
    if rank == 0:
        (run_dir / "comms_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        ops = summary.get("summary", {}) if isinstance(summary, dict) else {}
        log.info("communication (comms_logger): %s; details in comms_summary.json",
                 ", ".join(f"{op} x{sum(v.get('count', 0) for v in sizes.values())}" for op, sizes in ops.items())
                 or "no collective recorded")


def _setup_wandb(job, cfg: dict[str, Any], run_dir: Path) -> bool:
    section = dict(cfg.get("wandb") or {})
    if not (job.wandb.enabled or section.get("enabled")):
        return False
    mode = job.wandb.mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_DIR", str(run_dir.resolve()))
    if job.wandb.tags:
        os.environ["WANDB_TAGS"] = ",".join(job.wandb.tags)
    section.update(enabled=True, project=section.get("project") or job.wandb.project,
                   group=section.get("group") or job.wandb.group or f"{job.name}-{run_dir.name}")
    if job.wandb.entity or section.get("team"):
        section["team"] = section.get("team") or job.wandb.entity
    cfg["wandb"] = section
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    from launcher.rank_env import single_process_env
    single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from launcher import rank_env
    if args.run_dir:  # started by labs launch: the console is for rank 0's progress (-v: everything)
        rank_env.quiet_console(Path(args.run_dir) / "logs" / f"rank{rank}.log", rank)
    job, cfg, layout = resolve_in_rank(args, world)  # user errors surface before any collective

    import deepspeed
    import torch
    import torch.distributed as dist

    from launcher.engine import build_strategy
    from launcher.job import _build, job_to_dict
    from tasks import get_task
    from tasks.options import OPTIONS
    if os.environ["DS_ACCELERATOR"] == "cpu":
        rank_env.clear_stale_build_locks(say=lambda m: rank_env.to_console(f"[rank {rank}] {m}\n"))
        if not rank_env.comm_op_built() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            rank_env.to_console(f"[rank {rank}] building DeepSpeed's CPU comm op into {rank_env.extensions_dir()} "
                                f"(once per extensions folder, about {rank_env.COMM_OP_SECONDS} s)\n")
    from launcher.memory import PeakMeter  # the rank's baseline: resident memory after the framework's imports
    mem = PeakMeter("cpu" if os.environ["DS_ACCELERATOR"] == "cpu" or not torch.cuda.is_available() else "cuda")
    deepspeed.init_distributed(dist_backend="gloo" if os.environ["DS_ACCELERATOR"] == "cpu" else None)
    mem.mark("distributed")
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        import datetime as dt
        box = [str(Path(job.train.output_dir) / job.name / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    _setup_logging(run_dir, rank)
    stop = rank_env.StopRequest(run_dir, rank_env.parse_duration(job.train.max_time))  # from now on a signal saves
    if rank == 0 and not (run_dir / "job.yaml").is_file():
        import yaml
        (run_dir / "job.yaml").write_text(yaml.safe_dump(job_to_dict(job), sort_keys=False))
        (run_dir / "ds_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    use_wandb = _setup_wandb(job, cfg, run_dir)
    _place_outputs(cfg, run_dir)

    task = get_task(job.task)
    options = _build(OPTIONS[job.task], job.options, job.path, "options.")
    _seed(job.train.seed)
    parts = task.build(job, options, dry_run=args.dry_run)
    mem.mark("built")
    n_params = sum(p.numel() for p in parts.model.parameters())
    n_train = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
    from launcher.dsconfig import ops_needed
    for op, seconds, built in ops_needed(cfg):
        if not built and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            rank_env.to_console(f"[rank {rank}] building DeepSpeed's {op} op into {rank_env.extensions_dir()} "
                                f"(once per extensions folder, about {seconds} s)\n")
    strategy = build_strategy(parts.model, cfg, layout)
    if job.train.compile:  # the plan allows it for data parallel only
        log.info("compiling the model with torch.compile (DeepSpeed engine.compile(); the first steps include it)")
        strategy.engine.compile()
    mem.mark("engine")
    log.info("task %s | model %s | %s params (%.1f%% trainable) | %s | ZeRO-%s | host %s",
             job.task, job.model.name, f"{n_params:,}", 100.0 * n_train / max(n_params, 1),
             layout.describe(), cfg.get("zero_optimization", {}).get("stage", 0), os.uname().nodename)

    metrics = Metrics(run_dir / "metrics.jsonl", rank, cfg["train_batch_size"])
    metrics.monitor = strategy.monitor
    if use_wandb and rank == 0:
        import wandb
        if wandb.run is not None:
            wandb.config.update({"layout": {"world": layout.world, "dp": layout.dp, "tp": layout.tp,
                                            "pp": layout.pp}, "ds_config": cfg, "job": job_to_dict(job)},
                                allow_val_change=True)

    mb, ga = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    dp_rank = layout.dp_rank(rank)
    sampler = torch.utils.data.DistributedSampler(parts.train_data, num_replicas=layout.dp, rank=dp_rank,
                                                  shuffle=True, seed=job.train.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(parts.train_data, batch_size=mb, sampler=sampler,
                                         collate_fn=parts.collate, drop_last=True)
    steps_per_epoch = len(loader) // ga
    if steps_per_epoch == 0:
        raise LabsError(f"{job.path}: {len(parts.train_data)} training samples are fewer than one global "
                        f"batch (train_batch_size {cfg['train_batch_size']}); give more data or lower the batch")
    total = steps_per_epoch * job.train.epochs
    if job.train.max_steps:
        total = min(total, job.train.max_steps)

    ckpt_dir = run_dir / "checkpoints"
    step = 0
    if args.resume:
        from launcher import checkpoints
        best = checkpoints.newest(ckpt_dir)
        if best is None:
            raise LabsError(f"--resume {run_dir}: no complete checkpoint in {ckpt_dir}; start a new run")
        if rank == 0 and (note := checkpoints.latest_note(ckpt_dir)):
            log.info("%s", note)
        step = strategy.load(ckpt_dir, best[1].name)["step"]
        log.info("resumed from %s at step %d", best[1], step)
    stopped: str | None = None

    def evaluate() -> dict[str, float]:
        sums = _eval_sums(task, strategy, parts, layout, dp_rank, mb)
        result = task.summarize(sums)
        metrics.write({"kind": "eval", "step": step, **result})
        log.info("eval @ step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    def save(reason: str = "scheduled") -> None:
        strategy.save(ckpt_dir, f"step{step}", {"step": step}, manifest(job, cfg, layout, step, reason),
                      keep=job.train.keep_checkpoints)

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="train", unit="step",
               dynamic_ncols=True, mininterval=1.0, file=sys.stdout)
    eval_result: dict[str, float] = {}
    last_eval = last_save = -1
    train_time, tokens_seen, loss, local_samples = 0.0, 0, float("nan"), 0
    dev = device()
    while step < total:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range((step % steps_per_epoch) * ga):
            next(batches)
        while step < total and step // steps_per_epoch == epoch:
            micro = [to_device(next(batches), dev) for _ in range(ga)]
            tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                         for b in micro) * layout.dp
            t0 = time.perf_counter()
            loss = strategy.train_step(micro)
            local_samples += sum(len(b["input_ids"]) for b in micro)
            dt_step = time.perf_counter() - t0
            step += 1
            train_time += dt_step
            if mem.peak is None and (step >= mem.steps or step == total):  # the peak of the first steps
                from launcher.memory import write_memory_record
                mem.finish(step)
                write_memory_record(mem, job, cfg, layout, metrics, step)  # collective: every rank is here
            tokens_seen += tokens
            if not math.isfinite(loss):
                raise RuntimeError(f"loss became {loss} at step {step}")
            if step % job.train.log_every == 0 or step == total:
                from launcher import mfu  # FLOPs/token and the peak: worked out (and logged) at the first call
                metrics.write({"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": strategy.lr(),
                               "grad_norm": strategy.grad_norm(),
                               "tokens_per_s": tokens / dt_step, "step_time_s": dt_step,
                               **mfu.train_fields(parts.model, micro, cfg, layout, tokens, dt_step)})
                log.debug("step %d loss %.5f", step, loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
            if job.train.eval_every and step % job.train.eval_every == 0:
                eval_result, last_eval = evaluate(), step
            if job.train.save_every and step % job.train.save_every == 0:
                save()
                last_save = step
            if step < total and (stopped := stop.agreed()):
                break
        if stopped:
            break
        if not job.train.eval_every and step != last_eval:
            eval_result, last_eval = evaluate(), step
    bar.close()
    if stopped:
        return _stop_early(strategy, save, step, last_save, stopped, run_dir, rank, loss)
    if step != last_eval:
        eval_result = evaluate()
    if step != last_save:
        save()

    _comms_summary(cfg, run_dir, rank)
    model_dir = run_dir / "hf"
    if job.train.export:
        log.info("gathering the final weights on rank 0%s ...",
                 " from the partitioned checkpoint (ZeRO-3)" if cfg.get("zero_optimization", {}).get("stage") == 3 else "")
        state = strategy.full_state_dict(ckpt_dir / f"step{step}")
        probe = {k: v[:1] for k, v in parts.collate([parts.eval_data[0]]).items()}
        logits = strategy.forward(to_device(probe, device())).logits.detach().float().cpu()
        if rank == 0:
            t_export = time.perf_counter()
            log.info("exporting the model in Hugging Face format to %s ...", model_dir)
            task.export(parts, state, model_dir)
            log.info("exported in %.1f s", time.perf_counter() - t_export)
            torch.save({"batch": probe, "logits": logits}, run_dir / "probe_logits.pt")
        dist.barrier()
    from launcher import mfu
    if job.train.checkpoint is False:  # e.g. a dry run: nothing to resume, and it can be 100s of MB
        if rank == 0:
            import shutil
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        dist.barrier()
    summary = {"task": job.task, "steps": step, "world": layout.world, "layout": layout.describe(),
               "zero_stage": cfg.get("zero_optimization", {}).get("stage", 0),
               "final_train_loss": loss, **eval_result,
               "tokens_per_s": tokens_seen / train_time if train_time else 0.0,
               **mfu.summary_fields(parts.model, tokens_seen, train_time),
               "train_time_s": train_time, "run_dir": str(run_dir),
               "model_dir": str(model_dir) if job.train.export else None,
               "checkpoint_dir": str(ckpt_dir) if job.train.checkpoint is not False else None,
               "memory": mem.record, "ranks": _rank_info(strategy, rank, layout.world, local_samples, mem)}
    # every rank says where it ran and what it did: multi-host runs are checked from these lines
    rank_env.to_console(f"rank {rank} host {os.uname().nodename}: {step} steps, {local_samples} samples of its "
                        f"shard, loss {loss:.4f}\n")
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary)
        if use_wandb:
            import wandb
            if wandb.run is not None:
                wandb.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
                where = wandb.run.dir
                wandb.finish()
                log.info("W&B run (%s) written to %s%s", os.environ.get("WANDB_MODE"), where,
                         "; upload it with `wandb sync " + str(Path(where).parent) + "`"
                         if os.environ.get("WANDB_MODE") == "offline" else "")
    log.info("done: %d steps, final loss %.4f", step, loss)
    return summary


def manifest(job, cfg: dict[str, Any], layout, step: int, reason: str):
    from launcher import checkpoints
    from launcher.job import job_to_dict
    return checkpoints.Manifest(step=step, world=layout.world, dp=layout.dp, tp=layout.tp, pp=layout.pp, sp=layout.sp,
                                zero_stage=int(cfg.get("zero_optimization", {}).get("stage", 0)),
                                precision=checkpoints.precision(cfg), job_sha=checkpoints.sha(job_to_dict(job)),
                                config_sha=checkpoints.sha(cfg), reason=reason)


def _stop_early(strategy, save, step: int, last_save: int, reason: str, run_dir: Path, rank: int,
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


def _rank_info(strategy, rank: int, world: int, local_samples: int, mem=None) -> list[dict[str, Any]]:
    """Per rank: peak RSS and what the strategy says this rank holds (collective; rank 0 keeps it)."""
    import resource

    import torch.distributed as dist
    info = {"rank": rank, "host": os.uname().nodename, "samples": local_samples, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **(strategy.shard_info() if hasattr(strategy, "shard_info") else {}), **(mem.report() if mem else {})}
    out: list[Any] = [None] * world
    dist.all_gather_object(out, info)
    return out


def _eval_sums(task, strategy, parts, layout, dp_rank: int, mb: int) -> dict[str, float]:
    """Metric sums over the whole eval split, identical for any world size: each data-parallel
    rank takes every dp-th sample; ranks short of batches repeat one with weight 0 so that every
    rank runs the same number of forwards (ZeRO-3 and pipelines need that)."""
    import torch
    import torch.distributed as dist

    n = len(parts.eval_data)
    dev = device()
    mine = list(range(dp_rank, n, layout.dp))
    n_batches = math.ceil(math.ceil(n / layout.dp) / mb)
    sums: dict[str, float] = {}
    from tqdm import tqdm
    show = (not dist.is_initialized() or dist.get_rank() == 0) and n_batches > 1
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


def _print_summary(s: dict[str, Any]) -> None:
    rows = [("steps", s["steps"]), ("layout", s["layout"]), ("ZeRO stage", s["zero_stage"]),
            ("final train loss", f"{s['final_train_loss']:.4f}")]
    rows += [(k.replace("_", " "), f"{v:.4f}") for k, v in s.items()
             if k in ("eval_loss", "perplexity", "accuracy")]
    from launcher.memory import summary_row
    from launcher.mfu import summary_rows
    rows += [("tokens/s", f"{s['tokens_per_s']:.0f}"), *summary_rows(s), *summary_row(s.get("memory")),
             ("train time", f"{s['train_time_s']:.1f} s"),
             ("model saved to", s["model_dir"]), ("checkpoints", s["checkpoint_dir"] or "none kept (train.checkpoint: false, as in dry runs)")]
    width = max(len(k) for k, _ in rows)
    print("\n== summary\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)


def main(argv: list[str] | None = None, default_task: str | None = None) -> None:
    from launcher.rank_env import EXIT_STOPPED
    args = parse_args(argv, default_task)
    status = RankStatus(args.run_dir)
    code, error = 0, ""
    try:
        if run(args).get("status") == "stopped":
            code = EXIT_STOPPED
    except LabsError as e:
        error = f"error: {e}"
        print(f"[rank {os.environ.get('RANK', '0')}] {error}", file=sys.stderr, flush=True)
        code = 2
    except BaseException:  # printed here: _leave may end the process before Python would print it
        error = traceback.format_exc()
        print(error, end="", file=sys.stderr, flush=True)
        code = 1
    if error and log.handlers:
        log.error("%s", error.rstrip())  # the rank's own log holds its traceback, not only its stderr
    status.finish(code, error)
    _leave(code)


class RankStatus:
    """`logs/rank<N>.status.json`: this rank's host and pid from its start, its exit code and error at
    its end. `labs launch` reads them to name the rank that failed first (a rank killed by a signal or
    the OOM killer leaves a start record only) instead of the peers that failed on its closed socket."""

    def __init__(self, run_dir: str | None):
        rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK")
        self.path = Path(run_dir) / "logs" / f"rank{rank}.status.json" if run_dir and rank is not None else None
        self.record: dict[str, Any] = {"rank": int(rank or 0), "host": os.uname().nodename, "pid": os.getpid(),
                                       "started": time.time()}
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.record) + "\n")
            os.replace(tmp, self.path)
        except OSError:
            pass

    def finish(self, code: int, error: str) -> None:
        self.record.update(exit=code, ended=time.time(), error=error[-4000:])
        self._write()


def _leave(code: int) -> None:
    """End this rank. With a process group: a last barrier when all went well, then ``os._exit``.

    Tearing gloo down on the way out (destroy_process_group or the interpreter's own finalisers) races
    with peers on other hosts that have already gone: the job then ends in ``terminate called without
    an active exception`` (SIGABRT) on a rank that trained correctly. Everything this rank wrote is
    closed by now, so flushing the streams and leaving without C++ teardown is safe; on an error the
    rank leaves at once and its peers fail on the closed connection instead of waiting on a barrier.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    from launcher.rank_env import EXIT_STOPPED
    if code in (0, EXIT_STOPPED):
        try:
            dist.barrier()
        except Exception as e:  # a peer died after this rank finished
            print(f"[rank {os.environ.get('RANK', '0')}] error: final barrier failed: {e}", file=sys.stderr)
            code = 1
    mpi = sys.modules.get("mpi4py.MPI")  # started by mpirun: it counts a rank without MPI_Finalize as failed
    if code == 0 and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
