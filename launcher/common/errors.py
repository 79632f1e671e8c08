"""The one exception type for user mistakes.

A `LabsError` is caught at the CLI (and in each rank's entry point) and printed as one message
with exit code 2. Bugs are any other exception and keep their tracebacks.
"""

from __future__ import annotations


class LabsError(Exception):
    """A user mistake: bad config, missing file, impossible layout. The message names the fix."""
