"""The plain PyTorch baseline: the same job's model and data (built by the project's task code, same
seed), trained by a hand-written loop; DistributedDataParallel over gloo when started by torchrun.

    .venv/bin/python bench/torch_loop.py --job jobs/compare.yaml --steps 10 --micro 8 --accum 1 --threads 2
    torchrun --nproc_per_node 2 bench/torch_loop.py --job jobs/compare.yaml --steps 10 --micro 2 --accum 2 \\
        --threads 1 --out_json r.json --set data.block_size=64

Per optimizer step: `accum` micro-batches (no_sync on all but the last under DDP), gradient clipping
and AdamW with the values the labs arm's ds_config resolves for the same job (`labs_hparams`: lr, betas,
eps, weight decay, clipping; from scratch lr 3e-3 and 5 warm-up steps, fine-tuning a pretrained model lr 5e-5
and 10), its warm-up (DeepSpeed's WarmupLR, log-shaped from 0: `warmup_factor`), and the loss averaged over the ranks (as the labs worker logs it). bf16: autocast
(the model and the optimizer stay fp32), PyTorch's own mixed-precision idiom. With several ranks and
at least as many cores, each rank is pinned to one core (as DeepSpeed's --bind_cores_to_rank does).
--device cuda: one GPU per rank (LOCAL_RANK), nccl, autocast on the GPU, timers synchronised.
Rank 0 writes the step times, losses and a per-step breakdown to --out_json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parts(job_path: str, sets: list[str]):
    """The job's model and data exactly as a labs rank builds them (same seed, same blocks)."""
    import random

    import numpy as np
    import torch

    from launcher.config.job import load_job
    from launcher.config.schema import build_section
    from tasks.options import OPTIONS
    from tasks.registry import get_task
    job = load_job(job_path, sets)
    options = build_section(OPTIONS[job.task], job.options, job.path, "options.")
    random.seed(job.train.seed)
    np.random.seed(job.train.seed)
    torch.manual_seed(job.train.seed)
    return job, get_task(job.task).build(job, options, dry_run=False)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="jobs/compare.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--optimizer", default="default", choices=["default", "foreach", "fused"])
    p.add_argument("--ds_config", help="(HF Trainer script only)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per rank, nccl")
    p.add_argument("--out_json")
    p.add_argument("--set", dest="sets", nargs="*", default=[])
    return p.parse_args(argv)


