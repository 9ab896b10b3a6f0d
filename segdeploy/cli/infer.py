"""`segdeploy infer` (not implemented yet)."""

from __future__ import annotations

import click


@click.command()
def infer() -> None:
    """Not implemented yet."""
    click.echo("segdeploy infer: not implemented yet", err=True)
    raise SystemExit(2)
