"""Inside a rank: the strategy the table (launcher/parallel/__init__.py) chooses, built around the model."""

from __future__ import annotations

from typing import Any

from launcher.common.layout import Layout
from launcher.common.proc import release_shm_buffers
from launcher.parallel import (
    choose,
    data_parallel,
    pipe_tensor_parallel,
    pipeline_parallel,
    sequence_parallel,
    tensor_parallel,
)


def build_strategy(model: Any, config: dict[str, Any], layout: Layout):
    """The chosen strategy wrapping `model` (inside a rank: this imports torch and DeepSpeed)."""
    files = {"data_parallel": data_parallel, "pipe_tensor_parallel": pipe_tensor_parallel,
             "pipeline_parallel": pipeline_parallel, "sequence_parallel": sequence_parallel,
             "tensor_parallel": tensor_parallel}
    strategy = choose(layout)
    release_shm_buffers()
    return getattr(files[strategy.module], strategy.cls)(model, config, layout)
