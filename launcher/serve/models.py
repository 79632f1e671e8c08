"""The served model on a rank: the base (tasks.causal_lm: preset, folder or hub id; fp32 or bf16 as the spec says), its PEFT
LoRA adapters (one PeftModel holding all; a batch may mix them: PEFT's `adapter_names`), and on
N ranks the AutoTP shard (`deepspeed.init_inference`, as tasks/rag does for generation)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import deepspeed
import torch
from peft import PeftModel

from launcher.common.errors import LabsError
from launcher.serve.kv import KVBatch
from tasks.causal_lm import build_causal_lm
from tasks.rag.tensor_parallel import init_distributed, launcher_world, tp_grain

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# For a tokenizer without a chat template (the presets' built-in ones): a plain ChatML-like layout.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object  # the engine thread's (detokenizing)
    http_tokenizer: object  # the HTTP side's (tokenizing prompts): fast tokenizers are not for two threads
    kv: KVBatch
    with_adapters: bool
    context: int
    vocab: int
    eos: set[int]
    chat_template: str  # "the tokenizer's" or "the default (the tokenizer has none)"


def load(spec: dict) -> Loaded:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(int(spec.get("seed", 0)))  # presets: the same random weights on every rank and run
    dtype = DTYPES[spec.get("dtype", "fp32")]
    model, tok = build_causal_lm(spec["model"])
    model.eval()
    adapters: dict[str, str] = spec.get("adapters") or {}
    if adapters:
        names = list(adapters)
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        model.eval()
    model.to(dtype)  # base and adapters alike; the KV cache follows the activations' dtype
    tp = int(spec.get("tp", 1))
    if tp > 1:
        model = _tensor_parallel(model, tp, dtype)
    cfg = model.config
    template = "the tokenizer's"
    if not getattr(tok, "chat_template", None):
        tok.chat_template, template = DEFAULT_CHAT_TEMPLATE, "the default (the tokenizer has none)"
    eos = getattr(cfg, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return Loaded(model, copy.deepcopy(tok), tok, KVBatch(model), bool(adapters), int(context),
                  int(cfg.vocab_size), {i for i in eos_ids if i is not None}, template)


def _tensor_parallel(model: torch.nn.Module, tp: int, dtype: torch.dtype) -> torch.nn.Module:

    _, world = launcher_world()
    if world != tp:
        raise LabsError(f"--tp {tp} needs {tp} ranks and this launch has {world}")
    init_distributed()  # gloo, LOCAL_SIZE under torchrun, this rank's /dev/shm file unlinked
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp, "tp_grain_size": tp_grain(model.config, tp)},
                                      dtype=dtype, replace_with_kernel_inject=False)
    return engine.module
