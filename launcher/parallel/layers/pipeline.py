"""A Hugging Face causal LM as an ordered list of pipeline layers, for `deepspeed.pipe.PipelineModule`.

The layers wrap the model's OWN submodules (same parameter objects, same initialization), so a
1-rank plain HF forward and the pipeline compute the same function:

    Llama: embed_tokens | decoder layer (+ rotary cos/sin, causal attention) x N | norm | lm_head
           (tied, as SmolLM2: lm_head = embed_tokens, a TiedLayerSpec with key "embed" on both ends)
    GPT-2: wte (tied) | + wpe | block x N | ln_f | lm_head = wte (TiedLayerSpec, key "wte")

A tied weight sits on the first and the last stage; DeepSpeed's pipeline engine all-reduces its gradient
between them after the backward pass (`_exec_reduce_tied_grads`), so both copies take the same update: the
sum of the lookup's and the head's gradients, as in one process.

Between layers only the hidden state [batch, seq, hidden] travels (what DeepSpeed's pipeline
engine sends between stages). Positions are 0..seq-1 and attention is causal without padding,
as in the fine-tuning data (full token blocks). `causal_lm_loss` is HF's loss: logits shifted by
one against the labels, cross-entropy, mean over tokens (labels -100 ignored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn

from launcher.common.errors import LabsError

SUPPORTED = ("llama", "mistral", "gpt2")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def _causal_mask(h: torch.Tensor, attn_impl: str) -> torch.Tensor | None:
    """None lets SDPA/flash use is_causal (what HF does without padding); eager needs a real mask."""
    if attn_impl != "eager":
        return None
    t = h.shape[1]
    mask = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)
    return mask[None, None]


class LlamaEmbed(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class LlamaBlock(nn.Module):
    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, attn_impl: str):
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb  # parameter-free (inv_freq buffer), shared by all blocks
        self.attn_impl = attn_impl

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        out = self.layer(h, attention_mask=_causal_mask(h, self.attn_impl), position_ids=pos,
                         position_embeddings=self.rotary_emb(h, pos))
        return out[0] if isinstance(out, tuple) else out


def llama_tied_head(module: LlamaEmbed, h: torch.Tensor) -> torch.Tensor:
    """The head of a Llama whose lm_head is its input embedding (tie_word_embeddings: SmolLM2)."""
    return F.linear(h, module.embed_tokens.weight)


class Norm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class Head(nn.Module):
    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)


class GPT2TokenEmbed(nn.Module):
    """Holds the tied token embedding: the first layer (lookup) and, via forward_fn, the head."""

    def __init__(self, wte: nn.Embedding):
        super().__init__()
        self.wte = wte

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)


def gpt2_tied_head(module: GPT2TokenEmbed, h: torch.Tensor) -> torch.Tensor:
    return F.linear(h, module.wte.weight)


class GPT2PosEmbed(nn.Module):
    def __init__(self, wpe: nn.Embedding, drop: nn.Module):
        super().__init__()
        self.wpe, self.drop = wpe, drop

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        return self.drop(h + self.wpe(pos))


class GPT2Block(nn.Module):
    def __init__(self, block: nn.Module, attn_impl: str):
        super().__init__()
        self.block = block
        self.attn_impl = attn_impl

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.block(h, attention_mask=_causal_mask(h, self.attn_impl))
        return out[0] if isinstance(out, tuple) else out


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def pipeline_layers(model: nn.Module, where: str = "model") -> list:
    """The ordered layer list (modules and DeepSpeed LayerSpecs) of a Llama-family or GPT-2 HF model."""

    kind = model_type(model)
    attn_impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if kind in ("llama", "mistral"):
        inner = model.model
        if model.lm_head.weight is inner.embed_tokens.weight:  # tied: one weight on the first and last stage
            attr = "embed_tokens.weight"
            first = TiedLayerSpec("embed", LlamaEmbed, inner.embed_tokens, tied_weight_attr=attr)
            last = TiedLayerSpec("embed", LlamaEmbed, inner.embed_tokens, forward_fn=llama_tied_head,
                                 tied_weight_attr=attr)
        else:
            first, last = LlamaEmbed(inner.embed_tokens), Head(model.lm_head)
        return ([first] + [LlamaBlock(layer, inner.rotary_emb, attn_impl) for layer in inner.layers]
                + [Norm(inner.norm), last])
    if kind == "gpt2":
        t = model.transformer
        tied = model.lm_head.weight is t.wte.weight
        attr = "wte.weight"  # the tied weight inside GPT2TokenEmbed, on every stage holding a copy
        first = (TiedLayerSpec("wte", GPT2TokenEmbed, t.wte, tied_weight_attr=attr) if tied
                 else LayerSpec(GPT2TokenEmbed, t.wte))
        last = (TiedLayerSpec("wte", GPT2TokenEmbed, t.wte, forward_fn=gpt2_tied_head, tied_weight_attr=attr)
                if tied else Head(model.lm_head))
        return [first, GPT2PosEmbed(t.wpe, t.drop)] + [GPT2Block(b, attn_impl) for b in t.h] + [Norm(t.ln_f), last]
    raise LabsError(f"{where}: {kind!r} has no pipeline layer list (supported: {', '.join(SUPPORTED)}); "
                    f"use a ZeRO or tensor_parallel config for this model")


def pipeline_names(model) -> dict[str, str]:
    """Pipeline parameter name (`<layer index>.<name in the layer>`, as a PipelineModule and its
    `layer_XX-model_states.pt` files have them) -> the HF model's name, from the task's layer list
    (launcher/parallel/layers/pipeline.py), whose layers wrap the model's own submodules."""

    ids: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        ids.setdefault(id(p), n)
    out = {}
    for i, layer in enumerate(pipeline_layers(model, "model")):
        if isinstance(layer, TiedLayerSpec):
            raise LabsError("a pipeline with tied layers (GPT-2's embedding and head) cannot be converted yet")
        if isinstance(layer, LayerSpec):
            layer = layer.build()
        for n, p in layer.named_parameters():
            out[f"{i}.{n}"] = ids[id(p)]
    return out
