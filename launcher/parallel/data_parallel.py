"""Data parallel (ZeRO 0-3, offload): every rank holds the model (ZeRO shards optimizer states, gradients and
parameters by stage) and reads its own slice of each global batch; DeepSpeed averages the gradients.
`deepspeed.initialize` with the config's zero_optimization does all of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from launcher.checkpoint.convert import check_whole
from launcher.common.layout import Layout
from launcher.config.ds.load import wants_activation_checkpointing
from launcher.parallel.base import EngineAccess, dp_mean
from launcher.parallel.grad_norm import track_grad_norm
from launcher.parallel.meter import StateMeter


class DataParallel(EngineAccess):
    """Every rank holds the model (ZeRO shards optimizer/grads/params by stage) and reads its own
    slice of each global batch; DeepSpeed averages gradients across ranks."""

    name = "data_parallel"

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], layout: Layout):
        if wants_activation_checkpointing(config) and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
        track_grad_norm(self.engine)
        self.layout = layout
        self.stage = self.engine.zero_optimization_stage()
        self.meter = StateMeter(self.engine)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        self.engine.train()
        losses = []
        for batch in micro_batches:
            out = self.engine(**batch)
            self.engine.backward(out.loss)
            self.meter.sample()
            self.engine.step()  # DeepSpeed updates only at the accumulation boundary
            losses.append(out.loss.detach().float())
        return dp_mean(torch.stack(losses).mean())

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]):
        self.engine.eval()
        return self.engine(**batch)

    def full_state_dict(self, ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
        """Consolidated weights on global rank 0 (None elsewhere). ZeRO-3 partitions the
        parameters, so they come from the checkpoint through DeepSpeed's zero_to_fp32."""
        if dist.get_rank() != 0:
            return None
        if self.stage == 3:
            return check_whole(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name),
                               str(ckpt_dir))
        return check_whole({k: v.detach().clone() for k, v in self.module.state_dict().items()}, str(ckpt_dir))

    def shard_info(self) -> dict[str, Any]:
        return {"strategy": self.name, "zero_stage": self.stage, **self.meter.report(self.engine)}
