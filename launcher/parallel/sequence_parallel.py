"""Sequence parallelism, DeepSpeed-Ulysses: every sequence split across `sequence_parallel_size` ranks.

    ds_config: "sequence_parallel_size": S        world = dp x S (tensor / pipeline parallel: 1)

The S ranks of one sequence-parallel group read the same batch; rank r of the group keeps tokens
[r*s/S, (r+1)*s/S) of each sequence (its positions keep their global numbers, so the rotary
embedding is the one of the whole sequence). Everything but attention works token by token, so
embedding, norms, MLP and head run on the slice alone. Attention needs every earlier token: in each
block DeepSpeed's `DistributedAttention` does an all-to-all that turns q, k, v from
[batch, s/S, heads, d] (all heads, my tokens) into [batch, s, heads/S, d] (all tokens, my heads),
runs causal attention on its heads, and a second all-to-all turns the result back. Gradients go
the same way backwards (the all-to-all's backward is the opposite all-to-all).

The loss of the whole sequence is a mean over its tokens; each rank computes the sum over its own
slice divided by the token count of the whole batch (labels are shifted on the full sequence
first, so the last token of a slice is scored against the first token of the next). The sequence
mean is the SUM of the S ranks' parts, and so is its gradient. DeepSpeed's engine sees a plain
data-parallel world of dp x S ranks and AVERAGES gradients over all of them, so each rank's part is
multiplied by S: the average over dp x S ranks of S x part = the average over the dp replicas of
the whole sequence's gradient, as in a 1-rank run.

Why not DeepSpeed's own `sequence_parallel_size` handling: given `sequence_parallel_size` and
`data_parallel_size`, `deepspeed.initialize` builds a (data, sequence) device mesh, but without a
Megatron-style `mpu` DeepSpeed 0.19 then reduces gradients over the mesh's DATA axis only
(utils/groups.py `_get_sequence_data_parallel_group` falls back to the data-parallel group): the
sequence ranks never add up their parts (measured: eval loss off by 6e-4 relative after the first
real update). So labs reads `sequence_parallel_size` from the config, builds the sequence groups
itself, and hands DeepSpeed the config without it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.sequence.layer import DistributedAttention
from transformers import AttentionInterface

from launcher.common.errors import LabsError
from launcher.common.layout import Layout
from launcher.parallel.base import dp_mean
from launcher.parallel.data_parallel import DataParallel

ATTN_NAME = "labs_ulysses"


_ATTENTION: dict[str, Any] = {}  # the DistributedAttention of this process (one model per rank)


def _local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
                     dropout: float) -> torch.Tensor:
    """Causal attention on this rank's heads over the whole sequence: [b, s, h/S, d] -> the same."""
    if "shapes" not in _ATTENTION:
        _ATTENTION["shapes"] = {"attention_qkv_after_all_to_all": list(q.shape)}
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2)


