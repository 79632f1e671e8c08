"""Wrap a task's model by strategy. One class per strategy, one training-step interface:

    train_step(micro_batches) -> global mean loss of the step (all-reduced over data parallel)
    forward(batch)            -> model output (no grad), for evaluation
    save(dir, tag, state) / load(dir) -> state;  full_state_dict(ckpt_dir) -> weights on rank 0

Data parallel (ZeRO 0-3, offload): `deepspeed.initialize` with the config's zero_optimization.
Pipeline / model parallel (`pipeline.stages` > 1): the HF model becomes an ordered layer list
(tasks/pipeline_layers.py) inside a `deepspeed.pipe.PipelineModule`; `engine.train_batch` runs
DeepSpeed's 1F1B schedule over `gradient_accumulation_steps` micro-batches (1 = naive model
parallelism: each stage waits for the previous one).
Tensor parallel (`tensor_parallel.autotp_size` > 1): `deepspeed.initialize` applies AutoTP, which
replaces the attention/MLP Linear layers by row/column-sharded `LinearLayer`/`LinearAllreduce`.

Every strategy also reports `shard_info()`: the parameters this rank holds and its model-state
bytes measured from the tensors the engine really keeps (parameters, gradients, optimizer states).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from launcher import checkpoints
from launcher.layout import Layout
from launcher.rank_env import device, remove_shm


def dp_mean(value: torch.Tensor, group=None, size: int | None = None) -> float:
    t = value.detach().float().clone()
    if dist.is_initialized() and (size or dist.get_world_size(group)) > 1:
        dist.all_reduce(t, group=group)
        t /= size or dist.get_world_size(group)
    return float(t)


class EngineAccess:
    """What every strategy reads off its DeepSpeed engine (set as `self.engine`), and its checkpoints."""

    engine: Any

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def monitor(self):
        return self.engine.monitor

    def lr(self) -> float:
        return float(self.engine.get_lr()[0]) if self.engine.get_lr() else 0.0

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last update, before clipping (track_grad_norm)."""
        norm = self.engine.get_global_grad_norm()  # ZeRO 1-3, bf16: DeepSpeed's own
        norm = getattr(self.engine, "labs_grad_norm", None) if norm is None else norm
        return None if norm is None else float(norm)

    def layout_key(self) -> dict[str, Any]:
        """This engine's checkpoint layout (checkpoints.layout_key)."""
        e = self.engine
        precision = "bf16" if e.bfloat16_enabled() else "fp16" if e.fp16_enabled() else "fp32"
        offload = any(x is not None and str(getattr(x.device, "value", x.device)) != "none"
                      for x in (e.zero_offload_optimizer(), e.zero_offload_param()))
        return checkpoints.layout_key(self.layout.dp, self.layout.tp, self.layout.pp, self.stage, precision, offload,
                                      self.layout.sp)

    def save(self, ckpt_dir: Path, tag: str, state: dict[str, Any], manifest: checkpoints.Manifest,
             keep: int = 0) -> None:
        """Every rank writes its part; after a barrier rank 0 marks the checkpoint complete (its
        manifest), points `latest` at it (atomically) and prunes to the newest `keep`. Collective.
        The manifest also records offload and the global batch; the checkpoint, the names of the
        optimizer's parameters in order (what a ZeRO-0 checkpoint does not say, for launcher/reshard.py)."""
        import dataclasses
        e = self.engine
        key = self.layout_key()
        manifest = dataclasses.replace(manifest, offload=key["offload"], global_batch=int(
            e.train_micro_batch_size_per_gpu() * e.gradient_accumulation_steps() * self.layout.dp))
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"labs": state, "labs_params": names},
                                    save_latest=False)
        dist.barrier()
        if dist.get_rank() == 0:
            checkpoints.write_manifest(ckpt_dir / tag, manifest)
            checkpoints.write_latest(ckpt_dir, tag)
            checkpoints.prune(ckpt_dir, keep)
        dist.barrier()

    def load(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        """The run's client state after loading checkpoint `tag`. Saved under another layout (dp size,
        ZeRO stage, offload, precision): rank 0 converts it once (launcher/reshard.py; reused when
        already converted and intact) and every rank loads its share from the consolidated state."""
        saved = checkpoints.read_manifest(ckpt_dir / tag)
        now = self.layout_key()
        diffs = checkpoints.changes(saved.layout_key(), now) if saved is not None else []
        if diffs:
            return self._load_converted(ckpt_dir / tag, saved, now, diffs)
        path, client = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag} under {ckpt_dir}")
        return client["labs"]

    def _load_converted(self, tag_dir: Path, saved: checkpoints.Manifest, now: dict[str, Any],
                        diffs: list[str]) -> dict[str, Any]:
        import logging

        from launcher import reshard
        from launcher.errors import LabsError
        log = logging.getLogger("labs")
        was = saved.layout_key()
        if any(k in checkpoints.NOT_CONVERTIBLE for k in diffs) or (self.layout.tp > 1 and self.layout.pp > 1):
            raise LabsError(f"{tag_dir}: saved with {', '.join(f'{k} {was[k]}' for k in diffs)}, resumed with "
                            f"{', '.join(f'{k} {now[k]}' for k in diffs)}: a conversion to pipeline x tensor "
                            f"parallelism is not supported yet")
        log.info("resume: %s saved with %s; this run has %s: converting", tag_dir.name,
                 ", ".join(f"{k} {was[k]}" for k in diffs), ", ".join(f"{k} {now[k]}" for k in diffs))
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                reshard.ensure(tag_dir, saved, say=lambda m: log.info("%s", m),
                               model=getattr(self, "hf_model", None) or self.module)  # names a pipeline's layers
            except Exception as e:  # every rank stops with rank 0's reason
                box[0] = f"{e}" if isinstance(e, LabsError) else f"{type(e).__name__}: {e}"
                if not isinstance(e, LabsError):
                    log.exception("conversion of %s failed", tag_dir)
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise LabsError(f"--resume: converting {tag_dir} failed: {box[0]}")
        client = reshard.load_into(self, tag_dir / reshard.FOLDER)
        dist.barrier()
        return client


