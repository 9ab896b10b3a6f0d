"""Split expressions ("train[:50]", "train[10%:20%]", "train+validation") for any source.

Parsed by `datasets.ReadInstruction`, the same machinery `load_dataset(split=...)`
uses, so local folders and save_to_disk folders accept exactly the Hub syntax.
"""

from __future__ import annotations

from collections.abc import Mapping

from segdeploy.errors import SegdeployError


def split_names(expr: str, *, option: str = "--split") -> list[str]:
    """Split names an expression refers to, in order ("train[:5]+val" -> ["train", "val"])."""
    _parse(expr, option)
    return [part.split("[", 1)[0].strip() for part in expr.split("+")]


def resolve_split(
    expr: str, lengths: Mapping[str, int], *, where: str, option: str = "--split"
) -> list[tuple[str, int, int]]:
    """Absolute (split, start, stop) row ranges that `expr` selects, given each split's length."""
    instruction = _parse(expr, option)
    for name in split_names(expr, option=option):
        if name not in lengths:
            available = ", ".join(sorted(lengths)) or "none"
            raise SegdeployError(where, f"has no split {name!r} (available: {available})")
    try:
        absolute = instruction.to_absolute(dict(lengths))
    except (ValueError, AssertionError) as err:
        raise SegdeployError(option, f"{expr!r}: {err}") from None
    ranges = [(a.splitname, a.from_, a.to) for a in absolute]
    if sum(stop - start for _, start, stop in ranges) == 0:
        raise SegdeployError(option, f"{expr!r} selects no rows of {where}")
    return ranges


def _parse(expr: str, option: str):
    from datasets import ReadInstruction

    if not isinstance(expr, str) or not expr.strip():
        raise SegdeployError(option, "split expression is empty")
    try:
        return ReadInstruction.from_spec(expr.replace(" ", ""))
    except (ValueError, AssertionError) as err:
        raise SegdeployError(
            option,
            f"cannot parse split {expr!r} ({err}); use e.g. train, train[:50], train[10%:20%]",
        ) from None
