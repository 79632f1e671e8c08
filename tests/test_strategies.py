"""Pipeline, model and tensor parallelism: bad layouts are refused by `labs plan` before launch.

That the sharded runs equal one rank (and what each rank holds) is proven by tests/test_equivalence_*.py.
"""

from __future__ import annotations

import pytest
from conftest import labs

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