def track_grad_norm(engine) -> None:
    """Clip an fp32 engine without ZeRO by the global gradient norm in fp64, and keep that norm (before
    clipping) for metrics.jsonl; ZeRO 1-3 and bf16 keep theirs (`get_global_grad_norm`).

    DeepSpeed clips such an engine with `runtime.utils.clip_grad_norm_`, which takes each parameter's norm
    in fp32, and torch's CPU fp32 `norm()` of a large tensor is not exact: llama-tiny's 2M-element
    lm_head gradient came out 5.9e-5 low (1.015041 vs 1.015101 in fp64; `pow(2).sum()` gets it right).
    ZeRO 1-3 take the norms in fp64 (`get_norm_dtype()`), so ZeRO-0 (and the pipeline engine) clipped by
    another factor than ZeRO-1/2/3: their runs drifted apart (docs/strategies.md, "ZeRO-0 vs ZeRO>=1").
    This is DeepSpeed's clip_grad_norm_ (the same parameters counted, summed over `mpu`'s model-parallel
    group: pipeline stages, tensor slices; averaged over data parallel) with fp64 norms and ZeRO's clip
    factor; without clipping the norm is only measured."""
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


def clip_grad_norm_fp64(engine, max_norm: float) -> float:
    """The global gradient norm (see track_grad_norm); gradients scaled to max_norm when above it (> 0)."""
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.utils import groups
    mpu = engine.mpu
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None
             and (mpu is None or mpu.get_model_parallel_rank() == 0 or is_model_parallel_parameter(p))]
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else device())
    for g in grads:
        total += torch.linalg.vector_norm(g.detach().double()) ** 2
    if mpu is not None:
        dist.all_reduce(total, group=mpu.get_model_parallel_group())
    pg = groups._get_data_parallel_group()
    total = total.sqrt() / dist.get_world_size(group=pg)
    dist.all_reduce(total, group=pg)
    norm = float(total)
    clip = (norm + 1e-6) / max_norm if max_norm > 0 else 0.0
    if clip > 1:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.data.mul_(1.0 / clip)
    return norm


class DataParallel(EngineAccess):
    """Every rank holds the model (ZeRO shards optimizer/grads/params by stage) and reads its own
    slice of each global batch; DeepSpeed averages gradients across ranks."""

    name = "data_parallel"

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], layout: Layout):
        from launcher.dsconfig import wants_activation_checkpointing
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
        from launcher.reshard import check_whole  # never an empty (ZeRO-3 placeholder) tensor, e.g. a LoRA adapter
        if self.stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            return check_whole(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name),
                               str(ckpt_dir))
        return check_whole({k: v.detach().clone() for k, v in self.module.state_dict().items()}, str(ckpt_dir))

    def shard_info(self) -> dict[str, Any]:
        return {"strategy": self.name, "zero_stage": self.stage, **self.meter.report(self.engine)}


# ---------------------------------------------------------------- model-state bytes, measured

def _torch_optimizer(opt):
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


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


# ---------------------------------------------------------------- pipeline / model parallel

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
        from deepspeed.pipe import PipelineModule

        from launcher.dsconfig import wants_activation_checkpointing
        from tasks.pipeline_layers import causal_lm_loss, pipeline_layers

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
        """How ranks map to stages (launcher/pipe_tensor_parallel.py adds a tensor-parallel axis)."""
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


# ---------------------------------------------------------------- tensor parallel

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

    def full_state_dict(self, ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
        if self.stage == 3:
            return super().full_state_dict(ckpt_dir)
        return self.engine._consolidated_16bit_state_dict()  # gathers the shards; collective

    def shard_info(self) -> dict[str, Any]:
        info = super().shard_info()
        info["split_shapes"] = split_shapes(self.module)
        info["tp_rank"] = dist.get_rank() % self.layout.tp
        return info


def split_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Shapes of the first block's matrices and the head as this rank holds them (AutoTP splits them)."""
    return {n: list(p.shape) for n, p in module.named_parameters()
            if p.dim() == 2 and (".0." in n or "lm_head" in n)}


def release_shm_buffers() -> None:
    """Unlink this rank's /dev/shm file of DeepSpeed's CPU shared-memory all-reduce. Collective.

    deepspeed_shm_comm (loaded by `deepspeed.init_distributed` on CPU when all ranks share a host)
    creates one ~66 MiB file per rank, `deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`,
    and never unlinks it: every run left them behind, in RAM (tmpfs). Once every rank has mapped
    its peers' files (they have when all passed the barrier), each unlinks its own; the memory
    stays mapped until the ranks exit, and is then freed."""
    if not dist.is_initialized():
        return
    dist.barrier()  # (a 1-rank run on CPU creates its file too)
    remove_shm(os.environ.get("MASTER_PORT", "-"), dist.get_rank())


def build_strategy(model: torch.nn.Module, config: dict[str, Any], layout: Layout):
    release_shm_buffers()
    if layout.pp > 1 and layout.tp > 1:
        from launcher.pipe_tensor_parallel import PipeTensorParallel
        return PipeTensorParallel(model, config, layout)
    if layout.sp > 1:
        from launcher.sequence_parallel import SequenceParallel
        return SequenceParallel(model, config, layout)
    if layout.pp > 1:
        return PipelineParallel(model, config, layout)
    if layout.tp > 1:
        return TensorParallel(model, config, layout)
    return DataParallel(model, config, layout)
