"""Pipeline x tensor x data parallelism in one job (`pipeline.stages` P, `tensor_parallel.autotp_size` T).

The ranks form DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model; the model axis
innermost, as launcher/common/layout.py orders them): P stages, each held by D data-parallel replicas of
T tensor-parallel ranks. A rank builds only its stage's layers (the PipelineModule) and then slices
every transformer block of that stage Megatron-style (launcher/parallel/layers/tensor.py): attention heads and MLP
width split across the stage's T ranks, two all-reduces per block forward and two backward. Between
stages DeepSpeed's pipeline engine sends the whole hidden state from each tensor rank to the same
tensor rank of the next stage (and its gradient back). Gradients are averaged over the D replicas
of the same (stage, tensor rank).

DeepSpeed's `pipe_partitioned` / `grad_partitioned` (each of the T ranks sends 1/T of the hidden
state and the next stage all-gathers it; on by default with a model axis) are switched off: on
0.19.8 a micro-batch of another shape than the first (the export's 1-sequence probe after 2-sequence
training batches) fails in the all-gather ("invalid tensor size", measured here).

DeepSpeed's AutoTP is not used here: it does not run inside the pipeline engine, so the config's
`tensor_parallel` section is read by labs and not handed to DeepSpeed.

Gradient clipping counts every parameter once: DeepSpeed's norm sums, over the ranks of one
replica (all stages, all tensor ranks), the parameters marked `model_parallel`; the sliced matrices
are marked on every tensor rank (each holds a different part), the replicated ones (embedding,
norms, head) on tensor rank 0 only; a tied weight (SmolLM2's embedding = head, on the first and the last
stage) only where DeepSpeed keeps it unflagged (`ds_pipe_replicated` marks the later stages' copies), so
it counts once, on stage 0's tensor rank 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from launcher.common.layout import Layout
from launcher.parallel.layers.pipeline import LlamaBlock, model_type
from launcher.parallel.layers.tensor import split_llama_layer
from launcher.parallel.pipeline_parallel import PipelineParallel


class PipeTensorParallel(PipelineParallel):
    name = "pipeline_tensor_parallel"

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], layout: Layout):
        self.split_dim: dict[int, int] = {}  # id(sliced parameter) -> the dimension it was sliced along
        ds_cfg = {k: v for k, v in config.items() if k != "tensor_parallel"}
        ds_cfg["pipeline"] = {**config.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
        super().__init__(model, ds_cfg, layout)

    def placement(self, layout: Layout) -> dict[str, Any]:
        return {"topology": PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)}

    def prepare(self, pipe) -> None:
        if model_type(self.hf_model) not in ("llama", "mistral"):
            raise NotImplementedError("pipeline x tensor parallel slices Llama-family blocks only (refused by labs plan)")
        grid = pipe._grid
        self.tp_group, self.tp_rank = grid.get_slice_parallel_group(), grid.get_slice_parallel_rank()
        if self.tp_rank != self.layout.coords(dist.get_rank())["tp"]:
            raise RuntimeError("DeepSpeed's topology orders the ranks differently from launcher/common/layout.py")
        for layer in pipe.forward_funcs:
            if isinstance(layer, LlamaBlock):
                for old, new, dim in split_llama_layer(layer.layer, self.tp_group, self.tp_rank,
                                                       self.layout.tp).values():
                    self.names[id(new)] = self.names.get(id(old), [])
                    self.split_dim[id(new)] = dim
        for p in pipe.parameters():  # a tied copy (first and last stage: SmolLM2's embedding) counts once
            p.model_parallel = id(p) in self.split_dim or (self.tp_rank == 0
                                                           and not getattr(p, "ds_pipe_replicated", False))

    def full_state_dict(self, ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
        """Replica 0's stages gather their tensor-parallel slices into whole matrices (all-gather in
        each tensor group), then send them under their HF names to rank 0."""
        mine: dict[str, torch.Tensor] = {}
        if self.layout.dp_rank(dist.get_rank()) == 0:
            for p in self.module.parameters():
                t = p.detach().contiguous()
                if id(p) in self.split_dim:
                    parts = [torch.empty_like(t) for _ in range(self.layout.tp)]
                    dist.all_gather(parts, t, group=self.tp_group)
                    t = torch.cat(parts, dim=self.split_dim[id(p)])
                for n in self.names.get(id(p), []):
                    mine[n] = t.clone()
        parts_all: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts_all, dst=0)
        if dist.get_rank() != 0:
            return None
        state = {k: v.detach().clone() for k, v in self.hf_model.state_dict().items() if ".inner." not in k}
        for part in parts_all:
            state.update(part)
        return state

    def shard_info(self) -> dict[str, Any]:
        info = super().shard_info()
        info["tp_rank"] = self.tp_rank
        first = next(f for f in self.module.forward_funcs if isinstance(f, LlamaBlock))
        info["split_shapes"] = {n.replace("inner.", "").removesuffix(".weight"): list(p.shape)
                                for n, p in first.layer.named_parameters() if p.dim() == 2}
        return info
