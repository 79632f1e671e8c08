"""FLOPs per token of the model a rank trains (counted from its modules) and the MFU of each logged step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from launcher.common.text import fmt_flops
from launcher.config.ds.load import precision
from launcher.estimate.flops import TokenFlops, matmul_shape, token_flops
from launcher.estimate.shape import cfg_get
from launcher.rank.peak import Peak, peak

log = logging.getLogger("labs")


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions: the full size

def _module_matmul_params(model) -> int:
    """Fallback for unknown architectures: the weights of every Linear (and GPT-2 Conv1D) module."""
    # keeps torch and DeepSpeed out of the labs process
    import torch
    total = 0
    for name, mod in model.named_modules():
        if "lora_" in name:
            continue
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            total += _numel(mod.weight)
    return total

def model_flops(model, seq_len: int) -> TokenFlops:
    """FLOPs per training token of `model` (an HF model, a PEFT model, or one wrapped by ZeRO-3: sizes
    come from the config and `ds_numel`) at sequence length `seq_len`."""
    cfg = getattr(model, "config", None)
    shape = matmul_shape(cfg) if cfg is not None else None
    if shape is None:
        n = _module_matmul_params(model)
        layers = int(cfg_get(cfg, "num_hidden_layers", "n_layer", default=0) or 0) if cfg is not None else 0
        width = int(cfg_get(cfg, "hidden_size", "n_embd", default=0) or 0) if cfg is not None else 0
    else:
        n, layers, width = shape
    adapters = sum(_numel(p) for name, p in model.named_parameters() if "lora_" in name)
    return token_flops(n, layers, width, seq_len, adapters)


class Meter:
    """FLOPs per token and peak of one run (on global rank 0); logs both once when made."""

    def __init__(self, flops: TokenFlops, peak_: Peak, ranks: int):
        self.flops, self.peak, self.ranks = flops, peak_, ranks
        self.denominator = peak_.flops * ranks

    def fields(self, tokens: float, seconds: float) -> dict[str, float]:
        achieved = self.flops.total * tokens / seconds if seconds > 0 else 0.0
        return {"flops_per_s": achieved, "mfu": achieved / self.denominator if self.denominator else 0.0}

    def summary(self, tokens: float, seconds: float) -> dict[str, Any]:
        return {**self.fields(tokens, seconds), "flops_per_token": self.flops.total,
                "flops_formula": self.flops.formula, "peak_flops": self.denominator,
                "peak": self.peak.describe(self.ranks)}


_METERS: dict[int, Meter | None] = {}

def for_run(model, micro: list[dict[str, Any]], cfg: dict[str, Any], layout) -> Meter | None:
    """The run's meter (made at the first call, on global rank 0 only; None on other ranks):
    sequence length from the batch, precision from the DeepSpeed config, every rank assumed to run
    as many threads as rank 0 on the same kind of device."""
    key = id(model)
    if key not in _METERS:
        meter = None
        if int(os.environ.get("RANK", "0")) == 0:
            try:
                # keeps torch and DeepSpeed out of the labs process
                import torch

                device = "cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "cpu"
                flops = model_flops(model, int(micro[0]["input_ids"].shape[-1]))
                meter = Meter(flops, peak(precision(cfg), device=device), layout.world)
                log.info("FLOPs per token: %s", flops.describe())
                log.info("peak for MFU: %s", meter.peak.describe(layout.world))
            except Exception as e:  # a metric must never end a training run
                log.warning("MFU not available: %s: %s", type(e).__name__, e)
        _METERS[key] = meter
    return _METERS[key]

def train_fields(model, micro, cfg, layout, tokens: float, seconds: float) -> dict[str, float]:
    meter = for_run(model, micro, cfg, layout)
    return meter.fields(tokens, seconds) if meter else {}

def summary_fields(model, tokens: float, seconds: float) -> dict[str, Any]:
    meter = _METERS.get(id(model))
    return meter.summary(tokens, seconds) if meter else {}

def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's FLOP/s and MFU lines (empty when the run has no meter)."""
    if "mfu" not in s:
        return []
    return [("FLOP/s", f"{fmt_flops(s['flops_per_s'])} ({s['flops_per_token'] / 1e6:,.1f} MFLOP/token: "
                       f"{s['flops_formula']})"),
            ("MFU", f"{100 * s['mfu']:.1f}% of {s['peak']}")]
