"""What every strategy shares: the interface the rank's loop calls (`train_step`, `forward`, `save`/`load`,
`full_state_dict`, `shard_info`), read off its DeepSpeed engine (`EngineAccess`), and the collectives and
clean-up every strategy needs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.checkpoint.convert import ensure
from launcher.checkpoint.load import load_into
from launcher.checkpoint.store import (
    FOLDER,
    NOT_CONVERTIBLE,
    Manifest,
    changes,
    layout_key,
    prune,
    read_manifest,
    write_latest,
    write_manifest,
)
from launcher.common.errors import LabsError
from launcher.parallel.layers.pipeline import pipeline_names


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
        """The global gradient norm of the last update, before clipping (launcher/parallel/grad_norm.py)."""
        norm = self.engine.get_global_grad_norm()  # ZeRO 1-3, bf16: DeepSpeed's own
        norm = getattr(self.engine, "labs_grad_norm", None) if norm is None else norm
        return None if norm is None else float(norm)

    def layout_key(self) -> dict[str, Any]:
        """This engine's checkpoint layout (layout_key)."""
        e = self.engine
        precision = "bf16" if e.bfloat16_enabled() else "fp16" if e.fp16_enabled() else "fp32"
        offload = any(x is not None and str(getattr(x.device, "value", x.device)) != "none"
                      for x in (e.zero_offload_optimizer(), e.zero_offload_param()))
        return layout_key(self.layout.dp, self.layout.tp, self.layout.pp, self.stage, precision, offload,
                                      self.layout.sp)

    def save(self, ckpt_dir: Path, tag: str, state: dict[str, Any], manifest: Manifest,
             keep: int = 0) -> None:
        """Every rank writes its part; after a barrier rank 0 marks the checkpoint complete (its
        manifest), points `latest` at it (atomically) and prunes to the newest `keep`. Collective.
        The manifest also records offload and the global batch; the checkpoint, the names of the
        optimizer's parameters in order (what a ZeRO-0 checkpoint does not say, for launcher/py)."""
        e = self.engine
        key = self.layout_key()
        manifest = dataclasses.replace(manifest, offload=key["offload"], global_batch=int(
            e.train_micro_batch_size_per_gpu() * e.gradient_accumulation_steps() * self.layout.dp))
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"labs": state, "labs_params": names},
                                    save_latest=False)
        dist.barrier()
        if dist.get_rank() == 0:
            write_manifest(ckpt_dir / tag, manifest)
            write_latest(ckpt_dir, tag)
            prune(ckpt_dir, keep)
        dist.barrier()

    def load(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        """The run's client state after loading checkpoint `tag`. Saved under another layout (dp size,
        ZeRO stage, offload, precision): rank 0 converts it once (launcher/py; reused when
        already converted and intact) and every rank loads its share from the consolidated state."""
        saved = read_manifest(ckpt_dir / tag)
        now = self.layout_key()
        diffs = changes(saved.layout_key(), now) if saved is not None else []
        if diffs:
            return self._load_converted(ckpt_dir / tag, saved, now, diffs)
        path, client = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag} under {ckpt_dir}")
        return client["labs"]

    def _load_converted(self, tag_dir: Path, saved: Manifest, now: dict[str, Any],
                        diffs: list[str]) -> dict[str, Any]:

        log = logging.getLogger("labs")
        was = saved.layout_key()
        if any(k in NOT_CONVERTIBLE for k in diffs) or (self.layout.tp > 1 and self.layout.pp > 1):
            raise LabsError(f"{tag_dir}: saved with {', '.join(f'{k} {was[k]}' for k in diffs)}, resumed with "
                            f"{', '.join(f'{k} {now[k]}' for k in diffs)}: a conversion to pipeline x tensor "
                            f"parallelism is not supported yet")
        log.info("resume: %s saved with %s; this run has %s: converting", tag_dir.name,
                 ", ".join(f"{k} {was[k]}" for k in diffs), ", ".join(f"{k} {now[k]}" for k in diffs))
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                ensure(tag_dir, saved, say=lambda m: log.info("%s", m),
                               rename=pipeline_names(getattr(self, "hf_model", None) or self.module)
                       if saved.pp > 1 else None)  # the HF names of a pipeline's layers
            except Exception as e:  # every rank stops with rank 0's reason
                box[0] = f"{e}" if isinstance(e, LabsError) else f"{type(e).__name__}: {e}"
                if not isinstance(e, LabsError):
                    log.exception("conversion of %s failed", tag_dir)
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise LabsError(f"--resume: converting {tag_dir} failed: {box[0]}")
        client = load_into(self, tag_dir / FOLDER)
        dist.barrier()
        return client






