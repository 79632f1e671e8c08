"""Benchmark (not a test): `labs serve` throughput and time to first token at concurrency 1, 4, 8 against a
plain sequential `model.generate` loop on the same weights, in the same invocation.

    python bench/serve.py [--model llama-small] [--tokens 64] [--requests 16] [--repeats 3] [--threads 1]
                          [--prompt-tokens 0] [--tp 1] [--concurrency 1,4,8] [--dtype fp32|bf16]
                          [--out serve.json]

The server and the sequential loop run in the same dtype (--dtype: bf16 where the CPU lists avx512_bf16 or
amx_bf16, else fp32, as `labs serve`'s default), the same threads and the same weights.

Writes bench/results/serve.json (or --out) and prints a markdown table (median and range over the repeats)
and the load average seen at the start and after each repeat (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's launcher, not an installed one
from serve_helpers import REPO, Server  # noqa: E402

PROMPTS = ["The history of parallel computing", "Tensor parallelism splits", "On a small CPU machine,",
           "A language model server"]


FILLER = (" Each of the workers holds a part of the model, and the parts talk to each other at every layer"
          " so that the answer is the same as on one machine")


def make_prompts(model_name: str, n_tokens: int) -> list[str]:
    """The four prompts, each padded with FILLER and cut to `n_tokens` tokens of the model's tokenizer
    (0: as they are)."""
    if n_tokens <= 0:
        return list(PROMPTS)
    from tasks.causal_lm import load_tokenizer  # the tokenizer alone: no model built for it
    tok = load_tokenizer(model_name, model_name)
    out = []
    for p in PROMPTS:
        ids = tok(p + FILLER * (1 + n_tokens // 20), add_special_tokens=False)["input_ids"][:n_tokens]
        out.append(tok.decode(ids))
    return out


def sequential(model_name: str, seed: int, n: int, tokens: int, threads: int, dtype: str) -> float:
    """tokens/s of a plain loop: one model.generate per request, greedy, exactly `tokens` new tokens, in the
    server's dtype."""
    import torch

    from tasks.causal_lm import build_causal_lm
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, tok = build_causal_lm(model_name)
    model.eval().to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    t0 = time.perf_counter()
    for i in range(n):
        x = tok(f"{PROMPTS[i % 4]} {i}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)
    return n * tokens / (time.perf_counter() - t0)


def served(server: Server, concurrency: int, n: int, tokens: int) -> tuple[float, list[float]]:
    """(tokens/s, the TTFTs) of n streamed requests, `concurrency` at a time."""
    client = server.client()

    def one(i: int) -> tuple[float, int]:
        t0, first, count = time.perf_counter(), None, 0
        for chunk in client.completions.create(model=server.name, prompt=f"{PROMPTS[i % 4]} {i}", max_tokens=tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True}):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if chunk.usage:
                count = chunk.usage.completion_tokens
        return first or 0.0, count

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, range(n)))
    return sum(c for _, c in out) / (time.perf_counter() - t0), [f for f, _ in out]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-small")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tp", type=int, default=1, help="the server's tensor-parallel ranks (the baseline: one process)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="pad each prompt to this many tokens (0: a few words)")
    p.add_argument("--concurrency", default="1,4,8", help="the concurrencies served, comma-separated")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 where the CPU has it, else fp32")
    p.add_argument("--out", default="serve.json", help="file name under bench/results/")
    args = p.parse_args()
    if args.dtype is None:  # the server's own rule, resolved here so that the loop gets the same
        from launcher.serve_cli import serve_dtype
        args.dtype = serve_dtype("auto")[0]
    PROMPTS[:] = make_prompts(args.model, args.prompt_tokens)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: dict[str, list] = {"sequential": [], **{f"c{c}": [] for c in levels}}
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        server = Server([args.model, "--threads", str(args.threads), "--max-batch", "8", "--tp", str(args.tp),
                         "--dtype", args.dtype],
                        Path(tmp) / "bench")
        server.name = args.model
        try:
            server.wait_ready()
            served(server, 4, 4, 8)  # warm-up
            for _ in range(args.repeats):
                rows["sequential"].append((sequential(args.model, 0, args.requests // 2, args.tokens, args.threads,
                                                          args.dtype), []))
                for c in levels:
                    rows[f"c{c}"].append(served(server, c, args.requests, args.tokens))
                load.append(os.getloadavg())
        finally:
            server.stop()
    report(args, rows, load)


def report(args, rows: dict[str, list], load: list[tuple[float, float, float]]) -> None:
    """The markdown table (tokens/s and each repeat's TTFT p95: median and range over the repeats; TTFT p50
    over all requests) and bench/results/OUT with every figure and the load averages seen."""
    def span(xs: list[float], fmt: str) -> str:
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    base = statistics.median(r[0] for r in rows["sequential"])
    lines = ["| run | tokens/s median (range) | x sequential | TTFT p50 (s) | TTFT p95 median (range) (s) |",
             "|---|---|---|---|---|"]
    result = {"args": vars(args), "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "load_average_1_5_15_min": {"start": load[0], "after_each_repeat": load[1:]}, "runs": {}}
    for name, runs in rows.items():
        tps = [r[0] for r in runs]
        ttft = [f for r in runs for f in r[1]]
        p50 = f"{pct(ttft, 0.5):.3f}" if ttft else "-"
        p95 = span([pct(r[1], 0.95) for r in runs], ".3f") if ttft else "-"
        lines.append(f"| {name} | {span(tps, '.1f')} | {statistics.median(tps) / base:.2f} | {p50} | {p95} |")
        result["runs"][name] = {"tokens_per_s": tps, "ttft": ttft, "ttft_per_repeat": [r[1] for r in runs]}
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / args.out).write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    print("load average (1 min) at the start and after each repeat: "
          + ", ".join(f"{x[0]:.1f}" for x in load) + f" ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
