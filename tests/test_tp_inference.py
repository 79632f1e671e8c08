"""Tensor-parallel generation (tasks/rag/generation.py and tensor_parallel.py, `deepspeed.init_inference` with AutoTP): on 2 ranks each
rank holds half of every attention and MLP matrix and of the head, and greedy decoding yields the same
token ids as the plain model on one process (fp32, the same preset weights from the same seed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_ok

PROMPT = "Answer the question using only the context.\n\nContext:\n[1] Gloo runs collectives on CPUs.\n\nQuestion: Which library runs collectives on CPUs?\nAnswer:"
NEW_TOKENS = 12
HIDDEN, INTER, VOCAB = 64, 176, 32000  # llama-tiny

PROBE = """
import json, sys
from launcher.rank.main import leave
from tasks.rag import build_generator
g = build_generator("llama-tiny", max_new_tokens={new})  # tp_size = the launcher's world size
record = {{"rank": g.rank, "tp": g.tp_size, "ids": g.generate_ids({prompt!r}), "shapes": g.split_shapes()}}
open(f"{out}/rank{{g.rank}}.json", "w").write(json.dumps(record))
leave(0)
"""


def _env() -> dict:
    # as `labs launch` runs its ranks: the venv's ninja first (another ninja version on PATH makes
    # DeepSpeed rebuild its CPU comm op in the shared extension cache)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": path}


@pytest.mark.distributed
def test_tp_generation_splits_weights_and_equals_one_process(tmp_path, ds_ops):
    from tasks.rag.generation import build_generator

    one = build_generator("llama-tiny", max_new_tokens=NEW_TOKENS, tp_size=1)
    want_ids, full = one.generate_ids(PROMPT), one.split_shapes()
    assert len(want_ids) == NEW_TOKENS

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(new=NEW_TOKENS, prompt=PROMPT, out=tmp_path))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", str(probe)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert_ok(proc)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    half = {
        "self_attn.q_proj": [HIDDEN // 2, HIDDEN],
        "self_attn.k_proj": [HIDDEN // 2, HIDDEN],
        "self_attn.v_proj": [HIDDEN // 2, HIDDEN],
        "self_attn.o_proj": [HIDDEN, HIDDEN // 2],
        "mlp.gate_proj": [INTER // 2, HIDDEN],
        "mlp.up_proj": [INTER // 2, HIDDEN],
        "mlp.down_proj": [HIDDEN, INTER // 2],
    }
    assert full["model.layers.0.mlp.down_proj.weight"] == [HIDDEN, INTER]
    for r in ranks:
        assert r["tp"] == 2
        got = {k.split("layers.0.")[1].removesuffix(".weight"): v for k, v in r["shapes"].items() if "layers.0." in k}
        assert got == half, r["rank"]
        assert r["shapes"]["lm_head.weight"] == [VOCAB, HIDDEN // 2]  # split by input columns, all-reduced
        assert r["ids"] == want_ids, f"rank {r['rank']}: tensor parallel {r['ids']} vs 1 process {want_ids}"


@pytest.mark.distributed
def test_rag_cli_tp_size_relaunches_and_answers_like_one_process(tmp_path, ds_ops):
    """`--tp_size 2` alone re-launches under torchrun (which sets no LOCAL_SIZE: the shared-memory
    all-reduce must still be set up); only rank 0 prints; the answer equals the 1-process answer."""
    from tasks.rag.cli import main

    args = [
        "--generator",
        "llama-tiny",
        "--max_new_tokens",
        str(NEW_TOKENS),
        "-k",
        "2",
        "--query",
        "Which communication library runs collectives on CPUs?",
    ]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.rag", *args, "--tp_size", "2", "--out", str(tmp_path / "tp.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert_ok(proc)
    assert proc.stdout.count("generated answer (llama-tiny, tensor parallel x 2):") == 1
    one, tp = (json.loads((tmp_path / f"{n}.json").read_text())[0] for n in ("one", "tp"))
    assert [s["id"] for s in tp["sources"]] == [s["id"] for s in one["sources"]]  # the same prompt
    assert tp["generated_answer"] == one["generated_answer"]


def test_tp_size_errors(tmp_path, monkeypatch):
    from launcher.common.errors import LabsError
    from tasks.rag.cli import main
    from tasks.rag.generation import build_generator

    with pytest.raises(LabsError, match="--generator"):
        main(["--tp_size", "2", "--query", "x"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(LabsError, match="--tp_size 2 needs 2 ranks, and this launch has 4"):
        build_generator("llama-tiny", tp_size=2)
