"""Wrap a task's model by strategy. One class per strategy, one training-step interface:

    train_step(micro_batches) -> global mean loss of the step (all-reduced over data parallel)
    forward(batch)            -> model output (no grad), for evaluation
    save(dir, tag, state) / load(dir) -> state;  full_state_dict(ckpt_dir) -> weights on rank 0

Data parallel (ZeRO 0-3, offload): `deepspeed.initialize` with the config's zero_optimization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from launcher.layout import Layout


def dp_mean(value: torch.Tensor, group=None, size: int | None = None) -> float:
    t = value.detach().float().clone()
    if dist.is_initialized() and (size or dist.get_world_size(group)) > 1:
        dist.all_reduce(t, group=group)
        t /= size or dist.get_world_size(group)
    return float(t)


class DataParallel:
    """Every rank holds the model (ZeRO shards optimizer/grads/params by stage) and reads its own
    slice of each global batch; DeepSpeed averages gradients across ranks."""

    name = "data_parallel"

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], layout: Layout):
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
        self.layout = layout
        self.stage = self.engine.zero_optimization_stage()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def monitor(self):
        return self.engine.monitor

    def lr(self) -> float:
        return float(self.engine.get_lr()[0]) if self.engine.get_lr() else 0.0

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        self.engine.train()
        losses = []
        for batch in micro_batches:
            out = self.engine(**batch)
            self.engine.backward(out.loss)
            self.engine.step()  # DeepSpeed updates only at the accumulation boundary
            losses.append(out.loss.detach().float())
        return dp_mean(torch.stack(losses).mean())

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]):
        self.engine.eval()
        return self.engine(**batch)

    def save(self, ckpt_dir: Path, tag: str, state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"labs": state})

    def load(self, ckpt_dir: Path) -> dict[str, Any]:
        path, client = self.engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {ckpt_dir}")
        return client["labs"]

    def full_state_dict(self, ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
        """Consolidated weights on global rank 0 (None elsewhere). ZeRO-3 partitions the
        parameters, so they come from the checkpoint through DeepSpeed's zero_to_fp32."""
        if dist.get_rank() != 0:
            return None
        if self.stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}


def build_strategy(model: torch.nn.Module, config: dict[str, Any], layout: Layout):
    if layout.pp > 1 or layout.tp > 1:
        raise NotImplementedError("pipeline/tensor parallel strategies are added in launcher/engine.py")
    return DataParallel(model, config, layout)
