"""`segdeploy demo` (not implemented yet)."""

from __future__ import annotations

import click


@click.command()
def demo() -> None:
    """Not implemented yet."""
    click.echo("segdeploy demo: not implemented yet", err=True)
    raise SystemExit(2)
