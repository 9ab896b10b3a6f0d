"""`segdeploy export` (not implemented yet)."""

from __future__ import annotations

import click


@click.command()
def export() -> None:
    """Not implemented yet."""
    click.echo("segdeploy export: not implemented yet", err=True)
    raise SystemExit(2)
