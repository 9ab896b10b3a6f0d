"""`segdeploy bench` (not implemented yet)."""

from __future__ import annotations

import click


@click.command()
def bench() -> None:
    """Not implemented yet."""
    click.echo("segdeploy bench: not implemented yet", err=True)
    raise SystemExit(2)
