"""AG News topic classification with a small transformer built from config: data parallelism.

    python -m tasks.simple_model --dry_run                     # one process, built-in sample, seconds
    labs launch jobs/simple_model_zero0.yaml --data_dir ../shared/data   # 2 ranks, plain DDP-like
    labs launch jobs/simple_model_zero2.yaml --data_dir ../shared/data   # 2 ranks, ZeRO-2

Model: a `bert` preset (bert-tiny, bert-small) built from config with a 4-way head, or any HF
sequence classifier by hub id / folder. Metric: accuracy and per-class accuracy on the eval split.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.api import Job, TaskParts
from tasks.classifier import ClassifierMetric, PadCollate, build_classifier, encode, export_classifier, labelled_splits
from tasks.options import SimpleModelOptions

METRIC = ClassifierMetric()


def build(job: Job, options: SimpleModelOptions, dry_run: bool = False) -> TaskParts:
    METRIC.label_names = options.label_names
    model, tok = build_classifier(job.model.name, options.num_labels, job.model.tokenizer, options.label_names)
    splits = labelled_splits(job, options.num_labels)
    return TaskParts(model=model, tokenizer=tok, train_data=encode(splits["train"], tok, options.max_length),
                     eval_data=encode(splits["validation"], tok, options.max_length),
                     collate=PadCollate(tok.pad_token_id))


def eval_batch(out, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    return METRIC.eval_batch(out, batch)


def summarize(sums: dict[str, float]) -> dict[str, float]:
    return METRIC.summarize(sums)


def export(parts: TaskParts, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    export_classifier(parts, state_dict, out_dir)


if __name__ == "__main__":
    from launcher.worker import run_lab

    run_lab("simple_model")
