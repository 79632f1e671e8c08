"""Generation: a prompt holding the retrieved passages, and a causal LM that answers it greedily, on
one process or split over N ranks (`deepspeed.init_inference`, AutoTP; tasks/rag/tensor_parallel.py)."""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from tasks.api import LabsError, split_shapes
from tasks.causal_lm import build_causal_lm
from tasks.rag.passages import Passage
from tasks.rag.tensor_parallel import init_distributed, launcher_world, tp_grain


def build_prompt(question: str, passages: list[Passage], max_chars: int = 1500) -> str:
    ctx, used = [], 0
    for n, p in enumerate(passages, 1):
        text = p.text[: max(0, max_chars - used)]
        if not text:
            break
        ctx.append(f"[{n}] {text}")
        used += len(text)
    return ("Answer the question using only the context.\n\nContext:\n" + "\n".join(ctx)
            + f"\n\nQuestion: {question}\nAnswer:")


def chat_text(tok, prompt: str) -> str:
    """The prompt as the user's turn of the tokenizer's chat template, the assistant's turn opened (an
    instruction-tuned model such as smollm2-135m answers there); unchanged for a tokenizer without one."""
    if not getattr(tok, "chat_template", None):
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


class Generator:
    """A causal LM that answers a prompt greedily: `generator(prompt) -> text` (the generator hook;
    `generate_ids` gives the token ids). The model is a hub id, a local folder (runs/<job>/<run>/hf)
    or a preset: pretrained (smollm2-135m) or built from config (random weights from `seed`, the same
    on every rank and run). A model whose tokenizer has a chat template gets the prompt through it
    (`chat_text`); it stops at its end-of-turn token.

    tp_size 1: the plain Hugging Face model on this process. tp_size N > 1, inside an N-rank launch
    (deepspeed / torchrun): `deepspeed.init_inference` with AutoTP splits each attention and MLP
    matrix over the N ranks: q/k/v, gate/up by output rows (`LinearLayer`), o_proj, down_proj and
    lm_head by input columns (`LinearAllreduce`, an all-reduce after each). Every rank must run
    the same prompt (collectives in every layer; rank 0's is broadcast); greedy decoding then yields
    the same tokens on all ranks, equal to one process (fp32)."""

    def __init__(self, name: str, max_new_tokens: int = 64, tp_size: int = 1, seed: int = 0):

        rank, world = launcher_world()
        if tp_size > 1 and tp_size != world:
            raise LabsError(f"--tp_size {tp_size} needs {tp_size} ranks, and this launch has {world}; start it "
                            f"with `deepspeed --num_gpus {tp_size} --module tasks.rag ...`, `torchrun "
                            f"--nproc_per_node {tp_size} -m tasks.rag ...`, or alone with --tp_size (it re-launches)")
        torch.manual_seed(seed)
        model, self.tok = build_causal_lm(name)
        model.eval()
        self.name, self.max_new_tokens, self.tp_size, self.rank = name, max_new_tokens, tp_size, rank
        cfg = model.config
        self.limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024)
        if tp_size > 1:
            init_distributed()
            engine = deepspeed.init_inference(
                model, tensor_parallel={"tp_size": tp_size, "tp_grain_size": tp_grain(cfg, tp_size)},
                dtype=torch.float32, replace_with_kernel_inject=False)
            model = engine.module
        self.model = model

    def generate_ids(self, prompt: str) -> list[int]:
        if self.tp_size > 1:  # every rank must decode the same prompt: rank 0's (its retrieval) wins
            box = [prompt]
            dist.broadcast_object_list(box, src=0)
            prompt = box[0]
        text = chat_text(self.tok, prompt)
        special = text == prompt  # a chat template writes the special tokens itself
        ids = self.tok(text, return_tensors="pt", add_special_tokens=special)["input_ids"]
        ids = ids[:, -(self.limit - self.max_new_tokens):]
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                      do_sample=False, pad_token_id=self.tok.pad_token_id)
        return out[0, ids.shape[1]:].tolist()

    def __call__(self, prompt: str) -> str:
        return self.tok.decode(self.generate_ids(prompt), skip_special_tokens=True).strip().split("\n")[0]

    def split_shapes(self) -> dict[str, list[int]]:
        """Shapes of the first block's matrices and the head as this rank holds them."""
        return split_shapes(self.model)


def build_generator(name: str, max_new_tokens: int = 64, tp_size: int | None = None, seed: int = 0) -> Generator:
    """The generator hook, a function prompt -> answer text (see Generator). tp_size defaults to
    the launcher's world size: under `deepspeed`/`torchrun` with N ranks, N-way tensor parallel."""
    return Generator(name, max_new_tokens, tp_size or launcher_world()[1], seed)
