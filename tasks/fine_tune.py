"""Causal-LM fine-tuning on WikiText-2 (or any text): the foundation lab.

    python -m tasks.fine_tune --dry_run            # one process, CPU, built-in text, seconds
    labs launch jobs/fine_tune_zero2.yaml          # 2 ranks under DeepSpeed ZeRO-2

Metric: eval loss (mean per token over the whole eval split) and perplexity = exp(loss).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tasks.api import Job, LabsError, TaskParts, TensorRows
from tasks.causal_lm import build_causal_lm
from tasks.options import FineTuneOptions
from tasks.text_data import load_splits, require_column


def token_blocks(texts: list[str], tokenizer, block_size: int, limit: int | None) -> torch.Tensor:
    """Tokenize lines, join them with EOS, cut into [N, block_size] blocks (the tail is dropped)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for enc in tokenizer([t for t in texts if t.strip()], add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // block_size
    if limit:
        n = min(n, limit)
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def lm_rows(texts: list[str], tokenizer, job: Job, limit: int | None, split: str) -> TensorRows:
    blocks = token_blocks(texts, tokenizer, job.data.block_size, limit)
    if len(blocks) == 0:
        raise LabsError(f"{job.path}: the {split} text gives no block of {job.data.block_size} tokens; "
                        f"give more text or lower data.block_size")
    return TensorRows(input_ids=blocks, labels=blocks)


def build(job: Job, options: FineTuneOptions, dry_run: bool = False) -> TaskParts:
    model, tok = build_causal_lm(job.model.name, job.model.tokenizer)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    splits = load_splits(job)
    for split in ("train", "validation"):
        require_column(splits[split], job.data.text_column, "text", f"{split} data")
    train = lm_rows(splits["train"][job.data.text_column], tok, job, job.data.max_train_samples, "train")
    evals = lm_rows(splits["validation"][job.data.text_column], tok, job, job.data.max_eval_samples, "eval")
    return TaskParts(model=model, tokenizer=tok, train_data=train, eval_data=evals)


def eval_batch(out, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    tokens = batch["labels"][:, 1:].numel()  # HF shifts labels by one inside the model
    return {"loss_sum": float(out.loss) * tokens, "tokens": float(tokens)}


def summarize(sums: dict[str, float]) -> dict[str, float]:
    loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def export(parts: TaskParts, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    parts.model.save_pretrained(out_dir, state_dict=state_dict)
    parts.tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    from launcher.worker import run_lab

    run_lab("fine_tune")