def pin(local_rank: int, local_world: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if local_world > 1 and len(cores) >= local_world:
        per = len(cores) // local_world
        os.sched_setaffinity(0, cores[local_rank * per:(local_rank + 1) * per])


def labs_hparams(job_path: str, sets: list[str], world: int) -> dict:
    """The optimizer, warm-up and clipping the labs arm's ds_config resolves for this job (its "auto" values:
    lr, weight decay and warm-up steps from the job, or the from-scratch / fine-tuning defaults of
    launcher/config/ds/auto.py), read through the same `launcher.resolve.resolve` that `labs launch` runs."""
    from launcher.resolve import resolve
    _, cfg, _, _ = resolve(job_path, sets=sets, world=world)
    opt, sched = cfg["optimizer"]["params"], cfg["scheduler"]
    assert sched["type"] == "WarmupLR" and sched["params"].get("warmup_type", "log") == "log", sched
    assert sched["params"]["warmup_min_lr"] == 0, sched  # warmup_factor's schedule starts from 0
    return {"lr": sched["params"]["warmup_max_lr"], "betas": tuple(opt["betas"]), "eps": opt["eps"],
            "weight_decay": opt["weight_decay"], "warmup": sched["params"]["warmup_num_steps"],
            "clip": cfg.get("gradient_clipping", 0.0)}


def warmup_factor(k: int, warmup: int) -> float:
    """lr factor of update k+1 under DeepSpeed 0.19's WarmupLR (warmup_type log, warmup_min_lr 0): its
    iteration i < warmup gives log(i + 1) / log(warmup), and update k+1 runs at iteration k - 1 (the first
    two at lr 0). The same schedule keeps the plain loop's losses equal to the labs arm's."""
    if warmup <= 1:
        return 1.0 if k > 0 else 0.0
    return 0.0 if k == 0 else min(1.0, math.log(k) / math.log(warmup))


def make_training(a, model, parts, job, world: int, rank: int, hp: dict):
    """The plain loop's optimizer (the same AdamW implementation the labs arm gets: --optimizer; the same
    hyper-parameters: `labs_hparams`), warm-up and loader."""
    import torch
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(a.optimizer, {})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp["lr"], betas=hp["betas"],
                            eps=hp["eps"], weight_decay=hp["weight_decay"], **flags)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_factor(k, hp["warmup"]))
    sampler = torch.utils.data.DistributedSampler(parts.train_data, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=job.train.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(parts.train_data, batch_size=a.micro, sampler=sampler,
                                         collate_fn=parts.collate, drop_last=True)
    return opt, sched, sampler, loader


def write_results(a, rank: int, world: int, model, micro, step_times, losses, parts_ms) -> None:
    """The arm's JSON (rank 0) and every rank's closing line."""
    import torch
    if rank == 0 and a.out_json:
        from launcher.rank.mfu import model_flops
        seq = int(micro[0]["input_ids"].shape[-1])
        keep = parts_ms[2:] or parts_ms
        Path(a.out_json).write_text(json.dumps({
            "step_times": step_times, "losses": losses, "tokens_per_step": a.micro * a.accum * world * seq,
            "flops_per_token": model_flops(model, seq).total, "threads": torch.get_num_threads(), "world": world,
            "breakdown_ms": {k: statistics.median(p[k] for p in keep) for k in keep[0]}}, indent=1) + "\n")
    print(f"rank {rank}: {a.steps} steps, loss {losses[-1]:.4f}, median step {statistics.median(step_times):.3f} s",
          flush=True)


def take(batches, loader, sampler, n, device):
    """The next n micro-batches on the device, starting a new epoch of the sampler when the loader runs out."""
    micro = []
    for _ in range(n):
        try:
            micro.append(next(batches))
        except StopIteration:
            sampler.set_epoch(sampler.epoch + 1)
            batches = iter(loader)
            micro.append(next(batches))
    return [{k: v.to(device) for k, v in b.items()} for b in micro], batches


def main() -> int:
    a = parse()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    pin(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(a.threads or max(len(os.sched_getaffinity(0)), 1))
    cuda = a.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    torch.cuda.set_device(device) if cuda else None
    dist.init_process_group("nccl" if cuda else "gloo") if world > 1 else None
    job, parts = build_parts(a.job, a.sets)
    model = parts.model.to(device)
    model.train()
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
           if world > 1 else model)
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # GPU timers wait for the kernels
    hp = labs_hparams(a.job, a.sets, world)
    opt, sched, sampler, loader = make_training(a, model, parts, job, world, rank, hp)
    batches = iter(loader)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if a.precision == "bf16"
                else contextlib.nullcontext)
    step_times, losses, parts_ms = [], [], []
    for _ in range(a.steps):
        micro, batches = take(batches, loader, sampler, a.accum, device)
        sync()
        t0 = time.perf_counter()
        fwd = bwd = bwd_sync = 0.0
        step_loss = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            last = i == len(micro) - 1
            no_sync = contextlib.nullcontext() if (last or world == 1) else ddp.no_sync()
            with no_sync:
                t = time.perf_counter()
                with autocast():
                    loss = ddp(**b).loss / a.accum
                sync()
                t2 = time.perf_counter()
                loss.backward()
                sync()
                t3 = time.perf_counter()
            fwd += t2 - t
            if last and world > 1:
                bwd_sync = t3 - t2  # includes DDP's gradient all-reduce (overlapped with this backward)
            else:
                bwd += t3 - t2
            step_loss += loss.detach().float()
        t = time.perf_counter()
        if hp["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t_opt = time.perf_counter() - t
        if world > 1:
            dist.all_reduce(step_loss)
            step_loss /= world
        sync()
        step_times.append(time.perf_counter() - t0)
        losses.append(float(step_loss))
        # all-reduce: the synchronised backward less the mean of the others (needs accum >= 2)
        n_plain = len(micro) - (1 if world > 1 else 0)
        mean_bwd = bwd / n_plain if n_plain else bwd_sync
        parts_ms.append({"forward": 1000 * fwd, "backward": 1000 * (bwd + bwd_sync),
                         "backward_compute": 1000 * (bwd + (mean_bwd if world > 1 else 0.0)),
                         "allreduce": 1000 * max(bwd_sync - mean_bwd, 0.0) if world > 1 and n_plain else 0.0,
                         "optimizer": 1000 * t_opt})
    write_results(a, rank, world, model, micro, step_times, losses, parts_ms)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
