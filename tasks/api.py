"""THE task interface: what a task module hands to the worker, and the few launcher names a lab may use.
A lab imports nothing else of launcher/ (a test holds it); torch-free at module level.

A task module (tasks/<name>.py) exposes:
  build(job, options, dry_run) -> TaskParts
  eval_batch(model_out, batch) -> dict[str, float]   # sums, all-reduced across data-parallel ranks
  summarize(sums) -> dict[str, float]                  # e.g. eval_loss, perplexity, accuracy
  export(parts, state_dict, out_dir) -> None           # Hugging Face format
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launcher.common.cache import cache_dir
from launcher.common.errors import LabsError
from launcher.common.proc import rank_environment, release_shm_buffers
from launcher.config.job import Job
from launcher.config.schema import show

if TYPE_CHECKING:
    import torch

__all__ = ["cache_dir", "LabsError", "Job", "show", "rank_environment", "TensorRows", "TaskParts", "stack_collate",
           "split_shapes", "release_shm_buffers"]


class TensorRows:
    """Rows of equal-length tensors (e.g. token blocks), one dict per sample: a map-style dataset (what
    torch's DataLoader and DistributedSampler take: `__len__` and `__getitem__`)."""

    def __init__(self, **columns: torch.Tensor):
        n = {len(v) for v in columns.values()}
        assert len(n) == 1, f"columns differ in length: {n}"
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def stack_collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    import torch  # keeps torch out of the labs process (which reads the task catalogue)
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@dataclass
class TaskParts:
    model: torch.nn.Module
    tokenizer: Any
    train_data: torch.utils.data.Dataset
    eval_data: torch.utils.data.Dataset
    collate: Callable[[list[dict]], dict[str, torch.Tensor]] = stack_collate
    extra: dict[str, Any] | None = None



def split_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Shapes of the first block's matrices and the head as this rank holds them (AutoTP splits them)."""
    return {n: list(p.shape) for n, p in module.named_parameters()
            if p.dim() == 2 and (".0." in n or "lm_head" in n)}
