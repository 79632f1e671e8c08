"""Tensor parallel (`tensor_parallel.autotp_size` > 1): `deepspeed.initialize` applies AutoTP, which replaces
the attention/MLP Linear layers by row/column-sharded `LinearLayer`/`LinearAllreduce`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import groups

from launcher.common.layout import Layout
from launcher.parallel.data_parallel import DataParallel
from tasks.api import split_shapes


class TensorParallel(DataParallel):
    """DeepSpeed AutoTP: `deepspeed.initialize` sees `tensor_parallel.autotp_size` and replaces
    each attention/MLP Linear by a shard: q/k/v, gate/up (column-parallel `LinearLayer`, 1/N of
    the output rows) and o_proj/down_proj (row-parallel `LinearAllreduce`, 1/N of the input
    columns, all-reduced). Embeddings, norms and lm_head stay whole. All ranks of a TP group must
    read the same batch (layout.dp_rank gives them the same data-parallel rank)."""

    name = "tensor_parallel"

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], layout: Layout):
        # DeepSpeed 0.19 checks the batch triad of an AutoTP run against the whole world (it
        # builds its config before the TP groups exist): train_batch_size = micro x accum x world.
        # The samples per step stay micro x accum x dp; only DeepSpeed's bookkeeping counts the
        # TP replicas of each sample.
        ds_cfg = dict(config, train_batch_size=config["train_micro_batch_size_per_gpu"]
                      * config["gradient_accumulation_steps"] * layout.world)
        super().__init__(model, ds_cfg, layout)

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]):
        """The whole vocabulary's logits on every tensor rank: a vocab-parallel head (AutoTP shards SmolLM2's
        tied embedding = head) returns this rank's 1/tp of the vocabulary; the ranks' parts are gathered."""
        out = super().forward(batch)
        vocab = getattr(getattr(self.module, "config", None), "vocab_size", None)
        logits = getattr(out, "logits", None)
        if vocab is None or logits is None or logits.shape[-1] * self.layout.tp != vocab:
            return out  # whole (or a classifier's labels)
        parts = [torch.empty_like(logits) for _ in range(self.layout.tp)]
        dist.all_gather(parts, logits.contiguous(), group=groups.get_tensor_model_parallel_group())
        out.logits = torch.cat(parts, dim=-1)
        return out

    def full_state_dict(self, ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
        if self.stage == 3:
            return super().full_state_dict(ckpt_dir)
        return self.engine._consolidated_16bit_state_dict()  # gathers the shards; collective

    def shard_info(self) -> dict[str, Any]:
        info = super().shard_info()
        info["split_shapes"] = split_shapes(self.module)
        info["tp_rank"] = dist.get_rank() % self.layout.tp
        return info
