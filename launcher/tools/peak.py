"""`labs peak`: print (and measure if missing) the matmul peaks MFU divides by.
"""

from __future__ import annotations

import argparse
import os
import sys

from launcher.common.cache import cache_file, device_name
from launcher.common.text import fmt_flops
from launcher.estimate.flops import DTYPES
from launcher.rank.peak import peak


def main(argv: list[str] | None = None) -> int:
    # keeps torch and DeepSpeed out of the labs process
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
