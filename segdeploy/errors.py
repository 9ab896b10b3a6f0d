"""The one error type that the CLI turns into a one-line message and exit status 2.

Library code raises `SegdeployError` for bad input (a missing file, a mask of the
wrong size, an unknown provider...). It names the offending path or option so
the user can act on it without reading a traceback.
"""

from __future__ import annotations

import os


class SegdeployError(Exception):
    """Bad input or an impossible request; `str(err)` is the one-line message."""

    exit_code = 2

    def __init__(self, where: str | os.PathLike | None, problem: str):
        self.where = None if where is None else str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}" if self.where else problem)
