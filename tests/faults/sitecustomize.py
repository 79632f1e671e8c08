"""Test-only fault planting (tests/test_equivalence_*.py): NOT part of the product.

The equivalence tests put this folder first on the ranks' PYTHONPATH; Python then imports this module
at start-up in every process. It does nothing unless LABS_FAULT is set and the process is a rank
(RANK set by DeepSpeed's launcher). Then it wraps one torch.distributed collective, so that the fault
sits where a real bug would: under DeepSpeed, in the data that one rank contributes.

    LABS_FAULT        OPS:MODE:VALUE, e.g. "all_reduce:scale:1e-4", "send,isend:scale:1e-4", "all_reduce:skip:0"
                      OPS: comma-separated, of all_reduce reduce reduce_scatter_tensor all_to_all_single send isend
                      scale: multiply this rank's contribution (the tensor it sends) by 1 + VALUE
                      skip: do not communicate at all (the tensor keeps this rank's own part)
    LABS_FAULT_RANK   the global rank that misbehaves, or "all" (default 1; skip needs "all")
    LABS_FAULT_MIN_NUMEL  only tensors of at least this many elements (default 1024: gradients and
                      activations, not the scalar loss or the evaluation sums)
    LABS_FAULT_GROUPS only groups of exactly this many ranks (default: any group of 2 or more)
    LABS_FAULT_LOG    a file: every matching call is appended (op, shape, group size) for diagnosis

LABS_* variables reach the ranks through `labs launch` (launcher/backends.py PASS_PREFIXES).
"""

from __future__ import annotations

import os

_SPEC = os.environ.get("LABS_FAULT")
_TENSOR_ARG = {"all_reduce": ("tensor", 0), "reduce": ("tensor", 0), "send": ("tensor", 0), "isend": ("tensor", 0),
               "reduce_scatter_tensor": ("input", 1), "all_to_all_single": ("input", 1)}


class _Done:
    """What an async collective returns, for a skipped one."""

    def wait(self, *_a, **_k) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _install(spec: str) -> None:
    ops, mode, value = spec.split(":")
    for op in ops.split(","):
        _wrap(op, mode, float(value))


def _wrap(op: str, mode: str, value: float) -> None:
    import torch
    import torch.distributed as dist

    factor = 1.0 + value
    who = os.environ.get("LABS_FAULT_RANK", "1")
    min_numel = int(os.environ.get("LABS_FAULT_MIN_NUMEL", "1024"))
    sizes = os.environ.get("LABS_FAULT_GROUPS")
    log = os.environ.get("LABS_FAULT_LOG")
    name, index = _TENSOR_ARG[op]
    real = getattr(dist, op)

    def hit(t, group) -> bool:
        if not (torch.is_tensor(t) and t.is_floating_point() and t.numel() >= min_numel):
            return False
        if who != "all" and dist.get_rank() != int(who):
            return False
        size = dist.get_world_size(group) if op not in ("send", "isend") else 2
        return size >= 2 and (sizes is None or size == int(sizes))

    def faulty(*args, **kwargs):
        t = kwargs.get(name, args[index] if len(args) > index else None)
        group = kwargs.get("group")
        if not hit(t, group):
            return real(*args, **kwargs)
        if log:
            with open(log, "a") as f:
                f.write(f"rank {dist.get_rank()} {op} {mode} {list(t.shape)} group {dist.get_world_size(group)}\n")
        if mode == "scale":
            with torch.no_grad():
                t.mul_(factor)
            return real(*args, **kwargs)
        if op == "reduce_scatter_tensor":  # skipped: my own slice, not the sum
            out = kwargs.get("output", args[0] if args else None)
            out.copy_(t.view(dist.get_world_size(group), -1)[dist.get_rank(group)].view_as(out))
        return _Done() if kwargs.get("async_op") else None

    setattr(dist, op, faulty)
    if op == "reduce_scatter_tensor" and hasattr(dist, "_reduce_scatter_base"):
        dist._reduce_scatter_base = faulty


if _SPEC and os.environ.get("RANK") is not None:
    _install(_SPEC)
