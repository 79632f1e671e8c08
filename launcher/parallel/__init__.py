"""How a model is parallelised: THE place a strategy is chosen.

`STRATEGIES` is a torch-free table (the `labs` process reads it for the plan's checks; the ranks read it to
build the strategy). `choose(layout)` takes the first row whose `when` holds for the layout, in this fixed
order: pipeline x tensor, sequence, pipeline, tensor, data parallel. Each row names the one file that
implements the strategy (picotron-style: the maths in its docstring), the model types it can cut, the
highest ZeRO stage DeepSpeed runs it with, and whether `train.compile` applies. launcher/parallel/build.py
builds the chosen one inside a rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from launcher.common.layout import Layout

LLAMA_FAMILY = ("llama", "mistral")


@dataclass(frozen=True)
class Strategy:
    name: str
    module: str  # the file that implements it (launcher/parallel/<module>.py)
    cls: str
    when: Callable[[Layout], bool]
    fields: Callable[[Layout], str]  # the config keys that chose it, as an error message names them
    archs: tuple[str, ...] | None  # model types it can apply to; None: any that DeepSpeed can wrap
    arch_fix: str  # what to do instead when the model type is not among `archs`
    max_zero: int  # the highest ZeRO stage it runs with
    compile: bool  # train.compile (DeepSpeed's engine.compile()) applies


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("pipe_tensor_parallel", "pipe_tensor_parallel", "PipeTensorParallel",
             lambda lay: lay.pp > 1 and lay.tp > 1,
             lambda lay: f"pipeline.stages = {lay.pp} with tensor_parallel.autotp_size = {lay.tp}", LLAMA_FAMILY,
             "the stages' blocks are sliced by launcher/parallel/layers/tensor.py, which knows Llama-family blocks "
             "only; use pipeline or tensor parallelism alone for it", 1, False),
    Strategy("sequence_parallel", "sequence_parallel", "SequenceParallel", lambda lay: lay.sp > 1,
             lambda lay: f"sequence_parallel_size = {lay.sp}", LLAMA_FAMILY,
             "Ulysses attention is wired for Llama-family models only; remove sequence_parallel_size", 3, False),
    Strategy("pipeline_parallel", "pipeline_parallel", "PipelineParallel", lambda lay: lay.pp > 1,
             lambda lay: f"pipeline.stages = {lay.pp}", LLAMA_FAMILY + ("gpt2",),
             "it has no pipeline layer list (launcher/parallel/layers/pipeline.py); use a ZeRO or tensor_parallel "
             "config for it", 1, False),
    Strategy("tensor_parallel", "tensor_parallel", "TensorParallel", lambda lay: lay.tp > 1,
             lambda lay: f"tensor_parallel.autotp_size = {lay.tp}", None, "", 3, False),
    Strategy("data_parallel", "data_parallel", "DataParallel", lambda lay: True,
             lambda lay: f"data parallel over {lay.dp} rank(s)", None, "", 3, True),
)


def choose(layout: Layout) -> Strategy:
    return next(s for s in STRATEGIES if s.when(layout))


def tensor_parallel_sizes(heads: int, kv_heads: int) -> list[int]:
    """The tensor-parallel sizes that give every rank whole heads: the divisors of both the attention and the
    key-value heads (SmolLM2, 9 and 3: 1 and 3). An uneven split is not offered: not proven equal to one rank."""
    g = math.gcd(heads, kv_heads)
    return [d for d in range(1, g + 1) if g % d == 0]


def tensor_parallel_error(tp: int, heads: int, kv_heads: int, world: int) -> str | None:
    """Why `tp` cannot cut a model of `heads` / `kv_heads` heads, with the sizes that can (None: it can)."""
    if heads % tp == 0 and kv_heads % tp == 0:
        return None
    bad = " nor its ".join(f"{n} {what}" for n, what in ((heads, "attention heads"), (kv_heads, "key-value heads"))
                           if n % tp)
    sizes = tensor_parallel_sizes(heads, kv_heads)
    here = [t for t in sizes if world % t == 0]
    if len(sizes) == 1:
        note = " (no tensor parallelism for this model)"
    elif len(here) == 1:
        note = f" (tensor parallelism needs a multiple of {sizes[1]} ranks)"
    else:
        note = ""
    return (f"tensor_parallel.autotp_size = {tp} does not divide the model's {bad}: each tensor rank "
            f"takes whole query heads and whole key-value heads, so the size must divide both {heads} and "
            f"{kv_heads}; an uneven split is not supported; valid sizes for this model: "
            f"{', '.join(map(str, sizes))}; on {world} rank(s): {', '.join(map(str, here))}{note}")
