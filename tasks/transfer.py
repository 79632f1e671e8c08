"""Transfer learning: continue training a pretrained encoder (all-MiniLM-L6-v2) as an IMDB
sentiment classifier, with a new 2-way head.

    python -m tasks.transfer --dry_run                              # one process, built-in reviews
    labs launch jobs/transfer_imdb.yaml --data_dir ../shared/data   # 2 ranks, >= 80% in 100 steps

What trains (options.finetune): `head` (classifier + pooler; the backbone is frozen, so DeepSpeed
gets only the head's parameters and ZeRO has little to shard), `last_k` (head + the last K
encoder layers), `all`, or `lora` (PEFT LoRA adapters + head). Metric: accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from tasks.api import Job, LabsError, TaskParts
from tasks.classifier import ClassifierMetric, PadCollate, build_classifier, encode, export_classifier, labelled_splits
from tasks.lora import apply_lora, export_lora
from tasks.options import TransferOptions
from tasks.presets import PRESETS

METRIC = ClassifierMetric()
MODES = ("head", "last_k", "all", "lora")


def _head_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()
            if n.startswith(("classifier.", "score.")) or ".pooler." in f".{n}" or n.startswith("pre_classifier.")]


def freeze(model, mode: str, last_k: int) -> None:
    """Leave trainable only what `mode` trains (head | last_k | all)."""
    if mode == "all":
        return
    keep = set(_head_names(model))
    if mode == "last_k":
        layers = [n for n, _ in model.named_parameters() if ".layer." in n]
        ids = sorted({int(n.split(".layer.")[1].split(".")[0]) for n in layers})
        if last_k > len(ids):
            raise LabsError(f"options.last_k = {last_k}, but the model has {len(ids)} encoder layers")
        unfrozen = set(ids[len(ids) - last_k:])
        keep |= {n for n in layers if int(n.split(".layer.")[1].split(".")[0]) in unfrozen}
    for n, p in model.named_parameters():
        p.requires_grad = n in keep


def build(job: Job, options: TransferOptions, dry_run: bool = False) -> TaskParts:
    if options.finetune not in MODES:
        raise LabsError(f"{job.path}: options.finetune = {options.finetune!r}; choose one of {', '.join(MODES)}")
    METRIC.label_names = options.label_names
    model, tok = build_classifier(job.model.name, options.num_labels, job.model.tokenizer, options.label_names)
    if options.finetune == "lora":
        model = apply_lora(model, "SEQ_CLS", options.lora_r, options.lora_alpha, options.lora_dropout,
                           options.lora_target_modules)
    else:
        freeze(model, options.finetune, options.last_k)
    splits = labelled_splits(job, options.num_labels)
    return TaskParts(model=model, tokenizer=tok, train_data=encode(splits["train"], tok, options.max_length),
                     eval_data=encode(splits["validation"], tok, options.max_length),
                     collate=PadCollate(tok.pad_token_id), extra={"options": options, "model_name": job.model.name})


def eval_batch(out, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    return METRIC.eval_batch(out, batch)


def summarize(sums: dict[str, float]) -> dict[str, float]:
    return METRIC.summarize(sums)


def export(parts: TaskParts, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    options = parts.extra["options"]
    if options.finetune != "lora":
        export_classifier(parts, state_dict, out_dir)
        return

    name = parts.extra["model_name"]
    export_lora(parts.model, parts.tokenizer, state_dict, out_dir, auto_class=AutoModelForSequenceClassification,
                base_is_preset=name in PRESETS, merge=options.merge)


if __name__ == "__main__":
    from launcher.worker import run_lab

    run_lab("transfer")
