"""Progress bars for the long parts (embedding a collection, evaluating thousands of questions): global
rank 0 only, and only on a terminal; callers print one line with the counts when a part ends."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def bar(total: int, desc: str, unit: str = "it"):
    """A tqdm bar on stderr: drawn on rank 0 when stderr is a terminal, silent otherwise."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    return tqdm(total=total, desc=desc, unit=unit, disable=None if rank0 else True, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, leave=False)
