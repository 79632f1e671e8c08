"""Tensor-parallel serving: rank 0 decides every batch step and broadcasts it; every rank then runs
the same forward on its AutoTP shard (each all-reduce inside the model needs all of them).

A step is a small dict of plain lists, sent with `torch.distributed.broadcast_object_list` over the
default (gloo) group:

    {"keep": [row indices that stay], "tokens": [each kept row's latest token],
     "adapters": [each kept row's adapter or None], "new": [[prompt ids, adapter], ...]}

and {"quit": reason} ends the followers. The sampled tokens never travel: only rank 0 samples, and the
next step carries them. "new" is in the order the rows join; every rank splits it into the same prefill
forwards (kv.prefill_groups, a function of the prompts' lengths). On one rank nothing is sent.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from launcher.serve.kv import KVBatch, prefill_groups

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


class Channel:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))

    def send(self, msg: dict) -> None:
        if self.world > 1:
            dist.broadcast_object_list([msg], src=0)

    def recv(self) -> dict:
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def execute(kv: KVBatch, step: dict, with_adapters: bool, on_decode: Callable | None = None,
            on_prefill: Callable | None = None) -> None:
    """Apply one step to this rank's cache: keep, decode the kept rows, prefill the new ones in the groups
    `prefill_groups` makes of them. Rank 0 samples as each forward ends (`on_decode(logits)`,
    `on_prefill(group range, logits)`), so a group's first tokens stream before the next group runs."""
    def names(items: list) -> list[str] | None:
        return [a or BASE for a in items] if with_adapters else None

    with torch.inference_mode():
        kv.keep(step["keep"])
        if step["tokens"]:
            logits = kv.decode(step["tokens"], names(step["adapters"]))
            if on_decode is not None:
                on_decode(logits)
        new = step["new"]
        for group in prefill_groups([len(ids) for ids, _ in new]):
            logits = kv.prefill([new[i][0] for i in group], names([new[i][1] for i in group]))
            if on_prefill is not None:
                on_prefill(group, logits)


def follow(kv: KVBatch, channel: Channel, with_adapters: bool, grace: float) -> str:
    """A non-zero rank's life: run rank 0's steps until it says quit. SIGTERM here only starts a
    watchdog (rank 0 drains and then says quit); past the grace the rank leaves on its own."""
    def on_term(signum, frame) -> None:
        def watchdog() -> None:
            time.sleep(grace)
            os._exit(128 + signum)
        threading.Thread(target=watchdog, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_term)
    while True:
        step = channel.recv()
        if "quit" in step:
            return step["quit"]
        execute(kv, step, with_adapters)
