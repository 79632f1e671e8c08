"""A DeepSpeed JSON config: loaded (bounded reader), dotted overrides, comment keys, the batch triad, and
small readers of its sections (ZeRO stage, offload, activation checkpointing). The order the plan uses:
`load_ds_config` -> overrides (`set_dotted`) -> `strip_comments` -> `check_keys` -> `resolve_auto`
(config/ds/auto.py) -> `resolve_batch` -> `validate` (config/ds/validate.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher.common import files
from launcher.common.errors import LabsError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not files.is_file(p):
        raise LabsError(
            f"DeepSpeed config {str(path)!r} does not exist; pass --ds-config with one of "
            f"{sorted(str(x) for x in Path('ds_configs').glob('*.json')) or 'ds_configs/*.json'}"
        )
    cfg = files.load_json(p, "DeepSpeed config")
    if not isinstance(cfg, dict):
        raise LabsError(f"{path}: the top level must be a JSON object, got {type(cfg).__name__}")
    return cfg


def strip_comments(cfg: Any) -> Any:
    """A copy without the keys that start with `_` (comments, at any depth): accepted and ignored,
    never seen by DeepSpeed."""
    if isinstance(cfg, dict):
        return {k: strip_comments(v) for k, v in cfg.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(cfg, list):
        return [strip_comments(v) for v in cfg]
    return cfg




def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offload(cfg: dict[str, Any]) -> tuple[bool, bool]:
    """(optimizer offloaded to CPU, params offloaded to CPU)."""
    zero = cfg.get("zero_optimization", {})

    def on(section: str) -> bool:
        return (zero.get(section) or {}).get("device", "none") in ("cpu", "nvme")

    return on("offload_optimizer"), on("offload_param")


def _int_or_none(cfg: dict[str, Any], key: str, path: str) -> int | None:
    v = cfg.get(key)
    if v is None or v == "auto":
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise LabsError(f"{path}: {key} = {v!r}; it must be a positive integer or \"auto\"")
    if v > MAX_BATCH:
        shown = f"{v}" if len(str(v)) <= 20 else f"a {len(str(v))}-digit number"
        raise LabsError(f"{path}: {key} = {shown}; more than {MAX_BATCH:,} samples cannot be a batch "
                        f"(torch indexes a batch with 32-bit sizes); set a number of samples per step")
    return v


MAX_BATCH = 2**31 - 1


def resolve_batch(cfg: dict[str, Any], dp: int, path: str) -> dict[str, Any]:
    """Fill the batch triad (train_batch = micro x grad_accum x dp) and check it multiplies out.

    Missing or "auto" values are derived from the others; with two of three missing,
    gradient_accumulation_steps defaults to 1. Returns a new dict with all three set.
    """
    out = copy.deepcopy(cfg)
    tb, mb, ga = (_int_or_none(cfg, k, path) for k in BATCH_KEYS)
    if tb is None and mb is None:
        raise LabsError(
            f"{path}: neither train_batch_size nor train_micro_batch_size_per_gpu is a number (both missing "
            f"or \"auto\" with no micro batch from the job); set train_micro_batch_size_per_gpu (and "
            f"optionally gradient_accumulation_steps)"
        )
    if mb is None:
        ga = ga or 1
        if tb % (ga * dp):
            raise LabsError(
                f"{path}: train_batch_size = {tb} is not divisible by gradient_accumulation_steps "
                f"x data-parallel size = {ga} x {dp}; set train_batch_size to a multiple of {ga * dp}"
            )
        mb = tb // (ga * dp)
    elif ga is None:
        if tb is None:
            ga = 1
        elif tb % (mb * dp):
            raise LabsError(
                f"{path}: train_batch_size = {tb} is not divisible by micro batch x data-parallel "
                f"size = {mb} x {dp}; set train_batch_size to a multiple of {mb * dp}"
            )
        else:
            ga = tb // (mb * dp)
    if tb is None:
        tb = mb * ga * dp
    if tb != mb * ga * dp:
        raise LabsError(
            f"{path}: train_batch_size = {tb} but train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x data-parallel size = {mb} x {ga} x {dp} = {mb * ga * dp}; "
            f"set train_batch_size to {mb * ga * dp} (or \"auto\"), or change the micro batch or "
            f"accumulation steps"
        )
    out.update(train_batch_size=tb, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga)
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[keys[-1]] = value


def get_path(d: Any, keys: tuple[str, ...], default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _dotted(keys: tuple | list) -> str:
    return ".".join(str(k) for k in keys)


def _walk(node: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, value) of every value under node, depth first; list items get their index."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,), v
            yield from _walk(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,), v
            yield from _walk(v, prefix + (i,))


def wants_activation_checkpointing(cfg: dict[str, Any]) -> bool:
    """An `activation_checkpointing` section that is not all off: the engine then recomputes activations in
    the backward pass (HF gradient checkpointing under data / tensor parallel; every transformer block of
    a pipeline stage under the pipeline engine, unless pipeline.activation_checkpoint_interval says)."""
    return "activation_checkpointing" in cfg and not _harmless(cfg["activation_checkpointing"])


def _harmless(value: Any) -> bool:
    if value is None or value is False or value == {} or value == []:
        return True
    if isinstance(value, dict):
        if "enabled" in value:
            return value["enabled"] is False
        return all(_harmless(v) or v == 0 for v in value.values())
    return False


REFUSED: dict[str, tuple[str, str]] = {
    "autotuning": (
        "DeepSpeed's autotuner is a separate tool that launches many trial runs and picks a config; inside a "
        "training run the section only changes what the flops profiler records",
        "run `deepspeed --autotuning tune ...` on its own, and remove the section (or set \"enabled\": false) here"),
    "data_efficiency": (
        "curriculum learning and data sampling act only on DeepSpeed's own data loader (training_data given to "
        "deepspeed.initialize), which labs' ranks do not use, and random-LTD needs DeepSpeed's layer replacement "
        "in the model; both would be ignored",
        "remove the section (or set \"enabled\": false)"),
    "hybrid_engine": (
        "the hybrid engine switches a model between training and generation for RLHF (DeepSpeed-Chat); labs' "
        "tasks do not generate while training",
        "remove the section (or set \"enabled\": false)"),
    "weight_quantization": (
        "it is read by deepspeed.init_inference only (quantized inference weights); training ignores it",
        "remove the section"),
    "expert_parallel": (
        "AutoEP converts Mixture-of-Experts layers, and the labs' models are dense",
        "remove the section"),
    "use_data_before_expert_parallelism": (
        "it orders the process groups of Mixture-of-Experts models, and the labs' models are dense",
        "remove the key"),
    "data_parallel_size": (
        "with sequence_parallel_size it builds a (data, sequence) mesh for Ulysses sequence parallelism; labs "
        "sets it from the hostfile's world size / (sequence_parallel_size x tensor x pipeline)",
        "remove the key"),
    "dataloader_drop_last": (
        "it applies to DeepSpeed's own data loader, which labs' ranks do not use (the task's loader decides)",
        "remove the key"),
}
"""Keys DeepSpeed 0.19 accepts that labs would not honour: reason and fix. Harmless when switched off
("enabled": false, a false/null value, or a section whose values are all false/null/0)."""


def precision(cfg: dict[str, Any]) -> str:
    for key in ("bf16", "bfloat16", "fp16"):
        sec = cfg.get(key)
        if isinstance(sec, dict) and sec.get("enabled") is True:
            return "bf16" if key != "fp16" else "fp16"
    return "fp32"
