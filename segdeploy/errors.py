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
        super().__init__(f"{shown(self.where)}: {problem}" if self.where else problem)


def shown(name: str | os.PathLike) -> str:
    """A file name as messages and logs show it: as it is when printable, else quoted with
    escapes (Python's repr), so that a newline in a name cannot forge a line of the log and
    undecodable bytes cannot break the terminal's encoding."""
    text = os.fspath(name)
    return text if text.isprintable() else repr(text)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none).

    Library errors (onnx, onnxruntime, transformers) carry pages of context; the
    one-line SegdeployError keeps their first line, which names the problem.
    """
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: message` with every line joined, cut at `limit` characters (network errors,
    whose useful part is not on the first line)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}"
