"""Validation reports as tables on the terminal: the figures that decide, and the verdict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segdeploy.validate.report import validation_path


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.3f}%"


def _sci(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def summary_table(reports: Sequence[dict[str, Any]]):
    """One column per graph (PyTorch first): the figures that decide, and the verdict."""
    from rich.table import Table

    table = Table(title="ONNX export vs PyTorch", title_justify="left")
    table.add_column("")
    table.add_column("torch", justify="right")
    for r in reports:
        table.add_column(r["graph"], justify="right")
    ran = [r for r in reports if not r.get("skipped")]
    first = ran[0] if ran else {}

    def row(label: str, torch_cell: str, cell) -> None:
        table.add_row(label, torch_cell, *["-" if r.get("skipped") else cell(r) for r in reports])

    row("mean IoU", _fmt(first.get("mean_iou_torch")), lambda r: _fmt(r.get("mean_iou_onnx")))
    row("mIoU drop", "", lambda r: _fmt(r.get("mean_iou_drop"), 5))
    row(
        "tolerance",
        "",
        lambda r: (
            _fmt(r["tolerance"])
            if r.get("tolerance") is not None
            else f"logits {r['logit_tolerance']:g}"
        ),
    )
    row("pixel agreement", "", lambda r: _pct(r.get("pixel_agreement")))
    row("max |Δ logit|", "", lambda r: _sci(r.get("max_abs_logit_diff")))
    row("mean |Δ logit|", "", lambda r: _sci(r.get("mean_abs_logit_diff")))
    row("images", str(first.get("images", "-")), lambda r: str(r["images"]))
    row("precision, opset", "fp32", lambda r: f"{r['precision']}, {r['opset']}")
    row("provider", "cpu", lambda r: r["provider"])
    row(
        "run time",
        f"{first['timings']['torch_s']:.1f}s" if first else "-",
        lambda r: f"{r['timings']['onnx_s']:.1f}s",
    )
    table.add_row(
        "result",
        "",
        *[
            "[yellow]SKIPPED"
            if r.get("skipped")
            else ("[green]PASS" if r["passed"] else "[bold red]FAIL")
            for r in reports
        ],
    )
    return table


def class_table(reports: Sequence[dict[str, Any]]):
    """Per-class IoU of PyTorch and of each graph (dataset mode only); None otherwise."""
    from rich.table import Table

    with_classes = [r for r in reports if r.get("per_class_iou")]
    if not with_classes:
        return None
    table = Table(title="IoU per class", title_justify="left")
    table.add_column("class")
    table.add_column("torch", justify="right")
    for r in with_classes:
        table.add_column(r["graph"], justify="right")
    for i, row in enumerate(with_classes[0]["per_class_iou"]):
        table.add_row(
            row["class"],
            _fmt(row["torch"]),
            *[_fmt(r["per_class_iou"][i]["onnx"]) for r in with_classes],
        )
    return table


def print_reports(reports: Sequence[dict[str, Any]], console=None) -> None:
    """The tables and, for each graph, the reason of its verdict."""
    from rich.console import Console

    console = console or Console()
    classes = class_table(reports)
    if classes is not None:
        console.print(classes)
    console.print(summary_table(reports))
    notes = {r["note"] for r in reports if r.get("note")}
    for note in sorted(notes):
        console.print(f"[yellow]note[/]: {note}")
    for r in reports:
        console.print(f"{r['graph']}: {r['reason']}", highlight=False)


def print_outcome(reports: Sequence[dict[str, Any]], seconds: float | None = None) -> None:
    """The tables, a warning per skipped graph, the validation time (`seconds`, else the
    report's) and where each report was written."""
    import click

    print_reports(reports)
    for r in reports:
        if r.get("skipped"):
            click.echo(f"warning: {r['graph']} not validated: {r['reason']}", err=True)
    ran = [r for r in reports if not r.get("skipped")]
    if ran:
        seconds = ran[0]["timings"]["total_s"] if seconds is None else seconds
        click.echo(f"validation: {ran[0]['images']} images in {seconds:.1f} s")
    for r in reports:
        if r.get("onnx_dir"):
            click.echo(f"report: {validation_path(Path(r['onnx_dir']) / r['graph'])}")
