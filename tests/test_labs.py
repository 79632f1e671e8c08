"""Three labs on top of the foundation: simple_model, transfer, tinyllama (LoRA); rag is in test_rag.py.

Metrics and bad input are checked with plain function calls; each lab's dry run once under 2
real DeepSpeed ranks (one of them under torchrun). Real data (../shared/data) only where present.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, assert_ok, launch, read_metrics, summary

from launcher.common.errors import LabsError
from launcher.config.job import load_job


def _job(tmp_path: Path, task: str, **data) -> object:
    sets = [f"task={task}"] + [f"data.{k}={json.dumps(v)}" for k, v in data.items()]
    job = load_job(None, sets)
    job.train.seed = 0
    return job


def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- classification metric and data


def test_accuracy_and_per_class_accuracy_on_fixed_input():
    from tasks.classifier import accuracy_metrics, accuracy_sums
    logits = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [1.0, 0, 0], [0, 0, 5.0], [0, 4.0, 0]])
    labels = torch.tensor([0, 1, 2, 1, 2, 0])  # right: 0, 1, 2, 4 -> 4/6; class 0: 1/2, 1: 1/2, 2: 2/2
    sums = accuracy_sums(logits[:3], labels[:3], loss=0.5)
    for k, v in accuracy_sums(logits[3:], labels[3:], loss=1.0).items():  # two batches, summed
        sums[k] += v
    m = accuracy_metrics(sums, ["World", "Sports", "Sci/Tech"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["acc_world"] == pytest.approx(0.5) and m["acc_sports"] == pytest.approx(0.5)
    assert m["acc_sci_tech"] == pytest.approx(1.0)
    assert m["eval_loss"] == pytest.approx((0.5 * 3 + 1.0 * 3) / 6)


def test_csv_columns_are_mapped_by_option(tmp_path):
    from tasks.classifier import labelled_splits
    # headerless, labels 1-4, text in two columns: like AG News's original test.csv
    f = _csv(tmp_path / "news.csv", "".join(f'"{i % 4 + 1}","title {i}","body {i}"\n' for i in range(20)))
    job = _job(tmp_path, "simple_model", train_files=[f], column_names=["cls", "title", "body"],
               text_columns=["title", "body"], label_column="cls", label_offset=1)
    splits = labelled_splits(job, 4)
    assert len(splits["train"]) + len(splits["validation"]) == 20
    row = splits["train"][0]
    assert row["text"].startswith("title ") and " body " in row["text"]
    assert set(splits["train"]["label"]) <= {0, 1, 2, 3}


@pytest.mark.parametrize("case, expected", [
    ("label", "label 7 is outside 0..3"),
    ("column", "no column 'content'"),
    ("empty", "no rows"),
])
def test_classification_bad_input_is_one_clear_error(tmp_path, case, expected):
    from tasks.classifier import labelled_splits
    rows = {"label": "label,text\n" + "".join(f"{i % 4},t{i}\n" for i in range(9)) + "7,bad\n",
            "column": "label,text\n" + "".join(f"{i % 4},t{i}\n" for i in range(10)),
            "empty": "label,text\n"}[case]
    f = _csv(tmp_path / "d.csv", rows)
    extra = {"text_column": "content"} if case == "column" else {}
    job = _job(tmp_path, "simple_model", train_files=[f], eval_files=[f], **extra)
    with pytest.raises(LabsError, match=expected) as e:
        labelled_splits(job, 4)
    assert "d.csv" in str(e.value)


def test_model_folder_without_weights(tmp_path):
    from tasks.classifier import build_classifier
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(LabsError, match="no weights"):
        build_classifier(str(tmp_path), 2)


def test_builtin_samples_are_balanced_and_in_range():
    from tasks.classifier import labelled_splits
    for task, n in (("simple_model", 4), ("transfer", 2)):
        job = load_job(None, [f"task={task}", "data.dataset=sample"])
        splits = labelled_splits(job, n)
        labels = list(splits["train"]["label"]) + list(splits["validation"]["label"])
        assert sorted(set(labels)) == list(range(n)) and len(labels) >= 40


@pytest.mark.skipif(not (SHARED_DATA / "ag_news").is_dir(), reason="../shared/data/ag_news not present")
def test_ag_news_local_layout_maps_both_files():
    from tasks.classifier import labelled_splits
    job = load_job(None, ["task=simple_model", "data.dataset=ag_news", f"data.data_dir={SHARED_DATA}"])
    splits = labelled_splits(job, 4)
    assert len(splits["train"]) == 8000 and len(splits["validation"]) == 7600
    assert sorted(set(splits["validation"]["label"])) == [0, 1, 2, 3]


def test_transfer_freezing_modes():
    from tasks.classifier import build_classifier
    from tasks.transfer import freeze
    model, _ = build_classifier("bert-tiny", 2)
    freeze(model, "head", 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    freeze(model, "last_k", 1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".layer.1." in n for n in names) and not any(".layer.0." in n for n in names)


# ---------------------------------------------------------------- LoRA export round trip


def test_lora_adapter_round_trip_gives_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks import tinyllama
    from tasks.options import TinyLlamaOptions
    job = load_job(None, ["task=tinyllama", "model.name=llama-tiny", "data.dataset=sample", "data.block_size=16"])
    parts = tinyllama.build(job, TinyLlamaOptions(merge=True), dry_run=True)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter something to carry
        for n, p in parts.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    parts.model.eval()
    batch = parts.collate([parts.eval_data[0]])
    with torch.no_grad():
        want = parts.model(**batch).logits
    tinyllama.export(parts, parts.model.state_dict(), tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, want, atol=1e-5)
        assert torch.allclose(merged(**batch).logits, want, atol=1e-4)
    assert "lora_" not in "".join(dict(merged.named_parameters()))


# ---------------------------------------------------------------- 2-rank dry runs


@pytest.mark.distributed
def test_simple_model_dry_run_two_ranks_zero2(ds_ops, tmp_path):
    proc, run = launch("jobs/simple_model_zero2.yaml", tmp_path, "--dry_run", "--ds-config", "ds_configs/zero2.json")
    assert_ok(proc)
    s = summary(run)
    assert s["world"] == 2 and s["zero_stage"] == 2 and 0.0 <= s["accuracy"] <= 1.0
    assert read_metrics(run, "eval")[0]["step"] == 0 and 0.0 <= s["eval_before"]["accuracy"] <= 1.0
    assert s["samples_before"] is None and s["samples_after"] is None  # a classifier generates nothing
    assert "accuracy (step 0 -> end)" in proc.stdout
    ev = read_metrics(run, "eval")[-1]
    assert {"acc_world", "acc_sports", "acc_business", "acc_sci_tech"} <= set(ev)
    assert (run / "hf" / "model.safetensors").is_file()


@pytest.mark.distributed
def test_transfer_dry_run_two_ranks_under_torchrun(ds_ops, tmp_path):
    proc, run = launch("jobs/transfer_imdb.yaml", tmp_path, "--dry_run", "--backend", "torchrun")
    assert_ok(proc)
    assert "torchrun" in proc.stdout
    s = summary(run)
    assert s["world"] == 2 and "accuracy" in s and "acc_positive" in read_metrics(run, "eval")[-1]
