"""Megatron-style tensor parallelism for a Llama decoder layer, in one small file.

Each block has two tensor-parallel regions, attention and MLP. Inside a region the T ranks of a
tensor-parallel group each hold a slice of every matrix:

    q_proj, k_proj, v_proj, gate_proj, up_proj   column-parallel: 1/T of the OUTPUT rows
                                                 (whole attention heads, 1/T of the MLP width)
    o_proj, down_proj                            row-parallel: 1/T of the INPUT columns

so a rank computes its heads' attention (or its part of the MLP width) with no communication, and
its row-parallel product is a partial sum of the region's output. Two functions mark a region:

    f (enter): forward identity,   backward all-reduce of the input gradient over the T ranks
    g (leave): forward all-reduce, backward identity

(Megatron-LM's `copy_to_tensor_model_parallel_region` / `reduce_from_tensor_model_parallel_region`):
two all-reduces of [batch, seq, hidden] per block forward, two backward. Everything outside the
regions (embedding, norms, head, the residual stream) is replicated on the T ranks and gets the
same full gradient on each of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launcher.common.errors import LabsError

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


ROW = ("self_attn.o_proj", "mlp.down_proj")


class _Enter(torch.autograd.Function):
    """f: identity forward; the gradient of a replicated input is the sum of every rank's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Leave(torch.autograd.Function):
    """g: the row-parallel partial sums added up in the forward; identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class TensorParallelRegion(nn.Module):
    """Wraps a block's attention or MLP (its Linear layers already sliced): f before, g after."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        out = self.inner(_Enter.apply(hidden_states, self.group), *args, **kwargs)
        if isinstance(out, tuple):
            return (_Leave.apply(out[0], self.group), *out[1:])
        return _Leave.apply(out, self.group)


def _slice(linear: nn.Linear, dim: int, rank: int, size: int, what: str) -> nn.Linear:
    """A new Linear holding rank's 1/size of `linear`'s weight along dim (0: rows, 1: columns)."""
    if linear.bias is not None:
        raise LabsError(f"{what} has a bias; labs' tensor-parallel layers take bias-free Llama projections")
    w = linear.weight
    if w.shape[dim] % size:
        raise LabsError(f"{what}: {w.shape[dim]} {'rows' if dim == 0 else 'columns'} are not divisible by "
                        f"tensor parallel size {size}")
    part = w.detach().chunk(size, dim=dim)[rank].clone()
    new = nn.Linear(part.shape[1], part.shape[0], bias=False, dtype=w.dtype, device=w.device)
    new.weight = nn.Parameter(part, requires_grad=w.requires_grad)
    return new


def split_llama_layer(layer: nn.Module, group, rank: int, size: int) -> dict[str, tuple[nn.Parameter, nn.Parameter, int]]:
    """Slice one LlamaDecoderLayer in place for tensor-parallel rank `rank` of `size`, and wrap its
    attention and MLP in tensor-parallel regions. Returns {name: (old weight, new weight, split dim)}."""
    attn, mlp = layer.self_attn, layer.mlp
    for heads in (attn.config.num_attention_heads, attn.config.num_key_value_heads):
        if heads % size:
            raise LabsError(f"tensor parallel size {size} does not divide the {heads} attention heads")
    done = {}
    for name in COLUMN + ROW:
        parent_name, attr = name.split(".")
        parent = attn if parent_name == "self_attn" else mlp
        old = getattr(parent, attr)
        dim = 0 if name in COLUMN else 1
        new = _slice(old, dim, rank, size, name)
        setattr(parent, attr, new)
        done[name] = (old.weight, new.weight, dim)
    layer.self_attn = TensorParallelRegion(attn, group)
    layer.mlp = TensorParallelRegion(mlp, group)
    return done
