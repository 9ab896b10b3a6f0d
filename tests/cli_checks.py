"""Checks the hostile tests share on a CLI result."""

from __future__ import annotations


def one_line_error(result, *needles):
    """Exit status 2 with exactly one `error:` line holding every needle, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unexpected" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
