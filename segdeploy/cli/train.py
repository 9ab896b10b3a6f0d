"""`segdeploy train` (not implemented yet)."""

from __future__ import annotations

import click


@click.command()
def train() -> None:
    """Not implemented yet."""
    click.echo("segdeploy train: not implemented yet", err=True)
    raise SystemExit(2)
