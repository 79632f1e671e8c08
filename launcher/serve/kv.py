"""One batch's KV cache, held across decode steps, with rows that leave and join between steps.

Rows are left-padded to one length T: `mask` [B, T] marks real positions (1) and padding (0);
`next_pos` [B] is each row's next position id (its real length), so RoPE / learned positions see the
same numbers as an unpadded run. A step:

    keep(rows)        finished rows leave: index_select on the batch axis, all-padding columns trimmed
    decode(tokens)    one token per row, one forward for the whole batch (the cache grows by one column)
    prefill(ids)      a new request's prompt, alone (no padding inside a prompt), then its K/V joins the
                      batch: the shorter side is left-padded with zeros, masked out

Padding K/V is zero, never NaN, so masked positions contribute exactly nothing; a decode query is a
real token and always sees itself, so no attention row is fully masked. The cache is one
transformers `DynamicCache` (this project's transformers 5.x: the forward takes `cache=`), kept
between steps; only `keep`/`prefill` rewrite its layers' tensors.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


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

    def prefill(self, ids: list[int], adapter: str | None) -> torch.Tensor:
        """Logits [vocab] after a new prompt, which joins the batch as its last row."""
        n = len(ids)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        logits = self._forward(torch.tensor([ids], dtype=torch.long), torch.ones(1, n, dtype=torch.long),
                               torch.arange(n)[None], cache, None if adapter is None else [adapter])
        self._join(cache, n)
        return logits[0]

    def _join(self, cache: DynamicCache, n: int) -> None:
        if self.cache is None or self.size == 0:
            self.cache, self.mask, self.next_pos = cache, torch.ones(1, n, dtype=torch.long), torch.tensor([n])
            return
        t = self.mask.shape[1]
        width = max(t, n)
        self.mask = torch.cat([_pad(self.mask, width - t), _pad(torch.ones(1, n, dtype=torch.long), width - n)])
        self.next_pos = torch.cat([self.next_pos, torch.tensor([n])])
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
