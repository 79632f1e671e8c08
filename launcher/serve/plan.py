"""What `labs serve` prints before it starts anything, and the spec every rank reads. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from launcher.common.errors import LabsError
from launcher.common.text import fmt_bytes
from launcher.parallel import tensor_parallel_sizes
from launcher.serve.target import Target

LOOPBACK = ("127.0.0.1", "localhost", "::1")
BYTES = {"fp32": 4, "bf16": 2}


def check_tp(target: Target, tp: int) -> None:
    """AutoTP gives each rank whole attention and key-value heads (as training's plan requires): a tp
    that does not divide both is refused here, with the sizes that would work."""
    s = target.shape
    if tp == 1 or s is None:
        return
    bad = [f"{n} {what}" for n, what in ((s.heads, "attention heads"), (s.kv_heads, "key-value heads")) if n % tp]
    if bad:
        valid = tensor_parallel_sizes(s.heads, s.kv_heads)
        raise LabsError(f"--tp {tp}: it does not divide {target.name}'s {' and '.join(bad)} (AutoTP gives each rank "
                        f"whole heads); valid --tp for this model: {', '.join(map(str, valid))}")


@dataclass
class ServePlan:
    target: Target
    tp: int
    host: str
    port: int
    backend: str
    serve_dir: Path
    max_batch: int
    max_queue: int
    grace: float
    seed: int
    api_key: bool
    hostfile: str | None = None
    dtype: str = "fp32"
    dtype_why: str = ""
    command: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def spec(self) -> dict:
        """serve.json: what every rank loads and how rank 0 serves it (never the API key: env LABS_API_KEY)."""
        t = self.target
        return {"name": t.name, "model": t.model, "adapters": t.adapters, "tp": self.tp, "seed": self.seed,
                "host": self.host, "port": self.port, "max_batch": self.max_batch, "max_queue": self.max_queue,
                "grace": self.grace, "dtype": self.dtype}

    def memory_lines(self) -> list[str]:
        """Weights per rank under AutoTP (embeddings and norms whole on every rank; attention, MLP and
        the LM head split N ways) and the KV cache at a full batch of full contexts, in the served dtype."""
        s, ctx = self.target.shape, self.target.context
        if s is None:
            return ["  memory per rank: unknown until the model is loaded (no local config.json)"]
        tp, size = self.tp, BYTES[self.dtype]
        weights = (s.embed + s.final + (s.layers * s.block + s.head) / tp) * size
        kv_token = 2 * s.layers * s.kv_heads * (s.hidden // s.heads) * size / tp
        lines = [f"  memory per rank: weights {fmt_bytes(weights)} ({s.params / 1e6:.1f}M params"
                 + (f", attention/MLP/head split {tp} ways" if tp > 1 else "") + ")"]
        if ctx:
            lines.append(f"    + KV cache {fmt_bytes(kv_token)} per token: up to {fmt_bytes(kv_token * ctx * self.max_batch)}"
                         f" at {self.max_batch} running x {ctx}-token context")
        return lines

    def render(self) -> str:
        t = self.target
        lines = [f"== serve plan: {t.name}", f"  model: {t.source}"]
        if t.adapters:
            lines.append("  adapters (request `model` picks one): " + ", ".join(f"{n} = {p}" for n, p in t.adapters.items()))
        where = f"backend {self.backend}" + (f", hostfile {self.hostfile}" if self.hostfile else "")
        layout = (f"tensor parallel {self.tp} ranks (AutoTP: rank 0 serves HTTP and broadcasts each batch step)"
                  if self.tp > 1 else "1 rank (no tensor parallel)")
        why = f" ({self.dtype_why})" if self.dtype_why else ""
        lines += [f"  precision {self.dtype}{why}; {layout}; {where}", *self.memory_lines(),
                  f"  batching: up to {self.max_batch} running requests, {self.max_queue} waiting (then 429); "
                  f"context {t.context or 'from the model config'}",
                  f"  URL {self.url}  (" + ("API key required on every route but /health" if self.api_key
                                            else "loopback only, no API key") + ")",
                  f"  SIGTERM: new requests 503, running ones get {self.grace:g} s to finish, then every rank exits",
                  f"  serve folder {self.serve_dir} (logs/rank<N>.log)",
                  "  command: " + " ".join(self.command)]
        return "\n".join(lines)
