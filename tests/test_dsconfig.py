"""launcher/py: DeepSpeed's own parser in the plan, "auto" resolved as the HF Trainer does,
sections labs does not honour refused, precision rules, ops to build. One process, no ranks."""

from __future__ import annotations

import copy
import json
import time

import pytest
from conftest import REPO, min_world

from launcher.common.errors import LabsError
from launcher.common.layout import Layout
from launcher.config.ds.auto import DS_NATIVE_AUTO, find_auto, resolve_auto
from launcher.config.ds.load import BATCH_KEYS, REFUSED, load_ds_config, resolve_batch, set_dotted, strip_comments
from launcher.config.ds.optim import ops_needed
from launcher.config.ds.parser import accepted_keys
from launcher.config.ds.validate import check_keys, validate
from launcher.estimate.shape import hidden_size_of

PATH = "cfg.json"
AUTO_CFG = {  # the shape of transformers' ds_config_zero3.json, "auto" everywhere the Trainer fills it
    "fp16": {"enabled": "auto"},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto", "torch_adam": True}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def base(**changes) -> dict:
    # its "auto" values as a job training from scratch on 2 ranks fills them: train_batch_size 8 (micro batch 2 x
    # accumulation 2 x dp 2), lr 3e-3 and 5 warm-up steps, bf16 off (a job without train.bf16)
    cfg, _ = resolve_auto(load_ds_config(REPO / "ds_configs" / "zero2.json"), PATH, dp=2, hidden_size=None,
                          job_values={"from_scratch": True})
    assert cfg["train_batch_size"] == 8 and cfg["bf16"] == {"enabled": False}
    assert cfg["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 3e-3, "warmup_num_steps": 5}
    cfg.update(changes)
    return cfg


def refused(cfg: dict, world: int = 2, accelerator: str = "cpu") -> str:
    with pytest.raises(LabsError) as e:
        validate(cfg, PATH, world=world, accelerator=accelerator)
    msg = str(e.value)
    assert msg.startswith(PATH + ": ") and "\n" not in msg
    return msg


def accepted(cfg: dict, world: int = 2, accelerator: str = "cpu") -> list[str]:
    return validate(cfg, PATH, world=world, accelerator=accelerator)


# ---------------------------------------------------------------- DeepSpeed's own parser

def test_shipped_config_passes_and_deepspeed_parses_for_the_given_world():
    import torch.distributed as dist
    assert accepted(base()) == []
    cfg = base(train_batch_size=16)  # 2 x 2 x 4: only right for a data-parallel world of 4
    accepted(cfg, world=4)
    assert not dist.is_initialized()  # no process group was started


def test_batch_triad_mismatch_is_deepspeeds_own_check():
    msg = refused(base(train_batch_size=10))
    assert "10 != 2 * 2 * 2" in msg and "data-parallel world 2" in msg
    assert "train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x 2" in msg


def test_unknown_nested_key_in_a_pydantic_section():
    cfg = base()
    cfg["zero_optimization"]["stgae"] = 3
    msg = refused(cfg)
    assert "zero_optimization.stgae = 3" in msg and "did you mean 'stage'?" in msg


def test_unknown_nested_key_deeper_and_in_a_dict_style_section():
    cfg = base()
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_mem": True}
    assert "zero_optimization.offload_optimizer.pin_mem" in refused(cfg) and "'pin_memory'" in refused(cfg)
    msg = refused(base(flops_profiler={"enabled": True, "profile_stpe": 3}))
    assert "flops_profiler.profile_stpe = 3" in msg and "ignore it silently" in msg and "'profile_step'" in msg
    msg = refused(base(pipeline={"stagse": 2}))
    assert "pipeline.stagse = 2" in msg and "'stages'" in msg


def test_unknown_top_level_key_comes_from_the_installed_deepspeed():
    msg = refused(base(zero_optimisation={"stage": 2}))
    assert "unknown top-level key 'zero_optimisation'" in msg and "did you mean 'zero_optimization'" in msg
    from deepspeed.runtime.config import DeepSpeedConfig  # noqa: F401 (imported by accepted_keys too)
    keys = accepted_keys()
    assert {"zero_optimization", "optimizer", "bf16", "flops_profiler", "sequence_parallel_size"} <= keys
    assert accepted_keys() == keys


def test_range_and_enum_errors_name_field_value_and_default():
    cfg = base()
    cfg["zero_optimization"]["reduce_bucket_size"] = 0
    msg = refused(cfg)
    assert "zero_optimization.reduce_bucket_size = 0" in msg and "greater than 0" in msg and "500,000,000" in msg
    cfg["zero_optimization"] = {"stage": 2, "offload_optimizer": {"device": "gpu"}}
    msg = refused(cfg)
    assert "zero_optimization.offload_optimizer.device = 'gpu'" in msg and "'cpu'" in msg


@pytest.mark.parametrize("key", ["amp", "sparse_attention", "curriculum_learning", "elasticity", "eigenvalue",
                                 "progressive_layer_drop", "nebula", "compression_training"])
def test_legacy_top_level_keys_deepspeed_rejects(key):
    msg = refused(base(**{key: {"enabled": False}}))
    assert f"{key} = " in msg and "refuses this legacy key" in msg and "remove it" in msg


def test_comment_keys_are_accepted_and_stripped():
    cfg = base(_comment="from the HF docs")
    cfg["zero_optimization"]["_note"] = "buckets for a small model"
    assert accepted(cfg) == []
    stripped = strip_comments(cfg)
    assert "_comment" not in stripped and "_note" not in stripped["zero_optimization"]
    check_keys(cfg, PATH)


def test_deepspeed_warnings_come_back_instead_of_being_printed(capsys):
    cfg = base()
    cfg["zero_optimization"] = {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}
    warnings = accepted(cfg)
    assert any("stage3_gather_fp16_weights_on_model_save is deprecated" in w for w in warnings)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- strict types

def test_non_boolean_enabled_is_refused():
    msg = refused(base(bf16={"enabled": "yes"}))
    assert "bf16.enabled = 'yes' is not a JSON boolean" in msg and "write true or false" in msg
    msg = refused(base(wall_clock_breakdown="yes"))
    assert "wall_clock_breakdown = 'yes'" in msg and "true or false" in msg


def test_stage_true_is_not_zero_1():
    cfg = base()
    cfg["zero_optimization"]["stage"] = True
    msg = refused(cfg)
    assert "zero_optimization.stage = True" in msg and "0, 1, 2 or 3" in msg


def test_bool_for_a_number_field_deeper_in_a_model():
    cfg = base()
    cfg["zero_optimization"]["allgather_bucket_size"] = True
    msg = refused(cfg)
    assert "zero_optimization.allgather_bucket_size = True" in msg and "expects a number" in msg


# ---------------------------------------------------------------- "auto"

JOB = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.01, "warmup_steps": 5, "total_steps": 40,
       "max_grad_norm": 0.5, "micro_batch": 2, "grad_accum": 4, "bf16": True}


def test_auto_resolved_from_the_job_with_notes(bf16_cpu):
    cfg, notes = resolve_auto(AUTO_CFG, PATH, dp=2, hidden_size=64, job_values=JOB)
    opt, sched, zero = cfg["optimizer"]["params"], cfg["scheduler"]["params"], cfg["zero_optimization"]
    assert (opt["lr"], opt["betas"], opt["eps"], opt["weight_decay"]) == (3e-3, [0.9, 0.95], 1e-6, 0.01)
    assert sched == {"warmup_min_lr": 0, "warmup_max_lr": 3e-3, "warmup_num_steps": 5, "total_num_steps": 40}
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (2, 4, 16)
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (64 * 64, int(0.9 * 64 * 64), 640)
    assert "optimizer.params.lr = 0.003 (auto, from the job's train.lr)" in notes
    assert "train_batch_size = 16 (auto: micro batch 2 x grad accum 4 x data-parallel 2)" in notes
    assert any(n.startswith("zero_optimization.reduce_bucket_size = 4096 (auto, hidden*hidden") for n in notes)
    assert any(n.startswith("scheduler.params.total_num_steps = 40 (auto, from the job's train.max_steps") for n in notes)
    assert find_auto(cfg) == []
    accepted(resolve_batch(cfg, 2, PATH))  # and DeepSpeed takes the result


def test_auto_without_job_values_takes_the_hf_trainer_defaults():
    cfg, notes = resolve_auto(AUTO_CFG, PATH, dp=1, hidden_size=64, job_values={"total_steps": 10})
    assert cfg["optimizer"]["params"] == {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                          "torch_adam": True}
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 1  # max(1, 0): DeepSpeed 0.19 refuses 0
    assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"]["enabled"] is False
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (8, 1, 8)
    assert "optimizer.params.lr = 5e-05 (auto, the HF Trainer's default; set train.lr in the job to choose)" in notes


def test_hidden_size_from_presets_and_config_files():
    from tasks.presets import PRESETS
    assert hidden_size_of(PRESETS["llama-small"]) == 256
    assert hidden_size_of(PRESETS["gpt2-tiny"]) == 64
    assert hidden_size_of({"hidden_sizes": [64, 128, 320]}) == 320
    assert hidden_size_of({"text_config": {"hidden_size": 2048}}) == 2048
    assert hidden_size_of(None) is None and hidden_size_of({"vocab_size": 10}) is None


def test_batch_derived_from_what_the_config_gives():
    cfg, notes = resolve_auto({"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto",
                                        "gradient_accumulation_steps": 2}, PATH, dp=2, hidden_size=None, job_values={})
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert notes == ["train_micro_batch_size_per_gpu = 4 (auto: train_batch_size 16 / (grad accum 2 x data-parallel 2))"]


def test_accelerate_zero3_gather_auto_is_resolved_as_accelerate_does():
    """accelerate's ZeRO-3 configs say stage3_gather_16bit_weights_on_model_save: "auto"; accelerate fills it from
    zero3_save_16bit_model (default false), and DeepSpeed takes the result."""
    cfg = base(zero_optimization={"stage": 3, "stage3_gather_16bit_weights_on_model_save": "auto"})
    out, notes = resolve_auto(cfg, PATH, dp=2, hidden_size=64, job_values={})
    assert out["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
    assert any(n.startswith("zero_optimization.stage3_gather_16bit_weights_on_model_save = False (auto") for n in notes)
    accepted(resolve_batch(out, 2, PATH))


@pytest.mark.parametrize("where, value, expected", [
    (("zero_optimization", "sub_group_size"), "auto",
     "zero_optimization.sub_group_size = \"auto\", which nothing resolves"),
    (("optimizer", "params", "amsgrad"), "auto", "optimizer.params.amsgrad = \"auto\""),
    (("scheduler", "params", "warmup_type"), "auto", "scheduler.params.warmup_type = \"auto\""),
])
def test_auto_nothing_resolves_is_refused_naming_the_key(where, value, expected):
    cfg = copy.deepcopy(AUTO_CFG)
    set_dotted(cfg, ".".join(where), value)
    with pytest.raises(LabsError) as e:
        resolve_auto(cfg, PATH, dp=2, hidden_size=64, job_values={"total_steps": 10})
    assert str(e.value).startswith(PATH) and expected in str(e.value) and "write a value there" in str(e.value)
    cfg = base()  # validate refuses leftovers too
    set_dotted(cfg, ".".join(where), value)
    assert expected in refused(cfg)


def test_auto_needing_what_the_plan_does_not_know():
    with pytest.raises(LabsError, match=r"total_num_steps = \"auto\" needs the number of optimizer steps.*train\.max_steps"):
        resolve_auto(AUTO_CFG, PATH, dp=2, hidden_size=64, job_values={})
    with pytest.raises(LabsError, match=r"zero_optimization.reduce_bucket_size = \"auto\" is computed from the "
                                        r"model's hidden size"):
        resolve_auto(AUTO_CFG, PATH, dp=2, hidden_size=None, job_values={"total_steps": 10})


def test_deepspeeds_own_auto_values_stay():
    cfg, notes = resolve_auto(base(pipeline={"stages": "auto"}), PATH, dp=2, hidden_size=None, job_values={})
    assert cfg["pipeline"]["stages"] == "auto" and notes == []
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import get_pipeline_config
    native = {f"pipeline.{k}" for k, v in get_pipeline_config({}).items() if v == "auto"}
    assert constants.KEEP_IN_FP32_MODULES_DEFAULT == "auto"
    assert DS_NATIVE_AUTO == native | {"data_types.keep_in_fp32_modules"}


def test_all_auto_batch_message_mentions_auto():
    with pytest.raises(LabsError, match=r"missing or \"auto\""):
        resolve_batch({k: "auto" for k in BATCH_KEYS}, 2, PATH)


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize("flags, fix", [("fpu amx_bf16", "use bf16 instead"), ("fpu avx2", "use fp32: set fp16.enabled")])
def test_fp16_on_cpu_is_refused_with_the_fix(tmp_path, monkeypatch, flags, fix):
    (tmp_path / "cpuinfo").write_text(f"flags\t\t: {flags}\n")
    monkeypatch.setattr("launcher.config.ds.optim.CPUINFO", tmp_path / "cpuinfo")
    msg = refused(base(fp16={"enabled": True}))
    assert "fp16.enabled = True on CPU" in msg and fix in msg and "fp32" in msg
    accepted(base(fp16={"enabled": True}), accelerator="cuda")


@pytest.mark.parametrize("flags, ok", [("fpu sse avx512f", False), ("fpu avx512f avx512_bf16", True),
                                       ("fpu amx_tile amx_bf16", True)])
def test_bf16_on_cpu_needs_the_cpu_flags(tmp_path, monkeypatch, flags, ok):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr("launcher.config.ds.optim.CPUINFO", cpuinfo)
    cfg = base(bf16={"enabled": True})
    if ok:
        accepted(cfg)
    else:
        msg = refused(cfg)
        assert "bf16.enabled = True" in msg and "avx512_bf16" in msg and "amx_bf16" in msg and "false" in msg
        accepted(cfg, accelerator="cuda")


def test_fp16_and_bf16_together_is_deepspeeds_assertion():
    msg = refused(base(fp16={"enabled": True}, bf16={"enabled": True}), accelerator="cuda")
    assert "both true" in msg and "cannot be simultaneously enabled" in msg


# ---------------------------------------------------------------- sections labs does not honour

REFUSED_VALUES = {
    "autotuning": {"enabled": True}, "data_efficiency": {"enabled": True, "data_routing": {"enabled": True}},
    "activation_checkpointing": {"partition_activations": True}, "hybrid_engine": {"enabled": True},
    "compile": {"deepcompile": True}, "weight_quantization": {"post_init_quant": {"fc": {"num_bits": 8}}},
    "expert_parallel": {"enabled": True}, "use_data_before_expert_parallelism": True,
    "sequence_parallel_size": 2, "data_parallel_size": 2, "dataloader_drop_last": True,
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_sections_not_honoured_are_refused_with_reason(key):
    msg = refused(base(**{key: REFUSED_VALUES[key]}))
    reason, fix = REFUSED[key]
    assert f"{key} = " in msg and "not honoured" in msg and reason in msg and fix in msg
    if key == "autotuning":
        assert "deepspeed --autotuning" in msg


@pytest.mark.parametrize("key, off", [("autotuning", {"enabled": False}), ("hybrid_engine", {"enabled": False}),
                                      ("activation_checkpointing", {"partition_activations": False,
                                                                    "number_checkpoints": None}),
                                      ("data_efficiency", {"enabled": False}), ("dataloader_drop_last", False)])
def test_switched_off_sections_are_harmless(key, off):
    accepted(base(**{key: off}))


def test_sections_that_work_pass():
    cfg = base(steps_per_print=10, wall_clock_breakdown=True, memory_breakdown=False, dump_state=False,
               flops_profiler={"enabled": True, "profile_step": 2}, csv_monitor={"enabled": True, "output_path": "x"},
               wandb={"enabled": False}, comms_logger={"enabled": False}, communication_data_type="fp32",
               zero_allow_untested_optimizer=False, zero_force_ds_cpu_optimizer=False,
               checkpoint={"tag_validation": "WARN"}, tensor_parallel={"autotp_size": 1},
               pipeline={"stages": 1, "partition": "type:Block"})
    accepted(cfg)


# ---------------------------------------------------------------- optimizer and scheduler

def test_config_without_optimizer_is_refused_with_a_section_to_add():
    cfg = base()
    del cfg["optimizer"]
    msg = refused(cfg)
    assert "no \"optimizer\" section" in msg and "\"optimizer\": {\"type\": \"AdamW\"" in msg


def test_optimizer_and_scheduler_parameters_checked_like_initialize():
    cfg = base()
    cfg["optimizer"]["params"]["lrr"] = 0.1
    assert "optimizer.params.lrr = 0.1" in refused(cfg) and "did you mean 'lr'?" in refused(cfg)
    cfg = base()
    cfg["optimizer"]["params"]["lr"] = "auto-ish"
    assert "optimizer.params.lr = 'auto-ish' is not a number" in refused(cfg)
    cfg = base()
    cfg["optimizer"]["params"]["max_grad_norm"] = 1.0
    assert "gradient_clipping" in refused(cfg)
    cfg = base()
    cfg["scheduler"]["params"]["warmup_num_steps"] = 0
    msg = refused(cfg)
    assert "scheduler.params.warmup_num_steps = 0" in msg and "positive integer" in msg
    cfg = base()
    cfg["scheduler"]["type"] = "WarmupLr"
    assert "did you mean 'WarmupLR'?" in refused(cfg)


def test_optimizers_deepspeed_cannot_build_on_cpu():
    assert "FusedLamb" in refused(base(optimizer={"type": "Lamb", "params": {"lr": 1e-3}}))
    assert "did you mean 'SGD'?" in refused(base(optimizer={"type": "sgd", "params": {"lr": 0.1}}))
    msg = refused(base(optimizer={"type": "SGD", "params": {"lr": 0.1}}))  # with ZeRO-2
    assert "zero_allow_untested_optimizer" in msg


# ---------------------------------------------------------------- ops

def test_ops_needed(tmp_path):
    cfg = base()
    assert ops_needed(cfg, ext_dir=tmp_path) == []  # torch_adam: torch's AdamW
    del cfg["optimizer"]["params"]["torch_adam"]
    assert ops_needed(cfg, ext_dir=tmp_path) == [("fused_adam", 112, False)]
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    assert ops_needed(cfg, ext_dir=tmp_path) == [("cpu_adam", 155, False)]
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    assert ops_needed(cfg, ext_dir=tmp_path) == [("cpu_adam", 155, True)]
    cfg["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": "/tmp"}
    assert [op for op, _, _ in ops_needed(cfg, ext_dir=tmp_path)] == ["cpu_adam", "async_io"]


# ---------------------------------------------------------------- the shipped configs

@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_every_shipped_config_validates(bf16_cpu, name):
    path = f"ds_configs/{name}"
    cfg = strip_comments(load_ds_config(REPO / path))
    layout = Layout.from_ds_config(cfg, max(2, min_world(cfg)), path)  # 2 ranks, or what the config needs
    cfg, notes = resolve_auto(cfg, path, dp=layout.dp, hidden_size=64, job_values={})
    cfg = resolve_batch(cfg, layout.dp, path)
    t = time.perf_counter()
    validate(cfg, path, world=layout.dp, accelerator="cpu")
    assert time.perf_counter() - t < 10
    json.dumps(cfg)
