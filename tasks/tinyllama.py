"""TinyLlama-style causal LM with PEFT LoRA (the seed's fine_tune_tinyllama), under ZeRO-2/3.

    python -m tasks.tinyllama --dry_run                              # one process, built-in text
    labs launch jobs/tinyllama_lora.yaml                             # 2 ranks, ZeRO-2
    labs launch jobs/tinyllama_lora_zero3.yaml                       # 2 ranks, ZeRO-3
    labs launch jobs/tinyllama_lora.yaml --set model.name=TinyLlama/TinyLlama-1.1B-Chat-v1.0  # online
    labs launch jobs/tinyllama_lora_smollm2.yaml --data_dir ../shared/data   # pretrained SmolLM2-135M, offline

Model and data come from the fine_tune lab (tasks.causal_lm.build_causal_lm, tasks.fine_tune's
token blocks); LoRA wraps the attention and MLP projections, so only ~1% of the parameters train
and DeepSpeed holds optimizer state for those alone. Outputs: hf/adapter (PEFT), hf/base (preset
bases), and with options.merge the merged model in hf/. Metric: eval loss and perplexity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tasks import fine_tune
from tasks.api import Job, TaskParts
from tasks.causal_lm import build_causal_lm
from tasks.lora import apply_lora, export_lora
from tasks.options import TinyLlamaOptions
from tasks.presets import PRESETS
from tasks.text_data import load_splits, require_column

eval_batch = fine_tune.eval_batch
summarize = fine_tune.summarize


def build(job: Job, options: TinyLlamaOptions, dry_run: bool = False) -> TaskParts:
    model, tok = build_causal_lm(job.model.name, job.model.tokenizer)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = apply_lora(model, "CAUSAL_LM", options.lora_r, options.lora_alpha, options.lora_dropout,
                       options.lora_target_modules)
    splits = load_splits(job)
    for split in ("train", "validation"):
        require_column(splits[split], job.data.text_column, "text", f"{split} data")
    col = job.data.text_column
    train = fine_tune.lm_rows(splits["train"][col], tok, job, job.data.max_train_samples, "train")
    evals = fine_tune.lm_rows(splits["validation"][col], tok, job, job.data.max_eval_samples, "eval")
    return TaskParts(model=model, tokenizer=tok, train_data=train, eval_data=evals,
                     extra={"options": options, "model_name": job.model.name})


def export(parts: TaskParts, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:

    export_lora(parts.model, parts.tokenizer, state_dict, out_dir, auto_class=AutoModelForCausalLM,
                base_is_preset=_built_from_config(parts.extra["model_name"]), merge=parts.extra["options"].merge)


def _built_from_config(name: str) -> bool:
    """A preset built from config has its base weights nowhere else (hf/base is written); a pretrained
    preset (smollm2-135m) loads from its cached folder, which the adapter's config names."""
    return name in PRESETS and not PRESETS[name].get("weights")


if __name__ == "__main__":
    from launcher.worker import run_lab

    run_lab("tinyllama")
