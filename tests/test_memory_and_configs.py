"""The plan's numbers against DeepSpeed's own: memory estimators, parameter counts, configs."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from conftest import REPO

from launcher.common.layout import Layout
from launcher.config.ds.load import load_ds_config, resolve_batch, zero_stage
from launcher.config.ds.parser import accepted_keys
from launcher.config.ds.validate import check_keys
from launcher.estimate.memory import zero_model_state_bytes
from launcher.estimate.shape import count_params
from tasks.presets import PRESETS, VOCAB


@pytest.mark.parametrize("world", [1, 2, 4, 16])
@pytest.mark.parametrize("offload", [(False, False), (True, False), (True, True)])
def test_memory_matches_deepspeed_estimators(world, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    params, largest = 216_000_000, 32_000 * 1024
    off_opt, off_param = offload
    _, z2 = estimate_zero2_model_states_mem_needs(params, world, 1, cpu_offload=off_opt)
    _, z3, *_ = estimate_zero3_model_states_mem_needs(params, largest, world, 1, cpu_offload=off_opt,
                                                  cpu_offload_params=off_param)
    assert zero_model_state_bytes(2, params, largest, world, off_opt, off_param) == z2
    assert zero_model_state_bytes(3, params, largest, world, off_opt, off_param) == z3


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "llama-small"])
def test_param_counts_match_deepspeed_model_to_params(name):
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    from tasks.causal_lm import preset_config
    cfg = PRESETS[name]
    model = AutoModelForCausalLM.from_config(preset_config(name, VOCAB[cfg["tokenizer"]]))
    assert count_params(cfg, VOCAB[cfg["tokenizer"]]) == model_to_params(model)


def test_plan_memory_equals_deepspeed_all_live_printout():
    """The `_all_live` estimators print a table (GB, 2 decimals); the plan's bytes give the same figures."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live
    from transformers import AutoModelForCausalLM

    from launcher.launch.make_plan import make_plan
    from tasks.causal_lm import preset_config
    model = AutoModelForCausalLM.from_config(preset_config("llama-58m", 32000))
    plan = make_plan("jobs/demo.yaml", sets=["model.name=llama-58m"])
    mem = plan.memory()
    for stage, fn in ((2, estimate_zero2_model_states_mem_needs_all_live),
                      (3, estimate_zero3_model_states_mem_needs_all_live)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            fn(model, num_gpus_per_node=2, num_nodes=1)
        # the row without any offload is the last one for stage 2 and the last one for stage 3
        rows = [r for r in buf.getvalue().splitlines() if "offload_optimizer=none" in r]
        gpu_gb = float(re.findall(r"([\d.]+)GB", rows[-1])[1])
        assert gpu_gb == pytest.approx(mem[stage] / 2**30, abs=0.006), (stage, rows[-1])


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "ds_configs").glob("*.json")))
def test_every_ds_config_is_accepted_by_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig
    cfg = load_ds_config(REPO / path)
    check_keys(cfg, path)
    model = int((cfg.get("tensor_parallel") or {}).get("autotp_size", 1)) * int((cfg.get("pipeline") or {}).get("stages", 1))
    Layout.from_ds_config(cfg, max(2, model), path)  # the shipped layout fits 2 ranks (4 for pipeline x tensor)
    # Outside a process group DeepSpeed parses for a world of 1: let the batch size follow.
    resolved = resolve_batch(cfg | {"train_batch_size": "auto"}, 1, path)
    parsed = DeepSpeedConfig(resolved)
    assert parsed.zero_optimization_stage == zero_stage(cfg)
    assert parsed.train_batch_size == resolved["train_batch_size"]


def test_known_keys_cover_everything_deepspeed_reads():
    """DeepSpeedConfig looks up a set of top-level keys; all must be in our allow-list."""
    from deepspeed.runtime.config import DeepSpeedConfig
    seen: set[str] = set()

    class Tracking(dict):
        def __getitem__(self, k):
            seen.add(k)
            return dict.__getitem__(self, k)

        def get(self, k, d=None):
            seen.add(k)
            return dict.get(self, k, d)

        def __contains__(self, k):
            seen.add(k)
            return dict.__contains__(self, k)

    DeepSpeedConfig(Tracking(train_batch_size=2, train_micro_batch_size_per_gpu=2))
    assert seen - accepted_keys() == set()


def test_jobs_all_plan(bf16_cpu, tmp_path):
    from launcher.launch.make_plan import make_plan
    for job in sorted(Path(REPO / "jobs").glob("*.yaml")):
        text = job.read_text()
        if "hostfiles/localhost" not in text:
            continue
        plan = make_plan(str(job.relative_to(REPO)))
        assert plan.command and plan.layout.world == plan.hostfile.world_size in (2, 4), job
        json.dumps(plan.ds_config)


def test_plan_counts_lora_adapters_like_peft():
    """The plan's LoRA count (tasks/presets.py, no torch) equals PEFT's on the real model."""
    from peft import LoraConfig, get_peft_model

    from launcher.estimate.shape import lora_params
    from tasks.causal_lm import build_causal_lm
    from tasks.options import TinyLlamaOptions
    from tasks.presets import PRESETS
    targets = TinyLlamaOptions().lora_target_modules
    model, _ = build_causal_lm("llama-tiny")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(PRESETS["llama-tiny"], 4, targets) == trainable
    assert lora_params(PRESETS["gpt2-tiny"], 4, ["c_attn"]) is None


def test_plan_memory_for_lora_counts_the_frozen_base_once():
    from launcher.estimate.shape import lora_params
    from launcher.launch.make_plan import make_plan
    from tasks.presets import PRESETS
    plan = make_plan("jobs/tinyllama_lora.yaml")
    total, largest = plan.params
    lora = lora_params(PRESETS["llama-small"], 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"])
    assert plan.trainable == lora and total == lora + 19_597_568
    frozen = 2 * (total - lora)
    mem = plan.memory()
    assert mem[0] == 20 * lora + frozen and mem[2] == 2 * lora + 18 * lora // 2 + frozen
    assert mem[3] == 18 * lora // 2 + frozen // 2 + 2 * largest