def ulysses_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """A transformers attention function (AttentionInterface): q [b, heads, s/S, d], k/v [b, kv, s/S, d]
    (rotary already applied with the global positions) -> ([b, s/S, heads, d], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: give every query head its k/v head before the exchange
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [b, s/S, heads, d]
    _ATTENTION.setdefault("before", list(q.shape))
    out = _ATTENTION["layer"](q, k, v, 0, None, scaling, dropout)  # batch dim 0; scatter heads, gather sequence
    return out, None


def register_attention() -> None:
    AttentionInterface.register(ATTN_NAME, ulysses_attention)


class SequenceParallel(DataParallel):
    """Ulysses sequence parallelism (see the module docstring) on a dp x sp mesh."""

    name = "sequence_parallel"

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], layout: Layout):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if kind not in ("llama", "mistral"):
            raise LabsError(f"sequence_parallel_size = {layout.sp}: Ulysses attention is wired for Llama-family "
                            f"models; this model is {kind!r}")
        heads = model.config.num_attention_heads
        if heads % layout.sp:
            raise LabsError(f"sequence_parallel_size = {layout.sp} does not divide the model's {heads} attention heads")
        register_attention()
        model.config._attn_implementation = ATTN_NAME  # every decoder layer reads it at each forward
        # The sequence groups: S consecutive ranks each (launcher/common/layout.py's order). Every rank
        # creates every group, in the same order (new_group is collective).
        rank, world, sp = dist.get_rank(), layout.world, layout.sp
        for first in range(0, world, sp):
            group = dist.new_group(list(range(first, first + sp)))
            if first <= rank < first + sp:
                self.group = group
        self.sp_rank = dist.get_rank(self.group)
        assert self.sp_rank == layout.sp_rank(rank)
        # DeepSpeed sees dp x S data-parallel ranks (see the module docstring): its batch triad
        # counts each sample S times, as for AutoTP; the samples per step stay micro x accum x dp.
        ds_cfg = {k: v for k, v in config.items() if k not in ("sequence_parallel_size", "data_parallel_size")}
        ds_cfg["train_batch_size"] = (config["train_micro_batch_size_per_gpu"]
                                      * config["gradient_accumulation_steps"] * world)
        super().__init__(model, ds_cfg, layout)
        _ATTENTION["layer"] = DistributedAttention(_local_attention, self.group, scatter_idx=2, gather_idx=1)
        self.slice: list[int] | None = None
        self.seq_len: int | None = None

    def _slice(self, s: int) -> tuple[int, int]:
        if s % self.layout.sp:
            raise LabsError(f"sequence length {s} is not divisible by sequence_parallel_size = {self.layout.sp}; "
                            f"set data.block_size to a multiple of {self.layout.sp}")
        n = s // self.layout.sp
        lo = self.sp_rank * n
        if self.slice is None:
            self.slice, self.seq_len = [lo, lo + n], s
        return lo, lo + n

    def _local_forward(self, batch: dict[str, torch.Tensor]):
        """(logits of my slice, shifted labels of my slice, token count of the whole batch)."""
        ids = batch["input_ids"]
        if "attention_mask" in batch and not bool(batch["attention_mask"].all()):
            raise LabsError("sequence parallelism needs full token blocks (no padding); this batch is padded")
        labels = batch.get("labels", ids)
        b, s = ids.shape
        lo, hi = self._slice(s)
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        count = (shifted != -100).sum().clamp(min=1)
        pos = torch.arange(lo, hi, device=ids.device).unsqueeze(0).expand(b, -1)
        out = self.engine(input_ids=ids[:, lo:hi], position_ids=pos, use_cache=False)
        return out.logits, shifted[:, lo:hi], count

    @staticmethod
    def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        self.engine.train()
        losses = []
        for batch in micro_batches:
            logits, labels, count = self._local_forward(batch)
            # S x my part of the sequence mean: DeepSpeed averages it over the dp x S ranks
            loss = self._loss_sum(logits, labels) * self.layout.sp / count
            self.engine.backward(loss)
            self.meter.sample()
            self.engine.step()
            losses.append(loss.detach().float())
        # mean over all dp x S ranks of (S x my part) = mean over the replicas of the whole loss
        return dp_mean(torch.stack(losses).mean())

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]):
        """The whole batch's loss and logits on every rank of the group (slices all-gathered)."""
        self.engine.eval()
        logits, labels, count = self._local_forward(batch)
        parts = [torch.empty_like(logits) for _ in range(self.layout.sp)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        loss = self._loss_sum(logits, labels)
        dist.all_reduce(loss, group=self.group)
        return _Output(loss / count, torch.cat(parts, dim=1))

    def shard_info(self) -> dict[str, Any]:
        info = super().shard_info()
        info.update(sp_rank=self.sp_rank, sp_size=self.layout.sp, seq_len=self.seq_len, seq_slice=self.slice,
                    shapes={"qkv_before_all_to_all": _ATTENTION.get("before"),
                            **(_ATTENTION.get("shapes") or {})})
        return info


class _Output:
    def __init__(self, loss: torch.Tensor, logits: torch.Tensor):
        self.loss, self.logits = loss, logits
