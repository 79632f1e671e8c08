"""One batch's KV cache, held across decode steps, with rows that leave and join between steps.

Rows are left-padded to one length T: `mask` [B, T] marks real positions (1) and padding (0);
`next_pos` [B] is each row's next position id (its real length), so RoPE / learned positions see the
same numbers as an unpadded run. A step:

    keep(rows)        finished rows leave: index_select on the batch axis, all-padding columns trimmed
    decode(tokens)    one token per row, one forward for the whole batch (the cache grows by one column)
    prefill(prompts)  new requests' prompts, together in one forward: left-padded to the longest, with
                      their 2-D mask and per-row position ids (0 at each row's first real token); then
                      their K/V joins the batch, the shorter side left-padded with zeros, masked out

`prefill_groups` decides which new prompts share a forward (similar lengths; one that would pad the
others too much gets its own), so a short prompt is not padded to a long one's length.

Padding K/V is zero, never NaN, so masked positions contribute exactly nothing; a decode query is a
real token and always sees itself, so no attention row of a real token is fully masked (the K/V that a
prefill computes at its padded positions are overwritten with zeros). The cache is one transformers
`DynamicCache` (this project's transformers 5.x: the forward takes `cache=`), kept between steps; only
`keep`/`prefill` rewrite its layers' tensors.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

PAD_ID = 0  # the token id in padded positions (masked: any id in the vocabulary gives the same result)
FORWARD_COST = 32  # one forward's fixed cost, in prompt tokens' worth of compute (CPU, SmolLM2/llama presets)
MAX_PREFILL_TOKENS = 4096  # padded tokens in one prefill forward at most (a lone longer prompt still runs)


def prefill_groups(lengths: list[int]) -> list[range]:
    """Consecutive runs of new prompts to prefill together, in the order given (the engine sorts them by
    length). A prompt joins the current group unless the padding it adds to the group's rows costs more
    than a forward of its own, or the group would pass MAX_PREFILL_TOKENS."""
    groups: list[range] = []
    start, longest = 0, 0
    for i, n in enumerate(lengths):
        k, width = i - start, max(n, longest)
        padding = k * (width - longest) + (width - n)  # what joining adds: the group's rows and this one
        if k and (padding > FORWARD_COST or (k + 1) * width > MAX_PREFILL_TOKENS):
            groups.append(range(start, i))
            start, longest = i, 0
        longest = max(longest, n)
    if lengths:
        groups.append(range(start, len(lengths)))
    return groups


class KVBatch:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.next_pos = torch.zeros(0, dtype=torch.long)

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache,
                 adapters: list[str] | None) -> torch.Tensor:
        extra = {"adapter_names": adapters} if adapters is not None else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1, **extra)
        return out.logits[:, -1, :].float()

    def keep(self, rows: list[int]) -> None:
        if len(rows) == self.size:
            return
        if not rows:
            self.__init__(self.model)
            return
        idx = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, idx)
        used = mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0  # columns that are padding in every kept row go
        self.mask, self.next_pos = mask[:, first:].contiguous(), self.next_pos.index_select(0, idx)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]

    def decode(self, tokens: list[int], adapters: list[str] | None) -> torch.Tensor:
        """Logits [B, vocab] of the next token of every row, given each row's latest token."""
        mask = torch.cat([self.mask, torch.ones(self.size, 1, dtype=torch.long)], dim=1)
        ids = torch.tensor(tokens, dtype=torch.long)[:, None]
        logits = self._forward(ids, mask, self.next_pos[:, None], self.cache, adapters)
        self.mask, self.next_pos = mask, self.next_pos + 1
        return logits

    def prefill(self, prompts: list[list[int]], adapters: list[str] | None) -> torch.Tensor:
        """Logits [k, vocab] after k new prompts, prefilled in one forward; they join the batch as its
        last k rows, in this order."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        pos = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            ids[i, width - n:] = torch.tensor(p, dtype=torch.long)
            mask[i, width - n:] = 1
            pos[i, width - n:] = torch.arange(n)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        logits = self._forward(ids, mask, pos, cache, adapters)
        if min(lengths) < width:  # padded queries saw no real key: their K/V are not to be kept
            pad = (mask == 0)[:, None, :, None]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.masked_fill(pad, 0), layer.values.masked_fill(pad, 0)
        self._join(cache, mask, torch.tensor(lengths, dtype=torch.long))
        return logits

    def _join(self, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        if self.cache is None or self.size == 0:
            self.cache, self.mask, self.next_pos = cache, mask, next_pos
            return
        t, n = self.mask.shape[1], mask.shape[1]
        width = max(t, n)
        self.mask = torch.cat([_pad(self.mask, width - t), _pad(mask, width - n)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        for mine, new in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad(mine.keys, width - t), _pad(new.keys, width - n)])
            mine.values = torch.cat([_pad(mine.values, width - t), _pad(new.values, width - n)])


def _pad(x: torch.Tensor, left: int) -> torch.Tensor:
    """Zeros in front along the sequence axis (the last of a mask, the third of a K/V tensor)."""
    if left == 0:
        return x
    dim = 1 if x.dim() == 2 else 2
    shape = list(x.shape)
    shape[dim] = left
    return torch.cat([torch.zeros(shape, dtype=x.dtype), x], dim=dim)
