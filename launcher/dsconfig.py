"""Load and check a DeepSpeed JSON config before any rank starts.

DeepSpeed ignores unknown top-level keys silently, so a typo such as `zero_optimisation` trains
without ZeRO. We refuse them here. `KNOWN_KEYS` is the set DeepSpeed 0.19 reads (tests keep it
in step with the installed DeepSpeed by recording which keys `DeepSpeedConfig` looks up).
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from launcher.errors import LabsError

KNOWN_KEYS = frozenset(
    """
    activation_checkpointing aio amp autotuning bf16 bfloat16 checkpoint comet comms_logger
    communication_data_type compile compression_training csv_monitor curriculum_learning
    data_efficiency data_types dataloader_drop_last datastates_ckpt disable_allgather
    disable_python_gc dump_state eigenvalue elasticity expert_parallel flops_profiler fp16
    gradient_accumulation_steps gradient_allreduce_op gradient_clipping gradient_predivide_factor
    graph_harvesting hybrid_engine log_level managed_gradient_accumulation memory_breakdown nebula
    optimizer pipeline prescale_gradients progressive_layer_drop quantize_training scheduler
    seq_parallel_communication_data_type sparse_attention sparse_gradients steps_per_print
    tensor_parallel tensorboard timers torch_autocast train_batch_size
    train_micro_batch_size_per_gpu use_data_before_expert_parallelism vocabulary_size
    wall_clock_breakdown wandb weight_quantization zero_allow_untested_optimizer
    zero_force_ds_cpu_optimizer zero_optimization
    """.split()
)
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LabsError(
            f"DeepSpeed config {str(path)!r} does not exist; pass --ds-config with one of "
            f"{sorted(str(x) for x in Path('ds_configs').glob('*.json')) or 'ds_configs/*.json'}"
        )
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LabsError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise LabsError(f"{path}: the top level must be a JSON object, got {type(cfg).__name__}")
    return cfg


def check_keys(cfg: dict[str, Any], path: str) -> None:
    for key in cfg:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "remove it"
            raise LabsError(
                f"{path}: unknown top-level key {key!r} (DeepSpeed would ignore it silently); {hint}"
            )
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise LabsError(f"{path}: zero_optimization must be an object like {{\"stage\": 2}}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise LabsError(
            f"{path}: zero_optimization.stage = {stage!r}; ZeRO stage must be 0, 1, 2 or 3"
        )


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offload(cfg: dict[str, Any]) -> tuple[bool, bool]:
    """(optimizer offloaded to CPU, params offloaded to CPU)."""
    zero = cfg.get("zero_optimization", {})

    def on(section: str) -> bool:
        return zero.get(section, {}).get("device", "none") in ("cpu", "nvme")

    return on("offload_optimizer"), on("offload_param")


def _int_or_none(cfg: dict[str, Any], key: str, path: str) -> int | None:
    v = cfg.get(key)
    if v is None or v == "auto":
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise LabsError(f"{path}: {key} = {v!r}; it must be a positive integer or \"auto\"")
    return v


def resolve_batch(cfg: dict[str, Any], dp: int, path: str) -> dict[str, Any]:
    """Fill the batch triad (train_batch = micro x grad_accum x dp) and check it multiplies out.

    Missing or "auto" values are derived from the others; with two of three missing,
    gradient_accumulation_steps defaults to 1. Returns a new dict with all three set.
    """
    out = copy.deepcopy(cfg)
    tb, mb, ga = (_int_or_none(cfg, k, path) for k in BATCH_KEYS)
    if tb is None and mb is None:
        raise LabsError(
            f"{path}: set train_micro_batch_size_per_gpu (and optionally gradient_accumulation_steps)"
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
