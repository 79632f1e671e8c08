"""The matmul peak behind MFU: measured in this process (square matmuls, best of several) and cached per
machine; a GPU of a known kind takes its table peak.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from launcher.common.cache import _key, _write_cache, device_name, read_cache, table_peak
from launcher.common.text import fmt_flops
from launcher.estimate.flops import DTYPES


def _torch_dtype(dtype: str):
    # keeps torch and DeepSpeed out of the labs process
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def measure_matmul(dtype: str, threads: int, device: str = "cpu", sizes: tuple[int, ...] | None = None,
                   repeats: int = 3, budget_s: float = 3.0) -> dict[str, Any]:
    """Best FLOP/s of square matmuls (several sizes: on CPUs the fastest kernel differs by size)."""
    # keeps torch and DeepSpeed out of the labs process
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


def peak(dtype: str = "fp32", threads: int | None = None, device: str = "cpu", refresh: bool = False,
         measure=None, replace: bool = False) -> Peak:
    """The peak FLOP/s of one rank: datasheet for known GPUs, else measured once and cached. `refresh`
    measures again and keeps the higher of the new and the cached figure (a peak is what the machine
    can do; a moment when other processes share the cores measures less); with `replace`, the new one."""
    # keeps torch and DeepSpeed out of the labs process
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
