"""A model's shape read from its config dict (a tasks/presets.py preset or an HF config.json), with no torch:
the ONE place that knows the config keys of each architecture (llama/mistral, gpt2, bert) and their
aliases, and the parameter counts that follow from them (they match DeepSpeed's `model_to_params`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def hidden_size_of(model_config: dict[str, Any] | None) -> int | None:
    """The hidden size "auto" bucket sizes are computed from, read from a model's config dict (a preset
    or config.json) in the HF Trainer's order: hidden_size (GPT-2's n_embd / d_model are what its
    config objects alias to it), the largest of hidden_sizes, then the same in text_config."""
    for c in (model_config or {}, (model_config or {}).get("text_config") or {}):
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(c.get(key), int):
                return c[key]
        if isinstance(c.get("hidden_sizes"), list) and c["hidden_sizes"]:
            return max(c["hidden_sizes"])
    return None


def block_params(cfg: dict[str, Any]) -> int:
    """Parameters of one transformer block of a llama/mistral/gpt2 config dict (attention with its
    biases if any, MLP, the block's norms)."""
    arch = cfg.get("arch") or cfg.get("model_type")
    if arch in ("llama", "mistral"):
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or h // heads
        bias = 1 if cfg.get("attention_bias") else 0
        attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + bias * (heads * hd + 2 * kv * hd + h)
        return attn + 3 * h * i + 2 * h
    if arch == "gpt2":
        h = cfg["n_embd"]
        inner = cfg.get("n_inner") or 4 * h
        return 4 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h)
    raise KeyError(arch)


def count_params(cfg: dict[str, Any], vocab: int) -> tuple[int, int]:
    """(total parameters, largest single module's own parameters) for a llama/gpt2 config dict."""
    arch = cfg.get("arch") or cfg.get("model_type")
    if arch in ("llama", "mistral"):
        h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
        tied = cfg.get("tie_word_embeddings", False)
        total = vocab * h * (1 if tied else 2) + n * block_params(cfg) + h
        return total, vocab * h
    if arch == "gpt2":
        h, n = cfg["n_embd"], cfg["n_layer"]
        pos = cfg.get("n_positions", 1024)
        total = vocab * h + pos * h + n * block_params(cfg) + 2 * h
        return total, vocab * h
    if arch == "bert":  # encoder + pooler; the classification head (h * labels + labels) is left out
        h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        pos, types_ = cfg.get("max_position_embeddings", 512), cfg.get("type_vocab_size", 2)
        block = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        total = (vocab + pos + types_) * h + 2 * h + n * block + h * h + h
        return total, vocab * h
    raise KeyError(arch)


def lora_params(cfg: dict[str, Any], r: int, targets: list[str]) -> int | None:
    """Parameters PEFT's LoRA adds (A: r x in, B: out x r per wrapped projection) to a llama/mistral
    config; None for another architecture or a target this count does not know."""
    if (cfg.get("arch") or cfg.get("model_type")) not in ("llama", "mistral"):
        return None
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    if any(t not in shapes for t in targets):
        return None
    return n * sum(r * (shapes[t][0] + shapes[t][1]) for t in set(targets))


@dataclass
class Shape:
    """A llama/mistral/gpt2 model's sizes, from a preset or a config.json (no torch)."""

    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    params: int
    embed: int  # input embeddings (+ GPT-2's positions)
    head: int  # lm_head (0 when tied to the embeddings)
    block: int  # one transformer block
    final: int  # the final norm

    @classmethod
    def of(cls, cfg: dict[str, Any], vocab: int) -> Shape | None:

        arch = cfg.get("arch") or cfg.get("model_type")
        if arch in ("llama", "mistral"):
            h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
            heads = cfg["num_attention_heads"]
            kv = cfg.get("num_key_value_heads") or heads
            block = block_params(cfg)
            tied = bool(cfg.get("tie_word_embeddings", False))
            return cls(arch, vocab, h, n, heads, kv, i, tied, vocab * h * (1 if tied else 2) + n * block + h,
                       vocab * h, 0 if tied else vocab * h, block, h)
        if arch == "gpt2":
            h, n = cfg["n_embd"], cfg["n_layer"]
            inner = cfg.get("n_inner") or 4 * h
            block = block_params(cfg)
            embed = vocab * h + cfg.get("n_positions", 1024) * h
            return cls(arch, vocab, h, n, cfg["n_head"], cfg["n_head"], inner, True, embed + n * block + 2 * h,
                       embed, 0, block, 2 * h)
        return None


def cfg_get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def cfg_ints(cfg: Any, *names: str) -> list[int]:
    return [int(cfg_get(cfg, n)) for n in names]


def layout_dims(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """(arch, layers, heads, kv heads) from a preset or a local config.json; None for hub ids."""
    if cfg is None:
        return None
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    return {"arch": cfg.get("arch") or cfg.get("model_type"), "heads": heads,
            "layers": cfg.get("num_hidden_layers") or cfg.get("n_layer"),
            "kv_heads": cfg.get("num_key_value_heads") or heads}
