"""Pipeline, model and tensor parallelism: the sharded 2-rank run equals the 1-rank run, each rank
really holds only its share, and bad layouts are refused by `labs plan` before launch.

The 1-rank reference is the plain Hugging Face model under DeepSpeed (pipeline.stages = 1 and
autotp_size = 1 give the data-parallel strategy on one rank) with the same seed, data and global
batch: equality then proves both the layer-list conversion and the sharded arithmetic.
"""

from __future__ import annotations

import pytest
from conftest import assert_ok, assert_same_losses, labs, launch, summary

STEPS = 5
REL_TOL = 1e-3  # fp32; measured differences are ~1e-7 (pipeline, model parallel, tensor parallel)


def _hostfile(tmp_path_factory, slots: int):
    p = tmp_path_factory.mktemp("hosts") / f"slots{slots}"
    p.write_text(f"localhost slots={slots}\n")
    return str(p)


def _run(tmp_path_factory, job: str, *sets: str, hostfile: str | None = None):
    out = tmp_path_factory.mktemp("runs")
    flags = ["--hostfile", hostfile] if hostfile else []
    proc, run_dir = launch(job, out, *flags, "--set", f"train.max_steps={STEPS}", *sets)
    assert_ok(proc)
    return run_dir


def _assert_same_losses(run_dir, ref_dir):
    return assert_same_losses(run_dir, ref_dir, STEPS, REL_TOL)


@pytest.fixture(scope="module")
def llama_ref(tmp_path_factory, ds_ops):
    """llama-tiny on ONE rank, plain HF model (micro 2 x accum 4 = 8 sequences per step)."""
    return _run(tmp_path_factory, "jobs/fine_tune_pipeline.yaml", "ds.pipeline.stages=1",
                hostfile=_hostfile(tmp_path_factory, 1))


@pytest.mark.distributed
@pytest.mark.parametrize("job,micro_batches", [("jobs/fine_tune_pipeline.yaml", 4),
                                               ("jobs/fine_tune_model_parallel.yaml", 1)])
def test_pipeline_and_model_parallel_equal_one_rank(tmp_path_factory, llama_ref, job, micro_batches):
    run_dir = _run(tmp_path_factory, job)
    _assert_same_losses(run_dir, llama_ref)
    ranks, ref = summary(run_dir)["ranks"], summary(llama_ref)["ranks"][0]
    assert [r["stage"] for r in ranks] == [0, 1]
    assert all(r["micro_batches"] == micro_batches for r in ranks)
    # stage 0: embedding + block 0; stage 1: block 1 + norm + head; each holds only its layers
    assert ranks[0]["layer_types"] == ["LlamaEmbed", "LlamaBlock"]
    assert ranks[1]["layer_types"] == ["LlamaBlock", "Norm", "Head"]
    assert sum(r["params_local"] for r in ranks) == ref["params_local"]
    assert all(r["params_local"] < 0.6 * ref["params_local"] for r in ranks)
    assert all(r["state_bytes"]["params"] == 4 * r["params_local"] for r in ranks)


