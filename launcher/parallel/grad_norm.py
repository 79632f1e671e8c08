"""The global gradient norm of every update, before clipping, for metrics.jsonl (`grad_norm`), and the same
clipping on every engine.

DeepSpeed clips an fp32 engine without ZeRO (ZeRO-0, the pipeline engine) with `runtime.utils.clip_grad_norm_`,
which takes each parameter's norm in fp32, and torch's CPU fp32 `norm()` of a large tensor is not exact:
llama-tiny's 2M-element lm_head gradient came out 5.9e-5 low (1.015041 vs 1.015101 in fp64; `pow(2).sum()`
gets it right). ZeRO 1-3 take the norms in fp64 (`get_norm_dtype()`), so ZeRO-0 (and the pipeline engine)
clipped by another factor than ZeRO-1/2/3 and their runs drifted apart (docs/strategies.md, "ZeRO-0 vs
ZeRO>=1"). `track_grad_norm` gives those engines DeepSpeed's own clip_grad_norm_ (the same parameters counted,
summed over `mpu`'s model-parallel group: pipeline stages, tensor slices; averaged over data parallel) with
fp64 norms and ZeRO's clip factor; without clipping the norm is only measured.

Cost: casting every gradient to fp64 took 57 ms a step on llama-small's 19.6M parameters (1 thread), a
third of the plain loop's whole optimizer step. The sums of squares are taken instead as fp32 norms of
1024-element rows whose squares are summed in fp64: within 1e-10 of the fp64 norm there, in 5 ms.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.utils import groups

from launcher.common.proc import device


def track_grad_norm(engine) -> None:
    """Clip an fp32 engine without ZeRO by the global gradient norm in fp64 and keep that norm (before clipping)
    as `engine.labs_grad_norm`; ZeRO 1-3 and bf16 keep theirs (`get_global_grad_norm`)."""
    if hasattr(engine.optimizer, "_global_grad_norm"):
        return
    take = engine._take_model_step

    def clip_fp32_gradients() -> None:
        engine.labs_grad_norm = clip_grad_norm_fp64(engine, engine.gradient_clipping())

    def take_model_step(*args, **kwargs):
        if not engine.gradient_clipping() > 0.0:
            engine.labs_grad_norm = clip_grad_norm_fp64(engine, 0.0)
        return take(*args, **kwargs)

    engine.clip_fp32_gradients, engine._take_model_step = clip_fp32_gradients, take_model_step


ROW = 1024  # elements per fp32 partial norm (each exact to ~1e-7, their squares summed in fp64)


def sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """sum(g**2) in fp64, to ~1e-10 relative, without an fp64 copy of g."""
    flat = g.detach().reshape(-1)
    whole = flat.numel() // ROW * ROW
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    if whole:
        total += torch.linalg.vector_norm(flat[:whole].view(-1, ROW), dim=1).double().pow(2).sum()
    if whole < flat.numel():
        total += flat[whole:].double().pow(2).sum()
    return total


def clip_grad_norm_fp64(engine, max_norm: float) -> float:
    """The global gradient norm (see the module's docstring); gradients scaled to max_norm when above it (> 0)."""
    mpu = engine.mpu
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None
             and (mpu is None or mpu.get_model_parallel_rank() == 0 or is_model_parallel_parameter(p))]
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else device())
    for g in grads:
        total += sum_of_squares(g)
    if mpu is not None:
        dist.all_reduce(total, group=mpu.get_model_parallel_group())
    pg = groups._get_data_parallel_group()
    total = total.sqrt() / dist.get_world_size(group=pg)
    dist.all_reduce(total, group=pg)
    norm = float(total)
    clip = (norm + 1e-6) / max_norm if max_norm > 0 else 0.0
    if clip > 1:
        torch._foreach_mul_([p.grad.data for p in engine.module.parameters() if p.grad is not None], 1.0 / clip)
    return norm
