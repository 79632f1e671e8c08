"""What a task module hands to the worker.

A task module (tasks/<name>.py) exposes:
  build(job, options, dry_run) -> TaskParts
  eval_batch(model_out, batch) -> dict[str, float]   # sums, all-reduced across data-parallel ranks
  summarize(sums) -> dict[str, float]                  # e.g. eval_loss, perplexity, accuracy
  export(parts, state_dict, out_dir) -> None           # Hugging Face format
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class TensorRows(torch.utils.data.Dataset):
    """Rows of equal-length tensors (e.g. token blocks), one dict per sample."""

    def __init__(self, **columns: torch.Tensor):
        n = {len(v) for v in columns.values()}
        assert len(n) == 1, f"columns differ in length: {n}"
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def stack_collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@dataclass
class TaskParts:
    model: torch.nn.Module
    tokenizer: Any
    train_data: torch.utils.data.Dataset
    eval_data: torch.utils.data.Dataset
    collate: Callable[[list[dict]], dict[str, torch.Tensor]] = stack_collate
    extra: dict[str, Any] | None = None
