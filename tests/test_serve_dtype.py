"""`labs serve --dtype auto|fp32|bf16`: the rule (auto = bf16 where the CPU lists avx512_bf16 or amx_bf16, as
training's `bf16: auto`; an explicit bf16 refused on a CPU without them), the plan that says which and why, and
a real server in the chosen dtype whose greedy answers equal plain `model.generate` on the same weights cast
to the same dtype (SmolLM2's shape: grouped-query attention, the tied head)."""

from __future__ import annotations

import pytest
from conftest import MACHINE_BF16
from serve_helpers import Server, generate, reference

from launcher.common.errors import LabsError
from launcher.serve_cli import serve_dtype

PROMPTS = ["The capital of France is", "Tensor parallelism splits", "Once upon a time"]


@pytest.fixture
def plain_cpu(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo-plain"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")  # AMD Zen 3: no avx512_bf16, no AMX
    monkeypatch.setattr("launcher.config.ds.optim.CPUINFO", info)
    return info


def test_auto_takes_bf16_where_the_cpu_has_it(bf16_cpu):
    assert serve_dtype("auto") == ("bf16", "--dtype auto: this CPU lists avx512_bf16/amx_bf16")
    assert serve_dtype("bf16") == ("bf16", "--dtype bf16")
    assert serve_dtype("fp32") == ("fp32", "--dtype fp32")


def test_auto_is_fp32_and_bf16_refused_without_it(plain_cpu):
    assert serve_dtype("auto") == ("fp32", "--dtype auto: this CPU lists neither avx512_bf16 nor amx_bf16")
    with pytest.raises(LabsError, match=r"--dtype bf16: this CPU lists neither avx512_bf16 nor amx_bf16.*"
                                        r"use --dtype fp32 or --dtype auto"):
        serve_dtype("bf16")


def test_bf16_refused_before_anything_starts(plain_cpu, tmp_path, capsys):
    from launcher import serve_cli
    with pytest.raises(LabsError, match="--dtype bf16"):
        serve_cli.main(["llama-tiny", "--dtype", "bf16", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()  # nothing written


def test_the_default_serves_in_the_machines_dtype_and_equals_generate(tmp_path):
    """No --dtype: auto. The plan names the dtype and why; weights at 2 bytes in bf16; every greedy answer is
    `model.generate`'s on the seed-0 weights in that dtype (one request at a time: the same shapes)."""
    import torch
    dtype = "bf16" if MACHINE_BF16 else "fp32"
    server = Server(["smollm2-tiny", "--threads", "1", "--dtype", "auto"], tmp_path / "serve")
    try:
        model, tok = reference("smollm2-tiny")  # built while the server loads
        model.to(torch.bfloat16 if MACHINE_BF16 else torch.float32)
        server.wait_ready()
        console = server.console()
        why = "this CPU lists avx512_bf16/amx_bf16" if MACHINE_BF16 else "this CPU lists neither"
        assert f"precision {dtype} (--dtype auto: {why}" in console, console
        params = sum(p.numel() for p in model.parameters())  # the tied head counted once
        assert f"({params / 1e6:.1f}M params)" in console, console
        weights_line = next(line for line in console.splitlines() if "memory per rank: weights" in line)
        mib = float(weights_line.split("weights ")[1].split(" MiB")[0])
        assert mib == pytest.approx(params * (2 if MACHINE_BF16 else 4) / 2**20, rel=0.02), weights_line
        client = server.client()
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            r = client.completions.create(model="smollm2-tiny", prompt=prompt, max_tokens=10, temperature=0)
            assert r.choices[0].text == generate(model, tok, ids, 10), prompt
    finally:
        assert server.stop() == 0, server.console()
