"""Model FLOPs utilisation: the FLOPs a training token costs, the machine's peak, and their ratio.

    labs peak [--dtype fp32 bf16] [--threads 1 2] [--refresh]     # the cached peaks; measures missing ones

FLOPs per token (model FLOPs, as PaLM's appendix B and torchtitan count them; activation
recomputation is not counted, so this is MFU, not HFU):

    full training:  6 * N + 12 * L * h * s
    LoRA:           4 * N + 6 * A + 12 * L * h * s

N: the matmul parameters (every Linear weight of the blocks, plus the LM head or classifier; not the
embedding lookup, norms or biases), L layers, h = heads x head_dim, s the sequence length, A the LoRA
adapter parameters. 6N = forward (2N) + backward through activations (2N) + weight gradients (2N);
a frozen base (LoRA) costs the first two only. 12*L*h*s is the attention score and value matmuls
(forward 4*L*h*s, backward twice that), counted over the full s x s square as PaLM does.

Peak: on a GPU the dense bf16/fp16 tensor peak of its datasheet (table below); on a CPU, or a GPU
not in the table, a short matmul probe (best of a few square matmuls) per dtype and thread count,
cached per machine in $LABS_CACHE_DIR/peak.json (default ~/.cache/llm-labs), keyed by device
model + dtype + threads. MFU = achieved FLOP/s / (ranks x peak per rank); the denominator is
always printed beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from launcher.estimate.shape import cfg_get, cfg_ints

log = logging.getLogger("labs")




DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TokenFlops:
    """FLOPs of one training token (forward + backward) and how they were counted."""

    total: float
    matmul_params: int  # N: frozen ones too
    adapter_params: int  # A: LoRA adapters (0: full training)
    attention: float  # 12*L*h*s
    seq_len: int
    formula: str

    def describe(self) -> str:
        return (f"{self.total / 1e6:,.1f} MFLOP/token = {self.formula} (N = {self.matmul_params:,} matmul params"
                + (f", A = {self.adapter_params:,} LoRA params" if self.adapter_params else "")
                + f", attention {self.attention / 1e6:,.2f} MFLOP at s = {self.seq_len})")


def matmul_shape(cfg: Any, vocab: int | None = None) -> tuple[int, int, int] | None:
    """(N matmul parameters, layers, attention width h) from a model config (an HF config or a
    tasks/presets.py dict); None for an architecture this count does not know."""
    arch = cfg_get(cfg, "arch", "model_type")
    vocab = vocab or cfg_get(cfg, "vocab_size")
    if arch in ("llama", "mistral", "qwen2", "qwen3"):
        h, i, n = cfg_ints(cfg, "hidden_size", "intermediate_size", "num_hidden_layers")
        heads = cfg_get(cfg, "num_attention_heads")
        kv = cfg_get(cfg, "num_key_value_heads", default=heads)
        hd = cfg_get(cfg, "head_dim") or h // heads
        block = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i
        return n * block + vocab * h, n, heads * hd
    if arch == "gpt2":
        h, n = cfg_ints(cfg, "n_embd", "n_layer")
        inner = cfg_get(cfg, "n_inner") or 4 * h
        return n * (4 * h * h + 2 * h * inner) + vocab * h, n, h
    if arch == "bert":  # sequence classifier: pooler + head run on one token per sequence (left out)
        h, i, n = cfg_ints(cfg, "hidden_size", "intermediate_size", "num_hidden_layers")
        return n * (4 * h * h + 2 * h * i), n, h
    return None


def token_flops(n: int, layers: int, width: int, seq_len: int, adapters: int = 0) -> TokenFlops:
    attention = 12.0 * layers * width * seq_len
    if adapters:
        total = 4.0 * n + 6.0 * adapters + attention
        formula = "4N (frozen base: forward + backward through activations) + 6A (LoRA) + 12*L*h*s"
    else:
        total = 6.0 * n + attention
        formula = "6N + 12*L*h*s"
    return TokenFlops(total, n, adapters, attention, seq_len, formula)



