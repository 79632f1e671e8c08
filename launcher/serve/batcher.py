"""The engine thread: continuous batching of concurrent requests over one KV cache.

Each iteration: finished and cancelled rows leave; every running row decodes one token in one forward;
waiting requests join (up to `max_batch` running), their prompts prefilled together: one forward per
group of similar lengths, shortest first, each group's first tokens streamed as its forward ends. The HTTP
event loop never runs the model: it `submit`s a Sequence and reads its events from an asyncio queue.

States: loading -> ready -> draining (SIGTERM: new requests refused, running ones finish until the
grace ends, then are cut) -> stopped; or failed (the model did not load, or a rank is gone).
"""

from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from launcher.serve.metrics import Metrics
from launcher.serve.ranks import Channel, execute
from launcher.serve.sequence import Sequence, sample


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Engine:
    def __init__(self, load: Callable[[], object], metrics: Metrics, max_batch: int, max_queue: int,
                 stop_file: Path | None = None):
        self._load, self.metrics = load, metrics
        self.max_batch, self.max_queue, self.stop_file = max_batch, max_queue, stop_file
        self.cond = threading.Condition()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.rows: list[Sequence] = []
        self.state, self.error = "loading", ""
        self.deadline, self.grace = float("inf"), 10.0
        self.loaded = None  # models.Loaded, once loaded
        self.channel = Channel()
        self.on_stop: Callable[[], None] = lambda: None
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    # ------------------------------------------------------------ HTTP side (event loop thread)
    def submit(self, seq: Sequence) -> None:
        with self.cond:
            if self.state != "ready":
                raise Refused(503, f"the server is {self.state}" + (f": {self.error}" if self.error else ""))
            if len(self.waiting) >= self.max_queue:
                raise Refused(429, f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue}); "
                                   f"retry later")
            self.waiting.append(seq)
            self.metrics.queue.set(len(self.waiting))
            self.cond.notify()

    def drain(self, grace: float, why: str) -> None:
        with self.cond:
            if self.state in ("loading", "ready"):
                self.state, self.error, self.deadline = "draining", why, time.monotonic() + grace
            self.cond.notify()

    # ------------------------------------------------------------ engine thread
    def run(self) -> None:
        try:
            _lower_priority()
            self.loaded = self._load()
            with self.cond:
                if self.state == "loading":
                    self.state = "ready"
            self._loop()
            self.channel.send({"quit": self.error or "stopped"})
            self.state = "stopped"
        except Exception as e:  # a rank is gone (gloo), or the model failed: /health says so, the server ends
            self.state, self.error = "failed", f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
            for seq in [*self.rows, *self.waiting]:
                seq.cut(503, f"the server failed: {self.error}")
        finally:
            self.on_stop()

    def _next(self) -> list[Sequence] | None:
        """Requests to admit now ([] for none); None when drained and stopping."""
        with self.cond:
            self._check_stop_file()
            while not self.rows and not self.waiting:
                if self.state == "draining":
                    return None
                self.cond.wait(0.25)
                self._check_stop_file()
            room = self.max_batch - sum(not s.done for s in self.rows)
            admit = []
            while self.waiting and len(admit) < room:
                seq = self.waiting.popleft()
                if not seq.cancelled:
                    admit.append(seq)
            self.metrics.queue.set(len(self.waiting))
            return admit

    def _check_stop_file(self) -> None:
        """`labs serve` writes STOP into the serve folder on SIGTERM (ranks on other hosts get no signal)."""
        if self.stop_file is not None and self.state == "ready" and self.stop_file.exists():
            self.state, self.deadline = "draining", time.monotonic() + self.grace
            self.error = "stopping (SIGTERM to labs serve)"

    def _loop(self) -> None:
        while (admit := self._next()) is not None:
            if self.state == "draining" and time.monotonic() > self.deadline:
                self._cut_all("the server is shutting down (SIGTERM) and its grace time is over")
            self.step(admit)

    def _cut_all(self, message: str) -> None:
        with self.cond:
            for seq in [*self.rows, *self.waiting]:
                if not seq.done:
                    seq.cut(503, message + f" after {len(seq.out_ids)} tokens")
            self.waiting.clear()

    def step(self, admit: list[Sequence]) -> None:
        """One batch step on every rank: drop finished rows, decode the running ones, prefill the new ones
        (shortest prompts first, similar lengths together in one forward: kv.prefill_groups); each
        forward's tokens are accepted (streamed) as soon as it ends."""
        for s in self.rows:
            if s.done:
                self.metrics.finished(s)  # cancelled (client gone) or cut; the others were counted at their end
        keep = [i for i, s in enumerate(self.rows) if not s.done]
        self.rows = [self.rows[i] for i in keep]
        admit = sorted(admit, key=lambda s: len(s.prompt_ids))  # stable: arrival order among equal lengths
        msg = {"keep": keep, "tokens": [s.pending for s in self.rows], "adapters": [s.adapter for s in self.rows],
               "new": [[s.prompt_ids, s.adapter] for s in admit]}
        self.metrics.running.set(len(self.rows) + len(admit))
        self.channel.send(msg)
        tok = self.loaded.tokenizer

        def accept(seqs: list[Sequence], logits) -> None:
            for s, t in zip(seqs, sample(logits, seqs), strict=True):
                self._accept(s, t, tok)

        execute(self.loaded.kv, msg, self.loaded.with_adapters, on_decode=lambda logits: accept(self.rows, logits),
                on_prefill=lambda group, logits: accept([admit[i] for i in group], logits))
        self.rows += admit
        self.metrics.running.set(sum(not s.done for s in self.rows))

    def _accept(self, s: Sequence, token: int, tok) -> None:
        if s.done:  # cancelled while its token was computed
            return
        self.metrics.token(s)
        s.accept(token, tok)
        if s.done:
            self.metrics.finished(s)


def _lower_priority(niceness: int = 5) -> None:
    """This thread (the model) yields the CPU to the HTTP thread when both want it: /health and the
    streams stay responsive under load on a machine with few cores (Linux: a thread has its own nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (OSError, AttributeError):
        pass
