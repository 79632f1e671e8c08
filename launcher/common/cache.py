"""This machine's cache ($LABS_CACHE_DIR, default ~/.cache/llm-labs): the framework's memory baseline and the
measured matmul peaks, keyed by host and accelerator (or CPU model); plain files, no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """$LABS_CACHE_DIR, default ~/.cache/llm-labs: what this machine keeps between runs."""
    return Path(os.environ.get("LABS_CACHE_DIR") or Path.home() / ".cache" / "llm-labs")


def baseline_file() -> Path:
    return cache_dir() / "memory_baseline.json"


def _baseline_key() -> str:
    return f"{os.uname().nodename} | {os.environ.get('DS_ACCELERATOR', 'cpu')}"


def cached_baseline() -> dict[str, Any] | None:
    try:
        return json.loads(baseline_file().read_text()).get(_baseline_key())
    except (OSError, ValueError):
        return None


def store_baseline(rss: int, source: str) -> None:
    path = baseline_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[_baseline_key()] = {"bytes": int(rss), "source": source, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def cache_file() -> Path:
    return cache_dir() / "peak.json"


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
        # keeps torch and DeepSpeed out of the labs process
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


# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s per device.
# Matched on the CUDA device name, most specific first.
GPU_PEAK_BF16: list[tuple[tuple[str, ...], float]] = [
    (("H100", "NVL"), 835e12), (("H100", "PCIE"), 756e12), (("H100",), 989e12), (("H200",), 989e12),
    (("GH200",), 989e12), (("H800",), 989e12), (("H20",), 148e12), (("B200",), 2250e12),
    (("A100",), 312e12), (("A800",), 312e12), (("A30",), 165e12), (("A10",), 125e12),
    (("L40S",), 362e12), (("L40",), 181e12), (("L4",), 121e12), (("V100",), 125e12),  # V100: fp16
    (("MI300X",), 1307e12), (("MI325X",), 1307e12), (("MI250X",), 383e12),
]
