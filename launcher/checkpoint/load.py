"""Loading a consolidated checkpoint (checkpoint/convert.py) into any engine: each rank takes its share of the
fp32 weights and Adam moments for its own layout, the step counts and the LR schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.checkpoint.store import MOMENTS
from launcher.common.errors import LabsError


def _torch_optimizer(opt):
    # keeps torch and DeepSpeed out of the labs process
    import torch
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def _prime_optimizer_state(engine, adam_step: int) -> None:
    """Torch's Adam creates its state at its first step; create it now (zeros, this step count) so
    that the moments can be written into it, and let DeepSpeed link its per-parameter views."""
    # keeps torch and DeepSpeed out of the labs process
    import torch
    opt = _torch_optimizer(engine.optimizer)
    plain_torch = type(opt).__module__.startswith("torch.optim")
    # the tensors the optimizer steps: ZeRO's fp32 flat partitions (ZeRO-3 hands them to the torch
    # optimizer only during its step), the bf16 optimizer's, or (plain ZeRO-0) the parameters
    flats = None
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if (flats := getattr(engine.optimizer, attr, None)) is not None:
            break
    stepped = list(flats) if flats is not None else [p for g in opt.param_groups for p in g["params"]]
    for p in stepped:
        if p is not None:
            st = opt.state[p]
            for k in MOMENTS:
                if k not in st:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] = torch.tensor(float(adam_step)) if plain_torch else adam_step
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def load_into(strategy, folder: Path) -> dict[str, Any]:
    """Set a freshly built data-parallel engine (ZeRO 0-3, offload or not) to the consolidated
    state; returns the run's client state. Collective (every rank of the run calls it)."""
    # keeps torch and DeepSpeed out of the labs process
    import deepspeed

    # keeps torch and DeepSpeed out of the labs process
    import torch

    # keeps torch and DeepSpeed out of the labs process
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    engine = strategy.engine
    weights = torch.load(folder / "weights.pt", map_location="cpu", mmap=True, weights_only=True)
    moments = {k: torch.load(folder / f"{k}.pt", map_location="cpu", mmap=True, weights_only=True) for k in MOMENTS}
    state = torch.load(folder / "engine.pt", map_location="cpu", weights_only=False)
    named = list(engine.module.named_parameters())
    hf_of = getattr(strategy, "names", None)  # a pipeline stage: id(param) -> its names in the HF model
    if hf_of is not None:
        named = [(hf_of[id(p)][0], p) for _, p in named]
    missing = [n for n, _ in named if n not in weights]
    if missing:
        raise LabsError(f"{folder}: the checkpoint has no weights for {len(missing)} parameter(s) of this model "
                        f"({', '.join(missing[:4])}...): it was saved from another model")
    trained_now = sorted(n for n, p in named if p.requires_grad)
    if not set(trained_now) <= set(state["trained"]) or (hf_of is None and trained_now != state["trained"]):
        raise LabsError(f"{folder}: the checkpoint trained {len(state['trained'])} parameters, this run trains "
                        f"{len(trained_now)}: another model or LoRA set-up")
    _prime_optimizer_state(engine, state["adam_step"])
    opt = _torch_optimizer(engine.optimizer)
    zero3 = engine.zero_optimization_stage() == 3
    tp = strategy.layout.tp
    tp_rank = torch.distributed.get_rank() % tp if tp > 1 else 0

    def mine(name: str, p, t):
        """This rank's part of full tensor t: under tensor parallelism the slice AutoTP gave it."""
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tp == 1 or tuple(t.shape) == shape:
            return t
        diff = [d for d, (a, b) in enumerate(zip(shape, t.shape, strict=True)) if a != b]
        if len(diff) != 1 or shape[diff[0]] * tp != t.shape[diff[0]]:
            raise LabsError(f"{folder}: {name} is {tuple(t.shape)} in the checkpoint and {shape} on this "
                            f"tensor-parallel rank: not an even split over {tp} ranks")
        d = diff[0]
        return t.narrow(d, tp_rank * shape[d], shape[d]).contiguous()

    with torch.no_grad():
        for name, p in named:
            full = mine(name, p, weights[name])
            if zero3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(full.view(p.shape).to(p.dtype))
            else:
                p.data.copy_(full.to(p.dtype))
            if not p.requires_grad:
                continue
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO-1/2/3, bf16 optimizer
                safe_set_full_fp32_param(p, full)
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, mine(name, p, moments[k][name]), k)
            else:  # plain torch optimizer (ZeRO-0 fp32): p is its own master copy
                for k in MOMENTS:
                    opt.state[p][k].copy_(mine(name, p, moments[k][name]).view(p.shape))
    for group, lr in zip(opt.param_groups, state["lrs"], strict=False):
        group["lr"] = lr
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    return state["labs"]
