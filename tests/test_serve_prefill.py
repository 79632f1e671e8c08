"""Batched prefill in `labs serve`'s engine (launcher/serve/kv.py, batcher.py), in this process: the real
Engine.step and KVBatch on a preset's seed-0 weights, no HTTP. Requests that join in one iteration with
prompts of different lengths are prefilled together (left-padded, masked, per-row positions) and must give
exactly the greedy tokens each gets alone, and that plain `model.generate` gives.
"""

from __future__ import annotations

import pytest

# (prompt length, max_tokens): joined at step 1 while a first request decodes; lengths chosen so that
# 3, 7, 10 share one padded forward and 30 gets its own (asserted below), max_tokens so rows leave apart
FIRST = (12, 9)
JOINERS = ((10, 6), (3, 11), (30, 8), (7, 10))
TEXT = ("Tensor parallelism splits every layer of the model across the ranks, and the ranks talk at each "
        "layer so that the answer is the same as on one machine; pipelines split the layers instead. ") * 3


def _engine(name: str):
    from launcher.serve.batcher import Engine
    from launcher.serve.metrics import Metrics
    from launcher.serve.models import load
    engine = Engine(lambda: None, Metrics(), max_batch=8, max_queue=8)
    engine.loaded = load({"model": name, "seed": 0})  # what a rank of `labs serve NAME` serves
    return engine


def _seq(engine, ids: list[int], n: int):
    from launcher.serve.sequence import Sequence
    return Sequence(prompt_ids=ids, max_tokens=n, eos=engine.loaded.eos)


def _run(engine, joins: list[list]) -> None:
    """Engine steps until every row has ended; joins[i] are admitted together at step i."""
    for step in range(200):
        engine.step(joins[step] if step < len(joins) else [])
        if step >= len(joins) and all(s.done for s in engine.rows):
            engine.step([])  # the ended rows leave: the cache is empty again
            assert engine.loaded.kv.size == 0
            return
    raise AssertionError("the rows did not end in 200 steps")


def _generate(model, ids: list[int], n: int) -> list[int]:
    import torch
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "smollm2-tiny"])  # RoPE, learned positions, GQA
def test_requests_joining_together_with_different_lengths_equal_each_alone(name):
    from launcher.serve.kv import prefill_groups
    engine = _engine(name)
    ids = engine.loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    # each prompt a different window of the text, so that no two share a prefix
    prompts = [ids[5 * i: 5 * i + n] for i, (n, _) in enumerate((FIRST, *JOINERS))]
    wants = [n for _, n in (FIRST, *JOINERS)]
    assert [list(g) for g in prefill_groups(sorted(n for n, _ in JOINERS))] == [[0, 1, 2], [3]]

    alone = []
    for p, n in zip(prompts, wants, strict=True):
        s = _seq(engine, p, n)
        _run(engine, [[s]])
        alone.append(s.out_ids)
    seqs = [_seq(engine, p, n) for p, n in zip(prompts, wants, strict=True)]
    _run(engine, [seqs[:1], seqs[1:]])  # the first decodes while the other four join in one iteration
    together = [s.out_ids for s in seqs]

    generated = [_generate(engine.loaded.model, p, n) for p, n in zip(prompts, wants, strict=True)]
    assert together == alone == generated, (together, alone, generated)
    assert len({tuple(t) for t in generated}) == len(generated)  # the prompts matter: the check can fail
    assert all(s.finish in ("length", "stop") for s in seqs)
