"""One request's generation on the engine thread: its sampling settings, the tokens so far, the text
streamed so far, and why it ended.

Text is streamed so that the deltas always add up to the non-streamed text: after every token the
whole output is decoded again; a tail that may still become a stop string, or that ends in a partial
UTF-8 character (U+FFFD), is held back until the next token decides it.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

Event = tuple[Any, ...]
"""("delta", text) | ("done", finish_reason, usage) | ("error", http status, message), to the HTTP side."""


@dataclass
class Sequence:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: str | None = None
    eos: set[int] = field(default_factory=set)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    arrived: float = field(default_factory=time.monotonic)
    # filled in on the engine thread
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish: str | None = None
    cancelled: bool = False
    counted: bool = False
    last_token_at: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.temperature > 0:
            self.generator = torch.Generator().manual_seed(self.seed if self.seed is not None
                                                           else random.getrandbits(63))

    @property
    def done(self) -> bool:
        return self.finish is not None or self.cancelled

    @property
    def pending(self) -> int:
        return self.out_ids[-1]

    def usage(self) -> dict[str, int]:
        p, c = len(self.prompt_ids), len(self.out_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def emit(self, event: Event) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the HTTP loop is closed: nobody is listening
            pass

    def accept(self, token: int, tokenizer) -> None:
        """The next token: check eos, length and stop strings, stream what is certain."""
        self.out_ids.append(token)
        if token in self.eos:
            self._finish("stop", tokenizer, drop_last=True)
            return
        full = tokenizer.decode(self.out_ids, skip_special_tokens=True)
        for s in self.stop:
            at = full.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text = full[:at]
                self._finish("stop", None)
                return
        if len(self.out_ids) >= self.max_tokens:
            self.text = full
            self._finish("length", None)
            return
        safe = len(full) - _held_back(full, self.stop)
        if safe > self.sent:
            self.emit(("delta", full[self.sent:safe]))
            self.sent = safe

    def _finish(self, reason: str, tokenizer, drop_last: bool = False) -> None:
        if tokenizer is not None:
            self.text = tokenizer.decode(self.out_ids[:-1] if drop_last else self.out_ids, skip_special_tokens=True)
        if len(self.text) > self.sent:
            self.emit(("delta", self.text[self.sent:]))
            self.sent = len(self.text)
        self.finish = reason
        self.emit(("done", reason, self.usage()))

    def cut(self, status: int, message: str) -> None:
        self.finish = "cut"
        self.emit(("error", status, message))


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that must wait: a partial character, or a prefix of a stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """The next token of each row: argmax at temperature 0, else nucleus sampling with its own generator."""
    tokens = logits.argmax(-1).tolist()
    for i, s in enumerate(seqs):
        if s.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / s.temperature, dim=-1)
        if s.top_p < 1.0:
            p, idx = probs.sort(descending=True)
            p[(p.cumsum(0) - p) > s.top_p] = 0.0
            tokens[i] = int(idx[torch.multinomial(p / p.sum(), 1, generator=s.generator)])
        else:
            tokens[i] = int(torch.multinomial(probs, 1, generator=s.generator))
    return tokens
