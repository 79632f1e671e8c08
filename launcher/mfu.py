"""Model FLOPs utilisation: the FLOPs a training token costs, the machine's peak, and their ratio.

    labs peak [--dtype fp32 bf16] [--threads 1 2] [--refresh]     # the cached peaks; measures missing ones

FLOPs per token (model FLOPs, as PaLM's appendix B and torchtitan count them; activation
recomputation is not counted, so this is MFU, not HFU):

    full training:  6 * N + 12 * L * h * s
    LoRA:           4 * N + 6 * A + 12 * L * h * s

N: the matmul parameters (every Linear weight of the blocks, plus the LM head or classifier; not the
embedding lookup, norms or biases), L layers, h = heads x head_dim, s the sequence length, A the LoRA
adapter parameters. 6N = forward (2N) + backward through activations (2N) + weight gradients (2N);
a frozen base (LoRA) costs the first two only. 12*L*h*s is the attention score and value matmuls
(forward 4*L*h*s, backward twice that), counted over the full s x s square as PaLM does.

Peak: on a GPU the dense bf16/fp16 tensor peak of its datasheet (table below); on a CPU, or a GPU
not in the table, a short matmul probe (best of a few square matmuls) per dtype and thread count,
cached per machine in $LABS_CACHE_DIR/peak.json (default ~/.cache/llm-labs), keyed by device
model + dtype + threads. MFU = achieved FLOP/s / (ranks x peak per rank); the denominator is
always printed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("labs")

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s per device.
# Matched on the CUDA device name, most specific first.
GPU_PEAK_BF16: list[tuple[tuple[str, ...], float]] = [
    (("H100", "NVL"), 835e12), (("H100", "PCIE"), 756e12), (("H100",), 989e12), (("H200",), 989e12),
    (("GH200",), 989e12), (("H800",), 989e12), (("H20",), 148e12), (("B200",), 2250e12),
    (("A100",), 312e12), (("A800",), 312e12), (("A30",), 165e12), (("A10",), 125e12),
    (("L40S",), 362e12), (("L40",), 181e12), (("L4",), 121e12), (("V100",), 125e12),  # V100: fp16
    (("MI300X",), 1307e12), (("MI325X",), 1307e12), (("MI250X",), 383e12),
]
DTYPES = ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------- FLOPs per token

@dataclass(frozen=True)
class TokenFlops:
    """FLOPs of one training token (forward + backward) and how they were counted."""

    total: float
    matmul_params: int  # N: frozen ones too
    adapter_params: int  # A: LoRA adapters (0: full training)
    attention: float  # 12*L*h*s
    seq_len: int
    formula: str

    def describe(self) -> str:
        return (f"{self.total / 1e6:,.1f} MFLOP/token = {self.formula} (N = {self.matmul_params:,} matmul params"
                + (f", A = {self.adapter_params:,} LoRA params" if self.adapter_params else "")
                + f", attention {self.attention / 1e6:,.2f} MFLOP at s = {self.seq_len})")


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def matmul_shape(cfg: Any, vocab: int | None = None) -> tuple[int, int, int] | None:
    """(N matmul parameters, layers, attention width h) from a model config (an HF config or a
    tasks/presets.py dict); None for an architecture this count does not know."""
    arch = _get(cfg, "arch", "model_type")
    vocab = vocab or _get(cfg, "vocab_size")
    if arch in ("llama", "mistral", "qwen2", "qwen3"):
        h, i, n = cfg_ints(cfg, "hidden_size", "intermediate_size", "num_hidden_layers")
        heads = _get(cfg, "num_attention_heads")
        kv = _get(cfg, "num_key_value_heads", default=heads)
        hd = _get(cfg, "head_dim") or h // heads
        block = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i
        return n * block + vocab * h, n, heads * hd
    if arch == "gpt2":
        h, n = cfg_ints(cfg, "n_embd", "n_layer")
        inner = _get(cfg, "n_inner") or 4 * h
        return n * (4 * h * h + 2 * h * inner) + vocab * h, n, h
    if arch == "bert":  # sequence classifier: pooler + head run on one token per sequence (left out)
        h, i, n = cfg_ints(cfg, "hidden_size", "intermediate_size", "num_hidden_layers")
        return n * (4 * h * h + 2 * h * i), n, h
    return None


def cfg_ints(cfg: Any, *names: str) -> list[int]:
    return [int(_get(cfg, n)) for n in names]


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions: the full size


def _module_matmul_params(model) -> int:
    """Fallback for unknown architectures: the weights of every Linear (and GPT-2 Conv1D) module."""
    import torch
    total = 0
    for name, mod in model.named_modules():
        if "lora_" in name:
            continue
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            total += _numel(mod.weight)
    return total


def model_flops(model, seq_len: int) -> TokenFlops:
    """FLOPs per training token of `model` (an HF model, a PEFT model, or one wrapped by ZeRO-3: sizes
    come from the config and `ds_numel`) at sequence length `seq_len`."""
    cfg = getattr(model, "config", None)
    shape = matmul_shape(cfg) if cfg is not None else None
    if shape is None:
        n = _module_matmul_params(model)
        layers = int(_get(cfg, "num_hidden_layers", "n_layer", default=0) or 0) if cfg is not None else 0
        width = int(_get(cfg, "hidden_size", "n_embd", default=0) or 0) if cfg is not None else 0
    else:
        n, layers, width = shape
    adapters = sum(_numel(p) for name, p in model.named_parameters() if "lora_" in name)
    return token_flops(n, layers, width, seq_len, adapters)


def token_flops(n: int, layers: int, width: int, seq_len: int, adapters: int = 0) -> TokenFlops:
    attention = 12.0 * layers * width * seq_len
    if adapters:
        total = 4.0 * n + 6.0 * adapters + attention
        formula = "4N (frozen base: forward + backward through activations) + 6A (LoRA) + 12*L*h*s"
    else:
        total = 6.0 * n + attention
        formula = "6N + 12*L*h*s"
    return TokenFlops(total, n, adapters, attention, seq_len, formula)


def preset_flops(name: str, seq_len: int) -> TokenFlops:
    """FLOPs per token of a tasks/presets.py model, by arithmetic only."""
    from tasks.presets import PRESETS, VOCAB
    cfg = PRESETS[name]
    shape = matmul_shape(cfg, VOCAB[cfg["tokenizer"]])
    if shape is None:
        raise KeyError(name)
    return token_flops(*shape, seq_len)


# ---------------------------------------------------------------- peak FLOP/s

def cache_file() -> Path:
    return Path(os.environ.get("LABS_CACHE_DIR") or Path.home() / ".cache" / "llm-labs") / "peak.json"


def cpu_model() -> str:
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        name += f" (family {info['cpu family']} model {info.get('model', '?')})"
    return name


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch
        return "cuda: " + torch.cuda.get_device_name(torch.device(device))
    return "cpu: " + cpu_model()


def table_peak(name: str, dtype: str) -> float | None:
    if dtype not in ("bf16", "fp16"):
        return None
    upper = name.upper()
    for words, flops in GPU_PEAK_BF16:
        if all(w in upper for w in words):
            return flops
    return None


def _torch_dtype(dtype: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def measure_matmul(dtype: str, threads: int, device: str = "cpu", sizes: tuple[int, ...] | None = None,
                   repeats: int = 3, budget_s: float = 3.0) -> dict[str, Any]:
    """Best FLOP/s of square matmuls (several sizes: on CPUs the fastest kernel differs by size)."""
    import torch
    sizes = sizes or ((4096, 8192) if device.startswith("cuda") else (1024, 2048, 3072))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    best, best_n, start = 0.0, 0, time.perf_counter()
    try:
        for n in sizes:
            a = torch.randn(n, n, dtype=_torch_dtype(dtype), device=device)
            b = torch.randn(n, n, dtype=_torch_dtype(dtype), device=device)
            a @ b  # warm-up (kernel choice, page faults)
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                a @ b
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                rate = 2.0 * n**3 / (time.perf_counter() - t0)
                if rate > best:
                    best, best_n = rate, n
            if time.perf_counter() - start > budget_s:
                break
    finally:
        torch.set_num_threads(old)
    return {"flops": best, "size": best_n}


@dataclass(frozen=True)
class Peak:
    flops: float  # per rank
    dtype: str
    threads: int
    device: str
    source: str  # "measured <date>", "cached, measured <date>", "datasheet"

    def describe(self, ranks: int = 1) -> str:
        per = f"{fmt_flops(self.flops)}/rank" if ranks > 1 else fmt_flops(self.flops)
        total = f"{fmt_flops(self.flops * ranks)} = {ranks} ranks x " if ranks > 1 else ""
        return f"{total}{per} ({self.dtype}, {self.threads} thread{'s' * (self.threads != 1)}, {self.source}; {self.device})"


def _key(device: str, dtype: str, threads: int) -> str:
    return f"{device} | {dtype} | {threads} threads"


def read_cache() -> dict[str, Any]:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    """Merge one entry into the cache file (atomic replace; concurrent writers lose nothing but races)."""
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_cache()
    data[key] = entry
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def peak(dtype: str = "fp32", threads: int | None = None, device: str = "cpu", refresh: bool = False,
         measure=None, replace: bool = False) -> Peak:
    """The peak FLOP/s of one rank: datasheet for known GPUs, else measured once and cached. `refresh`
    measures again and keeps the higher of the new and the cached figure (a peak is what the machine
    can do; a moment when other processes share the cores measures less); with `replace`, the new one."""
    import torch
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    threads = threads or torch.get_num_threads()
    name = device_name(device)
    if device.startswith("cuda"):
        threads = 1
        if (flops := table_peak(name, dtype)) is not None:
            return Peak(flops, dtype, threads, name, "datasheet, dense")
    key = _key(name, dtype, threads)
    cached = read_cache().get(key)
    if cached is None or refresh:
        entry = dict((measure or measure_matmul)(dtype, threads, device))
        entry.update(when=dt.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__)
        if cached is not None and not replace and cached["flops"] >= entry["flops"]:
            return Peak(cached["flops"], dtype, threads, name, f"measured {cached['when'][:10]}, {cached['size']}^2 "
                        f"matmul, cached (now {fmt_flops(entry['flops'])})")
        _write_cache(key, entry)
        return Peak(entry["flops"], dtype, threads, name, f"measured now, {entry['size']}^2 matmul")
    entry = cached
    return Peak(entry["flops"], dtype, threads, name, f"measured {entry['when'][:10]}, {entry['size']}^2 matmul, cached")


def fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x / 1e6:,.1f} MFLOP/s"


# ---------------------------------------------------------------- the meter a run uses

class Meter:
    """FLOPs per token and peak of one run (on global rank 0); logs both once when made."""

    def __init__(self, flops: TokenFlops, peak_: Peak, ranks: int):
        self.flops, self.peak, self.ranks = flops, peak_, ranks
        self.denominator = peak_.flops * ranks

    def fields(self, tokens: float, seconds: float) -> dict[str, float]:
        achieved = self.flops.total * tokens / seconds if seconds > 0 else 0.0
        return {"flops_per_s": achieved, "mfu": achieved / self.denominator if self.denominator else 0.0}

    def summary(self, tokens: float, seconds: float) -> dict[str, Any]:
        return {**self.fields(tokens, seconds), "flops_per_token": self.flops.total,
                "flops_formula": self.flops.formula, "peak_flops": self.denominator,
                "peak": self.peak.describe(self.ranks)}


_METERS: dict[int, Meter | None] = {}


def for_run(model, micro: list[dict[str, Any]], cfg: dict[str, Any], layout) -> Meter | None:
    """The run's meter (made at the first call, on global rank 0 only; None on other ranks):
    sequence length from the batch, precision from the DeepSpeed config, every rank assumed to run
    as many threads as rank 0 on the same kind of device."""
    key = id(model)
    if key not in _METERS:
        meter = None
        if int(os.environ.get("RANK", "0")) == 0:
            try:
                import torch

                from launcher import checkpoints
                device = "cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "cpu"
                flops = model_flops(model, int(micro[0]["input_ids"].shape[-1]))
                meter = Meter(flops, peak(checkpoints.precision(cfg), device=device), layout.world)
                log.info("FLOPs per token: %s", flops.describe())
                log.info("peak for MFU: %s", meter.peak.describe(layout.world))
            except Exception as e:  # a metric must never end a training run
                log.warning("MFU not available: %s: %s", type(e).__name__, e)
        _METERS[key] = meter
    return _METERS[key]


def train_fields(model, micro, cfg, layout, tokens: float, seconds: float) -> dict[str, float]:
    meter = for_run(model, micro, cfg, layout)
    return meter.fields(tokens, seconds) if meter else {}


def summary_fields(model, tokens: float, seconds: float) -> dict[str, Any]:
    meter = _METERS.get(id(model))
    return meter.summary(tokens, seconds) if meter else {}


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's FLOP/s and MFU lines (empty when the run has no meter)."""
    if "mfu" not in s:
        return []
    return [("FLOP/s", f"{fmt_flops(s['flops_per_s'])} ({s['flops_per_token'] / 1e6:,.1f} MFLOP/token: "
                       f"{s['flops_formula']})"),
            ("MFU", f"{100 * s['mfu']:.1f}% of {s['peak']}")]


# ---------------------------------------------------------------- `labs peak`

def main(argv: list[str] | None = None) -> int:
    import torch
    p = argparse.ArgumentParser(prog="labs peak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", choices=DTYPES, help="default: fp32 and bf16")
    p.add_argument("--threads", nargs="+", type=int, help="default: 1 and every core this process may use")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--refresh", action="store_true", help="measure again; keep the higher of the new and the cached")
    p.add_argument("--replace", action="store_true", help="with --refresh: keep the new figure even if lower")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or sorted({1, cores})
    print(f"cache: {cache_file()}")
    for dtype in args.dtype or ["fp32", "bf16"]:
        for t in threads:
            pk = peak(dtype, t, args.device, refresh=args.refresh or args.replace, replace=args.replace)
            print(f"  {dtype:<5} {t:>3} thread{'s' if t != 1 else ' '}  {fmt_flops(pk.flops):>14}  {pk.source}")
    print(f"device: {device_name(args.device)}; torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
