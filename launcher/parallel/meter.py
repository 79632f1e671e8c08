"""Model-state bytes a rank really holds, measured from the engine's own tensors (parameters, fp32 master
partitions, gradients at their peak over the first step, optimizer states), each storage byte counted once.
"""

from __future__ import annotations

from typing import Any

import torch

from launcher.checkpoint.load import _torch_optimizer


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _bytes(tensors, seen: dict) -> int:
    """Bytes the tensors cover, counting each byte of each storage once (parameters that are
    views of one flat ZeRO buffer, and the buffer itself, count once; a shard that is a view of a
    larger tensor counts only its own bytes). `seen` maps storage -> covered [start, end) ranges."""
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        start = t.storage_offset() * t.element_size()
        lo, hi = start, start + t.numel() * t.element_size()
        ranges = seen.setdefault(t.untyped_storage().data_ptr(), [])
        new = hi - lo - sum(max(0, min(hi, e) - max(lo, b)) for b, e in ranges)
        if new > 0:
            total += new
            ranges.append((lo, hi))
    return total


class StateMeter:
    """Model-state bytes this rank holds, read from the engine's own tensors: parameters (ZeRO-3:
    the `ds_tensor` partitions; ZeRO-1/2: the flat bit16 groups), fp32 master partitions, gradients
    (their peak over the first optimizer step, see `sample`) and optimizer states."""

    def __init__(self, engine):
        self.grad_bytes, self.bucket_bytes, self.measured = 0, 0, False
        opt = _torch_optimizer(engine.optimizer)
        self.zero_opt = engine.optimizer if engine.optimizer is not opt else None
        # The hook stays registered (it returns at once after the first step): removing it from
        # inside itself breaks torch's iteration over the hooks when another one follows it.
        self.hook = opt.register_step_pre_hook(self._on_step) if opt is not None else None
        self.engine = engine

    def _grad_tensors(self):
        opt = _torch_optimizer(self.engine.optimizer)
        yield from (p.grad for p in self.engine.module.parameters() if p.grad is not None)
        if opt is not None:
            yield from (p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None)
        for attr in ("averaged_gradients", "grad_partitions_flat_buffer"):
            yield from _tensors(getattr(self.zero_opt, attr, None))

    def _bucket_tensors(self):
        """ZeRO's reduce buckets (`reduce_bucket_size` elements each): communication buffers."""
        for bucket in (getattr(self.zero_opt, "ipg_buckets", None) or {}).values():
            yield from _tensors(getattr(bucket, "buffer", None))

    def sample(self) -> None:
        """Gradient bytes held now. Called after each backward of the first optimizer step and just
        before that step; the largest is kept: ZeRO-0/1 hold full gradients while micro-batches
        accumulate, ZeRO-2/3 their partition (ZeRO-3 twice during the step). Bucket bytes not
        already holding gradients are kept apart (not model states)."""
        if self.measured:
            return
        seen: dict = {}
        self.grad_bytes = max(self.grad_bytes, _bytes(self._grad_tensors(), seen))
        self.bucket_bytes = max(self.bucket_bytes, _bytes(self._bucket_tensors(), seen))

    def _on_step(self, *_):
        self.sample()
        self.measured = True

    def report(self, engine) -> dict[str, Any]:
        seen: dict = {}
        module_params = list(engine.module.parameters())
        params = _bytes([getattr(p, "ds_tensor", p) for p in module_params]
                        + list(_tensors(getattr(self.zero_opt, "bit16_groups_flat", None))), seen)
        master = _bytes(list(_tensors(getattr(self.zero_opt, "single_partition_of_fp32_groups", None)))
                        + list(_tensors(getattr(self.zero_opt, "fp32_partitioned_groups_flat", None))), seen)
        opt = _torch_optimizer(engine.optimizer)
        states = _bytes(list(_tensors(list(opt.state.values()))) if opt is not None else [], seen)
        n_local = sum(getattr(p, "ds_numel", p.numel()) if hasattr(p, "ds_tensor") else p.numel()
                      for p in module_params)
        n_held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module_params)
        return {"params_local": n_local, "params_held": n_held,
                "state_bytes": {"params": params, "master": master, "grads": self.grad_bytes,
                                "optimizer": states, "total": params + master + self.grad_bytes + states,
                                "buckets": self.bucket_bytes}}
