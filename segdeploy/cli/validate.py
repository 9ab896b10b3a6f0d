"""`segdeploy validate` (not implemented yet)."""

from __future__ import annotations

import click


@click.command()
def validate() -> None:
    """Not implemented yet."""
    click.echo("segdeploy validate: not implemented yet", err=True)
    raise SystemExit(2)
