"""PEFT LoRA for the labs that use it (tinyllama, transfer with finetune=lora): wrap, and export.

Export works the same for every ZeRO stage: the worker hands the full state dict of the
PEFT-wrapped model (module.state_dict() at stages 0-2, DeepSpeed's zero_to_fp32 at stage 3, where
the live parameters are partitioned), which is loaded into a fresh, unpartitioned copy; from it
`hf/adapter/` (PEFT format: PeftModel.from_pretrained loads it), `hf/base/` (only when the base
model was built from a preset: nothing else holds its weights) and, with merge, the merged full
weights in `hf/` (a plain HF model folder, e.g. for `labs rag --generator runs/.../hf`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from tasks.api import LabsError

log = logging.getLogger("labs")


def apply_lora(model: torch.nn.Module, task_type: str, r: int, alpha: int, dropout: float,
               targets: list[str]):
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise LabsError(f"options.lora_target_modules: {missing} match no module of {type(model).__name__}; "
                        f"module names include {sorted(n for n in names if n)[:20]}")
    cfg = LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft_model = get_peft_model(model, cfg)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %s of %s parameters trainable (%.2f%%)", r, alpha, ",".join(targets),
             f"{trainable:,}", f"{total:,}", 100.0 * trainable / total)
    return peft_model


def export_lora(peft_model, tokenizer, state_dict: dict[str, torch.Tensor], out_dir: Path, *,
                auto_class, base_is_preset: bool, merge: bool) -> None:
    """Write hf/adapter (always), hf/base (preset bases) and merged weights in hf/ (merge)."""
    config = copy.deepcopy(peft_model.get_base_model().config)
    peft_cfg = copy.deepcopy(peft_model.peft_config["default"])
    fresh = get_peft_model(auto_class.from_config(config, dtype=torch.float32), peft_cfg)
    result = fresh.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k in dict(fresh.named_parameters())]
    if missing:
        raise RuntimeError(f"exported state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    out_dir = Path(out_dir)
    adapter_dir = out_dir / "adapter"
    if base_is_preset:
        base_dir = out_dir / "base"
        base = fresh.get_base_model()
        sd = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
        sd = {k.replace("modules_to_save.default.", ""): v for k, v in sd.items() if "original_module" not in k}
        base.save_pretrained(base_dir, state_dict=sd)
        tokenizer.save_pretrained(base_dir)
        fresh.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    fresh.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    if merge:
        merged = fresh.merge_and_unload()
        merged.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
