"""Pipeline / model parallel (`pipeline.stages` > 1): the HF model becomes an ordered layer list
(parallel/layers/pipeline.py) inside a `deepspeed.pipe.PipelineModule`; `engine.train_batch` runs DeepSpeed's
1F1B schedule over `gradient_accumulation_steps` micro-batches (1 = naive model parallelism: each stage
waits for the previous one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule

from launcher.common.layout import Layout
from launcher.common.proc import device
from launcher.config.ds.load import wants_activation_checkpointing
from launcher.parallel.base import EngineAccess
from launcher.parallel.grad_norm import track_grad_norm
from launcher.parallel.layers.pipeline import causal_lm_loss, pipeline_layers
from launcher.parallel.meter import StateMeter


class PipeOutput:
    """What the task's eval_batch reads: `.loss` (the last stage's loss, broadcast to every stage)
    and `.logits` (broadcast from the last stage on first access; every stage must access it)."""

    def __init__(self, loss: torch.Tensor, logits: torch.Tensor | None, src: int, group):
        self.loss, self._logits, self._src, self._group = loss, logits, src, group

    @property
    def logits(self) -> torch.Tensor:
        dev = device()  # nccl broadcasts device tensors only
        if dist.get_rank() != self._src or self._logits is None:
            shape = torch.zeros(3, dtype=torch.long, device=dev)
            dist.broadcast(shape, src=self._src, group=self._group)
            self._logits = torch.empty(*shape.tolist(), device=dev)
        else:
            self._logits = self._logits.to(dev)
            dist.broadcast(torch.tensor(self._logits.shape, dtype=torch.long, device=dev), src=self._src,
                           group=self._group)
        dist.broadcast(self._logits, src=self._src, group=self._group)
        return self._logits


CHECKPOINTABLE = ["LlamaBlock", "GPT2Block"]
"""Pipeline layers whose activations are recomputed under activation checkpointing: the transformer blocks
(DeepSpeed's default would take every layer with parameters, the embedding too, which breaks its gradient)."""


class PipelineParallel(EngineAccess):
    """The model's layer list cut into `pipeline.stages` consecutive stages (a PipelineModule);
    each rank builds and holds only its stage. Activations go forward and gradients backward
    between neighbouring stages; with one micro-batch (model_parallel.json) only one stage works
    at a time, with many DeepSpeed's 1F1B schedule overlaps them."""

    name = "pipeline_parallel"

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], layout: Layout):


        self.layout = layout
        self.hf_model = model
        pipe_cfg = config.get("pipeline", {})
        self.names: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), []).append(n)
        layers = pipeline_layers(model, "model")
        pipe = PipelineModule(layers=layers, **self.placement(layout), loss_fn=causal_lm_loss,
                              partition_method=self.partition_method(pipe_cfg),
                              seed_layers=False, dynamic_shape=True,
                              activation_checkpoint_interval=pipe_cfg.get(
                                  "activation_checkpoint_interval", 1 if wants_activation_checkpointing(config) else 0),
                              checkpointable_layers=CHECKPOINTABLE)
        # DeepSpeed's gradient-norm (clipping) sums over the stages only the parameters marked
        # model-parallel (Megatron's convention); unmarked, stage 0's norm alone would clip every
        # stage. Mark each stage's own parameters; a tied copy (ds_pipe_replicated) counts once.
        for p in pipe.parameters():
            p.model_parallel = not getattr(p, "ds_pipe_replicated", False)
        self.prepare(pipe)
        params = [p for p in pipe.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=pipe, model_parameters=params, config=config)
        track_grad_norm(self.engine)
        self.stage = self.engine.zero_optimization_stage()
        self.meter = StateMeter(self.engine)
        self.layer_names = [x.typename.__name__ if hasattr(x, "typename") else type(x).__name__ for x in layers]

    def placement(self, layout: Layout) -> dict[str, Any]:
        """How ranks map to stages (launcher/parallel/pipe_tensor_parallel.py adds a tensor-parallel axis)."""
        return {"num_stages": layout.pp}

    def prepare(self, pipe) -> None:
        """Change this stage's layers before DeepSpeed wraps them (tensor-parallel slicing)."""

    @staticmethod
    def partition_method(pipe_cfg: dict[str, Any]) -> str:
        """DeepSpeed's `pipeline.partition` ("best", its config default, is not a PipelineModule
        method): by default balance the transformer blocks ("type:Block")."""
        method = pipe_cfg.get("partition", "best")
        return "type:Block" if method == "best" else method

    @staticmethod
    def _pair(batch: dict[str, torch.Tensor]):
        return batch["input_ids"], batch.get("labels", batch["input_ids"])

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        # Every stage gets the iterator: the first stage reads the inputs, the last the labels.
        loss = self.engine.train_batch(iter([self._pair(b) for b in micro_batches]))
        return float(loss)  # mean over micro-batches, averaged over dp, broadcast to all stages

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> PipeOutput:
        mon = self.engine.monitor
        enabled, mon.enabled = mon.enabled, False  # its eval hook expects one scalar
        try:
            out = self.engine.eval_batch(iter([self._pair(batch)]), return_logits=True, compute_loss=True,
                                         reduce_output=None, bcast_loss=False, num_micro_batches=1)
        finally:
            mon.enabled = enabled
        losses, logits = out if isinstance(out, tuple) else (out, None)
        src = self.engine._loss_stage_global_rank()
        group = self.engine.grid.get_pipe_parallel_group()
        loss = losses[0].float().clone() if self.engine.is_last_stage() else torch.zeros((), device=device())
        dist.broadcast(loss, src=src, group=group)
        return PipeOutput(loss, logits.detach().float() if logits is not None else None, src, group)

    def full_state_dict(self, ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
        """Each stage of data-parallel replica 0 sends its parameters (under their HF names) to
        rank 0, which lays them over its own copy of the HF model's state dict."""
        mine: dict[str, torch.Tensor] = {}
        if self.layout.dp_rank(dist.get_rank()) == 0:
            for p in self.module.parameters():
                for n in self.names.get(id(p), []):
                    mine[n] = p.detach().clone()
        parts: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if dist.get_rank() != 0:
            return None
        state = {k: v.detach().clone() for k, v in self.hf_model.state_dict().items()}
        for part in parts:
            state.update(part)
        return state

    def shard_info(self) -> dict[str, Any]:
        lo, hi = self.module._local_start, self.module._local_stop
        return {"strategy": self.name, "zero_stage": self.stage, "stage": self.engine.stage_id,
                "num_stages": self.engine.num_stages, "micro_batches": self.engine.micro_batches,
                "layers": [int(lo), int(hi)], "layer_types": self.layer_names[lo:hi],
                "parts": [int(x) for x in self.module.parts], **self.meter.report(self.engine)}
