"""`python -m tasks.rag ...` (also `deepspeed --module tasks.rag`, `torchrun -m tasks.rag`)."""

import sys

from tasks.api import LabsError
from tasks.rag.cli import main

if __name__ == "__main__":
    from launcher.rank.main import leave  # under a launcher: a last barrier, then leave without gloo teardown
    try:
        code = main()
    except LabsError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    leave(code)