@pytest.mark.distributed
def test_tensor_parallel_equals_one_rank_and_splits_matrices(tmp_path_factory, llama_ref):
    run_dir = _run(tmp_path_factory, "jobs/fine_tune_tensor_parallel.yaml")
    _assert_same_losses(run_dir, llama_ref)
    ranks, ref = summary(run_dir)["ranks"], summary(llama_ref)["ranks"][0]
    hidden, inter, vocab, tp = 64, 176, 32000, 2  # llama-tiny
    want = {"self_attn.q_proj": [hidden // tp, hidden], "self_attn.k_proj": [hidden // tp, hidden],
            "self_attn.v_proj": [hidden // tp, hidden], "self_attn.o_proj": [hidden, hidden // tp],
            "mlp.gate_proj": [inter // tp, hidden], "mlp.up_proj": [inter // tp, hidden],
            "mlp.down_proj": [hidden, inter // tp]}
    for r in ranks:
        assert r["strategy"] == "tensor_parallel"
        assert {k.split("layers.0.")[1].removesuffix(".weight"): v
                for k, v in r["split_shapes"].items() if "layers.0." in k} == want
        assert r["split_shapes"]["lm_head.weight"] == [vocab // tp, hidden]  # vocab-parallel head
        split = 2 * (4 * hidden * hidden + 3 * hidden * inter) + vocab * hidden  # blocks' linears + head
        assert r["params_local"] == ref["params_local"] - split // tp
    assert [r["tp_rank"] for r in ranks] == [0, 1]


@pytest.mark.distributed
def test_gpt2_pipeline_with_tied_embeddings_equals_one_rank(tmp_path_factory, ds_ops):
    """GPT-2 ties lm_head to wte: a TiedLayerSpec puts a copy on both stages, DeepSpeed
    all-reduces its gradient between them, and the gradient norm counts it once."""
    # GPT-2's BPE makes fewer tokens of the sample text than Llama's SentencePiece: one epoch is
    # only 4 steps of 8 x 32 tokens, so two epochs give the STEPS = 5 compared (across an epoch end).
    gpt2 = ("model.name=gpt2-tiny", "train.epochs=2")
    ref = _run(tmp_path_factory, "jobs/fine_tune_pipeline.yaml", "ds.pipeline.stages=1", *gpt2,
               hostfile=_hostfile(tmp_path_factory, 1))
    run_dir = _run(tmp_path_factory, "jobs/fine_tune_pipeline.yaml", *gpt2)
    _assert_same_losses(run_dir, ref)
    ranks = summary(run_dir)["ranks"]
    assert ranks[0]["layer_types"][:3] == ["GPT2TokenEmbed", "GPT2PosEmbed", "GPT2Block"]
    assert ranks[1]["layer_types"][-1] == "GPT2TokenEmbed"  # the tied head on the last stage


BAD = [
    # (ds config, overrides, hostfile slots, words the message must contain)
    ("ds_configs/pipeline.json", ["ds.pipeline.stages=4"], 4, ["pipeline.stages = 4", "2 transformer blocks"]),
    ("ds_configs/pipeline.json", ["ds.pipeline.stages=3"], 2, ["pipeline.stages = 3", "world size 2"]),
    ("ds_configs/tensor_parallel.json", ["ds.tensor_parallel.autotp_size=3"], 3,
     ["tensor_parallel.autotp_size = 3", "4 attention heads"]),
    ("ds_configs/tensor_parallel.json", ["ds.tensor_parallel.autotp_size=4"], 2,
     ["tensor_parallel.autotp_size = 4", "world size 2"]),
    ("ds_configs/pipeline.json", ["ds.zero_optimization.stage=3"], 2, ["zero_optimization.stage = 3", "ZeRO 0-1"]),
    ("ds_configs/pipeline.json", ["ds.tensor_parallel.autotp_size=2"], 2, ["autotp_size = 2", "pipeline"]),
]


@pytest.mark.parametrize("ds_config,sets,slots,words", BAD)
def test_plan_refuses_bad_layouts(tmp_path, ds_config, sets, slots, words):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"localhost slots={slots}\n")
    proc = labs("plan", "jobs/fine_tune_pipeline.yaml", "--ds-config", ds_config, "--hostfile", str(hosts),
                "--set", *sets)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ds_config in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_plan_refuses_pipeline_for_a_model_without_layer_list(tmp_path):
    model = tmp_path / "opt"  # a causal LM that tasks/pipeline_layers.py cannot cut
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "opt", "num_hidden_layers": 2, "vocab_size": 100}')
    (model / "model.safetensors").write_bytes(b"")
    proc = labs("plan", "jobs/fine_tune_pipeline.yaml", "--set", f"model.name={model}")
    assert proc.returncode == 2
    assert "not 'opt': it has no pipeline layer list" in proc.stderr and "pipeline.stages = 2" in proc.stderr, proc.stderr


def test_plan_accepts_pipeline_x_data_parallel(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=4\n")
    proc = labs("plan", "jobs/fine_tune_pipeline.yaml", "--hostfile", str(hosts), "--set", "ds.train_batch_size=16")
    assert proc.returncode == 0, proc.stderr
    assert "world 4 = dp 2 x tp 1 x pp 2" in proc.stdout
