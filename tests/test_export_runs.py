"""After a run: `labs export RUN [--step N]` (HF weights from a checkpoint), `labs merge RUN` (a LoRA
adapter merged into its base), `labs runs` (list, prune). Dry runs keep no checkpoint unless asked."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_ok, labs, launch, read_metrics, summary

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def lora_zero3_run(ds_ops, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    # SmolLM2's shape (tied embedding, 9 query / 3 key-value heads) with 2 random blocks and the real tokenizer
    proc, run = launch("jobs/tinyllama_lora.yaml", out, "--dry_run", "--ds-config", "ds_configs/zero3.json",
                       "--set", "train.checkpoint=true", "model.name=smollm2-tiny", "data.block_size=32")
    assert_ok(proc)
    return out, run, proc.stdout


def _tensors(folder):
    from safetensors.torch import load_file
    (f,) = list(folder.glob("*.safetensors"))
    return load_file(f)


def test_lora_dry_run_two_ranks_zero3_samples_and_adapter_loads(lora_zero3_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    _, run, stdout = lora_zero3_run
    assert "% trainable" in stdout
    s = summary(run)
    assert s["zero_stage"] == 3
    # before -> after: the step-0 evaluation, and greedy answers generated under ZeRO-3 (parameters gathered,
    # both ranks in step) to the default prompts, 8 new tokens each (a dry run's), in the summary and metrics.jsonl
    assert read_metrics(run, "eval")[0]["step"] == 0 and s["eval_before"]["eval_loss"] > 0
    prompts = ["The capital of France is", "Once upon a time"]
    for key in ("samples_before", "samples_after"):
        assert [x["prompt"] for x in s[key]] == prompts and all(x["answer"].strip() for x in s[key]), s[key]
    assert [r["step"] for r in read_metrics(run, "samples")] == [0, s["steps"]]
    assert "greedy samples (8 new tokens), before -> after training:" in stdout
    assert "eval loss (step 0 -> end)" in stdout
    probe = torch.load(run / "probe_logits.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "hf" / "base"),
                                      run / "hf" / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(model(**probe["batch"]).logits, probe["logits"], atol=1e-5)
    assert (run / "hf" / "model.safetensors").is_file()  # merge: true in the job


def test_export_of_a_zero3_lora_checkpoint_equals_the_runs_own_export(lora_zero3_run, tmp_path):
    _, run, _ = lora_zero3_run
    step = json.loads((run / "summary.json").read_text())["steps"]
    proc = labs("export", str(run), "--step", str(step), "--out", str(tmp_path / "exp"))
    assert_ok(proc)
    mine, theirs = _tensors(tmp_path / "exp" / "adapter"), _tensors(run / "hf" / "adapter")
    assert mine.keys() == theirs.keys() and len(mine) > 0
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(t.abs().sum() > 0 for k, t in mine.items() if "lora_B" in k)  # ZeRO-3 did not save an empty adapter


def test_merge_equals_peft_merge_and_unload(lora_zero3_run, tmp_path):
    """`labs merge` of the ZeRO-3 checkpoint: every weight within 1e-5 (relative, Frobenius) of PEFT's own
    `merge_and_unload` of the run's base and adapter, the embedding still tied to the head, the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    _, run, _ = lora_zero3_run
    proc = labs("merge", str(run), "--out", str(tmp_path / "merged"))
    assert_ok(proc)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(run / "hf" / "base")
    before = {k: t.clone() for k, t in base.state_dict().items()}  # merge_and_unload merges into `base` itself
    peft = PeftModel.from_pretrained(base, run / "hf" / "adapter").eval()
    ids = torch.tensor([[1, 15, 200, 7, 31, 99]])
    with torch.no_grad():
        want_logits = peft(ids).logits
        assert torch.allclose(merged(ids).logits, want_logits, atol=1e-5)
    want = peft.merge_and_unload().state_dict()
    got = merged.state_dict()
    assert got.keys() == want.keys()
    diff = {k: float((got[k] - want[k]).norm() / want[k].norm().clamp(min=1e-30)) for k in want}
    assert max(diff.values()) <= 1e-5, sorted(diff.items(), key=lambda kv: -kv[1])[:3]
    changed = [k for k in want if not torch.equal(want[k], before[k])]
    assert any("q_proj" in k for k in changed)  # the adapter moved the projections it targets
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_export_refuses_what_it_cannot(lora_zero3_run, tmp_path):
    _, run, _ = lora_zero3_run
    proc = labs("export", str(run), "--step", "999")
    assert proc.returncode == 2 and "--step 999" in proc.stderr and "complete checkpoints at steps" in proc.stderr
    proc = labs("export", str(tmp_path))
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


def test_dry_run_keeps_no_checkpoint_and_runs_lists_and_prunes(ds_ops, lora_zero3_run, tmp_path):
    out, kept, _ = lora_zero3_run
    proc, dry = launch("jobs/fine_tune_dry_run.yaml", out, "--dry_run", "--set", "train.export=false")
    assert_ok(proc)
    assert not (dry / "checkpoints").exists()
    assert "none kept" in proc.stdout
    failed = out / "some_job" / "20260101-000000"
    failed.mkdir(parents=True)
    (failed / "job.yaml").write_text("task: fine_tune\n")
    listing = labs("runs", "--output_dir", str(out))
    assert_ok(listing)
    lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith(str(out))}
    assert " finished " in lines[str(kept)] and "eval_loss" in lines[str(kept)]
    assert " failed " in lines[str(failed)]
    shown = labs("runs", "--output_dir", str(out), "--prune", "--status", "failed")
    assert_ok(shown)
    assert f"would remove {failed}" in shown.stdout and failed.exists()
    gone = labs("runs", "--output_dir", str(out), "--prune", "--status", "failed", "--yes")
    assert_ok(gone)
    assert not failed.exists() and kept.exists() and dry.exists()
