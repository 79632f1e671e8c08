"""Typed task options (the `options:` section of a job), one dataclass per lab.

Kept free of torch imports so that `labs plan` can check them in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FineTuneOptions:
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (HF gradient checkpointing)."""


OPTIONS: dict[str, type] = {
    "fine_tune": FineTuneOptions,
}
