"""Per-rank model-state memory (parameters, gradients, optimizer states) for each ZeRO stage.

Mixed-precision Adam, DeepSpeed's accounting (bytes per parameter: 2 fp16/bf16 params, 2 low-
precision grads, 4 fp32 grads, 4 fp32 master params, 8 Adam moments = 20). Stages 2 and 3 are
exactly DeepSpeed's `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`
(tests assert equality against them); stage 0 and 1 follow the same accounting since DeepSpeed has
no estimator for them. Written out here so that `labs plan` does not import DeepSpeed (2 s).
"""

from __future__ import annotations


def zero_model_state_bytes(stage: int, params: int, largest_layer: int, world: int,
                           offload_optimizer: bool = False, offload_param: bool = False) -> int:
    n = max(world, 1)
    if stage == 0:
        return 20 * params
    if stage == 1:
        return 2 * params + 2 * params + int(16 * params / n)
    if stage == 2:
        return 2 * params if offload_optimizer else 2 * params + int(18 * params / n)
    if stage == 3:
        layer = 4 * largest_layer
        if offload_optimizer:
            return layer if offload_param else layer + int(2 * params / n)
        return layer + int(18 * params / n)
    raise ValueError(f"ZeRO stage {stage}")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
