"""Starting and stopping a real `labs serve` process for tests/test_serve.py and bench/serve.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def reference(name: str = "llama-tiny"):
    """(model, tokenizer) as a rank of `labs serve NAME` builds them (a preset's seed-0 weights)."""
    import torch

    from tasks.causal_lm import build_causal_lm
    torch.manual_seed(0)
    model, tok = build_causal_lm(name)
    return model.eval(), tok


def generate(model, tok, ids: list[int], n: int) -> str:
    """Plain greedy `model.generate`: what a served temperature-0 completion must equal."""
    import torch
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


class Server:
    """`labs serve ARGS` on 127.0.0.1 and a free port; `url` once /health says ready. Without a --dtype in ARGS
    it serves fp32, as `reference` builds the model (the default, auto, is bf16 on a CPU with bf16)."""

    def __init__(self, args: list[str], out: Path, key: str | None = None, env: dict | None = None):
        from launcher.common.proc import free_port
        if "--dtype" not in args:
            args = [*args, "--dtype", "fp32"]
        self.port, self.key, self.out = free_port(), key, out
        self.log = open(out.with_suffix(".console.log"), "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "launcher.cli", "serve", *args, "--port", str(self.port), "--out", str(out)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=os.environ | {"PYTHONPATH": str(REPO)} | (env or {}))
        self.health_codes: list[int] = []

    @classmethod
    def around(cls, cmd: list[str], port: int, out: Path, env: dict) -> Server:
        """The same health poll, client and stop for another command that serves on `port` (a container)."""
        self = cls.__new__(cls)
        self.port, self.key, self.out, self.health_codes = port, None, out, []
        self.log = open(out.with_suffix(".console.log"), "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"labs serve exited {self.proc.returncode}:\n{self.console()}")
            try:
                code = httpx.get(self.url + "/health", timeout=2).status_code
                self.health_codes.append(code)
                if code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"not ready in {timeout} s:\n{self.console()}")

    def console(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.out.with_suffix(".console.log").read_text()[-6000:]

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, timeout=60, **kw)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers(), timeout=5).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def shm_files(port_hint: str) -> list[str]:
    """DeepSpeed's CPU comm op files in /dev/shm of this user named by a rendezvous port."""
    return [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port_hint}_*")]


def serve_ranks(serve_dir: Path) -> list[int]:
    """The rank processes of a serve folder (their command line names its serve.json)."""
    spec = str(serve_dir / "serve.json")
    out = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = p.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launcher.serve.rank" in cmd and spec.encode() in cmd:
            out.append(int(p.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
