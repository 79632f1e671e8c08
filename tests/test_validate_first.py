"""Validate before derive: each value of the three files is type- and range-checked before anything is computed
from it. Every case here was a traceback or passed silently before; each is now `labs plan` exit 2 with one
message naming the file, the field (or both lines of a duplicate key), the value and the fix, and nothing is
written. Two real public configs that were refused wrongly now plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, labs


def ds(tmp_path: Path, **changes) -> str:
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    cfg.update(changes)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def plan(*args: str) -> tuple[int, str]:
    proc = labs("plan", *args)
    return proc.returncode, (proc.stderr + proc.stdout).strip()


def refused(*args: str) -> str:
    code, out = plan(*args)
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


@pytest.mark.parametrize("section, value, words", [
    ("pipeline", "two", ["pipeline = 'two'", '{"stages": 2}']),
    ("tensor_parallel", 2, ["tensor_parallel = 2", '{"autotp_size": 2}']),
    ("tensor_parallel", {"autotp_size": "x"}, ["tensor_parallel.autotp_size = 'x'", "positive integer"]),
    ("pipeline", {"stages": True}, ["pipeline.stages = True", "positive integer"]),
    ("gradient_clipping", -1, ["gradient_clipping = -1", ">= 0"]),
    ("gradient_clipping", [1.0], ["gradient_clipping = [1.0]", ">= 0"]),
    ("steps_per_print", 0, ["steps_per_print = 0", ">= 1"]),
])
def test_malformed_ds_config_sections(tmp_path, section, value, words):
    path = ds(tmp_path, **{section: value})
    msg = refused("jobs/demo.yaml", "--ds-config", path)
    assert path in msg and all(w in msg for w in words), msg


def test_duplicate_key_in_a_job_names_both_lines(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("task: fine_tune\nmodel:\n  name: llama-tiny\ntrain:\n  epochs: 1\n  epochs: 3\n")
    msg = refused(str(job))
    assert str(job) in msg and "'epochs' appears twice" in msg and "lines 5 and 6" in msg, msg


@pytest.mark.parametrize("text", ["", "~\n", "# only a comment\n"])
def test_empty_or_null_job_file(tmp_path, text):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    msg = refused(str(job))
    assert str(job) in msg and "empty" in msg and "task: fine_tune" in msg, msg


def test_null_section(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("task: fine_tune\nmodel: null\n")
    msg = refused(str(job))
    assert "model: null" in msg and "remove the line" in msg, msg


@pytest.mark.parametrize("line, words", [
    ("localhost slots=1.5", ["slots=1.5", "whole number"]),
    ("localhost slots=2 gpus=1", ["'gpus=1'", "ignored by DeepSpeed's runner"]),
    ("-v slots=1", ["'-v'", "starts with '-'"]),
    ("h" * 300 + " slots=1", ["300 characters", "at most 253"]),
    ("bad_-.host slots=1", ["not a host name"]),
])
def test_bad_hostfile_lines(tmp_path, line, words):
    hosts = tmp_path / "hosts"
    hosts.write_text(line + "\n")
    msg = refused("jobs/demo.yaml", "--hostfile", str(hosts))
    assert f"{hosts}:1" in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("line", ["node1 slots=2 max_slots=4", "localhost slots=2   # the laptop", "10.0.0.7 slots=1",
                                  "my_node.cluster.local slots=2"])
def test_good_hostfile_lines_still_parse(line):
    from launcher.config.hostfile import parse_hostfile
    host = line.split()[0]
    assert host in parse_hostfile(line + "\n", "h").hosts


def test_master_addr_is_a_host_name():
    msg = refused("jobs/demo.yaml", "--master_addr=-oProxyCommand=x")
    assert "cluster.master_addr" in msg and "'-oProxyCommand=x'" in msg, msg


def test_accelerate_zero3_config_with_gather_auto_plans(tmp_path):
    """accelerate's ZeRO-3 configs say stage3_gather_16bit_weights_on_model_save: "auto"."""
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = "auto"
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    code, out = plan("jobs/demo.yaml", "--ds-config", str(tmp_path / "ds.json"), "-v")
    assert code == 0, out
    assert "stage3_gather_16bit_weights_on_model_save = False (auto" in out


def test_compile_section_turns_on_train_compile(tmp_path):
    code, out = plan("jobs/demo.yaml", "--ds-config", ds(tmp_path, compile={"deepcompile": False}), "-v")
    assert code == 0, out
    assert "compile section turns on train.compile" in out
    msg = refused("jobs/fine_tune_pipeline.yaml", "--set", "ds.compile.deepcompile=false")
    assert "train.compile = true" in msg and "pipeline" in msg, msg
